"""The integer kernels the converted layers call, and the packing of 4-bit codes.

* oneDNN's int8 GEMM and convolution (``torch.ops.onednn.qlinear_pointwise``, ``qconv2d_pointwise``: VNNI/AMX on
  x86 CPUs, the kernels inductor's x86 int8 path lowers to) on weights reordered once into oneDNN's blocked layout;
* ``torch._int_mm`` elsewhere (cuBLASLt on CUDA);
* 4-bit codes packed two per byte.
"""

from __future__ import annotations

import math
import platform
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "ACTIVATIONS",
    "PrepackedLayer",
    "activation_key",
    "apply_activation",
    "ceil8",
    "inductor_freezing",
    "int8_mm",
    "onednn_available",
    "onednn_conv_prepack",
    "onednn_int8_conv",
    "onednn_int8_mm",
    "onednn_prepack",
    "pack_int4",
    "unpack_int4",
    "UINT8_OFFSET",
]

#: oneDNN's int8 kernels read unsigned input codes: a layer's int8 codes ``q`` (zero point ``z``) travel as ``q + 128``
#: with zero point ``z + 128``, which stand for the same values. Signed inputs would do on CPUs with AMX, but on those
#: with VNNI alone (AMD Zen 4, Intel before Sapphire Rapids) oneDNN 3.x runs a signed-input GEMM on its reference
#: kernel (``ref_int8``), a thousand times slower than its VNNI kernel for the same unsigned GEMM.
UINT8_OFFSET = 128


def pack_int4(codes: Tensor) -> Tensor:
    """Pack integer codes in ``[-8, 7]`` two per byte along the last dimension: ``[..., K] -> uint8 [..., ceil(K/2)]``
    (element ``2i`` in the low nibble, ``2i + 1`` in the high one, both offset by 8)."""
    if codes.numel() and (codes.min() < -8 or codes.max() > 7):
        raise ValueError("pack_int4: codes must lie in [-8, 7]")
    u = (codes.to(torch.int16) + 8).to(torch.uint8)
    if u.shape[-1] % 2:
        u = F.pad(u, (0, 1), value=8)
    return u[..., 0::2] | (u[..., 1::2] << 4)


def unpack_int4(packed: Tensor, length: int) -> Tensor:
    """Inverse of :func:`pack_int4`: ``uint8 [..., ceil(length/2)] -> int8 [..., length]``."""
    low, high = packed & 15, packed >> 4
    codes = torch.stack([low, high], dim=-1).reshape(*packed.shape[:-1], -1)[..., :length]
    return (codes.to(torch.int16) - 8).to(torch.int8)


def onednn_available(device: torch.device) -> bool:
    """Whether oneDNN's int8 kernels serve tensors on ``device``: an x86 CPU with oneDNN."""
    return (
        device.type == "cpu"
        and platform.machine().lower() in ("x86_64", "amd64")
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.onednn, "qlinear_prepack")
    )


def onednn_prepack(codes: Tensor) -> Tensor | None:
    """oneDNN's int8 weight, ``int8 [out, in]`` codes reordered for ``torch.ops.onednn.qlinear_pointwise`` (an opaque
    tensor), on an x86 CPU with oneDNN; ``None`` elsewhere (the layer then runs ``torch._int_mm``)."""
    if not onednn_available(codes.device):
        return None
    try:
        return torch.ops.onednn.qlinear_prepack(codes.contiguous(), None)
    except RuntimeError:
        return None


def onednn_conv_prepack(
    codes: Tensor,
    weight_scale: Tensor,
    *,
    x_scale: float,
    x_zero_point: int,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
) -> Tensor | None:
    """oneDNN's int8 convolution weight, ``int8 [out, in / groups, kh, kw]`` codes reordered for
    ``torch.ops.onednn.qconv2d_pointwise`` (an opaque tensor), on an x86 CPU with oneDNN; ``None`` elsewhere."""
    if not onednn_available(codes.device):
        return None
    try:
        return torch.ops.onednn.qconv_prepack(
            codes.contiguous(), weight_scale, x_scale, x_zero_point, stride, padding, dilation, groups, None
        )
    except RuntimeError:
        return None


