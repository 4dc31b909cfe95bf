"""Integer convolution: :class:`QuantizedConv2d` and :class:`QuantizedConv1d` (run as a 2-D one of height 1), what
:func:`zoo.quant.convert_` makes of a :class:`~zoo.quant.qat.QATConv2d` or :class:`~zoo.quant.qat.QATConv1d`;
:func:`fold_batch_norm`, which folds the batch norm after one into it; and :func:`fuse_convolutions_`, which chains
the integer convolutions of an ``nn.Sequential`` stem.

On x86 CPUs the layer runs oneDNN's int8 convolution (``torch.ops.onednn.qconv2d_pointwise``, VNNI/AMX; the kernel
inductor's x86 int8 path lowers to) on uint8 input codes, with the rescaling, bias and a folded ReLU in its epilogue.
Elsewhere (CUDA, other CPUs: core PyTorch has no int8 convolution there) it runs in floating point on the
dequantized codes: the same results, the memory of int8 weights, none of the speed.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from zoo.quant.fake_quant import quant_range
from zoo.quant.kernels import (
    UINT8_OFFSET,
    PrepackedLayer,
    activation_key,
    apply_activation,
    onednn_conv_prepack,
    onednn_int8_conv,
    pack_int4,
    unpack_int4,
)
from zoo.quant.qat import QATConv1d, QATConv2d

__all__ = ["QuantizedConv1d", "QuantizedConv2d", "fold_batch_norm", "fuse_convolutions_"]


class QuantizedConv2d(PrepackedLayer):
    """Integer 2-D convolution: ``[B, in_channels, H, W] -> [B, out_channels, H', W']`` (channels-last) in the input's
    float dtype, or uint8 codes of the next layer's input (:func:`fuse_convolutions_`).

    Computes ``y = act(s_x * s_w * conv(q_x - z_x, q_w) + bias)`` with the convolution in int32 sums, ``q_x`` the
    input's codes (one stored scale and zero point per tensor), ``q_w`` the stored weight codes (symmetric, per
    output channel). A ``BatchNorm2d`` folded in at conversion (:func:`fold_batch_norm`) lives in ``weight_scale`` and
    ``bias``.

    State dict (all tensors; the configuration is extra state of ints, bools, strings and lists):
    ``qweight`` (int8 ``[out, in / groups, kh, kw]``, or uint8 ``[out, ceil(in / groups * kh * kw / 2)]`` packed when
    ``weight_bit <= 4``), ``weight_scale`` (float32 ``[out]``), ``bias`` (float32 ``[out]``), ``act_scale`` and
    ``act_zero_point`` (float32 ``[1]``).
    """

    zoo_converted = True

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: tuple[int, int],
        *,
        stride: tuple[int, int] = (1, 1),
        padding: tuple[int, int] = (0, 0),
        dilation: tuple[int, int] = (1, 1),
        groups: int = 1,
        bias: bool = True,
        weight_bit: int = 8,
        activation_bit: int = 8,
        activation_symmetric: bool = True,
        folded_batch_norm: bool = False,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_size, self.stride = list(kernel_size), list(stride)
        self.padding, self.dilation = list(padding), list(dilation)
        self.weight_bit, self.activation_bit, self.activation_symmetric = (
            weight_bit,
            activation_bit,
            activation_symmetric,
        )
        #: whether the BatchNorm2d after this layer (in its nn.Sequential) is folded into it and replaced by Identity
        self.folded_batch_norm = folded_batch_norm
        #: "relu" when fuse_convolutions_ folded the next ReLU in (derived from the model, not saved)
        self.activation: str | None = None
        #: (the next layer,) when this layer writes that layer's uint8 input codes; set by fuse_convolutions_
        self._codes_for: tuple[QuantizedConv2d, ...] = ()
        per_channel = in_channels // groups * math.prod(kernel_size)
        if weight_bit <= 4:
            self.register_buffer("qweight", torch.zeros(out_channels, math.ceil(per_channel / 2), dtype=torch.uint8,
                                                        device=device))  # fmt: skip
        else:
            shape = (out_channels, in_channels // groups, *kernel_size)
            self.register_buffer("qweight", torch.zeros(shape, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.ones(out_channels, device=device))
        self.register_buffer("bias", torch.zeros(out_channels, device=device) if bias else None)
        self.register_buffer("act_scale", torch.ones(1, device=device))
        self.register_buffer("act_zero_point", torch.zeros(1, device=device))
        self._refresh()

    @classmethod
    def from_qat(cls, layer: QATConv2d, batch_norm: nn.BatchNorm2d | None = None) -> QuantizedConv2d:
        """The integer layer computing what ``layer`` simulates at its current bit widths, followed by
        ``batch_norm`` (in eval mode: its running statistics) when given."""
        return cls._from_qat(layer, batch_norm, layer.kernel_size, layer.stride, layer.padding, layer.dilation)

    @classmethod
    def _from_qat(
        cls,
        layer: QATConv1d | QATConv2d,
        batch_norm: nn.Module | None,
        kernel_size: tuple[int, int],
        stride: tuple[int, int],
        padding: tuple[int, int],
        dilation: tuple[int, int],
    ) -> QuantizedConv2d:
        wq, aq = layer.weight_quant, layer.act_quant
        codes, scale, _ = wq.codes(layer.weight.flatten(1))
        scale = scale.reshape(-1).float()
        bias = layer.bias.detach().float() if layer.bias is not None else None
        if batch_norm is not None:
            codes, scale, bias = fold_batch_norm(codes, scale, bias, batch_norm)
        out = cls(
            layer.in_channels,
            layer.out_channels,
            kernel_size,
            stride=stride,
            padding=padding,
            dilation=dilation,
            groups=layer.groups,
            bias=bias is not None,
            weight_bit=wq.bits,
            activation_bit=aq.bits,
            activation_symmetric=aq.symmetric,
            folded_batch_norm=batch_norm is not None,
            device=layer.weight.device,
        )
        codes = codes.to(torch.int8)
        out.qweight = pack_int4(codes) if wq.bits <= 4 else codes.view(out.qweight.shape)
        out.weight_scale = scale.clone()
        if bias is not None:
            out.bias = bias.clone()
        act_scale, act_zero_point = aq.static_qparams()
        out.act_scale, out.act_zero_point = act_scale.reshape(1).float(), act_zero_point.reshape(1).float()
        out._refresh()
        return out

    def int_weight(self) -> Tensor:
        """The weight codes, int8 ``[out, in / groups, kh, kw]`` (unpacked)."""
        shape = (self.out_channels, self.in_channels // self.groups, *self.kernel_size)
        if self.weight_bit <= 4:
            return unpack_int4(self.qweight, math.prod(shape[1:])).view(shape)
        return self.qweight

    def dequantized_weight(self) -> Tensor:
        """The weight the codes stand for, float32 ``[out, in / groups, kh, kw]``."""
        return self.int_weight().float() * self.weight_scale.float()[:, None, None, None]

    def _refresh(self) -> None:
        if self.act_scale.device.type == "meta":
            return
        self._x_scale = float(self.act_scale)
        self._x_zero_point = int(self.act_zero_point) + UINT8_OFFSET  # of the uint8 codes
        self._packed_scale = self.weight_scale.float()
        self._packed_zero_point = torch.zeros(self.out_channels, dtype=torch.int64, device=self.weight_scale.device)
        self._packed_bias = None if self.bias is None else self.bias.float()
        self._packed = onednn_conv_prepack(
            self.int_weight(),
            self._packed_scale,
            x_scale=self._x_scale,
            x_zero_point=self._x_zero_point,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            groups=self.groups,
        )

    def quantize_input(self, x: Tensor) -> Tensor:
        """The uint8 codes of a float input, channels-last: the fake quantizer's codes plus 128."""
        qmin, qmax = quant_range(self.activation_bit, self.activation_symmetric)
        q = torch.div(x.float(), self._x_scale).round_().add_(self._x_zero_point)
        q = q.clamp_(qmin + UINT8_OFFSET, qmax + UINT8_OFFSET)
        return q.to(torch.uint8).contiguous(memory_format=torch.channels_last)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"{type(self).__name__}: expected input [B, {self.in_channels}, H, W], got {list(x.shape)}"
            )
        if x.dtype == torch.uint8:  # the input's codes, written by the layer before (fuse_convolutions_)
            q, out_dtype = x.contiguous(memory_format=torch.channels_last), self.weight_scale.dtype
        else:
            q, out_dtype = self.quantize_input(x), x.dtype
        onednn = self._runs_onednn()
        if not onednn:
            x_hat = (q.float() - self._x_zero_point) * self._x_scale
            y = F.conv2d(x_hat, self.dequantized_weight(), self._packed_bias, self.stride, self.padding, self.dilation,
                         self.groups)  # fmt: skip
            return apply_activation(y, self.activation).to(out_dtype)
        y = onednn_int8_conv(
            q,
            self._packed,
            self._packed_scale,
            self._packed_zero_point,
            x_scale=self._x_scale,
            x_zero_point=self._x_zero_point,
            bias=self._packed_bias,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            groups=self.groups,
            **self._epilogue(out_dtype, torch.uint8),
        )
        return y if y.dtype == torch.uint8 else y.to(out_dtype)

    def get_extra_state(self) -> dict[str, Any]:
        return {
            "zoo_converted": "conv2d",
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "kernel_size": list(self.kernel_size),
            "stride": list(self.stride),
            "padding": list(self.padding),
            "dilation": list(self.dilation),
            "groups": self.groups,
            "bias": self.bias is not None,
            "weight_bit": self.weight_bit,
            "activation_bit": self.activation_bit,
            "activation_symmetric": self.activation_symmetric,
            "folded_batch_norm": self.folded_batch_norm,
        }

    @classmethod
    def from_extra_state(cls, state: dict[str, Any], device: torch.device) -> QuantizedConv2d:
        """An empty layer of the configuration ``get_extra_state`` saved, for ``load_state_dict`` to fill."""
        config = {k: v for k, v in state.items() if k not in ("zoo_converted", "in_channels", "out_channels")}
        config["kernel_size"] = tuple(config["kernel_size"])
        return cls(state["in_channels"], state["out_channels"], device=device, **config)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={tuple(self.kernel_size)}, "
            f"stride={tuple(self.stride)}, padding={tuple(self.padding)}"
            + (f", dilation={tuple(self.dilation)}" if any(d != 1 for d in self.dilation) else "")
            + (f", groups={self.groups}" if self.groups != 1 else "")
            + f", W{self.weight_bit}A{self.activation_bit}"
            + (", batch norm folded" if self.folded_batch_norm else "")
            + (f", activation={self.activation}" if self.activation else "")
            + (", writes the next layer's uint8 input codes" if self._codes_for else "")
        )


