"""Integer attention on x86 CPUs with AVX-512 VNNI: ``softmax(q k^T * s + mask) v`` on signed 8-bit codes.

:func:`int8_attention` (the operator ``torch.ops.zoo.int8_attention``, which ``torch.compile`` calls as it is) takes
the query, key and value codes ``int8 [B, H, T, D]`` of a symmetric quantizer and returns float32 ``[B, H, T, D]``:
``q k^T`` as exact int32 sums on VNNI's u8 x s8 dot product, the softmax in float32, the probabilities rounded to
unsigned codes of ``1 / levels``, and ``P v`` again as exact int32 sums, scaled once. That is the arithmetic of
:func:`zoo.quant.attention.quantized_product` on the codes, in one pass over each head that keeps its ``T x T``
logits in a row buffer instead of writing them out (the C source, ``int8_attention.c``, says how).

Why a kernel of our own: PyTorch 2.11 has no integer attention, and torchao's (0.18, an inductor template) needs AMX
tiles, which AMD's CPUs and Intel's before Sapphire Rapids lack; on those, without it, the integer model's attention
cost as much as fp32 SDPA (README, "QAT").

The C source is compiled once per machine at first use (the C compiler ``$CC``, else ``cc``, ``gcc`` or ``clang``,
with ``-O3 -march=native -fopenmp``), into ``$ZOO_KERNEL_CACHE`` (default ``~/.cache/zoo/kernels``; the temporary
directory where that cannot be written), keyed by the source, the compiler and the CPU's flags, and written
atomically. Without a compiler, without AVX-512 VNNI, or off x86-64 Linux, :func:`available` is false and callers
take another path.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["available", "int8_attention"]

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("int8_attention.c")
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c11"]


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _cache_dir() -> Path:
    return Path(os.environ.get("ZOO_KERNEL_CACHE", Path.home() / ".cache" / "zoo" / "kernels"))


@functools.cache
def _library() -> ctypes.CDLL | None:
    if platform.machine() not in ("x86_64", "AMD64") or platform.system() != "Linux":
        return None
    cpu_flags = _cpu_flags()
    if "avx512_vnni" not in cpu_flags.split():
        return None
    compiler = next(filter(None, map(shutil.which, [os.environ.get("CC", ""), "cc", "gcc", "clang"])), None)
    if compiler is None:
        log.info("zoo int8 attention: no C compiler ($CC, cc, gcc, clang); the integer attention takes another path")
        return None
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256(
        "\0".join([SOURCE.read_text(), compiler, version, " ".join(FLAGS), cpu_flags]).encode()
    ).hexdigest()[:16]
    path = _cache_dir() / f"int8_attention_{key}.so"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError:  # a read-only home: the temporary directory, per user
        path = Path(tempfile.gettempdir()) / f"zoo-kernels-{os.getuid()}" / path.name
        path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
            built = Path(tmp) / path.name
            result = subprocess.run(
                [compiler, *FLAGS, str(SOURCE), "-o", str(built), "-lm"], capture_output=True, text=True
            )
            if result.returncode != 0:
                log.info("zoo int8 attention: %s failed to compile it; another path runs:\n%s", compiler, result.stderr)
                return None
            os.replace(built, path)  # atomic: a concurrent process finds the whole library or none
    library = ctypes.CDLL(str(path))
    fn = library.zoo_int8_attention
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int64] * 3 + [ctypes.c_void_p] + [ctypes.c_int64] * 4
    fn.argtypes += [ctypes.c_float, ctypes.c_float, ctypes.c_int32]
    return library


def available() -> bool:
    """Whether this machine runs :func:`int8_attention` (x86-64 Linux, AVX-512 VNNI, a C compiler)."""
    return _library() is not None


@torch.library.custom_op("zoo::int8_attention", mutates_args=())
def int8_attention(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, qk_scale: float, v_scale: float, levels: int
) -> Tensor:
    """``int8 [B, H, T, D]`` query, key and value codes (zero points 0) -> float32 ``[B, H, T, D]``:
    ``v_scale * round(levels * softmax(qk_scale * q k^T + mask)) v``.

    ``mask``: float additive (``-inf`` = may not attend) or bool (``True`` = may attend), broadcastable to
    ``[B, H, T, T]``, or ``None``. ``D`` a multiple of 4, ``levels`` at most 255. A row with every logit ``-inf`` gives
    zeros.
    """
    library = _library()
    if library is None:
        raise RuntimeError("zoo.kernels.int8_attention: not available here (x86-64 Linux, AVX-512 VNNI, a C compiler)")
    if not all(x.dtype == torch.int8 and x.device.type == "cpu" for x in (q, k, v)):
        raise ValueError("int8_attention: q, k and v must be int8 CPU tensors")
    if q.dim() != 4:
        raise ValueError(f"int8_attention: q, k and v must be [B, H, T, D]; got q of shape {tuple(q.shape)}")
    B, H, T, D = q.shape
    if k.shape != q.shape or v.shape != q.shape or D % 4 or not 1 <= levels <= 255:
        raise ValueError(f"int8_attention: q, k, v of one shape [B, H, T, D], D % 4 == 0, levels in 1..255; got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}, levels {levels}")  # fmt: skip
    # any batch, head and token strides (the projection's [B, T, H, 3, D] split leaves them), the last dimension dense
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    strides = (ctypes.c_int64 * 9)(*(stride for x in (q, k, v) for stride in x.stride()[:3]))
    mask_strides = (0, 0, 0)
    if mask is not None:
        if mask.dtype == torch.bool:
            mask = torch.zeros(mask.shape).masked_fill_(~mask, float("-inf"))
        mask = mask.to(torch.float32)
        if mask.dim() > 4 or not all(m in (1, n) for m, n in zip(mask.shape[::-1], (T, T, H, B), strict=False)):
            raise ValueError(f"int8_attention: mask of shape {tuple(mask.shape)} does not broadcast to {[B, H, T, T]}")
        mask = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape)).expand(B, H, T, T)
        if mask.stride(-1) != 1:
            mask = mask.contiguous()
        mask_strides = tuple(mask.stride()[:3])
    out = torch.empty(B, H, T, D, dtype=torch.float32)
    if out.numel() == 0:
        return out
    status = library.zoo_int8_attention(
        q.data_ptr(), k.data_ptr(), v.data_ptr(), strides, mask.data_ptr() if mask is not None else None, *mask_strides,
        out.data_ptr(), B, H, T, D, qk_scale, v_scale, levels,
    )  # fmt: skip
    if status == 1:
        raise MemoryError("int8_attention: the kernel could not allocate its scratch buffers")
    if status:
        raise ValueError(f"int8_attention: the kernel refused [B, H, T, D] = {[B, H, T, D]}, levels {levels}")
    return out


@int8_attention.register_fake
def _(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, qk_scale: float, v_scale: float, levels: int) -> Tensor:
    return q.new_empty(q.shape, dtype=torch.float32)