#: activations the integer layers apply to their output (folded in by the fusions), as oneDNN post-ops
#: ``(name, algorithm)``; oneDNN's int8 convolution takes only ``"relu"``
ACTIVATIONS = {"relu": ("relu", ""), "gelu": ("gelu", "none"), "gelu_tanh": ("gelu", "tanh")}


def activation_key(module: nn.Module) -> str | None:
    """The :data:`ACTIVATIONS` key of an activation module; ``None`` for one oneDNN cannot apply."""
    if type(module) is nn.ReLU:
        return "relu"
    if type(module) is nn.GELU:
        return "gelu_tanh" if module.approximate == "tanh" else "gelu"
    return None


def apply_activation(y: Tensor, key: str | None) -> Tensor:
    """``y`` through the activation :data:`ACTIVATIONS` names ``key`` (``None``: unchanged), in floating point: the
    layers' paths without an epilogue."""
    if key is None:
        return y
    if key == "relu":
        return F.relu(y)
    return F.gelu(y, approximate="tanh" if key == "gelu_tanh" else "none")


def onednn_int8_mm(
    a: Tensor,
    packed: Tensor,
    weight_scale: Tensor,
    zero_point: Tensor,
    *,
    x_scale: float = 1.0,
    x_zero_point: int = 0,
    bias: Tensor | None = None,
    out_dtype: torch.dtype = torch.float32,
    activation: str | None = None,
    output_scale: float = 1.0,
    output_zero_point: int = 0,
) -> Tensor:
    """``act(x_scale * weight_scale * ((a - x_zero_point) @ w.T) + bias)``, ``[M, N]`` in ``out_dtype``: oneDNN's int8
    GEMM of ``a`` (uint8 ``[M, K]`` codes, see :data:`UINT8_OFFSET`) and a weight prepacked by :func:`onednn_prepack`
    (int8 ``[N, K]`` codes), scaled
    per output channel (``weight_scale`` float32 ``[N]``; ``zero_point`` int64 zeros ``[N]``, symmetric weights), with
    the input's scale and zero point, the bias and the activation (a key of :data:`ACTIVATIONS`) applied in the
    GEMM's epilogue. With ``out_dtype=torch.uint8`` the epilogue writes codes ``clamp(round(y / output_scale) +
    output_zero_point, 0, 255)`` instead."""
    post_op, algorithm = ACTIVATIONS[activation] if activation else ("none", "")
    return torch.ops.onednn.qlinear_pointwise(
        a,
        x_scale,
        x_zero_point,
        packed,
        weight_scale,
        zero_point,
        bias,
        output_scale,
        output_zero_point,
        out_dtype,
        post_op,
        [],
        algorithm,
    )


def inductor_freezing() -> bool:
    """Whether inductor freezes parameters (``torch._inductor.config.freezing``): only then does it lower oneDNN's
    int8 kernels, whose prepacked weights must be graph constants."""
    # inductor lowers oneDNN's int8 GEMM only with the prepacked weight as a graph constant, i.e. when freezing
    # (the usual setting for CPU inference: torch._inductor.config.freezing = True); without it the compiled graph
    # takes the torch._int_mm path
    import torch._inductor.config

    return bool(torch._inductor.config.freezing)


def ceil8(n: int) -> int:
    """``n`` rounded up to a multiple of 8."""
    return 8 * math.ceil(n / 8)


def int8_mm(a: Tensor, b: Tensor) -> Tensor:
    """``int8 [M, K] @ int8 [K', N] -> int32 [M, N]`` through ``torch._int_mm``; ``b`` may have zero rows appended
    (``K' >= K``, as :class:`QuantizedLinear` pads to multiples of 8). On CUDA, ``_int_mm`` needs ``M > 16`` and ``K``,
    ``N`` multiples of 8: rows are padded here and sliced off."""
    if a.shape[1] != b.shape[0]:
        a = F.pad(a, (0, b.shape[0] - a.shape[1]))
    rows = a.shape[0]
    if a.is_cuda and rows <= 16:
        a = F.pad(a, (0, 0, 0, 17 - rows))
    out = torch._int_mm(a.contiguous(), b)
    return out[:rows] if out.shape[0] != rows else out