class QuantizedConv1d(QuantizedConv2d):
    """Integer 1-D convolution, ``[B, in_channels, L] -> [B, out_channels, L']``: computed as a 2-D one of height 1
    (the same kernels, :class:`QuantizedConv2d`), which is also how its geometry is stored (``kernel_size`` ``[1, k]``,
    ``qweight`` ``[out, in / groups, 1, k]``)."""

    @classmethod
    def from_qat(cls, layer: QATConv1d, batch_norm: nn.BatchNorm1d | None = None) -> QuantizedConv1d:
        """The integer layer computing what ``layer`` simulates at its current bit widths, followed by
        ``batch_norm`` (in eval mode: its running statistics) when given."""
        (k,), (s,), (p,), (d,) = layer.kernel_size, layer.stride, layer.padding, layer.dilation
        return cls._from_qat(layer, batch_norm, (1, k), (1, s), (0, p), (1, d))

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 3 or x.shape[1] != self.in_channels:
            raise ValueError(f"{type(self).__name__}: expected input [B, {self.in_channels}, L], got {list(x.shape)}")
        return super().forward(x.unsqueeze(2)).squeeze(2)

    def get_extra_state(self) -> dict[str, Any]:
        return {**super().get_extra_state(), "zoo_converted": "conv1d"}


