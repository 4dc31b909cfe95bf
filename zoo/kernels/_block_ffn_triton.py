"""Fused Triton kernels of the block-sparse FFN (contract in :mod:`zoo.kernels.block_ffn`).

Three launches, no host synchronisation, after :func:`zoo.kernels.block_ffn.route` has sorted the (token, block)
pairs by block into tiles of ``BM`` rows that each belong to one block:

1. ``_up_kernel``: for each tile and each ``BN``-wide slice of the block's hidden units, gathers the tile's ``x`` rows
   by token index straight from ``x`` (no gathered copy of ``x``), multiplies by the block's rows of ``fc1.weight``,
   adds the bias, applies GELU and the gate ``alpha`` in the epilogue, and writes a compact ``[tiles * BM, Hb]``
   buffer (bf16 for bf16 inputs). Only the selected blocks' hidden units are ever computed.
2. ``_down_kernel``: multiplies each tile of that buffer by the block's columns of ``fc2.weight`` and scatters the
   rows to their pair's slot ``t * k + j`` of a ``[T * k, D]`` buffer, so that each token's ``k`` partial outputs sit
   side by side.
3. ``_combine_kernel``: ``y[t] = b2 + sum_j partial[t * k + j]`` in fp32, a ``k``-way sum with no atomics.

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

from zoo.kernels.block_ffn import route

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

if _INTERPRET:  # pragma: no cover - exercised by the tests in a subprocess
    import builtins

    from triton.runtime import interpreter as _interpreter

    # Triton 3.6's interpreter keeps scalars as 1-element arrays and turns them into loop bounds with int(), which
    # NumPy >= 2.5 refuses for arrays of one dimension; a module-level int() that accepts them fixes loops over
    # runtime bounds. Interpreter only: compiled kernels never see this.
    _interpreter.int = lambda v=0, *a: builtins.int(v.reshape(-1)[0]) if hasattr(v, "reshape") else builtins.int(v, *a)


def _configs(sizes: list[tuple[int, int, int, int]]) -> list[triton.Config]:
    if _INTERPRET:  # one small configuration: the interpreter runs each program in Python
        return [triton.Config({"BN": 16, "BK": 16}, num_warps=4, num_stages=1)]
    return [triton.Config({"BN": bn, "BK": bk}, num_warps=w, num_stages=s) for bn, bk, w, s in sizes]


# (BN, BK, num_warps, num_stages); the first ones are the Hopper GEMM shapes that run wgmma at 128 x 256 tiles.
_GEMM_SIZES = [
    (256, 64, 8, 3),
    (256, 64, 8, 4),
    (128, 64, 8, 4),
    (128, 64, 4, 4),
    (128, 128, 8, 3),
    (64, 64, 4, 4),
    (64, 32, 4, 3),
    (32, 32, 4, 2),
    (16, 16, 4, 2),
]


def _prune(n_name: str, k_name: str):
    """Keep the configurations whose tiles divide the widths (the kernels have no masks along N and K)."""

    def prune(configs, named_args, **kwargs):
        n, k = named_args[n_name], named_args[k_name]
        kept = [c for c in configs if n % c.kwargs["BN"] == 0 and k % c.kwargs["BK"] == 0]
        # Tiles far wider than the problem only waste work; keep the larger of the fitting ones when possible.
        return kept or configs[-1:]

    return prune


@triton.jit
def _gelu(x):
    return 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))


@triton.autotune(
    configs=_configs(_GEMM_SIZES),
    key=["D", "HB", "BM"],
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
    TOPK,
    HAS_BIAS: tl.constexpr,
    PRECISION: tl.constexpr,
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
    w_rows = (block * HB + offs_n).to(tl.int64)
    a_ptrs = x_ptr + token[:, None] * D + offs_k[None, :]
    b_ptrs = w1_ptr + w_rows[None, :] * D + offs_k[:, None]  # [BK, BN] view of fc1.weight rows
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for _ in tl.range(0, D, BK):
        a = tl.load(a_ptrs)
        b = tl.load(b_ptrs)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        a_ptrs += BK
        b_ptrs += BK
    if HAS_BIAS:
        acc += tl.load(b1_ptr + w_rows).to(tl.float32)[None, :]
    alpha = tl.load(alpha_ptr + pair, mask=valid, other=0.0).to(tl.float32)
    h = _gelu(acc) * alpha[:, None]
    out_rows = (tile * BM + offs_m).to(tl.int64)
    tl.store(h_ptr + out_rows[:, None] * HB + offs_n[None, :], h.to(h_ptr.dtype.element_ty))


@triton.autotune(
    configs=_configs(_GEMM_SIZES),
    key=["D", "HB", "BM"],
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
    PRECISION: tl.constexpr,
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
    in_rows = (tile * BM + offs_m).to(tl.int64)
    a_ptrs = h_ptr + in_rows[:, None] * HB + offs_k[None, :]
    b_ptrs = w2_ptr + offs_n[None, :].to(tl.int64) * H + (block * HB + offs_k)[:, None]  # [BK, BN] of fc2.weight
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for _ in tl.range(0, HB, BK):
        a = tl.load(a_ptrs)
        b = tl.load(b_ptrs)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        a_ptrs += BK
        b_ptrs += BK
    valid = offs_m < rows
    pair = tl.load(order_ptr + first_row + offs_m, mask=valid, other=0).to(tl.int64)
    tl.store(out_ptr + pair[:, None] * D + offs_n[None, :], acc.to(out_ptr.dtype.element_ty), mask=valid[:, None])


@triton.jit
def _combine_kernel(
    part_ptr,
    b2_ptr,
    y_ptr,
    T,
    D,
    TOPK: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BT: tl.constexpr,
    BD: tl.constexpr,
):
    offs_t = tl.program_id(0) * BT + tl.arange(0, BT)
    offs_d = tl.program_id(1) * BD + tl.arange(0, BD)
    mask = (offs_t < T)[:, None] & (offs_d < D)[None, :]
    acc = tl.zeros((BT, BD), dtype=tl.float32)
    if HAS_BIAS:
        acc += tl.load(b2_ptr + offs_d, mask=offs_d < D, other=0.0).to(tl.float32)[None, :]
    rows = offs_t.to(tl.int64) * TOPK
    for j in tl.static_range(TOPK):
        acc += tl.load(part_ptr + (rows + j)[:, None] * D + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs_t.to(tl.int64)[:, None] * D + offs_d[None, :], acc.to(y_ptr.dtype.element_ty), mask=mask)


def _block_m(pairs: int, num_blocks: int) -> int:
    if _INTERPRET:
        return 16
    return 128 if pairs >= 256 * num_blocks else 64


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
) -> Tensor:
    """Fused block-sparse FFN: ``x [T, D]``, ``alpha``/``idx [T, k]`` -> ``[T, D]`` (contract in ``block_ffn``).

    All tensors on one device and in one dtype; ``D`` and ``H / num_blocks`` multiples of 16. fp32 inputs are
    multiplied in full fp32 (``ieee``), half types on the tensor cores with fp32 accumulation.
    """
    x = x.contiguous()
    w1, w2 = w1.contiguous(), w2.contiguous()
    T, D = x.shape
    k = idx.shape[1]
    H = w1.shape[0]
    hb = H // num_blocks
    bm = block_m or _block_m(T * k, num_blocks)
    routing = route(idx, num_blocks, block_m=bm)
    num_tiles = routing.tiles.shape[0]
    alpha = alpha.reshape(-1).contiguous()
    precision = "ieee" if x.dtype == torch.float32 else "tf32"
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
        k,
        HAS_BIAS=b1 is not None,
        PRECISION=precision,
        BM=bm,
    )
    partial = torch.empty(T * k, D, device=x.device, dtype=x.dtype)
    _down_kernel[lambda meta: (num_tiles * (D // meta["BN"]),)](
        h,
        w2,
        routing.order,
        routing.tiles,
        partial,
        D,
        hb,
        H,
        PRECISION=precision,
        BM=bm,
    )
    y = torch.empty_like(x)
    bt, bd = 16, 256 if not _INTERPRET else 32
    _combine_kernel[(triton.cdiv(T, bt), triton.cdiv(D, bd))](
        partial,
        b2 if b2 is not None else x,
        y,
        T,
        D,
        TOPK=k,
        HAS_BIAS=b2 is not None,
        BT=bt,
        BD=bd,
    )
    return y
