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
    block ``tiles[i, 0]`` (``-1``, with ``0, 0``: an unused tile of the fixed-size grid). Only the pairs of one block
    share a tile, so each tile multiplies by a single block's weights; a block wastes at most ``block_m - 1`` rows.

    ``slot[p]`` is the row of pair ``p`` in the tile layout (tile ``i`` owns rows ``i * block_m ..``), where the
    kernels keep per-pair rows.

    Attributes:
        order: ``[T * k]`` int32.
        slot: ``[T * k]`` int32.
        tiles: ``[num_tiles, 3]`` int32, ``num_tiles = ceil(T * k / block_m) + num_blocks`` (an upper bound known
            without reading the counts back to the host).
        counts: ``[num_blocks]`` int64, pairs per block (``None`` from the Triton version, which does not need it).
        block_m: rows per tile.
    """

    order: Tensor
    slot: Tensor
    tiles: Tensor
    counts: Tensor | None
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
    used = block < num_blocks
    block, first_row, rows = torch.where(used, block, -1), torch.where(used, first_row, 0), torch.where(used, rows, 0)
    tiles = torch.stack([block, first_row, rows], 1).to(torch.int32).contiguous()
    sorted_block = flat[order]
    position = torch.arange(pairs, device=idx.device)
    slot = torch.empty_like(order)
    slot[order] = tile_begin[sorted_block] * block_m + position - row_begin[sorted_block]
    return Routing(order.to(torch.int32), slot.to(torch.int32), tiles, counts, block_m)


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

    ``w1 [H, D]``, ``b1 [H]``, ``w2 [D, H]``, ``b2 [D]`` are the dense FFN's ``fc1``/``fc2`` parameters. One gather
    of the pairs' token rows in block order, one GEMM per block on its contiguous slice for each layer, then one
    gather puts each token's ``k`` output rows side by side and a sum combines them: few, large operations (each
    is a parallel region on the CPU) and no ``index_add_``, whose CPU kernel is a slow scatter.
    """
    T, k = idx.shape
    hb = w1.shape[0] // num_blocks
    flat = idx.reshape(-1)
    order = torch.sort(flat, stable=True).indices
    counts = torch.bincount(flat, minlength=num_blocks).tolist()
    xs = x.index_select(0, order // k)  # [T * k, D]: each pair's token row, block-sorted
    h = torch.empty(T * k, hb, dtype=x.dtype, device=x.device)
    out = torch.empty_like(xs)
    bounds = [0]
    for count in counts:
        bounds.append(bounds[-1] + count)
    for b in range(num_blocks):  # one GEMM per block on its contiguous slice of rows
        rows, cols = slice(bounds[b], bounds[b + 1]), slice(b * hb, (b + 1) * hb)
        if rows.start == rows.stop:
            continue
        if b1 is None:
            torch.mm(xs[rows], w1[cols].t(), out=h[rows])
        else:
            torch.addmm(b1[cols], xs[rows], w1[cols].t(), out=h[rows])
    h = F.gelu(h).mul_(alpha.reshape(-1)[order, None].to(x.dtype))
    for b in range(num_blocks):
        rows, cols = slice(bounds[b], bounds[b + 1]), slice(b * hb, (b + 1) * hb)
        if rows.start < rows.stop:
            torch.mm(h[rows], w2[:, cols].t(), out=out[rows])
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    y = out.index_select(0, inverse).view(T, k, w2.shape[0]).sum(1)  # each token's k rows side by side, summed
    return y if b2 is None else y.add_(b2)


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
