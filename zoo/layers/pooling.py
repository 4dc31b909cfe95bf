"""Pooling of a token sequence into one vector per example: :class:`Tokens` ``[B, T, D]`` -> ``[B, D]``."""

from __future__ import annotations

from timm.layers import AttentionPoolLatent
from torch import Tensor, nn

from zoo.contracts import Tokens
from zoo.errors import ConfigError


class MeanPool(nn.Module):
    """The mean of the real tokens (:meth:`Tokens.pooled_mean`); no parameters."""

    def forward(self, tokens: Tokens) -> Tensor:
        return tokens.pooled_mean()


class AttentionPool(nn.Module):
    """A learned query attends over the real tokens: ``Tokens [B, T, dim] -> [B, dim]``.

    timm's ``AttentionPoolLatent`` (the multi-head attention pooling of SigLIP's and ViT's ``global_pool="map"``) with
    one latent query and no output MLP: ``softmax(q k^T / sqrt(dim / num_heads)) v`` per head, ``k`` and ``v``
    projections of the tokens, the heads concatenated. Padding positions are masked out; an example with no real
    token pools to zeros.

    Args:
        dim: token width (the encoder's ``out_dim``).
        num_heads: attention heads; must divide ``dim``.
    """

    def __init__(self, dim: int, *, num_heads: int = 8) -> None:
        super().__init__()
        if num_heads < 1 or dim % num_heads:
            raise ConfigError(f"AttentionPool: num_heads={num_heads} must be >= 1 and divide the token width {dim}")
        self.attention = AttentionPoolLatent(dim, out_features=0, num_heads=num_heads)
        # timm adds attn_mask to the scores on its unfused path; the fused path (SDPA) reads a bool mask as intended
        self.attention.fused_attn = True

    def forward(self, tokens: Tokens) -> Tensor:
        empty = ~tokens.mask.any(1, keepdim=True)  # [B, 1]
        # SDPA's result for a row that may attend nowhere differs by backend (zeros on the CPU, not on an H200 under
        # bf16 autocast): such an example attends over all its positions, and its output is set to zeros.
        pooled = self.attention(tokens.embeddings, attn_mask=(tokens.mask | empty)[:, None, None, :])
        return pooled.masked_fill(empty, 0.0)


POOLS = ("mean", "attention")


def build_pool(pool: str, dim: int, *, num_heads: int = 8, owner: str = "pool") -> nn.Module:
    """The pooling named ``pool`` (one of :data:`POOLS`) for tokens of width ``dim``; ``owner`` names the argument in
    errors."""
    if pool == "mean":
        return MeanPool()
    if pool == "attention":
        return AttentionPool(dim, num_heads=num_heads)
    raise ConfigError(f"{owner}={pool!r} is not a pooling; choose one of {list(POOLS)}")


__all__ = ["POOLS", "AttentionPool", "MeanPool", "build_pool"]
