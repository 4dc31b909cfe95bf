"""Real integer inference for a model trained with :func:`zoo.quant.quantize_`.

:func:`convert_` replaces every :class:`~zoo.quant.qat.QATLinear` by a :class:`QuantizedLinear`, every
:class:`~zoo.quant.qat.QATConv2d` by a :class:`~zoo.quant.conv.QuantizedConv2d` (:mod:`zoo.quant.conv`) and every
:class:`~zoo.quant.qat.QATEmbedding` by a :class:`QuantizedEmbedding`:

* weights are stored as integer codes with one float32 scale (and, when asymmetric, an int8 zero point) per output
  channel: one byte per weight at 5 to 8 bits, half a byte at 2 to 4 bits (two codes packed per byte);
* inputs are quantized to int8 codes (one scale per token computed at run time, or one per tensor learned or observed
  in training: the same codes the fake quantizer computed), and the product runs as a real integer GEMM (int8 x int8,
  int32 sums), then is rescaled to float:
  on x86 CPUs oneDNN's VNNI/AMX GEMM on a weight reordered once into its blocked layout
  (``torch.ops.onednn.qlinear_pointwise``, the kernel inductor's x86 int8 path lowers to; the input codes travel as
  uint8, offset by 128, see :data:`~zoo.quant.kernels.UINT8_OFFSET`), elsewhere
  ``torch._int_mm`` (cuBLASLt on CUDA). Under ``torch.compile`` the oneDNN GEMM needs inductor's freezing
  (``torch._inductor.config.freezing = True``, the usual CPU inference setting); without it compiled graphs take
  ``torch._int_mm``.

Why core PyTorch's integer GEMMs and not torchao's for the linears (torchao serves the attention product only,
:mod:`zoo.quant.attention`): torchao 0.18's int8 dynamic-activation path falls back on the CPU to an int32
``matmul`` in eager mode and to a float ``mm`` under ``torch.compile``, and its tensor subclasses need registering
before a ``weights_only=True`` load; the core ops give the integer kernels directly and a plain ``state_dict`` of
integer tensors. ``torch.ao``'s dynamic quantized
``Linear`` (fbgemm) is deprecated, per-tensor only and CPU only.

The converted model saves as a plain dictionary of tensors and primitives (:func:`save_converted`) and loads with
``torch.load(..., weights_only=True)`` (:func:`load_converted`). 4-bit codes stay packed on disk and are unpacked
once at load into the int8 matrix the GEMM reads (in memory: the packed codes plus one byte per weight; 8-bit layers
read their saved codes directly; on x86, oneDNN's reordered copy adds one byte per weight); :func:`main` is the
``python -m zoo convert`` command.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import io
import json
import math
import sys
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from zoo.errors import ConfigError, DataError, check_sizes
from zoo.layers.ffn import FeedForward
from zoo.quant.attention import QATScaledDotProduct, QuantizedScaledDotProduct
from zoo.quant.conv import QuantizedConv1d, QuantizedConv2d, fuse_convolutions_
from zoo.quant.fake_quant import quant_range, quantize_codes, row_qparams
from zoo.quant.kernels import (
    UINT8_OFFSET,
    PrepackedLayer,
    activation_key,
    apply_activation,
    ceil8,
    int8_mm,
    onednn_int8_mm,
    onednn_prepack,
    pack_int4,
    unpack_int4,
)
from zoo.quant.qat import (
    QATConv1d,
    QATConv2d,
    QATEmbedding,
    QATLinear,
    _replace,
    calibrating,
    qat_layers,
    quantize_,
    restore_qat_layers,
    static_quantizers,
)

__all__ = [
    "FORMAT",
    "QuantizedEmbedding",
    "QuantizedLinear",
    "QuantizedScaledDotProduct",
    "calibrate",
    "convert_",
    "fuse_feedforward_",
    "int8_mm",
    "load_converted",
    "main",
    "pack_int4",
    "save_converted",
    "state_dict_bytes",
    "unpack_int4",
]

FORMAT = "zoo.quant.converted/1"


class QuantizedLinear(PrepackedLayer):
    """Integer linear layer: ``[..., in_features] -> [..., out_features]`` in the input's dtype.

    Computes ``y = act(s_x * s_w * ((q_x - z_x) . (q_w - z_w)) + bias)`` with the dot product in int32 (oneDNN on
    x86 CPUs, else ``torch._int_mm``), ``q_x`` the input's codes (per token, dynamic; or per tensor with a stored
    scale), ``q_w`` the stored weight codes (per output channel) and ``act`` the identity unless
    :func:`fuse_feedforward_` folded the next activation in. With per-tensor inputs on oneDNN everything after the
    quantization of the input runs in the GEMM's epilogue.

    State dict (all tensors; the configuration is extra state of ints, bools and strings):
    ``qweight`` (int8 ``[out, in]``, or uint8 ``[out, ceil(in/2)]`` packed when ``weight_bit <= 4``), ``weight_scale``
    (float32 ``[out]``), ``weight_zero_point`` (int8 ``[out]``, asymmetric weights only), ``bias`` (float32
    ``[out]``), ``act_scale``/``act_zero_point`` (float32 ``[1]``, per-tensor inputs only).
    """

    zoo_converted = True

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        bias: bool = True,
        weight_bit: int = 8,
        activation_bit: int = 8,
        weight_symmetric: bool = True,
        activation_symmetric: bool = True,
        activation_granularity: str = "per_token",
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight_bit, self.activation_bit = weight_bit, activation_bit
        self.weight_symmetric, self.activation_symmetric = weight_symmetric, activation_symmetric
        self.activation_granularity = activation_granularity
        #: a key of ACTIVATIONS applied to the output, set by fuse_feedforward_ (derived from the model, not saved)
        self.activation: str | None = None
        #: (the next layer,) when this layer writes that layer's uint8 input codes instead of floats on the oneDNN
        #: per-tensor path; set by fuse_feedforward_ (a tuple, so that the next layer is not a submodule of this one)
        self._codes_for: tuple[QuantizedLinear, ...] = ()
        packed = weight_bit <= 4
        shape = (out_features, math.ceil(in_features / 2) if packed else in_features)
        self.register_buffer("qweight", torch.zeros(shape, dtype=torch.uint8 if packed else torch.int8, device=device))
        self.register_buffer("weight_scale", torch.ones(out_features, device=device))
        if not weight_symmetric:
            self.register_buffer("weight_zero_point", torch.zeros(out_features, dtype=torch.int8, device=device))
        self.register_buffer("bias", torch.zeros(out_features, device=device) if bias else None)
        if activation_granularity == "per_tensor":
            self.register_buffer("act_scale", torch.ones(1, device=device))
            self.register_buffer("act_zero_point", torch.zeros(1, device=device))
        # The GEMM's second operand, int8 [in, out] column-major (see _refresh), and the per-channel code sums the
        # zero-point corrections need. Derived from the state dict, so not saved.
        self.register_buffer("_wt", torch.zeros(0, dtype=torch.int8, device=device), persistent=False)
        self.register_buffer("_w_colsum", torch.zeros(0, dtype=torch.int32, device=device), persistent=False)
        self._refresh()

    @classmethod
    def from_qat(cls, layer: QATLinear) -> QuantizedLinear:
        """The integer layer computing what ``layer`` simulates at its current bit widths."""
        wq, aq = layer.weight_quant, layer.act_quant
        codes, scale, zero_point = wq.codes(layer.weight)
        out = cls(
            layer.in_features,
            layer.out_features,
            bias=layer.bias is not None,
            weight_bit=wq.bits,
            activation_bit=aq.bits,
            weight_symmetric=wq.symmetric,
            activation_symmetric=aq.symmetric,
            activation_granularity=aq.granularity,
            device=layer.weight.device,
        )
        codes = codes.to(torch.int8)
        out.qweight = pack_int4(codes) if wq.bits <= 4 else codes
        out.weight_scale = scale.reshape(-1).float().clone()
        if not wq.symmetric:
            out.weight_zero_point = zero_point.reshape(-1).to(torch.int8)
        if layer.bias is not None:
            out.bias = layer.bias.detach().float().clone()
        if aq.granularity == "per_tensor":
            act_scale, act_zero_point = aq.static_qparams()
            out.act_scale, out.act_zero_point = act_scale.reshape(1).float(), act_zero_point.reshape(1).float()
        out._refresh()
        return out

    def int_weight(self) -> Tensor:
        """The weight codes, int8 ``[out, in]`` (unpacked)."""
        if self.weight_bit <= 4:
            return unpack_int4(self.qweight, self.in_features)
        return self.qweight

    def dequantized_weight(self) -> Tensor:
        """The weight the codes stand for, float32 ``[out, in]``."""
        codes = self.int_weight().float()
        if not self.weight_symmetric:
            codes = codes - self.weight_zero_point.float()[:, None]
        return codes * self.weight_scale[:, None]

    def _refresh(self) -> None:
        w = codes = self.int_weight()
        if w.is_cuda:  # cuBLASLt wants K and N multiples of 8: zero rows and columns added, sliced off the output
            padded = torch.zeros(ceil8(self.out_features), ceil8(self.in_features), dtype=torch.int8, device=w.device)
            padded[: self.out_features, : self.in_features] = w
            w = padded
        # the column-major view of [N, K]: oneDNN runs 5-15% faster on it than on a row-major [K, N] copy, and
        # cuBLASLt several times faster (its int8 kernels take the second operand transposed); no copy at 8 bits
        self._wt = w.t()
        self._w_colsum = codes.sum(1, dtype=torch.int32)
        # oneDNN's prepacked int8 GEMM where there is one (x86 CPUs): the weight is reordered once into the blocked
        # layout the VNNI/AMX kernels read, where torch._int_mm reorders it at every call. Symmetric weights only, and
        # a per-token input's zero points are corrected for on the _int_mm path only (oneDNN takes one per tensor)
        supported = self.weight_symmetric and (self.activation_symmetric or self.activation_granularity == "per_tensor")
        self._packed = onednn_prepack(codes) if supported else None
        self._packed_zero_point = torch.zeros(self.out_features, dtype=torch.int64, device=codes.device)
        # oneDNN takes float32 scales and bias, whatever .to(dtype) did, and a per-tensor input's as Python numbers
        # (so that inductor lowers the call)
        self._packed_scale = self.weight_scale.float()
        self._packed_bias = None if self.bias is None else self.bias.float()
        if self.activation_granularity == "per_tensor" and self.act_scale.device.type != "meta":
            # of the uint8 codes oneDNN reads
            self._x_scale, self._x_zero_point = float(self.act_scale), int(self.act_zero_point) + UINT8_OFFSET

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        if not shape or shape[-1] != self.in_features:
            raise ValueError(f"{type(self).__name__}: expected input [..., {self.in_features}], got {list(shape)}")
        onednn = self._runs_onednn()
        if x.dtype in (torch.int8, torch.uint8):
            # the input's codes: uint8 (plus UINT8_OFFSET) as the layer before writes them (fuse_feedforward_), or
            # int8; each path takes its own
            if self.activation_granularity != "per_tensor":
                raise TypeError(
                    f"{type(self).__name__}: input codes need a per-tensor input scale; this layer quantizes "
                    f"its input {self.activation_granularity}"
                )
            q, out_dtype = x.reshape(-1, self.in_features), self.weight_scale.dtype  # the model's float dtype
            wanted, offset = (torch.uint8, UINT8_OFFSET) if onednn else (torch.int8, -UINT8_OFFSET)
            if q.dtype != wanted:
                q = (q.to(torch.int16) + offset).to(wanted)
            scale, zero_point = self.act_scale, self.act_zero_point
        else:
            q, scale, zero_point = self._quantize_input(x.reshape(-1, self.in_features).float(), unsigned=onednn)
            out_dtype = x.dtype
        if onednn and self.activation_granularity == "per_tensor":
            # the whole layer in oneDNN: the input's scale and zero point, the bias and the activation run in the
            # GEMM's epilogue, which writes the output once, in the input's dtype, or as the next layer's input codes
            y = onednn_int8_mm(
                q,
                self._packed,
                self._packed_scale,
                self._packed_zero_point,
                x_scale=self._x_scale,
                x_zero_point=self._x_zero_point,
                bias=self._packed_bias,
                **self._epilogue(out_dtype, torch.uint8),
            )
            return (y if y.dtype == torch.uint8 else y.to(out_dtype)).reshape(*shape[:-1], self.out_features)
        if onednn:
            # s_w (q_x . q_w) per output channel, float32, from oneDNN's int8 GEMM on the prepacked weight; the
            # per-token scales multiply after it
            y = onednn_int8_mm(
                q, self._packed, self._packed_scale, self._packed_zero_point, x_zero_point=UINT8_OFFSET
            ).mul_(scale.reshape(-1, 1))
        else:
            acc = int8_mm(q, self._wt)
            if acc.shape[1] != self.out_features:
                acc = acc[:, : self.out_features]
            # (q_x - z_x) . (q_w - z_w) = q_x . q_w - z_x sum(q_w) - z_w sum(q_x) + K z_x z_w
            if not self.activation_symmetric:
                z_x = zero_point.to(torch.int32).reshape(-1, 1)
                acc = acc - z_x * self._w_colsum
            if not self.weight_symmetric:
                z_w = self.weight_zero_point.to(torch.int32)
                correction = q.sum(1, keepdim=True, dtype=torch.int32)
                if not self.activation_symmetric:
                    correction = correction - self.in_features * z_x
                acc = acc - correction * z_w
            y = acc.float().mul_(scale.reshape(-1, 1)).mul_(self.weight_scale)
        if self.bias is not None:
            y = y.add_(self.bias)
        return apply_activation(y, self.activation).to(out_dtype).reshape(*shape[:-1], self.out_features)

    def _quantize_input(self, x: Tensor, *, unsigned: bool = False) -> tuple[Tensor, Tensor, Tensor]:
        # the codes of a float32 [rows, in_features] input, with their scale and zero point: the codes of
        # quantize_codes (what the fake quantizer computed), int8, or with unsigned=True uint8 plus UINT8_OFFSET (what
        # oneDNN reads), with fewer passes over the input (a per-token symmetric scale maps every row into
        # [-qmax, qmax] already, so its clamp is skipped)
        qmin, qmax = quant_range(self.activation_bit, self.activation_symmetric)
        if self.activation_granularity == "per_token":
            scale, zero_point = row_qparams(x, self.activation_bit, self.activation_symmetric)
        else:
            scale, zero_point = self.act_scale, self.act_zero_point
        q = torch.div(x, scale).round_()
        if not self.activation_symmetric:
            q.add_(zero_point)
        if not (self.activation_symmetric and self.activation_granularity == "per_token"):
            q.clamp_(qmin, qmax)
        if unsigned:
            return q.add_(UINT8_OFFSET).to(torch.uint8), scale, zero_point
        return q.to(torch.int8), scale, zero_point

    def get_extra_state(self) -> dict[str, Any]:
        return {
            "zoo_converted": "linear",
            "in_features": self.in_features,
            "out_features": self.out_features,
            "bias": self.bias is not None,
            "weight_bit": self.weight_bit,
            "activation_bit": self.activation_bit,
            "weight_symmetric": self.weight_symmetric,
            "activation_symmetric": self.activation_symmetric,
            "activation_granularity": self.activation_granularity,
        }

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"W{self.weight_bit}A{self.activation_bit}, {self.activation_granularity}"
            + (f", activation={self.activation}" if self.activation else "")
            + (", writes the next layer's uint8 input codes" if self._codes_for else "")
        )


def fuse_feedforward_(module: nn.Module) -> int:
    """Fuse the integer layers of every :class:`zoo.layers.FeedForward` of ``module`` whose ``fc1`` is a
    :class:`QuantizedLinear`, in place; returns how many FFNs changed. The outputs do not change (up to the rounding
    noted below).

    * The activation folds into ``fc1`` (``fc1.activation``; ``act`` becomes ``nn.Identity``): ReLU and GELU (exact
      or tanh); other activations stay. On oneDNN with per-tensor inputs it then runs in the GEMM's epilogue instead
      of as a separate pass over the ``[tokens, hidden]`` output (GELU's ``erf`` alone cost about as much as the
      layer's integer GEMM at VQA's width).
    * When the activation folded and ``fc1`` and ``fc2`` both take per-tensor inputs, ``fc2`` 8-bit ones, ``fc1``
      writes ``fc2``'s input codes (uint8, offset by 128) directly on that path (in eval mode), instead of floats that
      ``fc2`` would read back to quantize; ``fc2`` then returns the model's float dtype (float32, or bf16 after
      ``.to(torch.bfloat16)``). oneDNN clamps the codes to ``[0, 255]``, i.e. ``[-128, 127]`` before the offset,
      where a symmetric fake quantizer stops at -127: the two differ only for an output below ``-127.5`` times
      ``fc2``'s input scale, which a GELU output (at least -0.17) reaches only when ``fc2``'s whole input range is
      below 0.17, and a ReLU output never.
    """
    count = 0
    for ffn in module.modules():
        if not (isinstance(ffn, FeedForward) and isinstance(ffn.fc1, QuantizedLinear)):
            continue
        fc1, fc2, changed = ffn.fc1, ffn.fc2, False
        name = activation_key(ffn.act)
        if fc1.activation is None and name is not None:
            fc1.activation, ffn.act, changed = name, nn.Identity(), True
        chain = (  # after a folded ReLU or GELU, whose outputs are bounded below (see the docstring)
            fc1.activation is not None
            and type(ffn.act) is nn.Identity
            and isinstance(fc2, QuantizedLinear)
            and fc1.activation_granularity == fc2.activation_granularity == "per_tensor"
            and fc2.activation_bit == 8
        )
        if chain and not fc1._codes_for:
            fc1._codes_for, changed = (fc2,), True
        count += changed
    return count


class QuantizedEmbedding(nn.Embedding):
    """Embedding stored as integer codes with one scale per row (weight-only); ``[...] -> [..., embedding_dim]``.

    The float table is rebuilt once from the codes at load (so lookups cost what a float embedding costs, and
    ``.weight`` works as in ``nn.Embedding``); only the codes are saved: ``qweight`` (int8 ``[V, D]`` or uint8
    ``[V, ceil(D/2)]`` packed), ``weight_scale`` (float32 ``[V]``), ``weight_zero_point`` (int8 ``[V]``, asymmetric).
    """

    zoo_converted = True

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        *,
        weight_bit: int = 8,
        weight_symmetric: bool = True,
        padding_idx: int | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__(num_embeddings, embedding_dim, padding_idx=padding_idx, device=device)
        weight = self.weight.detach()
        del self.weight
        self.register_buffer("weight", weight, persistent=False)
        self.weight_bit, self.weight_symmetric = weight_bit, weight_symmetric
        packed = weight_bit <= 4
        shape = (num_embeddings, math.ceil(embedding_dim / 2) if packed else embedding_dim)
        self.register_buffer("qweight", torch.zeros(shape, dtype=torch.uint8 if packed else torch.int8, device=device))
        self.register_buffer("weight_scale", torch.ones(num_embeddings, device=device))
        if not weight_symmetric:
            self.register_buffer("weight_zero_point", torch.zeros(num_embeddings, dtype=torch.int8, device=device))
        self.register_load_state_dict_post_hook(lambda module, _: module._refresh())

    @classmethod
    def from_qat(cls, layer: QATEmbedding) -> QuantizedEmbedding:
        quantizer = layer.weight_quant
        weight = layer.weight.detach().float()
        scale, zero_point = row_qparams(weight, quantizer.bits, quantizer.symmetric)
        codes = quantize_codes(weight, scale, zero_point, *quantizer.qrange).to(torch.int8)
        out = cls(
            layer.num_embeddings,
            layer.embedding_dim,
            weight_bit=quantizer.bits,
            weight_symmetric=quantizer.symmetric,
            padding_idx=layer.padding_idx,
            device=weight.device,
        )
        for key in ("max_norm", "norm_type", "scale_grad_by_freq", "sparse"):
            setattr(out, key, getattr(layer, key))
        out.qweight = pack_int4(codes) if quantizer.bits <= 4 else codes
        out.weight_scale = scale.reshape(-1).clone()
        if not quantizer.symmetric:
            out.weight_zero_point = zero_point.reshape(-1).to(torch.int8)
        out._refresh()
        return out

    def _refresh(self) -> None:
        codes = unpack_int4(self.qweight, self.embedding_dim) if self.weight_bit <= 4 else self.qweight
        codes = codes.float()
        if not self.weight_symmetric:
            codes = codes - self.weight_zero_point.float()[:, None]
        self.weight = codes * self.weight_scale[:, None]

    def get_extra_state(self) -> dict[str, Any]:
        return {
            "zoo_converted": "embedding",
            "num_embeddings": self.num_embeddings,
            "embedding_dim": self.embedding_dim,
            "weight_bit": self.weight_bit,
            "weight_symmetric": self.weight_symmetric,
            "padding_idx": self.padding_idx,
        }

    def set_extra_state(self, state: dict[str, Any]) -> None:
        if state != self.get_extra_state():
            raise ValueError(f"QuantizedEmbedding: state dict configuration {state} differs from this layer's")


def convert_(module: nn.Module, *, fuse: bool = True) -> nn.Module:
    """Replace every fake-quantized layer of ``module`` by its integer counterpart, in place, at the bit widths the
    layers run at now, and fuses the integer layers of FFNs and of convolution stems (:func:`fuse_feedforward_`,
    :func:`~zoo.quant.conv.fuse_convolutions_`, unless ``fuse`` is false); puts ``module`` in eval mode and returns
    it. A ``BatchNorm2d`` that follows a fake-quantized convolution in an ``nn.Sequential`` folds into the integer
    convolution (its running statistics) and is replaced by ``nn.Identity``. Warns when a layer still runs above its
    target bits (a checkpoint taken before the schedule's last stage)."""
    unobserved = list(dict.fromkeys(n for n, q in static_quantizers(module) if not q.initialized))
    if unobserved:
        raise ConfigError(
            f"{len(unobserved)} layers with per-tensor inputs have observed no data, e.g. {unobserved[0]!r}: their "
            "input scales are unknown. Run a few batches through the model under zoo.quant.calibrating(model) (or "
            "train it with quantization-aware training) before convert_"
        )
    above = []
    for name, layer in list(qat_layers(module)):
        if layer.weight_quant.bits > layer.target_weight_bit:
            above.append(f"{name} ({layer.weight_quant.bits} > {layer.target_weight_bit})")
        if isinstance(layer, QATConv1d | QATConv2d):
            one_d = isinstance(layer, QATConv1d)
            batch_norm = _next_in_sequential(module, name)
            norm_type = nn.BatchNorm1d if one_d else nn.BatchNorm2d
            if not (type(batch_norm) is norm_type and batch_norm.track_running_stats):
                batch_norm = None
            new: nn.Module = (QuantizedConv1d if one_d else QuantizedConv2d).from_qat(layer, batch_norm)
            if batch_norm is not None:
                _replace(module, _sibling(name, 1), nn.Identity())
        elif isinstance(layer, QATLinear):
            new = QuantizedLinear.from_qat(layer)
        else:
            new = QuantizedEmbedding.from_qat(layer)
        if not name:
            return new.eval()
        _replace(module, name, new)
    for name, m in list(module.named_modules()):
        if isinstance(m, QATScaledDotProduct):
            _replace(module, name, QuantizedScaledDotProduct.from_qat(m))
    if above:
        warnings.warn(
            f"{len(above)} layers run above their target weight bits and are converted at those bits, e.g. "
            f"{above[0]}: was the checkpoint taken before the last stage of the QAT schedule?",
            stacklevel=2,
        )
    if fuse:
        fuse_feedforward_(module)
        fuse_convolutions_(module)
    return module.eval()


def _sibling(name: str, offset: int) -> str:
    parent, _, index = name.rpartition(".")
    return f"{parent}.{int(index) + offset}" if parent else str(int(index) + offset)


def _next_in_sequential(root: nn.Module, name: str) -> nn.Module | None:
    # the module after `name` in its parent, when that parent is an nn.Sequential
    parent_name, _, index = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    if not (isinstance(parent, nn.Sequential) and index.isdigit() and int(index) + 1 < len(parent)):
        return None
    return parent[int(index) + 1]


def restore_converted_layers(module: nn.Module, state_dict: Mapping[str, Any]) -> int:
    """Swap the layers that are integer layers in ``state_dict`` for empty integer layers of the saved configuration,
    so that ``module.load_state_dict(state_dict)`` loads it; returns how many were swapped."""
    count = 0
    for key, state in state_dict.items():
        if not (key.endswith("._extra_state") and isinstance(state, Mapping) and "zoo_converted" in state):
            continue
        name = key[: -len("._extra_state")]
        device = next((t.device for k, t in state_dict.items() if k.startswith(name + ".") and torch.is_tensor(t)))
        if state["zoo_converted"] in ("conv1d", "conv2d"):
            conv_class = QuantizedConv1d if state["zoo_converted"] == "conv1d" else QuantizedConv2d
            new: nn.Module = conv_class.from_extra_state(state, device)
            if state["folded_batch_norm"]:  # saved without the batch norm it absorbed
                _replace(module, _sibling(name, 1), nn.Identity())
        elif state["zoo_converted"] == "attention":
            new = QuantizedScaledDotProduct(bits=state["bits"], symmetric=state["symmetric"], device=device)
        elif state["zoo_converted"] == "linear":
            new = QuantizedLinear(
                state["in_features"],
                state["out_features"],
                bias=state["bias"],
                weight_bit=state["weight_bit"],
                activation_bit=state["activation_bit"],
                weight_symmetric=state["weight_symmetric"],
                activation_symmetric=state["activation_symmetric"],
                activation_granularity=state["activation_granularity"],
                device=device,
            )
        else:
            new = QuantizedEmbedding(
                state["num_embeddings"],
                state["embedding_dim"],
                weight_bit=state["weight_bit"],
                weight_symmetric=state["weight_symmetric"],
                padding_idx=state["padding_idx"],
                device=device,
            )
        _replace(module, name, new)
        count += 1
    return count


def save_converted(module: nn.Module, path: str | Path, *, metadata: Mapping[str, Any] | None = None) -> int:
    """Save a converted model as ``{"format", "metadata", "state_dict"}`` (tensors and primitives only, loadable with
    ``weights_only=True``); returns the file size in bytes. ``metadata`` holds primitives, e.g. the hyper-parameters
    that rebuild the model (``hparams`` with a ``_class_path``, as LightningCLI records them); other objects in it
    are stored as their ``repr``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"format": FORMAT, "metadata": _plain(dict(metadata or {})), "state_dict": module.state_dict()}, path)
    return path.stat().st_size


def load_converted(
    path: str | Path, model: nn.Module | None = None, *, map_location: str | torch.device = "cpu"
) -> nn.Module:
    """Load what :func:`save_converted` wrote (``torch.load(..., weights_only=True)``).

    Args:
        path: the converted file.
        model: the float model the conversion started from (same architecture, any weights); its layers are swapped
            for integer ones and the saved state loaded into it. ``None``: rebuild it from the ``hparams`` in the
            file's metadata (``python -m zoo convert`` writes them).
        map_location: where the tensors go.
    """
    artefact = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(artefact, dict) or artefact.get("format") != FORMAT:
        raise DataError(f"{path} is not a converted zoo model (no format {FORMAT!r}); write it with save_converted")
    if model is None:
        model = instantiate_from_hparams(artefact["metadata"].get("hparams"), source=str(path))
    state_dict = artefact["state_dict"]
    restore_converted_layers(model, state_dict)
    model.load_state_dict(state_dict)
    fuse_feedforward_(model)
    fuse_convolutions_(model)
    return model.to(map_location).eval()


def instantiate_from_hparams(
    hparams: Mapping[str, Any] | None, *, source: str, model_class: str | None = None, datamodule: bool = False
) -> Any:
    """Build the (untrained) model that the hyper-parameters of a checkpoint describe: LightningCLI's ``_class_path``
    form, or any LightningModule class (``module.Class``, imported) called with ``hparams`` as keyword arguments;
    with ``datamodule=True``, the LightningDataModule of ``datamodule_hyper_parameters`` instead."""
    from lightning.pytorch import LightningDataModule, LightningModule
    from lightning.pytorch.cli import instantiate_module

    base, what, flag = (
        (LightningDataModule, "datamodule", "--datamodule-class")
        if datamodule
        else (LightningModule, "model", "--model-class")
    )
    hparams = dict(hparams or {})
    hparams.pop("_instantiator", None)
    class_path = model_class or hparams.get("_class_path")
    if not class_path:
        raise ConfigError(
            f"{source}: its hyper-parameters name no {what} class (the {base.__name__} did not call "
            f"save_hyperparameters under LightningCLI); give {flag} module.Class"
        )
    module_name, _, class_name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError, ValueError) as err:
        raise ConfigError(f"{what} class {class_path!r} from {source} cannot be imported: {err}") from None
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise ConfigError(f"{what} class {class_path!r} from {source} is not a {base.__name__}")
    if "_class_path" in hparams:
        hparams["_class_path"] = class_path
        return instantiate_module(base, hparams)
    return cls(**hparams)


def _plain(value: Any) -> Any:
    # hyper-parameters as dicts, lists and scalars only (LightningCLI's hold jsonargparse Namespaces), so that the
    # converted file loads with weights_only=True in a process that has not imported jsonargparse
    if hasattr(value, "as_dict"):
        value = value.as_dict()
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    for kind in (bool, int, float, str):  # exact builtins: subclasses such as torch's TorchVersion do not load
        if isinstance(value, kind):
            return kind(value)
    return None if value is None else repr(value)


def state_dict_bytes(module: nn.Module) -> int:
    """Bytes ``torch.save(module.state_dict())`` writes (the size on disk of the weights)."""
    buffer = io.BytesIO()
    torch.save(module.state_dict(), buffer)
    return buffer.getbuffer().nbytes


def converted_layers(module: nn.Module) -> dict[str, int]:
    """How many integer layers of each kind and bit width ``module`` holds, e.g. ``{"linear W4A8": 12, "attention A8":
    7}``: the bits a converted model really runs at (a checkpoint from before the schedule's last stage converts
    above its targets)."""
    counts: dict[str, int] = {}
    for m in module.modules():
        if isinstance(m, QuantizedLinear):
            key = f"linear W{m.weight_bit}A{m.activation_bit}"
        elif isinstance(m, QuantizedConv2d):
            key = f"{m.get_extra_state()['zoo_converted']} W{m.weight_bit}A{m.activation_bit}"
        elif isinstance(m, QuantizedEmbedding):
            key = f"embedding W{m.weight_bit}"
        elif isinstance(m, QuantizedScaledDotProduct):
            key = f"attention A{m.bits}"
        else:
            continue
        counts[key] = counts.get(key, 0) + 1
    return counts


def calibrate(task: nn.Module, batches: Iterable[Any], num_batches: int) -> int:
    """Observe the per-tensor input ranges of a task quantized after training (:func:`quantize_` with
    ``activation_granularity="per_tensor"``, with convolutions, whose inputs are always per tensor, or with
    ``attention_bit``, whose operands are) on the first
    ``num_batches`` of ``batches``, each moved to the task's device and run through its ``predict_step``
    (Lightning's default: ``self(batch)``) under :func:`calibrating`; returns how many batches ran: none when the task
    has no per-tensor input quantizer (per-token scales need no calibration)."""
    from lightning.pytorch.utilities import move_data_to_device

    check_sizes("calibrate", num_batches=num_batches)
    if not static_quantizers(task):
        return 0
    device, seen = next(task.parameters()).device, 0
    with torch.no_grad(), calibrating(task):
        for seen, batch in enumerate(batches, start=1):
            task.predict_step(move_data_to_device(batch, device), seen - 1)
            if seen == num_batches:
                break
    return seen


def _calibrate(
    model: nn.Module, checkpoint: Mapping[str, Any], batches: int, *, source: str, datamodule_class: str | None
) -> None:
    # --calibrate: the first training batches of the datamodule the checkpoint records
    hparams = checkpoint.get("datamodule_hyper_parameters")
    if hparams is None and datamodule_class is None:
        raise ConfigError(
            f"--calibrate: {source} records no datamodule (it was not trained with one that saves its "
            "hyper-parameters); give --datamodule-class module.Class, or calibrate in Python under "
            "zoo.quant.calibrating"
        )
    data = instantiate_from_hparams(hparams, source=source, model_class=datamodule_class, datamodule=True)
    data.prepare_data()
    data.setup("fit")
    seen = calibrate(model, data.train_dataloader(), batches)
    print(f"calibrated the per-tensor input scales on {seen} training batches", file=sys.stderr)


def _quant_config(text: str) -> dict[str, Any]:
    # --quant: the keyword arguments of quantize_ as a JSON object
    try:
        config = json.loads(text)
    except json.JSONDecodeError as err:
        raise ConfigError(f"--quant is not valid JSON: {err}") from None
    if not isinstance(config, dict):
        raise ConfigError(f"--quant must be a JSON object of quantize_ arguments, got {text!r}")
    valid = [name for name, p in inspect.signature(quantize_).parameters.items() if p.kind is p.KEYWORD_ONLY]
    unknown = [key for key in config if key not in valid]
    if unknown:
        raise ConfigError(
            f"--quant: unknown key{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}; "
            f"valid keys: {', '.join(valid)}"
        )
    return config


def main(argv: list[str] | None = None) -> None:
    """``python -m zoo convert --ckpt RUN.ckpt --out MODEL.pt [--quant JSON [--calibrate N]] [--model-class C]``.

    Converts a checkpoint of a quantization-aware run (``python -m zoo fit --config vqa_qat.yaml``) into an integer
    model; with ``--quant``, quantizes a float checkpoint after training instead (post-training quantization: no
    calibration data needed with the default per-token activations; per-tensor ones observe their ranges on
    ``--calibrate N`` training batches of the checkpoint's datamodule). Prints the layers converted and the sizes.
    """
    parser = argparse.ArgumentParser(prog="python -m zoo convert", description=main.__doc__)
    parser.add_argument("--ckpt", required=True, help="Lightning checkpoint written by `python -m zoo fit`")
    parser.add_argument(
        "--out",
        required=True,
        help="file to write the converted model to (load_converted reads it); missing parent folders are created",
    )
    parser.add_argument(
        "--quant",
        help="post-training quantization of a float checkpoint: zoo.quant.quantize_ keyword arguments as JSON, "
        'e.g. \'{"weight_bit": 4, "activation_bit": 8}\' ({} for the defaults)',
    )
    parser.add_argument(
        "--calibrate",
        type=int,
        metavar="N",
        help="with --quant: run N >= 1 training batches of the checkpoint's datamodule under zoo.quant.calibrating "
        "(per-tensor input scales need it: activation_granularity per_tensor, and quantized convolutions)",
    )
    parser.add_argument(
        "--model-class", help="LightningModule class (module.Class) when the checkpoint does not record one"
    )
    parser.add_argument(
        "--datamodule-class", help="LightningDataModule class for --calibrate when the checkpoint does not record one"
    )
    args = parser.parse_args(argv)
    from zoo.weights import read_checkpoint  # here: zoo.weights imports zoo.quant

    if args.calibrate is not None and args.calibrate < 1:
        raise ConfigError(f"--calibrate {args.calibrate}: must be at least 1 (the number of training batches)")
    quant_config = None if args.quant is None else _quant_config(args.quant)
    ckpt_path, out = Path(args.ckpt), Path(args.out)
    if out.is_dir():
        raise ConfigError(f"--out {out}: cannot write (it is a directory)")
    if out.exists() and ckpt_path.exists() and out.samefile(ckpt_path):
        raise ConfigError(f"--out {out} is the --ckpt {ckpt_path}: converting would overwrite it; give another --out")
    checkpoint = read_checkpoint(ckpt_path, what="--ckpt")
    if not isinstance(checkpoint, Mapping) or "state_dict" not in checkpoint:
        raise DataError(f"--ckpt {ckpt_path} has no state_dict: is it a Lightning checkpoint?")
    hparams = checkpoint.get("hyper_parameters")
    model = instantiate_from_hparams(hparams, source=str(ckpt_path), model_class=args.model_class)
    float_bytes = state_dict_bytes(model)
    state_dict = checkpoint["state_dict"]
    swapped = restore_qat_layers(model, state_dict)
    if swapped and args.quant is not None:
        raise ConfigError(f"--ckpt {ckpt_path} is already quantization-aware ({swapped} layers); drop --quant")
    if not swapped and args.quant is None:
        raise ConfigError(
            f"--ckpt {ckpt_path} has no quantization-aware layers: convert a run of vqa_qat.yaml, or pass --quant "
            "for post-training quantization"
        )
    model.load_state_dict(state_dict)
    if quant_config is not None:
        model = quantize_(model.eval(), **quant_config)
    if args.calibrate:
        if args.quant is None:
            raise ConfigError("--calibrate is for post-training quantization (--quant): QAT trained the scales")
        _calibrate(model, checkpoint, args.calibrate, source=str(ckpt_path), datamodule_class=args.datamodule_class)
    elif args.quant is not None and static_quantizers(model):
        raise ConfigError(
            f"--quant {args.quant} quantizes activations per tensor, with static scales (activation_granularity "
            "per_tensor, conv_bit for the convolutions, or attention_bit), which must be observed: add --calibrate N "
            "(N training batches)"
        )
    model = convert_(model)
    metadata = {
        "hparams": dict(hparams or {}) | ({"_class_path": args.model_class} if args.model_class else {}),
        "source": str(ckpt_path),
        "method": "post-training" if args.quant is not None else "quantization-aware",
        "torch": str(torch.__version__),
    }
    try:
        size = save_converted(model, out, metadata=metadata)
    except OSError as err:  # creating a parent folder
        reason = f"{err.strerror}: {err.filename}" if err.filename else str(err)
        raise ConfigError(f"--out {out}: cannot write ({reason})") from None
    except RuntimeError as err:  # torch.save's writer: "[enforce fail at inline_container.cc:N] . ... strerror: WHY"
        if "strerror: " not in str(err):
            raise
        raise ConfigError(f"--out {out}: cannot write ({str(err).rpartition('strerror: ')[2]})") from None
    print(
        f"converted {ckpt_path} -> {out}: {converted_layers(model)}; weights {size / 1e6:.2f} MB on disk, "
        f"{size / float_bytes:.1%} of the float model's {float_bytes / 1e6:.2f} MB",
        file=sys.stderr,
    )
