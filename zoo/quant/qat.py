"""Quantization-aware training: :func:`quantize_` swaps a model's ``nn.Linear`` (and ``nn.Conv2d``, ``nn.Embedding``)
layers, chosen by module-name patterns, for fake-quantized ones that train in floating point while simulating integer
rounding.

    from zoo.quant import quantize_
    quantize_(model, weight_bit=4, activation_bit=8, quant_method="symmetric")   # or task.quantize(**quant_config)

Per-layer bit widths come from ``overrides``, a mapping ``{pattern: bits}`` whose patterns are ``fnmatch`` patterns
over module names (``*`` also crosses dots). The default is :data:`DEFAULT_OVERRIDES`: attention projections 8-bit,
FFN layers 4-bit; every other ``nn.Linear`` gets ``weight_bit``; convolutions are quantized only when ``conv_bit`` is
given (their inputs need calibrated scales). A pattern also matches everything inside the module it names (``"head"``
covers ``head.1`` and ``head.4``); when several patterns match a layer, the last one wins.

Layers keep their ``weight``/``bias`` parameters (the same tensor objects), so an optimizer built before or after the
swap trains them, and a float checkpoint loads into the quantized model with ``strict=False``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from fnmatch import fnmatchcase
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from zoo.errors import ConfigError
from zoo.layers.attention import ScaledDotProduct
from zoo.quant.attention import QATScaledDotProduct
from zoo.quant.fake_quant import (
    FakeQuantizer,
    Granularity,
    Observer,
    QuantMethod,
    check_bits,
    check_method,
    check_observer,
)

__all__ = [
    "DEFAULT_OVERRIDES",
    "QATConv1d",
    "QATConv2d",
    "QATEmbedding",
    "QATLinear",
    "QATScaledDotProduct",
    "calibrating",
    "freeze_observers",
    "qat_layers",
    "quantizable_conv",
    "quantize_",
    "restore_qat_layers",
    "set_schedule_bits",
    "static_quantizers",
    "weight_quant_error",
]

#: The default mixed policy: attention projections at 8 bits, the FFN's two layers at 4 (dense and DSA FFNs alike;
#: the DSA gate ``*.ffn.gate.proj`` is not an FFN layer and gets ``weight_bit``).
DEFAULT_OVERRIDES: dict[str, int] = {"*.attn.qkv": 8, "*.attn.proj": 8, "*.ffn.fc1": 4, "*.ffn.fc2": 4}
_OVERRIDE_KEYS = ("weight_bit", "activation_bit", "quant_method")
_LINEAR_DEFAULTS: dict[str, Any] = {
    "weight_bit": 8,
    "activation_bit": 8,
    "quant_method": "symmetric",
    "activation_granularity": "per_token",
    "learnable_scales": False,
    "observer": "minmax",
}
_CONV_DEFAULTS: dict[str, Any] = {k: v for k, v in _LINEAR_DEFAULTS.items() if k != "activation_granularity"}


class QATLinear(nn.Module):
    """``nn.Linear`` with fake-quantized weights (per output channel) and inputs (per token or per tensor):
    ``[..., in_features] -> [..., out_features]``.

    Args:
        in_features, out_features, bias: as ``nn.Linear``.
        weight_bit: the layer's target weight bit width (2..8). A schedule may run it at more bits for a while
            (``weight_quant.bits``) but never at fewer.
        activation_bit: input bit width (2..8).
        quant_method: ``"symmetric"`` or ``"asymmetric"``, for weights and inputs.
        activation_granularity: ``"per_token"`` (dynamic, one scale per row; the default, and what integer
            inference computes) or ``"per_tensor"`` (static, observed).
        learnable_scales: LSQ scales for the weight and for a per-tensor input quantizer.
        observer: weight-range observer, ``"minmax"`` or ``"mse"``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        weight_bit: int = 8,
        activation_bit: int = 8,
        quant_method: QuantMethod = "symmetric",
        activation_granularity: Granularity = "per_token",
        learnable_scales: bool = False,
        observer: Observer = "minmax",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        base = nn.Linear(in_features, out_features, bias=bias, device=device, dtype=dtype)
        config = dict(weight_bit=weight_bit, activation_bit=activation_bit, quant_method=quant_method,
                      activation_granularity=activation_granularity, learnable_scales=learnable_scales,
                      observer=observer)  # fmt: skip
        self._setup(base.weight, base.bias, **config)

    @classmethod
    def from_linear(cls, linear: nn.Linear | QATLinear, **config: Any) -> QATLinear:
        """A QAT layer that shares ``linear``'s weight and bias parameters; ``config`` as the constructor."""
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        unknown = sorted(set(config) - set(_LINEAR_DEFAULTS))
        if unknown:
            raise ConfigError(f"QATLinear: {unknown[0]} is not a setting; use {', '.join(_LINEAR_DEFAULTS)}")
        layer._setup(linear.weight, linear.bias, **(_LINEAR_DEFAULTS | config))
        return layer

    def _setup(
        self,
        weight: nn.Parameter,
        bias: nn.Parameter | None,
        weight_bit: int,
        activation_bit: int,
        quant_method: QuantMethod,
        activation_granularity: Granularity,
        learnable_scales: bool,
        observer: Observer,
    ) -> None:
        symmetric = check_method(quant_method)
        self.out_features, self.in_features = weight.shape
        self.weight = weight
        self.bias = bias
        self.target_weight_bit = check_bits(weight_bit, "weight_bit")
        self.config = {
            "weight_bit": weight_bit,
            "activation_bit": check_bits(activation_bit, "activation_bit"),
            "quant_method": quant_method,
            "activation_granularity": activation_granularity,
            "learnable_scales": learnable_scales,
            "observer": observer,
        }
        factory = {"device": weight.device}
        self.weight_quant = FakeQuantizer(
            bits=weight_bit,
            symmetric=symmetric,
            granularity="per_channel",
            channels=self.out_features,
            learnable=learnable_scales,
            observer=observer,
        ).to(**factory)
        self.act_quant = FakeQuantizer(
            bits=activation_bit,
            symmetric=symmetric,
            granularity=activation_granularity,
            learnable=learnable_scales and activation_granularity != "per_token",
        ).to(**factory)
        self.weight_quant.observe(weight)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(self.act_quant(x), self.weight_quant(self.weight), self.bias)

    def get_extra_state(self) -> dict[str, Any]:
        return {"zoo_qat": "linear", "bias": self.bias is not None, **self.config}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.config = {k: state[k] for k in self.config}
        self.target_weight_bit = state["weight_bit"]

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class QATEmbedding(nn.Module):
    """``nn.Embedding`` whose looked-up rows are fake-quantized, one scale per row (weight-only): ``[...] -> [...,
    embedding_dim]``.

    Each row's scale comes from the row itself, in training and after conversion alike, so there is no observer to
    freeze. Only the rows looked up are quantized, which is the same as quantizing the table first.
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        *,
        weight_bit: int = 8,
        quant_method: QuantMethod = "symmetric",
        padding_idx: int | None = None,
    ) -> None:
        super().__init__()
        base = nn.Embedding(num_embeddings, embedding_dim, padding_idx=padding_idx)
        self._setup(base, weight_bit, quant_method)

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding | QATEmbedding, **config: Any) -> QATEmbedding:
        """A QAT embedding sharing ``embedding``'s weight; ``config``: ``weight_bit``, ``quant_method``."""
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer._setup(embedding, config.get("weight_bit", 8), config.get("quant_method", "symmetric"))
        return layer

    def _setup(self, embedding: nn.Embedding | QATEmbedding, weight_bit: int, quant_method: QuantMethod) -> None:
        self.weight = embedding.weight
        self.num_embeddings, self.embedding_dim = embedding.weight.shape
        for key in ("padding_idx", "max_norm", "norm_type", "scale_grad_by_freq", "sparse"):
            setattr(self, key, getattr(embedding, key))
        self.target_weight_bit = check_bits(weight_bit, "weight_bit")
        self.config = {"weight_bit": weight_bit, "quant_method": quant_method}
        self.weight_quant = FakeQuantizer(
            bits=weight_bit, symmetric=check_method(quant_method), granularity="per_token"
        )

    def forward(self, ids: Tensor) -> Tensor:
        rows = F.embedding(
            ids, self.weight, self.padding_idx, self.max_norm, self.norm_type, self.scale_grad_by_freq, self.sparse
        )
        return self.weight_quant(rows)

    def get_extra_state(self) -> dict[str, Any]:
        return {"zoo_qat": "embedding", "padding_idx": self.padding_idx, **self.config}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.config = {k: state[k] for k in self.config}
        self.target_weight_bit = state["weight_bit"]

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}"


