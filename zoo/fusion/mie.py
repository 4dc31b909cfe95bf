"""MIE, the Multimodal Interaction Encoder: one shared transformer over every modality's tokens, with cross-modal
attention blocked in the early layers and opened progressively in the last ``modality_fusion_layers``."""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor, nn

from zoo.contracts import FFNFactory, Fused, Fusion, Tokens
from zoo.errors import ConfigError, check_dropout, check_sizes
from zoo.layers.ffn import FeedForward
from zoo.layers.transformer import TransformerBlock

FusionSchedule = Literal["linear", "learned", "open"]


@torch.library.custom_op("zoo::mie_attention_masks", mutates_args=())
def attention_masks(mask: Tensor, group: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """MIE's additive attention masks from the token mask ``[B, T]`` (``True`` = token) and each position's modality
    index ``[T]``: the early layers' ``[B, 1, T, T]`` (padding keys and other modalities blocked), the late layers'
    ``[B, 1, T, T]`` (padding keys blocked) and the cross-modal indicator ``[T, T]``, in ``dtype``. A padding token
    always sees itself, so that no row is all ``-inf``.

    An operator of its own, so that ``torch.compile`` writes the masks out once: inlined into each block's softmax,
    inductor recomputed them per logit: on the AMD EPYC the integer attention (zoo.quant.attention) compiled with the
    early mask built in its graph took 17.1 ms inlined against 10.3 ms through the operator (README, "QAT"). Float
    SDPA reads a mask written out anyway, so on every other path (eager, a GPU) the operator changes nothing but
    where the masks are built.
    """
    B, T = mask.shape
    eye = torch.eye(T, dtype=torch.bool, device=mask.device)
    key_blocked = ~mask[:, None, None, :] & ~eye  # [B, 1, T, T]: padding keys, except a token itself
    cross = (group[:, None] != group[None, :]).to(dtype)  # [T, T]
    isolated = torch.zeros(B, 1, T, T, dtype=dtype, device=mask.device)
    isolated = isolated.masked_fill(key_blocked | cross.bool(), float("-inf"))
    padding_only = torch.zeros_like(isolated).masked_fill(key_blocked, float("-inf"))
    return isolated, padding_only, cross


@attention_masks.register_fake
def _(mask: Tensor, group: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    B, T = mask.shape
    square = mask.new_empty((B, 1, T, T), dtype=dtype)
    return square, torch.empty_like(square), mask.new_empty((T, T), dtype=dtype)


class MIE(Fusion):
    """Shared-transformer fusion: ``{modality: Tokens [B, T_m, dim]} -> Fused(pooled [B, dim], tokens [B, T, dim])``
    with ``T = sum T_m``.

    Each modality's tokens get a learned modality embedding; a ``[CLS]`` token is prepended and all are run through
    ``depth`` shared pre-norm blocks. Attention between tokens of different groups (each modality is a group, and
    ``[CLS]`` is a group of its own) is controlled per layer:

    * the first ``depth - modality_fusion_layers`` layers block it entirely: each modality is encoded on its own, as
      if by separate towers with shared weights, and ``[CLS]`` sees only itself;
    * the ``k``-th of the last ``F = modality_fusion_layers`` layers (``k = 1..F``) adds a bias ``b_k`` to the
      logits of every cross-group pair. With ``fusion_schedule="linear"``, ``b_k = log(k / F)``: before softmax
      normalisation, cross-group attention weights are scaled by ``k / F``, so fusion opens progressively and the
      last layer is fully open. ``"learned"`` starts from the same values and learns one bias per layer and head;
      ``"open"`` uses ``b_k = 0`` (all fused layers fully open at once, an ablation).

    ``pooled`` is the final ``[CLS]`` token after a LayerNorm. Padding keys are never attended.

    Args:
        modalities: names of the modalities fused, in the order their tokens are concatenated.
        dim: token width expected and returned.
        depth: transformer blocks.
        num_heads: attention heads.
        modality_fusion_layers: how many of the last layers attend across modalities, between 0 and ``depth``.
        fusion_schedule: how cross-modal attention opens over the fused layers (above).
        mlp_ratio: FFN width over ``dim``.
        ffn: FFN factory for every block (dense by default).
        dropout: dropout in the blocks.
    """

    def __init__(
        self,
        *,
        modalities: tuple[str, ...] = ("image", "text"),
        dim: int = 128,
        depth: int = 6,
        num_heads: int = 4,
        modality_fusion_layers: int = 4,
        fusion_schedule: FusionSchedule = "linear",
        mlp_ratio: float = 4.0,
        ffn: FFNFactory = FeedForward,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        check_sizes("MIE", dim=dim, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio)
        check_dropout("MIE", dropout)
        if not 0 <= modality_fusion_layers <= depth:
            raise ConfigError(
                f"MIE: modality_fusion_layers={modality_fusion_layers} must be between 0 and depth={depth}"
            )
        if fusion_schedule not in ("linear", "learned", "open"):
            raise ConfigError(f"MIE: fusion_schedule={fusion_schedule!r} must be 'linear', 'learned' or 'open'")
        if len(set(modalities)) != len(modalities) or not modalities:
            raise ConfigError(f"MIE: modalities={list(modalities)} must be distinct and not empty")
        self.modalities = tuple(modalities)
        self.dim, self.depth, self.num_heads = dim, depth, num_heads
        self.modality_fusion_layers = modality_fusion_layers
        self.fusion_schedule = fusion_schedule
        self.cls = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.modality_embed = nn.ParameterDict({m: nn.Parameter(torch.randn(dim) * 0.02) for m in self.modalities})
        self.blocks = nn.ModuleList(
            TransformerBlock(dim, num_heads, mlp_ratio=mlp_ratio, ffn=ffn, dropout=dropout) for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim)
        F = modality_fusion_layers
        initial = torch.tensor([math.log(k / F) for k in range(1, F + 1)]) if F else torch.zeros(0)
        if fusion_schedule == "open":
            initial = torch.zeros(F)
        if fusion_schedule == "learned":
            self.cross_modal_bias = nn.Parameter(initial[:, None].expand(F, num_heads).clone())  # [F, H]
        else:
            # [F, 1]: every head shares the bias, so the fused layers' masks stay [B, 1, T, T]; building [B, H, T, T]
            # ones took 10.9 ms of a VQA forward on the CPU (batch 64, T = 117; benchmarks/results/
            # qat_profile_cpu_2026-11-29_ffn_fused.json)
            self.register_buffer("cross_modal_bias", initial[:, None].clone(), persistent=False)  # from the config

    @property
    def first_fused_layer(self) -> int:
        """Index of the first block that attends across modalities (``depth`` if none does)."""
        return self.depth - self.modality_fusion_layers

    def segments(self, inputs: dict[str, Tokens]) -> dict[str, slice]:
        """Where each modality's tokens sit in the sequence the blocks see (position 0 is ``[CLS]``)."""
        out, start = {}, 1
        for m in self.modalities:
            length = inputs[m].embeddings.shape[1]
            out[m] = slice(start, start + length)
            start += length
        return out

    def forward(self, inputs: dict[str, Tokens]) -> Fused:
        self.check_modalities(list(inputs))
        first = inputs[self.modalities[0]].embeddings
        B, device = first.shape[0], first.device
        xs = [self.cls.expand(B, -1, -1).to(first.dtype)]
        masks = [torch.ones(B, 1, dtype=torch.bool, device=device)]
        groups = [torch.zeros(1, dtype=torch.long, device=device)]
        for g, m in enumerate(self.modalities, start=1):
            tokens = inputs[m]
            if tokens.dim != self.dim:
                raise ConfigError(f"MIE: modality {m!r} has width {tokens.dim}, expected dim={self.dim}")
            xs.append(tokens.embeddings + self.modality_embed[m].to(tokens.embeddings.dtype))
            masks.append(tokens.mask)
            groups.append(torch.full((tokens.embeddings.shape[1],), g, dtype=torch.long, device=device))
        x, mask, group = torch.cat(xs, 1), torch.cat(masks, 1), torch.cat(groups)
        isolated, padding_only, cross = attention_masks(mask, group, x.dtype)
        for i, block in enumerate(self.blocks):
            k = i - self.first_fused_layer
            if k < 0:
                attn_mask = isolated
            else:  # [B, 1, T, T] + [1, H or 1, T, T]
                attn_mask = padding_only + cross * self.cross_modal_bias[k].to(x.dtype)[None, :, None, None]
            x = block(x, attn_mask)
        x = self.norm(x)
        return Fused(pooled=x[:, 0], tokens=Tokens(x[:, 1:], mask[:, 1:]))
