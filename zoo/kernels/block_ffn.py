"""Block-sparse FFN inference: each token runs only the FFN blocks it selected, the others are never computed.

The hidden layer of width ``H`` is split into ``num_blocks`` contiguous blocks of ``Hb = H / num_blocks`` units.
Block ``b`` owns rows ``b*Hb:(b+1)*Hb`` of ``fc1.weight`` (``[H, D]``) and of ``fc1.bias``, and the same columns of
``fc2.weight`` (``[D, H]``). Token ``t`` selected the ``k`` blocks ``idx[t]`` with gate values ``alpha[t]``:

    y[t] = b2 + sum_j alpha[t, j] * W2_b @ gelu(W1_b @ x[t] + b1_b),   b = idx[t, j]

which is what the dense FFN computes when the hidden units of the unselected blocks are multiplied by zero. Two
implementations share this contract and the routing below:

* :func:`block_sparse_ffn_torch`: per block, ``index_select`` the tokens that chose it, two ``mm``, ``index_add_``
  the rows back. One host synchronisation (the per-block counts); fast on a CPU, where gathers are cheap next to the
  GEMMs, and the readable reference of the fused kernels.
* :func:`zoo.kernels._block_ffn_triton.block_sparse_ffn_triton`: two grouped GEMM kernels on the (token, block)
  pairs sorted by block, with the gather of ``x`` rows fused into the first and the scatter into the second (the
  scheme of scattermoe and MegaBlocks), then a ``k``-way combine. No host synchronisation.

:func:`block_sparse_ffn` picks one by device.
"""

from __future__ import annotations

import functools
import os
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

Impl = Literal["auto", "triton", "torch"]


class Routing(NamedTuple):
    """The (token, block) pairs of a top-``k`` selection, sorted by block and cut into tiles of ``block_m`` rows.

    Pair ``p = t * k + j`` is token ``t``'s ``j``-th choice. ``order[i]`` is the pair at position ``i`` of the
    block-sorted list. Tile ``i`` holds sorted positions ``tiles[i, 1] .. tiles[i, 1] + tiles[i, 2] - 1``, all of
    block ``tiles[i, 0]`` (``-1``: an unused tile of the fixed-size grid). Only the pairs of one block share a tile,
    so each tile multiplies by a single block's weights; a block wastes at most ``block_m - 1`` padded rows.

    Attributes:
        order: ``[T * k]`` int32.
        tiles: ``[num_tiles, 3]`` int32, ``num_tiles = ceil(T * k / block_m) + num_blocks`` (an upper bound known
            without reading the counts back to the host).
        counts: ``[num_blocks]`` int64, pairs per block.
        block_m: rows per tile.
    """

    order: Tensor
    tiles: Tensor
    counts: Tensor
    block_m: int