class _QATConv(nn.Module):
    """What :class:`QATConv1d` and :class:`QATConv2d` share: fake-quantized weights (per output channel, symmetric)
    and inputs (per tensor, static: observed, or learned with LSQ).

    The granularities are those of oneDNN's int8 convolution, which :func:`zoo.quant.convert_` turns the layer into:
    one input scale and zero point per tensor, symmetric weights. ``quant_method`` therefore sets the inputs' method
    only. A batch norm that follows the layer in an ``nn.Sequential`` stays a float module in training and folds into
    the integer layer's per-channel scales and bias at conversion, which leaves the codes unchanged.
    """

    _float_type: type[nn.Module]
    _kind: str

    def __init__(
        self,
        *args: Any,
        weight_bit: int = 8,
        activation_bit: int = 8,
        quant_method: QuantMethod = "symmetric",
        learnable_scales: bool = False,
        observer: Observer = "minmax",
        **conv_kwargs: Any,
    ) -> None:
        super().__init__()
        conv = self._float_type(*args, **conv_kwargs)
        self._setup(conv, weight_bit, activation_bit, quant_method, learnable_scales, observer)

    @staticmethod
    def _conv(x: Tensor, weight: Tensor, bias: Tensor | None, *args: Any) -> Tensor:
        raise NotImplementedError

    @classmethod
    def from_conv(cls, conv: nn.Module, **config: Any) -> _QATConv:
        """A QAT layer that shares ``conv``'s weight and bias parameters; ``config`` as the constructor."""
        if not (isinstance(conv, cls) or (type(conv) is cls._float_type and quantizable_conv(conv))):
            raise ConfigError(
                f"{cls.__name__}: only a zero-padded {cls._float_type.__name__} with numeric padding quantizes; got "
                f"{conv} (padding={getattr(conv, 'padding', None)!r}, "
                f"padding_mode={getattr(conv, 'padding_mode', None)!r})"
            )
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        unknown = sorted(set(config) - set(_CONV_DEFAULTS))
        if unknown:
            raise ConfigError(f"{cls.__name__}: {unknown[0]} is not a setting; use {', '.join(_CONV_DEFAULTS)}")
        layer._setup(conv, **(_CONV_DEFAULTS | config))
        return layer

    def _setup(
        self,
        conv: nn.Module,
        weight_bit: int,
        activation_bit: int,
        quant_method: QuantMethod,
        learnable_scales: bool,
        observer: Observer,
    ) -> None:
        symmetric = check_method(quant_method)
        self.weight, self.bias = conv.weight, conv.bias
        self.out_channels, in_per_group, *kernel = conv.weight.shape
        self.in_channels = in_per_group * conv.groups
        self.kernel_size = tuple(kernel)
        self.stride, self.padding, self.dilation = tuple(conv.stride), tuple(conv.padding), tuple(conv.dilation)
        self.groups = conv.groups
        self.target_weight_bit = check_bits(weight_bit, "weight_bit")
        self.config = {
            "weight_bit": weight_bit,
            "activation_bit": check_bits(activation_bit, "activation_bit"),
            "quant_method": quant_method,
            "learnable_scales": learnable_scales,
            "observer": observer,
        }
        factory = {"device": conv.weight.device}
        self.weight_quant = FakeQuantizer(
            bits=weight_bit,
            symmetric=True,
            granularity="per_channel",
            channels=self.out_channels,
            learnable=learnable_scales,
            observer=observer,
        ).to(**factory)
        self.act_quant = FakeQuantizer(
            bits=activation_bit, symmetric=symmetric, granularity="per_tensor", learnable=learnable_scales
        ).to(**factory)
        self.weight_quant.observe(self.weight.flatten(1))

    @property
    def padding_mode(self) -> str:
        return "zeros"

    def forward(self, x: Tensor) -> Tensor:
        # the quantizers work on [out, in * kernel] rows: one scale per output channel
        weight = self.weight_quant(self.weight.flatten(1)).view_as(self.weight)
        return self._conv(self.act_quant(x), weight, self.bias, self.stride, self.padding, self.dilation, self.groups)

    def get_extra_state(self) -> dict[str, Any]:
        return {"zoo_qat": self._kind, "bias": self.bias is not None, **self.config}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.config = {k: state[k] for k in self.config}
        self.target_weight_bit = state["weight_bit"]

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, groups={self.groups}, bias={self.bias is not None}"
        )