@torch.no_grad()
def fold_batch_norm(
    codes: Tensor, scale: Tensor, bias: Tensor | None, batch_norm: nn.BatchNorm1d | nn.BatchNorm2d
) -> tuple[Tensor, Tensor, Tensor]:
    """Fold an eval-mode ``batch_norm`` into a convolution's symmetric per-channel weight: ``(codes [out, K], scale
    [out], bias [out] or None)`` -> the same three for ``bn(conv(x))``.

    ``bn(y) = a * y + b`` per channel with ``a = gamma / sqrt(var + eps)``; ``a * s * q`` is ``|a| s`` times
    ``sign(a) q``, so the codes only change sign where ``a < 0`` (a symmetric range is symmetric about zero) and the
    folded layer computes exactly what the fake-quantized one followed by the batch norm computed.
    """
    var = batch_norm.running_var.float()
    gamma = batch_norm.weight.float() if batch_norm.weight is not None else torch.ones_like(var)
    beta = batch_norm.bias.float() if batch_norm.bias is not None else torch.zeros_like(var)
    a = gamma / torch.sqrt(var + batch_norm.eps)
    b = beta - a * batch_norm.running_mean.float() + (a * bias if bias is not None else 0.0)
    sign = torch.where(a < 0, -1.0, 1.0)
    return codes * sign[:, None], scale * a.abs(), b


def fuse_convolutions_(module: nn.Module) -> int:
    """Fuse the integer convolutions of every ``nn.Sequential`` of ``module``, in place; returns how many layers
    changed. The outputs do not change.

    * A ``ReLU`` right after a :class:`QuantizedConv2d` (``nn.Identity`` left by a folded batch norm in between)
      folds into it (``activation="relu"``, the ReLU becomes ``nn.Identity``): oneDNN applies it in the epilogue.
    * When that convolution is followed by another :class:`QuantizedConv2d` with 8-bit inputs, it writes that
      layer's uint8 input codes directly (in eval mode, on oneDNN): the ``[B, C, H, W]`` float feature map between
      them is never written. The codes are those of the next layer's fake quantizer: its range, plus 128, is
      ``[0, 255]`` (asymmetric) or ``[1, 255]`` (symmetric, which a ReLU output never reaches below).
    """
    count = 0
    for sequential in module.modules():
        if not isinstance(sequential, nn.Sequential):
            continue
        children = list(sequential)
        for i, conv in enumerate(children):
            if not isinstance(conv, QuantizedConv2d):
                continue
            following = [m for m in children[i + 1 :] if type(m) is not nn.Identity]
            changed = False
            if conv.activation is None and following and activation_key(following[0]) == "relu":
                conv.activation, changed = "relu", True
                index = children.index(following[0])
                sequential[index] = children[index] = nn.Identity()
                following = following[1:]
            chain = (
                conv.activation == "relu"
                and following
                and type(following[0]) is type(conv)
                and following[0].activation_bit == 8
            )
            if chain and not conv._codes_for:
                conv._codes_for, changed = (following[0],), True
            count += changed
    return count