def onednn_int8_conv(
    x: Tensor,
    packed: Tensor,
    weight_scale: Tensor,
    zero_point: Tensor,
    *,
    x_scale: float,
    x_zero_point: int,
    bias: Tensor | None,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
    out_dtype: torch.dtype = torch.float32,
    activation: str | None = None,
    output_scale: float = 1.0,
    output_zero_point: int = 0,
) -> Tensor:
    """``act(x_scale * weight_scale * conv2d(x - x_zero_point, w) + bias)``, ``[B, out, h, w]`` (channels-last) in
    ``out_dtype``: oneDNN's int8 convolution of ``x`` (uint8 ``[B, in, H, W]`` codes) and a weight prepacked by
    :func:`onednn_conv_prepack`, the rescaling, bias and activation (a key of :data:`ACTIVATIONS`) in its epilogue.
    With ``out_dtype=torch.uint8`` the epilogue writes codes ``clamp(round(y / output_scale) + output_zero_point, 0,
    255)`` instead."""
    post_op, algorithm = ACTIVATIONS[activation] if activation else ("none", "")
    return torch.ops.onednn.qconv2d_pointwise(
        x,
        x_scale,
        x_zero_point,
        packed,
        weight_scale,
        zero_point,
        bias,
        stride,
        padding,
        dilation,
        groups,
        output_scale,
        output_zero_point,
        out_dtype,
        post_op,
        [],
        algorithm,
    )


class PrepackedLayer(nn.Module):
    """Base of the integer layers that hold a weight prepacked for oneDNN in ``_packed``: an opaque tensor outside
    the state dict, which ``_refresh()`` (each layer's own) derives from the saved buffers after ``load_state_dict``,
    ``.to()`` and the like, ``copy.deepcopy`` and unpickling."""

    _packed: Tensor | None = None
    # each layer's own, set in its __init__ and _refresh (see QuantizedLinear, QuantizedConv2d)
    activation: str | None
    _codes_for: tuple[PrepackedLayer, ...]
    _x_scale: float
    _x_zero_point: int

    def __init__(self) -> None:
        super().__init__()
        self.register_load_state_dict_post_hook(lambda module, _: module._refresh())

    def _runs_onednn(self) -> bool:
        """Whether this call runs oneDNN on the prepacked weight: when there is one, and, under ``torch.compile``,
        only with inductor freezing (the only way inductor lowers the opaque weight); else the float fallback."""
        return self._packed is not None and (not torch.compiler.is_compiling() or inductor_freezing())

    def _epilogue(self, out_dtype: torch.dtype, codes_dtype: torch.dtype) -> dict[str, Any]:
        """Keyword arguments of a oneDNN call's output: the next layer's input codes (``codes_dtype``, at its input
        scale and zero point) when this layer writes them, in eval mode; else the output in ``out_dtype`` where
        oneDNN writes it (bf16), float32 otherwise. Either way with ``activation`` applied."""
        consumer = self._codes_for[0] if self._codes_for and not self.training else None
        if consumer is None:
            return {
                "out_dtype": out_dtype if out_dtype == torch.bfloat16 else torch.float32,
                "activation": self.activation,
            }
        return {
            "out_dtype": codes_dtype,
            "activation": self.activation,
            "output_scale": consumer._x_scale,
            "output_zero_point": consumer._x_zero_point,
        }

    def _refresh(self) -> None:
        raise NotImplementedError

    def set_extra_state(self, state: dict[str, Any]) -> None:
        # the configuration is fixed when the layer is built (restore_converted_layers builds it from this very state)
        if state != self.get_extra_state():
            raise ValueError(f"{type(self).__name__}: state dict configuration {state} differs from this layer's")

    def _apply(self, fn, recurse: bool = True):
        # the opaque prepacked weight cannot go through fn: dropped, then derived again on the new device or dtype
        self._packed = None
        super()._apply(fn, recurse)
        self._refresh()
        return self

    def __getstate__(self) -> dict[str, Any]:
        # the prepacked weight has no storage to copy or pickle; rebuilt after
        return {**super().__getstate__(), "_packed": None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._refresh()