class QATConv2d(_QATConv):
    """``nn.Conv2d`` with fake-quantized weights (per output channel, symmetric) and inputs (per tensor):
    ``[B, in_channels, H, W] -> [B, out_channels, H', W']``. A ``BatchNorm2d`` after it in an ``nn.Sequential`` folds
    into the integer layer at conversion (see the base class, ``_QATConv``).

    Args:
        *args, **conv_kwargs: those of ``nn.Conv2d`` (``in_channels``, ``out_channels``, ``kernel_size``, ...,
            ``device``, ``dtype``; numeric padding, zero-padded).
        weight_bit: the layer's target weight bit width (2..8).
        activation_bit: input bit width (2..8).
        quant_method: ``"symmetric"`` or ``"asymmetric"`` inputs.
        learnable_scales: LSQ scales for the weight and the input.
        observer: weight-range observer, ``"minmax"`` or ``"mse"``.
    """

    _float_type, _kind = nn.Conv2d, "conv2d"
    _conv = staticmethod(F.conv2d)


class QATConv1d(_QATConv):
    """``nn.Conv1d`` with fake-quantized weights (per output channel, symmetric) and inputs (per tensor):
    ``[B, in_channels, L] -> [B, out_channels, L']``; converted into a 2-D integer convolution of height 1. Arguments
    as :class:`QATConv2d`'s, with those of ``nn.Conv1d``."""

    _float_type, _kind = nn.Conv1d, "conv1d"
    _conv = staticmethod(F.conv1d)