def route(idx: Tensor, num_blocks: int, *, block_m: int = 128) -> Routing:
    """Sort the pairs of ``idx`` (``[T, k]`` block ids) by block and tile them; device-side, no host sync."""
    T, k = idx.shape
    pairs = T * k
    flat = idx.reshape(-1)
    order = torch.sort(flat, stable=True).indices
    counts = torch.bincount(flat, minlength=num_blocks)
    tiles_per_block = (counts + block_m - 1) // block_m
    tile_end = tiles_per_block.cumsum(0)
    tile_begin = tile_end - tiles_per_block
    row_begin = counts.cumsum(0) - counts
    num_tiles = -(-pairs // block_m) + num_blocks
    tile = torch.arange(num_tiles, device=idx.device)
    block = torch.searchsorted(tile_end, tile, right=True)  # == num_blocks past the last used tile
    b = block.clamp(max=num_blocks - 1)
    local = tile - tile_begin[b]
    first_row = row_begin[b] + local * block_m
    rows = (counts[b] - local * block_m).clamp(0, block_m)
    block = torch.where(block < num_blocks, block, -1)
    tiles = torch.stack([block, first_row, rows], 1).to(torch.int32).contiguous()
    return Routing(order.to(torch.int32), tiles, counts, block_m)


def block_sparse_ffn_torch(
    x: Tensor,
    alpha: Tensor,
    idx: Tensor,
    w1: Tensor,
    b1: Tensor | None,
    w2: Tensor,
    b2: Tensor | None,
    *,
    num_blocks: int,
) -> Tensor:
    """Block-sparse FFN in plain PyTorch: ``x [T, D]``, ``alpha``/``idx [T, k]`` -> ``[T, D]`` (see module doc).

    ``w1 [H, D]``, ``b1 [H]``, ``w2 [D, H]``, ``b2 [D]`` are the dense FFN's ``fc1``/``fc2`` parameters.
    """
    T, k = idx.shape
    hb = w1.shape[0] // num_blocks
    flat = idx.reshape(-1)
    order = torch.sort(flat, stable=True).indices
    counts = torch.bincount(flat, minlength=num_blocks).tolist()
    tokens = order // k
    gates = alpha.reshape(-1)[order].to(x.dtype)
    y = torch.zeros_like(x) if b2 is None else b2.to(x.dtype).expand_as(x).contiguous()
    start = 0
    for b, count in enumerate(counts):
        if count == 0:
            continue
        rows = tokens[start : start + count]
        cols = slice(b * hb, (b + 1) * hb)
        h = x.index_select(0, rows) @ w1[cols].t()
        if b1 is not None:
            h += b1[cols]
        h = F.gelu(h).mul_(gates[start : start + count, None])
        y.index_add_(0, rows, h @ w2[:, cols].t())
        start += count
    return y


@functools.cache
def triton_available() -> bool:
    """Whether Triton imports and a CUDA device is there (or ``TRITON_INTERPRET=1`` asks for the interpreter)."""
    if not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"):
        return False
    try:
        import triton  # noqa: F401
    except ImportError:  # pragma: no cover - triton ships with CUDA builds of torch
        return False
    return True


def triton_supports(x: Tensor, w1: Tensor, num_blocks: int) -> bool:
    """Whether the fused kernels take these shapes: widths multiples of 16 (tensor-core tiles)."""
    hb = w1.shape[0] // num_blocks
    return x.shape[-1] % 16 == 0 and hb % 16 == 0 and x.dtype in (torch.float32, torch.float16, torch.bfloat16)


def block_sparse_ffn(
    x: Tensor,
    alpha: Tensor,
    idx: Tensor,
    w1: Tensor,
    b1: Tensor | None,
    w2: Tensor,
    b2: Tensor | None,
    *,
    num_blocks: int,
    impl: Impl = "auto",
) -> Tensor:
    """Block-sparse FFN (see module doc): ``x [T, D]``, ``alpha``/``idx [T, k]`` -> ``[T, D]`` in ``x.dtype``.

    ``impl="auto"`` runs the fused Triton kernels on a CUDA tensor whose widths they take and the PyTorch version
    everywhere else (the CPU). Weights are cast to ``x.dtype``.
    """
    if impl not in ("auto", "triton", "torch"):
        raise ValueError(f"block_sparse_ffn: impl={impl!r} must be 'auto', 'triton' or 'torch'")
    use_triton = impl == "triton" or (
        impl == "auto" and x.is_cuda and triton_available() and triton_supports(x, w1, num_blocks)
    )
    w1, w2 = w1.to(x.dtype), w2.to(x.dtype)
    b1 = None if b1 is None else b1.to(x.dtype)
    b2 = None if b2 is None else b2.to(x.dtype)
    if use_triton:
        from zoo.kernels._block_ffn_triton import block_sparse_ffn_triton

        return block_sparse_ffn_triton(x, alpha, idx, w1, b1, w2, b2, num_blocks=num_blocks)
    return block_sparse_ffn_torch(x, alpha, idx, w1, b1, w2, b2, num_blocks=num_blocks)
