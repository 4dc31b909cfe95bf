"""Fused Triton kernels of the block-sparse FFN (contract in :mod:`zoo.kernels.block_ffn`).

Five launches, no host synchronisation. Two (``_count_kernel``, ``_order_kernel``: :func:`route_triton`) sort the
(token, block) pairs by block with a stable counting sort and cut them into tiles of ``BM`` rows that each belong to
one block, as :func:`zoo.kernels.block_ffn.route` does with PyTorch ops (whose ``bincount`` waits for the device).
Then:

1. ``_up_kernel``: for each tile and each ``BN``-wide slice of the block's hidden units, gathers the tile's ``x`` rows
   by token index straight from ``x`` (no gathered copy of ``x``), multiplies by the block's rows of ``fc1.weight``,
   adds the bias, applies GELU and the gate ``alpha`` in the epilogue, and writes a compact ``[tiles * BM, Hb]``
   buffer (bf16 for bf16 inputs). Only the selected blocks' hidden units are ever computed.
2. ``_down_kernel``: multiplies each tile of that buffer by the block's columns of ``fc2.weight`` and scatters the
   rows to their pair's slot ``t * k + j`` of a ``[T * k, D]`` buffer (scattermoe's ``scatter2scatter``), so that
   each token's ``k`` partial outputs sit side by side.
3. ``_combine_kernel``: ``y[t] = b2 + sum_j partial[t * k + j]`` in fp32, a ``k``-way sum with no atomics.

``sorted_out=True`` is the alternative that keeps kernel 2's rows in the tile layout (contiguous TMA stores) and
gathers them by ``Routing.slot`` in the combine; on an H200 (T=16384, D=2048, H=8192, 2 of 8 blocks) its second GEMM
took 0.316 ms against 0.276 ms for the scatter, so the scatter is the default.

On CUDA, :func:`gate_topk_triton` also fuses the gate (``sigmoid(x @ Wg^T + b)``) and the top-``k`` selection into
one pass over ``x``.

This is the scheme of scattermoe (Tan et al. 2024) and MegaBlocks (Gale et al. 2023) for mixture-of-experts layers,
applied to the blocks of one FFN: grouped GEMMs whose operand gather and result scatter are part of the GEMM, so that
no PyTorch-level ``index_select``/``index_add_`` pass over the activations is needed. We write our own because the
libraries that ship such kernels (MegaBlocks, scattermoe) are built for separate experts with their own weight
tensors, not for blocks of one ``nn.Linear``, and would be a heavy dependency for two short kernels.

Tile sizes other than ``BM`` are autotuned per width; ``TRITON_INTERPRET=1`` runs the kernels on the CPU (the tests
use this with a single small configuration).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from zoo.kernels.block_ffn import Routing

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

if _INTERPRET:  # pragma: no cover - exercised by the tests in a subprocess
    from triton.runtime import interpreter as _interpreter

    _patch_lang_tensor = _interpreter._patch_lang_tensor

    def _patch_index(tensor, scope) -> None:
        # Triton 3.6's interpreter keeps scalars as 1-element arrays and turns them into loop bounds with int(),
        # which NumPy >= 2.5 refuses for 1-D arrays; read the element instead. Interpreter only.
        _patch_lang_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    _interpreter._patch_lang_tensor = _patch_index


def _configs(sizes: list[tuple[int, int, int, int]]) -> list[triton.Config]:
    if _INTERPRET:  # one small configuration: the interpreter runs each program in Python
        return [triton.Config({"BN": 16, "BK": 16}, num_warps=4, num_stages=1)]
    return [triton.Config({"BN": bn, "BK": bk}, num_warps=w, num_stages=s) for bn, bk, w, s in sizes]


# (BN, BK, num_warps, num_stages); the first ones are the Hopper GEMM shapes that run wgmma on 128 x 256 tiles, the
# last ones serve narrow layers (the zoo's CPU-sized models).
_GEMM_SIZES = [
    (256, 64, 8, 3),
    (256, 64, 8, 4),
    (256, 128, 8, 2),
    (128, 128, 8, 3),
    (128, 64, 8, 4),
    (128, 64, 4, 4),
    (64, 64, 4, 4),
    (64, 32, 4, 3),
    (32, 32, 4, 2),
    (16, 16, 4, 2),
]


def _prune(n_name: str, k_name: str):
    """Keep the configurations whose tiles divide the widths (the kernels have no masks along N and K), and of
    those only the wide ones when the widths allow them (narrow tiles are never faster there; each costs a compile)."""

    def prune(configs, named_args, **kwargs):
        n, k = named_args[n_name], named_args[k_name]
        kept = [c for c in configs if n % c.kwargs["BN"] == 0 and k % c.kwargs["BK"] == 0]
        wide = [c for c in kept if c.kwargs["BN"] >= 128 and c.kwargs["BK"] >= 64]
        return wide or kept or configs[-1:]

    return prune


@triton.jit
def _gelu(x):
    return 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))


@triton.jit
def _gate_topk_kernel(
    x_ptr,
    wg_ptr,
    bg_ptr,
    alpha_ptr,
    idx_ptr,
    T,
    D,
    N,
    K: tl.constexpr,
    NB: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """alpha = sigmoid(x @ Wg^T + bg) in fp32, then the K largest per token (ties: lower block index)."""
    offs_t = tl.program_id(0) * BT + tl.arange(0, BT)
    t_ok = offs_t < T
    cols = tl.arange(0, NB)
    c_ok = cols < N
    acc = tl.zeros((BT, NB), dtype=tl.float32)
    for k0 in tl.range(0, D, BK):
        offs_k = k0 + tl.arange(0, BK)
        k_ok = offs_k < D
        xk = tl.load(
            x_ptr + offs_t[:, None].to(tl.int64) * D + offs_k[None, :], mask=t_ok[:, None] & k_ok[None, :], other=0.0
        )
        wk = tl.load(wg_ptr + cols[None, :] * D + offs_k[:, None], mask=c_ok[None, :] & k_ok[:, None], other=0.0)
        acc = tl.dot(xk, wk, acc, input_precision=PRECISION)
    logits = acc + tl.load(bg_ptr + cols, mask=c_ok, other=0.0).to(tl.float32)[None, :]
    alpha = tl.where(c_ok[None, :], tl.sigmoid(logits), -1.0)
    for j in tl.static_range(K):
        best = tl.max(alpha, 1)
        arg = tl.min(tl.where(alpha == best[:, None], cols[None, :], NB), 1)
        tl.store(alpha_ptr + offs_t * K + j, best.to(alpha_ptr.dtype.element_ty), mask=t_ok)
        tl.store(idx_ptr + offs_t * K + j, arg.to(tl.int64), mask=t_ok)
        alpha = tl.where(cols[None, :] == arg[:, None], -1.0, alpha)


@triton.autotune(
    configs=_configs(_GEMM_SIZES),
    key=["D", "HB", "BM", "USE_TMA"],
    prune_configs_by={"early_config_prune": _prune("HB", "D")},
)
@triton.jit
def _up_kernel(
    x_ptr,
    w1_ptr,
    b1_ptr,
    alpha_ptr,
    order_ptr,
    tiles_ptr,
    h_ptr,
    D,
    HB,
    H,
    TOPK,
    HAS_BIAS: tl.constexpr,
    PRECISION: tl.constexpr,
    USE_TMA: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
):
    pid = tl.program_id(0)
    n_tiles_n = HB // BN
    tile = pid // n_tiles_n
    pid_n = pid % n_tiles_n
    block = tl.load(tiles_ptr + tile * 3)
    if block < 0:
        return
    first_row = tl.load(tiles_ptr + tile * 3 + 1)
    rows = tl.load(tiles_ptr + tile * 3 + 2)
    offs_m = tl.arange(0, BM)
    valid = offs_m < rows
    # Padded rows read token 0 (always there) and are zeroed by alpha = 0 below, so the loads need no mask.
    pair = tl.load(order_ptr + first_row + offs_m, mask=valid, other=0)
    token = (pair // TOPK).to(tl.int64)
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_k = tl.arange(0, BK)
    w_row0 = block * HB + pid_n * BN
    w_rows = (w_row0 + tl.arange(0, BN)).to(tl.int64)
    a_ptrs = x_ptr + token[:, None] * D + offs_k[None, :]
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    if USE_TMA:  # the block's weight tiles through the tensor memory accelerator; x rows are a gather (no TMA)
        w_desc = tl.make_tensor_descriptor(w1_ptr, shape=[H, D], strides=[D, 1], block_shape=[BN, BK])
        for k0 in tl.range(0, D, BK):
            a = tl.load(a_ptrs)
            b = w_desc.load([w_row0, k0])
            acc = tl.dot(a, b.T, acc, input_precision=PRECISION)
            a_ptrs += BK
    else:
        b_ptrs = w1_ptr + w_rows[None, :] * D + offs_k[:, None]  # [BK, BN] view of fc1.weight rows
        for _ in tl.range(0, D, BK):
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
            acc = tl.dot(a, b, acc, input_precision=PRECISION)
            a_ptrs += BK
            b_ptrs += BK
    if HAS_BIAS:
        acc += tl.load(b1_ptr + w_rows).to(tl.float32)[None, :]
    alpha = tl.load(alpha_ptr + pair, mask=valid, other=0.0).to(tl.float32)
    h = (_gelu(acc) * alpha[:, None]).to(h_ptr.dtype.element_ty)
    # A plain store: a TMA store of the tile measured 1-3% slower on an H200 (its staging buffer costs a stage).
    out_rows = (tile * BM + offs_m).to(tl.int64)
    tl.store(h_ptr + out_rows[:, None] * HB + offs_n[None, :], h)


@triton.autotune(
    configs=_configs(_GEMM_SIZES),
    key=["D", "HB", "BM", "USE_TMA", "SORTED_OUT"],
    prune_configs_by={"early_config_prune": _prune("D", "HB")},
)
@triton.jit
def _down_kernel(
    h_ptr,
    w2_ptr,
    order_ptr,
    tiles_ptr,
    out_ptr,
    D,
    HB,
    H,
    ROWS,
    PRECISION: tl.constexpr,
    USE_TMA: tl.constexpr,
    SORTED_OUT: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
):
    pid = tl.program_id(0)
    n_tiles_n = D // BN
    tile = pid // n_tiles_n
    pid_n = pid % n_tiles_n
    block = tl.load(tiles_ptr + tile * 3)
    if block < 0:
        return
    first_row = tl.load(tiles_ptr + tile * 3 + 1)
    rows = tl.load(tiles_ptr + tile * 3 + 2)
    offs_m = tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_k = tl.arange(0, BK)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    if USE_TMA:
        h_desc = tl.make_tensor_descriptor(h_ptr, shape=[ROWS, HB], strides=[HB, 1], block_shape=[BM, BK])
        w_desc = tl.make_tensor_descriptor(w2_ptr, shape=[D, H], strides=[H, 1], block_shape=[BN, BK])
        for k0 in tl.range(0, HB, BK):
            a = h_desc.load([tile * BM, k0])
            b = w_desc.load([pid_n * BN, block * HB + k0])
            acc = tl.dot(a, b.T, acc, input_precision=PRECISION)
    else:
        in_rows = (tile * BM + offs_m).to(tl.int64)
        a_ptrs = h_ptr + in_rows[:, None] * HB + offs_k[None, :]
        b_ptrs = w2_ptr + offs_n[None, :].to(tl.int64) * H + (block * HB + offs_k)[:, None]  # [BK, BN] of fc2.weight
        for _ in tl.range(0, HB, BK):
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
            acc = tl.dot(a, b, acc, input_precision=PRECISION)
            a_ptrs += BK
            b_ptrs += BK
    out = acc.to(out_ptr.dtype.element_ty)
    if SORTED_OUT:  # rows stay in the tile layout; the combine gathers them back per token
        if USE_TMA:
            o_desc = tl.make_tensor_descriptor(out_ptr, shape=[ROWS, D], strides=[D, 1], block_shape=[BM, BN])
            o_desc.store([tile * BM, pid_n * BN], out)
        else:
            out_rows = (tile * BM + offs_m).to(tl.int64)
            tl.store(out_ptr + out_rows[:, None] * D + offs_n[None, :], out)
    else:  # scatter each row to its pair's slot t * k + j
        valid = offs_m < rows
        pair = tl.load(order_ptr + first_row + offs_m, mask=valid, other=0).to(tl.int64)
        tl.store(out_ptr + pair[:, None] * D + offs_n[None, :], out, mask=valid[:, None])


@triton.jit
def _combine_kernel(
    part_ptr,
    slot_ptr,
    b2_ptr,
    y_ptr,
    T,
    D,
    TOPK: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    GATHER: tl.constexpr,
    BT: tl.constexpr,
    BD: tl.constexpr,
):
    offs_t = tl.program_id(0) * BT + tl.arange(0, BT)
    offs_d = tl.program_id(1) * BD + tl.arange(0, BD)
    t_ok = offs_t < T
    mask = t_ok[:, None] & (offs_d < D)[None, :]
    acc = tl.zeros((BT, BD), dtype=tl.float32)
    if HAS_BIAS:
        acc += tl.load(b2_ptr + offs_d, mask=offs_d < D, other=0.0).to(tl.float32)[None, :]
    pairs = offs_t.to(tl.int64) * TOPK
    for j in tl.static_range(TOPK):
        if GATHER:
            rows = tl.load(slot_ptr + pairs + j, mask=t_ok, other=0).to(tl.int64)
        else:
            rows = pairs + j
        acc += tl.load(part_ptr + rows[:, None] * D + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs_t.to(tl.int64)[:, None] * D + offs_d[None, :], acc.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _count_kernel(idx_ptr, chunk_counts_ptr, P, NB: tl.constexpr, CH: tl.constexpr):
    """chunk_counts[c, b] = pairs of chunk c (CH consecutive pairs) that chose block b."""
    c = tl.program_id(0)
    offs = c * CH + tl.arange(0, CH)
    blocks = tl.load(idx_ptr + offs, mask=offs < P, other=NB)  # past the end: a block id that matches no column
    onehot = (blocks[:, None] == tl.arange(0, NB)[None, :]).to(tl.int32)
    tl.store(chunk_counts_ptr + c * NB + tl.arange(0, NB), tl.sum(onehot, 0))


@triton.jit
def _order_kernel(
    idx_ptr,
    chunk_counts_ptr,
    order_ptr,
    slot_ptr,
    tiles_ptr,
    P,
    N,
    n_chunks,
    num_tiles,
    BM: tl.constexpr,
    NB: tl.constexpr,
    CH: tl.constexpr,
    NC: tl.constexpr,
    TB: tl.constexpr,
):
    """Stable counting sort of the pairs by block (``order``, and each pair's row in the tile layout, ``slot``);
    program 0 also writes the tile table."""
    c = tl.program_id(0)
    cols = tl.arange(0, NB)
    chunk = tl.arange(0, NC)
    cc = tl.load(chunk_counts_ptr + chunk[:, None] * NB + cols[None, :], mask=(chunk < n_chunks)[:, None], other=0)
    counts = tl.sum(cc, 0)  # [NB] pairs per block
    earlier = tl.sum(tl.where((chunk < c)[:, None], cc, 0), 0)  # pairs per block in the chunks before this one
    row_begin = tl.cumsum(counts, 0) - counts  # first sorted position of each block
    tiles_of = (counts + BM - 1) // BM
    tile_end = tl.cumsum(tiles_of, 0)
    tile_begin = tile_end - tiles_of
    offs = c * CH + tl.arange(0, CH)
    blocks = tl.load(idx_ptr + offs, mask=offs < P, other=NB)
    onehot = (blocks[:, None] == cols[None, :]).to(tl.int32)  # [CH, NB]
    rank = tl.cumsum(onehot, 0) - onehot + earlier[None, :]  # earlier pairs of the same block
    pos = tl.sum(onehot * (rank + row_begin[None, :]), 1)
    tl.store(order_ptr + pos, offs, mask=offs < P)
    tl.store(slot_ptr + offs, tl.sum(onehot * (rank + tile_begin[None, :] * BM), 1), mask=offs < P)
    if c == 0:
        real = cols < N
        for t0 in range(0, num_tiles, TB):
            t = t0 + tl.arange(0, TB)
            block = tl.sum(((tile_end[None, :] <= t[:, None]) & real[None, :]).to(tl.int32), 1)
            pick = (block[:, None] == cols[None, :]).to(tl.int32)
            local = t - tl.sum(pick * tile_begin[None, :], 1)
            first = tl.sum(pick * row_begin[None, :], 1) + local * BM
            rows = tl.minimum(tl.maximum(tl.sum(pick * counts[None, :], 1) - local * BM, 0), BM)
            used = block < N
            in_range = t < num_tiles
            tl.store(tiles_ptr + t * 3, tl.where(used, block, -1), mask=in_range)
            tl.store(tiles_ptr + t * 3 + 1, tl.where(used, first, 0), mask=in_range)
            tl.store(tiles_ptr + t * 3 + 2, tl.where(used, rows, 0), mask=in_range)


def route_triton(idx: Tensor, num_blocks: int, *, block_m: int = 128) -> Routing:
    """:func:`zoo.kernels.block_ffn.route` in two Triton launches (no sort, no host synchronisation).

    ``counts`` of the result is ``None``; ``order``, ``slot`` and ``tiles`` equal those of ``route`` exactly.
    """
    T, k = idx.shape
    pairs = T * k
    flat = idx.reshape(-1)
    nb = triton.next_power_of_2(num_blocks)
    ch = max(128, min(2048, 16384 // nb))
    n_chunks = triton.cdiv(pairs, ch)
    num_tiles = -(-pairs // block_m) + num_blocks
    chunk_counts = torch.empty(n_chunks, nb, device=idx.device, dtype=torch.int32)
    order = torch.empty(pairs, device=idx.device, dtype=torch.int32)
    slot = torch.empty(pairs, device=idx.device, dtype=torch.int32)
    tiles = torch.empty(num_tiles, 3, device=idx.device, dtype=torch.int32)
    _count_kernel[(n_chunks,)](flat, chunk_counts, pairs, NB=nb, CH=ch, num_warps=4)
    _order_kernel[(n_chunks,)](
        flat,
        chunk_counts,
        order,
        slot,
        tiles,
        pairs,
        num_blocks,
        n_chunks,
        num_tiles,
        BM=block_m,
        NB=nb,
        CH=ch,
        NC=triton.next_power_of_2(n_chunks),
        TB=256,
        num_warps=8,
    )
    return Routing(order, slot, tiles, None, block_m)


def _block_m(pairs: int, num_blocks: int) -> int:
    if _INTERPRET:
        return 16
    return 128 if pairs >= 256 * num_blocks else 64


_ALLOCATOR_SET = False


def _tma_allocator() -> None:
    """Device-side tensor descriptors need a scratch allocation per launch; take it from PyTorch's allocator."""
    global _ALLOCATOR_SET
    if not _ALLOCATOR_SET:
        triton.set_allocator(lambda size, alignment, stream: torch.empty(size, dtype=torch.int8, device="cuda"))
        _ALLOCATOR_SET = True


def use_tma_default() -> bool:
    """TMA loads and stores on Hopper and newer (``ZOO_DSA_TMA=0`` or ``1`` overrides)."""
    env = os.environ.get("ZOO_DSA_TMA")
    if env is not None:
        return env == "1"
    return not _INTERPRET and torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9


def _precision(x: Tensor) -> str:
    return "ieee" if x.dtype == torch.float32 else "tf32"  # fp32 in full precision; ignored for half types


def gate_topk_triton(x: Tensor, weight: Tensor, bias: Tensor | None, k: int) -> tuple[Tensor, Tensor]:
    """``sigmoid(x @ weight^T + bias)`` and its top ``k`` per row, in one pass over ``x``: ``x [T, D]`` ->
    ``(alpha [T, k] in x.dtype, idx [T, k] int64)``, largest first. Logits and sigmoid in fp32."""
    T, D = x.shape
    N = weight.shape[0]
    alpha = torch.empty(T, k, device=x.device, dtype=x.dtype)
    idx = torch.empty(T, k, device=x.device, dtype=torch.int64)
    bt, bk = (16, 16) if _INTERPRET else (64, 128)
    _gate_topk_kernel[(triton.cdiv(T, bt),)](
        x,
        weight.contiguous(),
        bias if bias is not None else torch.zeros(N, device=x.device, dtype=x.dtype),
        alpha,
        idx,
        T,
        D,
        N,
        K=k,
        NB=max(16, triton.next_power_of_2(N)),
        BT=bt,
        BK=bk,
        PRECISION=_precision(x),
        num_warps=4,
    )
    return alpha, idx


def launch_up(x, w1, b1, alpha, routing, *, num_blocks: int, topk: int, use_tma: bool) -> Tensor:
    """Kernel 1: ``[tiles * BM, Hb]`` = alpha * gelu(x[token] @ W1_b^T + b1_b) for every pair, in the tile layout."""
    T, D = x.shape
    H = w1.shape[0]
    hb = H // num_blocks
    bm, num_tiles = routing.block_m, routing.tiles.shape[0]
    if use_tma:
        _tma_allocator()
    h = torch.empty(num_tiles * bm, hb, device=x.device, dtype=x.dtype)
    _up_kernel[lambda meta: (num_tiles * (hb // meta["BN"]),)](
        x,
        w1,
        b1 if b1 is not None else x,
        alpha,
        routing.order,
        routing.tiles,
        h,
        D,
        hb,
        H,
        topk,
        HAS_BIAS=b1 is not None,
        PRECISION=_precision(x),
        USE_TMA=use_tma,
        BM=bm,
    )
    return h


def launch_down(
    h, w2, routing, *, tokens: int, num_blocks: int, topk: int, use_tma: bool, sorted_out: bool = False
) -> Tensor:
    """Kernel 2: each pair's output row, ``h`` row @ W2_b^T: in the tile layout (``sorted_out``, ``[tiles * BM,
    D]``), or scattered to row ``t * k + j`` of a ``[T * k, D]`` buffer."""
    D, H = w2.shape
    hb = H // num_blocks
    bm, num_tiles = routing.block_m, routing.tiles.shape[0]
    if use_tma:
        _tma_allocator()
    rows = h.shape[0] if sorted_out else tokens * topk
    out = torch.empty(rows, D, device=h.device, dtype=h.dtype)
    _down_kernel[lambda meta: (num_tiles * (D // meta["BN"]),)](
        h,
        w2,
        routing.order,
        routing.tiles,
        out,
        D,
        hb,
        H,
        h.shape[0],
        PRECISION=_precision(h),
        USE_TMA=use_tma,
        SORTED_OUT=sorted_out,
        BM=bm,
    )
    return out


def launch_combine(partial, b2, routing, *, tokens: int, topk: int, sorted_out: bool = False) -> Tensor:
    """Kernel 3: ``y[t] = b2 + sum_j`` (row of pair ``(t, j)``), summed in fp32."""
    D = partial.shape[1]
    y = torch.empty(tokens, D, device=partial.device, dtype=partial.dtype)
    bt, bd = (16, 256) if not _INTERPRET else (16, 32)
    _combine_kernel[(triton.cdiv(tokens, bt), triton.cdiv(D, bd))](
        partial,
        routing.slot,
        b2 if b2 is not None else partial,
        y,
        tokens,
        D,
        TOPK=topk,
        HAS_BIAS=b2 is not None,
        GATHER=sorted_out,
        BT=bt,
        BD=bd,
    )
    return y


def block_sparse_ffn_triton(
    x: Tensor,
    alpha: Tensor,
    idx: Tensor,
    w1: Tensor,
    b1: Tensor | None,
    w2: Tensor,
    b2: Tensor | None,
    *,
    num_blocks: int,
    block_m: int | None = None,
    use_tma: bool | None = None,
    sorted_out: bool = False,
) -> Tensor:
    """Fused block-sparse FFN: ``x [T, D]``, ``alpha``/``idx [T, k]`` -> ``[T, D]`` (contract in ``block_ffn``).

    All tensors on one device and in one dtype; ``D`` and ``H / num_blocks`` multiples of 16. fp32 inputs are
    multiplied in full fp32 (``ieee``), half types on the tensor cores with fp32 accumulation. ``block_m``: rows per
    tile (128, or 64 for few tokens per block); ``use_tma``: weight (and second-GEMM operand) tiles through TMA
    (Hopper and newer); ``sorted_out=True`` keeps the second GEMM's rows in the tile layout (TMA stores) and gathers
    them in the combine, instead of scattering them to per-token slots (measured slower on an H200, module doc).
    """
    x, w1, w2 = x.contiguous(), w1.contiguous(), w2.contiguous()
    T = x.shape[0]
    k = idx.shape[1]
    use_tma = use_tma_default() if use_tma is None else use_tma
    routing = route_triton(idx, num_blocks, block_m=block_m or _block_m(T * k, num_blocks))
    alpha = alpha.reshape(-1).contiguous()
    h = launch_up(x, w1, b1, alpha, routing, num_blocks=num_blocks, topk=k, use_tma=use_tma)
    out = launch_down(h, w2, routing, tokens=T, num_blocks=num_blocks, topk=k, use_tma=use_tma, sorted_out=sorted_out)
    return launch_combine(out, b2, routing, tokens=T, topk=k, sorted_out=sorted_out)