def quantizable_conv(conv: nn.Module) -> bool:
    """Whether :func:`quantize_` fake-quantizes ``conv``: an ``nn.Conv1d`` or ``nn.Conv2d`` itself (not a subclass,
    whose forward may differ: timm's ``Conv2dSame`` pads at run time) with numeric zero padding, or a QAT
    convolution."""
    if isinstance(conv, _QATConv):
        return True
    return type(conv) in (nn.Conv1d, nn.Conv2d) and conv.padding_mode == "zeros" and not isinstance(conv.padding, str)


QATLayer = QATLinear | QATConv1d | QATConv2d | QATEmbedding


def _matches(name: str, pattern: str) -> bool:
    return fnmatchcase(name, pattern) or fnmatchcase(name, pattern + ".*")


def _override_rules(overrides: Mapping[str, Any]) -> list[tuple[str, dict[str, Any] | None]]:
    if not isinstance(overrides, Mapping):
        raise ConfigError(f"overrides={overrides!r} must be a mapping {{module-name pattern: bits}}")
    rules = []
    for pattern, value in overrides.items():
        key = f"overrides[{pattern!r}]"
        if not isinstance(pattern, str) or not pattern:
            raise ConfigError(f"{key}: patterns must be non-empty strings")
        if value is None:
            rules.append((pattern, None))
            continue
        if not isinstance(value, Mapping):
            value = {"weight_bit": value}
        unknown = sorted(set(value) - set(_OVERRIDE_KEYS))
        if unknown:
            raise ConfigError(f"{key}.{unknown[0]} is not a quantization setting; use {', '.join(_OVERRIDE_KEYS)}")
        for bits_key in ("weight_bit", "activation_bit"):
            if bits_key in value:
                check_bits(value[bits_key], f"{key}.{bits_key}")
        if "quant_method" in value:
            check_method(value["quant_method"], f"{key}.quant_method")
        rules.append((pattern, dict(value)))
    return rules


def _replace(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, new)


