"""Multi-head self-attention on ``scaled_dot_product_attention``."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from zoo.contracts import upgrade_on_load
from zoo.errors import ConfigError, check_dropout, check_sizes


class ScaledDotProduct(nn.Module):
    """The attention product ``softmax(q k^T / sqrt(head_dim) + mask) v``: ``[B, H, T, Dh]`` three times ->
    ``[B, H, T, Dh]``, through ``F.scaled_dot_product_attention``.

    A module of its own, without parameters, so that quantization can swap it by name as it swaps the projections
    (``zoo.quant.quantize_(..., attention_bit=8)`` makes it a ``QATScaledDotProduct``, whose integer form runs the
    product on int8 codes).
    """

    def forward(
        self, q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None = None, dropout_p: float = 0.0
    ) -> Tensor:
        return scaled_dot_product(q, k, v, attn_mask, dropout_p)


def scaled_dot_product(
    q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None = None, dropout_p: float = 0.0
) -> Tensor:
    """``F.scaled_dot_product_attention`` with the mask of :class:`ScaledDotProduct`'s contract: bool (``True`` = may
    attend) or float (added to the logits) in any dtype."""
    if attn_mask is not None and attn_mask.dtype != torch.bool:
        attn_mask = attn_mask.to(q.dtype)  # SDPA wants a float mask in the query's dtype (bf16 under autocast)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p)


class SelfAttention(nn.Module):
    """Multi-head self-attention: ``[B, T, dim] -> [B, T, dim]``.

    Args:
        dim: token width, at least 1; must be divisible by ``num_heads``.
        num_heads: attention heads, at least 1.
        dropout: dropout on the attention weights during training, in ``[0, 1)``.

    ``forward(x, attn_mask)`` takes an optional mask broadcastable to ``[B, num_heads, T, T]``: bool (``True`` =
    may attend) or float (added to the logits, ``-inf`` blocks). The projections are named ``qkv`` and ``proj``, the
    product between them ``sdpa`` (a :class:`ScaledDotProduct`), so that quantization and tensor-parallel plans can
    address them by name. ``qkv``'s outputs are grouped by head,
    ``[num_heads, 3, head_dim]`` (as GPT-NeoX's fused projection), so that a tensor-parallel shard of contiguous
    output rows holds whole heads, each with its query, key and value.
    """

    def __init__(self, dim: int, num_heads: int, *, dropout: float = 0.0) -> None:
        super().__init__()
        check_sizes("SelfAttention", dim=dim, num_heads=num_heads)
        check_dropout("SelfAttention", dropout)
        if dim % num_heads:
            raise ConfigError(f"SelfAttention: dim={dim} must be divisible by num_heads={num_heads}")
        self.dim, self.num_heads, self.dropout = dim, num_heads, dropout
        self.qkv = nn.Linear(dim, 3 * dim)
        with torch.no_grad():  # the rows as drawn in the old order, regrouped: a seed gives the model it gave before
            for param in (self.qkv.weight, self.qkv.bias):
                param.copy_(_group_by_head(param, num_heads))
        self.sdpa = ScaledDotProduct()
        self.proj = nn.Linear(dim, dim)
        # marks checkpoints written with qkv grouped by head; one without the mark has [3, num_heads, head_dim] rows,
        # which loading regroups (same keys and shapes, so nothing else could tell the two apart)
        self.register_buffer("qkv_grouped_by_head", torch.ones((), dtype=torch.bool))
        self.register_load_state_dict_pre_hook(upgrade_on_load)

    def upgrade_state_dict(self, state_dict: dict, prefix: str) -> None:
        """Regroup, in place, the ``qkv`` rows of a state dict written before they were grouped by head."""
        mark = prefix + "qkv_grouped_by_head"
        if mark in state_dict:
            return
        for key in [k for k in state_dict if k.startswith(prefix + "qkv.")]:
            value = state_dict[key]  # every per-output-row tensor: weight, bias, integer codes, per-channel scales
            if torch.is_tensor(value) and value.dim() >= 1 and value.shape[0] == 3 * self.dim:
                state_dict[key] = _group_by_head(value, self.num_heads)
        state_dict[mark] = torch.ones((), dtype=torch.bool)

    def forward(self, x: Tensor, attn_mask: Tensor | None = None) -> Tensor:
        B, T, _ = x.shape
        # [B, T, H, 3, Dh] -> three [B, H, T, Dh]; the head count is read from the output so that a tensor-parallel
        # shard (which holds num_heads / tp heads) runs the same code.
        head_dim = self.dim // self.num_heads
        q, k, v = self.qkv(x).view(B, T, -1, 3, head_dim).permute(3, 0, 2, 1, 4).unbind(0)
        out = self.sdpa(q, k, v, attn_mask, self.dropout if self.training else 0.0)
        return self.proj(out.transpose(1, 2).reshape(B, T, -1))


def _group_by_head(rows: Tensor, num_heads: int) -> Tensor:
    """``[3 * dim, ...]`` rows ordered ``[3, heads, head_dim]`` (q, k, v blocks) -> ordered ``[heads, 3, head_dim]``."""
    rest = rows.shape[1:]
    return rows.reshape(3, num_heads, -1, *rest).transpose(0, 1).reshape(rows.shape[0], *rest)
