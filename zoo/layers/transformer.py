"""The pre-norm transformer block shared by every transformer in the zoo."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from zoo.contracts import FFNFactory
from zoo.layers.attention import SelfAttention
from zoo.layers.ffn import FeedForward


class TransformerBlock(nn.Module):
    """Pre-norm block: ``x + attn(norm1(x))`` then ``x + ffn(norm2(x))``; ``[B, T, dim] -> [B, T, dim]``.

    Args:
        dim: token width.
        num_heads: attention heads.
        mlp_ratio: FFN hidden width as a multiple of ``dim``.
        ffn: builds the feed-forward layer, ``ffn(dim, hidden_dim)``; the dense :class:`FeedForward` by default, any
            :class:`zoo.contracts.FFN` (e.g. the DSA FFN) from YAML.
        dropout: dropout on attention weights and residual branches.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        mlp_ratio: float = 4.0,
        ffn: FFNFactory = FeedForward,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, num_heads, dropout=dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.ffn = ffn(dim, int(dim * mlp_ratio))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, attn_mask: Tensor | None = None) -> Tensor:
        x = x + self.drop(self.attn(self.norm1(x), attn_mask))
        return x + self.drop(self.ffn(self.norm2(x)))


def padding_attn_mask(mask: Tensor) -> Tensor:
    """Bool attention mask ``[B, 1, T, T]`` from a token mask ``[B, T]``: every query sees the real keys and itself.

    Letting each query see itself keeps a row of all-padding (an empty sequence) from producing NaN in softmax.
    """
    allowed = mask[:, None, None, :].expand(-1, 1, mask.shape[1], -1)
    return allowed | torch.eye(mask.shape[1], dtype=torch.bool, device=mask.device)