def quantize_(
    module: nn.Module,
    *,
    weight_bit: int = 4,
    activation_bit: int = 8,
    quant_method: QuantMethod = "symmetric",
    overrides: Mapping[str, int | Mapping[str, Any] | None] | None = None,
    activation_granularity: Granularity = "per_token",
    learnable_scales: bool = False,
    observer: Observer = "minmax",
    activation_observer: Observer = "minmax",
    embedding_bit: int | None = 8,
    conv_bit: int | None = None,
    attention_bit: int | None = None,
) -> nn.Module:
    """Prepare ``module`` for quantization-aware training, in place; returns it (or the replacement when ``module``
    itself is an ``nn.Linear``).

    Args:
        module: any model; its ``nn.Linear`` layers become :class:`QATLinear`, its ``nn.Conv2d`` layers
            :class:`QATConv2d` (``nn.Conv1d``: :class:`QATConv1d`; inputs per tensor, whatever
            ``activation_granularity`` says; see
            :func:`quantizable_conv` for which), its ``nn.Embedding`` layers :class:`QATEmbedding` (weight-only, per
            row).
        weight_bit: weight bits of every ``nn.Linear`` no override pattern matches (2..8).
        activation_bit: input bits of every quantized ``nn.Linear`` and ``nn.Conv2d`` (2..8).
        quant_method: ``"symmetric"`` or ``"asymmetric"``.
        overrides: ``{pattern: value}``; ``value`` is the weight bits, a mapping with any of ``weight_bit``,
            ``activation_bit``, ``quant_method``, or ``None`` to keep the matched layers in floating point.
            ``None`` (the default) means :data:`DEFAULT_OVERRIDES`; give ``{}`` for ``weight_bit`` everywhere. A given
            pattern that matches no layer is an error.
        activation_granularity: ``"per_token"`` (dynamic) or ``"per_tensor"`` (static, observed) inputs of the
            ``nn.Linear`` layers.
        learnable_scales: learn scales with LSQ (weights, and per-tensor inputs).
        observer: weight-range observer, ``"minmax"`` or ``"mse"``.
        activation_observer: range observer of the static inputs (per-tensor ones: linears with ``"per_tensor"``,
            convolutions, attention's operands): ``"minmax"`` (a moving average of batch ranges) or ``"mse"`` (of
            each batch's range clipped where the squared error is least: the calibrator for PTQ at 4-bit inputs,
            at 21 passes over each input per observed batch).
        embedding_bit: weight bits of every ``nn.Embedding`` no override matches; ``None`` leaves them in float.
        conv_bit: weight bits of every ``nn.Conv1d`` and ``nn.Conv2d`` no override matches; ``None`` (the default)
            leaves them in float. Their inputs are quantized per tensor, so a model with quantized convolutions needs
            calibrating before a post-training conversion even with per-token inputs elsewhere; ``None`` keeps the
            defaults free of calibration, as per-token inputs do.
        attention_bit: bits of the attention product's operands (query, key, value, probabilities and output) in
            every :class:`~zoo.layers.attention.ScaledDotProduct` (``*.attn.sdpa``) that no override keeps in float
            (``{pattern: None}``); the other override values do not apply to them. ``None`` (the default) leaves
            attention in float. Their scales are per tensor and static, so they need calibrating or training, as
            ``conv_bit`` does; see :mod:`zoo.quant.attention`.

    Raises:
        ConfigError: a bit width outside 2..8, an unknown method or setting, or a pattern that matches nothing; the
            message names the key.
    """
    check_bits(weight_bit, "weight_bit")
    check_bits(activation_bit, "activation_bit")
    check_method(quant_method)
    if embedding_bit is not None:
        check_bits(embedding_bit, "embedding_bit")
    if conv_bit is not None:
        check_bits(conv_bit, "conv_bit")
    if attention_bit is not None:
        check_bits(attention_bit, "attention_bit")
    if activation_granularity not in ("per_token", "per_tensor"):
        raise ConfigError(f"activation_granularity={activation_granularity!r} must be 'per_token' or 'per_tensor'")
    check_observer(observer)
    check_observer(activation_observer, "activation_observer")
    strict = overrides is not None
    rules = _override_rules(DEFAULT_OVERRIDES if overrides is None else overrides)
    if any(_is_converted(m) for m in module.modules()):
        raise ConfigError(f"{type(module).__name__} holds integer layers already converted; quantize the float model")

    layers = [
        (name, m)
        for name, m in module.named_modules()
        if isinstance(m, nn.Linear | nn.Embedding | QATLinear | QATEmbedding) or quantizable_conv(m)
    ]
    if not layers:
        raise ConfigError(f"{type(module).__name__} has no nn.Linear, nn.Conv2d or nn.Embedding layer to quantize")
    hits = {pattern: 0 for pattern, _ in rules}
    replacements = []
    for name, layer in layers:
        is_linear = isinstance(layer, nn.Linear | QATLinear)
        is_conv = quantizable_conv(layer)
        base_bits = weight_bit if is_linear else conv_bit if is_conv else embedding_bit
        config: dict[str, Any] | None = None if base_bits is None else {"weight_bit": base_bits}
        for pattern, value in rules:
            if _matches(name, pattern):
                hits[pattern] += 1
                config = None if value is None else {"weight_bit": base_bits or weight_bit, **(config or {}), **value}
        if config is None:
            continue
        config = {"activation_bit": activation_bit, "quant_method": quant_method} | config
        if is_linear:
            config |= {
                "activation_granularity": activation_granularity,
                "learnable_scales": learnable_scales,
                "observer": observer,
            }
            new: QATLayer = QATLinear.from_linear(layer, **config)
        elif is_conv:
            conv_class = QATConv1d if isinstance(layer, nn.Conv1d | QATConv1d) else QATConv2d
            new = conv_class.from_conv(layer, **config, learnable_scales=learnable_scales, observer=observer)
        else:
            new = QATEmbedding.from_embedding(
                layer, weight_bit=config["weight_bit"], quant_method=config["quant_method"]
            )
        # in the replaced layer's mode: a model quantized in eval mode (post-training) must not observe its inputs
        replacements.append((name, new.train(layer.training)))
    if attention_bit is not None:
        for name, product in module.named_modules():
            if type(product) is not ScaledDotProduct:
                continue
            keeping = [pattern for pattern, value in rules if value is None and _matches(name, pattern)]
            for pattern in keeping:
                hits[pattern] += 1
            if not keeping:
                new = QATScaledDotProduct(
                    bits=attention_bit, quant_method=quant_method, learnable_scales=learnable_scales
                ).to(next(module.parameters()).device)
                replacements.append((name, new.train(product.training)))
    if strict:
        for pattern, count in hits.items():
            if count == 0:
                examples = ", ".join(repr(n) for n, _ in layers[:3])
                raise ConfigError(
                    f"overrides[{pattern!r}] matches no nn.Linear, nn.Conv2d or nn.Embedding of "
                    f"{type(module).__name__}; "
                    f"layer names look like {examples}"
                )
    for name, new in replacements:
        for quantizer in new.modules():  # the static input quantizers (saved with their observer in the state dict)
            if isinstance(quantizer, FakeQuantizer) and quantizer.granularity == "per_tensor":
                quantizer.observer = activation_observer
        if not name:
            return new
        _replace(module, name, new)
    return module


