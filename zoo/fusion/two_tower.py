"""The two-tower (late fusion) baseline: one transformer per modality, pooled vectors fused by an MLP."""

from __future__ import annotations

import torch
from torch import nn

from zoo.contracts import FFNFactory, Fused, Fusion, Tokens
from zoo.errors import ConfigError, check_dropout, check_sizes
from zoo.layers.ffn import FeedForward
from zoo.layers.transformer import TransformerBlock, padding_attn_mask


class TwoTower(Fusion):
    """Late fusion: ``{modality: Tokens [B, T_m, dim]} -> Fused(pooled [B, dim], tokens [B, sum T_m, dim])``.

    Every modality has its own tower of ``depth`` pre-norm blocks and its own ``[CLS]`` token; nothing crosses
    modalities until the towers' ``[CLS]`` outputs are concatenated and mixed by a two-layer MLP into ``pooled``.
    With the same ``dim`` and ``depth`` it has as many transformer parameters per modality as MIE has in all.

    Args:
        modalities: names of the modalities, one tower each.
        dim: token width expected and returned.
        depth: blocks per tower.
        num_heads: attention heads.
        mlp_ratio: FFN width over ``dim``.
        ffn: FFN factory for every block.
        dropout: dropout in the blocks.
    """

    def __init__(
        self,
        *,
        modalities: tuple[str, ...] = ("image", "text"),
        dim: int = 128,
        depth: int = 6,
        num_heads: int = 4,
        mlp_ratio: float = 4.0,
        ffn: FFNFactory = FeedForward,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        check_sizes("TwoTower", dim=dim, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio)
        check_dropout("TwoTower", dropout)
        if len(set(modalities)) != len(modalities) or not modalities:
            raise ConfigError(f"TwoTower: modalities={list(modalities)} must be distinct and not empty")
        self.modalities = tuple(modalities)
        self.dim = dim
        self.cls = nn.ParameterDict({m: nn.Parameter(torch.randn(1, 1, dim) * 0.02) for m in self.modalities})
        self.towers = nn.ModuleDict(
            {
                m: nn.ModuleList(
                    TransformerBlock(dim, num_heads, mlp_ratio=mlp_ratio, ffn=ffn, dropout=dropout)
                    for _ in range(depth)
                )
                for m in self.modalities
            }
        )
        self.norms = nn.ModuleDict({m: nn.LayerNorm(dim) for m in self.modalities})
        n = len(self.modalities)
        self.mix = nn.Sequential(nn.Linear(n * dim, n * dim), nn.GELU(), nn.Linear(n * dim, dim))

    def forward(self, inputs: dict[str, Tokens]) -> Fused:
        self.check_modalities(list(inputs))
        pooled, tokens, masks = [], [], []
        for m in self.modalities:
            t = inputs[m]
            B = t.embeddings.shape[0]
            x = torch.cat([self.cls[m].expand(B, -1, -1).to(t.embeddings.dtype), t.embeddings], 1)
            mask = torch.cat([torch.ones(B, 1, dtype=torch.bool, device=t.mask.device), t.mask], 1)
            attn_mask = padding_attn_mask(mask)
            for block in self.towers[m]:
                x = block(x, attn_mask)
            x = self.norms[m](x)
            pooled.append(x[:, 0])
            tokens.append(x[:, 1:])
            masks.append(t.mask)
        return Fused(pooled=self.mix(torch.cat(pooled, -1)), tokens=Tokens(torch.cat(tokens, 1), torch.cat(masks, 1)))
