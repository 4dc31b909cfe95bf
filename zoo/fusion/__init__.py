"""Fusion modules: ``{modality: Tokens} -> Fused`` (a pooled vector and the fused tokens)."""

from zoo.fusion.mie import MIE
from zoo.fusion.two_tower import TwoTower

__all__ = ["MIE", "TwoTower"]