def _is_converted(module: nn.Module) -> bool:
    return getattr(module, "zoo_converted", False)


def qat_layers(module: nn.Module) -> Iterator[tuple[str, QATLayer]]:
    """``(name, layer)`` for every fake-quantized layer of ``module``."""
    for name, m in module.named_modules():
        if isinstance(m, QATLinear | _QATConv | QATEmbedding):
            yield name, m


def set_schedule_bits(module: nn.Module, bits: int | None) -> dict[str, int]:
    """Run every QAT layer at ``max(its target weight bits, bits)`` (``bits=None``: at its target); returns
    ``{name: weight bits}``. A schedule thus lowers layers progressively towards their own targets and never below."""
    if bits is not None:
        check_bits(bits, "bits")
    out = {}
    for name, layer in qat_layers(module):
        layer.weight_quant.set_bits(max(layer.target_weight_bit, bits or 0))
        out[name] = layer.weight_quant.bits
    return out


def enable_fake_quant(module: nn.Module, enabled: bool = True) -> int:
    """Turn every fake quantizer of ``module`` on (or off: the layers then compute in float, as if not quantized);
    returns the number of quantizers. A quantizer first enabled after training began observes its range then."""
    count = 0
    for m in module.modules():
        if isinstance(m, FakeQuantizer):
            m.enabled = enabled
            count += 1
    return count


def freeze_observers(module: nn.Module, frozen: bool = True) -> int:
    """Stop (``frozen=False``: restart) every static range observer of ``module``; returns the number of quantizers."""
    count = 0
    for m in module.modules():
        if isinstance(m, FakeQuantizer) and not m.dynamic:
            m.freeze_observer(frozen)
            count += 1
    return count


def static_quantizers(module: nn.Module) -> list[tuple[str, FakeQuantizer]]:
    """``(layer name, quantizer)`` for every activation quantizer of ``module`` with a static per-tensor scale
    (observed or learned): the per-tensor inputs of linears and convolutions, the attention products' operands. What
    :func:`calibrating` observes, and what conversion needs observed. (Weights are quantized per channel or per row.)"""
    found = []
    for name, m in module.named_modules():
        if isinstance(m, FakeQuantizer) and m.granularity == "per_tensor":
            # "<layer>.act_quant" or "<layer>.act_quant.<operand>"
            found.append((name.rpartition("act_quant")[0].rstrip("."), m))
    return found


@contextlib.contextmanager
def calibrating(module: nn.Module) -> Iterator[nn.Module]:
    """Within the block, the per-tensor input quantizers of ``module`` observe every batch it runs on (a moving
    average of the batch min/max, the first batch setting the range) while the rest of the model keeps its mode:
    in eval mode, batch norm and dropout are untouched. Post-training quantization with per-tensor inputs::

        model = quantize_(model.eval(), activation_granularity="per_tensor")
        with torch.no_grad(), calibrating(model):
            for batch in batches:
                model(batch)
        convert_(model)
    """
    quantizers = [quantizer for _, quantizer in static_quantizers(module)]
    states = [(q.training, q.observer_enabled) for q in quantizers]
    for q in quantizers:
        q.train()
        q.observer_enabled = True
    try:
        yield module
    finally:
        for q, (training, enabled) in zip(quantizers, states, strict=True):
            q.train(training)
            q.observer_enabled = enabled


@torch.no_grad()
def weight_quant_error(layer: QATLayer) -> float:
    """Relative error ``||w_hat - w|| / ||w||`` of the layer's quantized weight at its current bits."""
    weight = layer.weight.detach().float()
    if isinstance(layer, QATEmbedding):
        quantized = layer.weight_quant(weight)
    else:
        weight = weight.flatten(1)  # a convolution's [out, in, kh, kw] as [out, in * kh * kw]
        codes, scale, zero_point = layer.weight_quant.codes(weight)
        quantized = (codes - zero_point) * scale
    return ((quantized - weight).norm() / weight.norm().clamp_min(1e-12)).item()


def is_quantizer_state(key: str) -> bool:
    """Whether a state-dict key belongs to quantization (a fake quantizer's ranges and scales under ``weight_quant``
    or ``act_quant``, or a QAT layer's extra state), not to the float weights every model of the layers has."""
    return key.endswith("_extra_state") or ".weight_quant." in key or ".act_quant." in key


def restore_qat_layers(module: nn.Module, state_dict: Mapping[str, Any]) -> int:
    """Swap the layers that are fake-quantized in ``state_dict`` (a QAT checkpoint's) for QAT layers of the saved
    configuration, so that ``module.load_state_dict(state_dict)`` then loads it; returns how many were swapped."""
    count = 0
    for key, value in state_dict.items():
        if not (key.endswith("._extra_state") and isinstance(value, Mapping) and "zoo_qat" in value):
            continue
        name = key[: -len("._extra_state")]
        layer = module.get_submodule(name)
        if isinstance(layer, QATLinear | _QATConv | QATEmbedding | QATScaledDotProduct):
            continue
        if value["zoo_qat"] == "attention":  # buffers only: made on the device of the model's parameters
            config = {k: value[k] for k in ("bits", "quant_method", "learnable_scales")}
            _replace(module, name, QATScaledDotProduct(**config).to(next(module.parameters()).device))
        elif value["zoo_qat"] == "linear":
            config = {k: value[k] for k in _LINEAR_DEFAULTS}
            _replace(module, name, QATLinear.from_linear(layer, **config))
        elif value["zoo_qat"] in ("conv1d", "conv2d"):
            conv_class = QATConv1d if value["zoo_qat"] == "conv1d" else QATConv2d
            _replace(module, name, conv_class.from_conv(layer, **{k: value[k] for k in _CONV_DEFAULTS}))
        else:
            _replace(
                module,
                name,
                QATEmbedding.from_embedding(layer, weight_bit=value["weight_bit"], quant_method=value["quant_method"]),
            )
        count += 1
    return count
