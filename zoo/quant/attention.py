"""Integer attention: the product ``softmax(q k^T / sqrt(Dh) + mask) v`` between the projections, on 8-bit codes.

The projections around it (``qkv``, ``proj``) are quantized linears; this module quantizes what they leave in float:

* :class:`QATScaledDotProduct` (what ``quantize_(..., attention_bit=8)`` puts in place of a
  :class:`~zoo.layers.attention.ScaledDotProduct`) fake-quantizes the query, key and value (one static scale per
  tensor each, observed or learned, as the per-tensor linear inputs), the attention probabilities (unsigned codes
  with the fixed scale ``1 / (2^bits - 1)``: they lie in ``[0, 1]``, and a fixed scale needs no calibration) and the
  output (per tensor);
* :class:`QuantizedScaledDotProduct` (what :func:`zoo.quant.convert_` makes of it) keeps those scales. At 8 bits,
  without gradients, on a CPU it runs an integer kernel:

  - on an x86 CPU with AMX, under ``torch.compile``: torchao's int8 attention (inductor generates the kernel from
    torchao's C++ template, ``torchao.prototype.inductor``; uint8 ``q k^T`` and ``p v`` on AMX tiles, the softmax in
    float32 between them, the probabilities and the output written as codes);
  - otherwise, on an x86 CPU with AVX-512 VNNI (AMD Zen 4, Intel since Ice Lake), eager or compiled, on symmetric
    codes: zoo's own (:func:`zoo.kernels.int8_attention.int8_attention`): ``q k^T`` and ``p v`` as exact int32
    sums, the softmax in float32, the probabilities rounded to their codes: the trained arithmetic but for float32's
    rounding in exp and the sum.

  Compiled on any other CPU at 8 bits it runs the same product on the codes with float GEMMs
  (:func:`codes_product`): ``q k^T`` of the integer codes in float32 (exact), the softmax in float32, the
  probabilities rounded to their codes, and ``p v`` of the codes in bfloat16 where the CPU multiplies bfloat16 in
  hardware (AVX512-BF16: codes of 8 bits or fewer are exact in bfloat16, the float32 sums are rounded once to
  bfloat16), else float32. Elsewhere (eager mode, a GPU, gradients asked for) at 8 bits it runs float SDPA on the
  dequantized query, key and value codes and quantizes its output: the trained arithmetic but for the probabilities'
  rounding, at the float kernel's speed plus the passes that quantize q, k, v and the output. ``exact=True``, or
  another bit width, runs :func:`quantized_product` instead, the arithmetic QAT trained with, which writes the
  ``[B, H, T, T]`` logits and probabilities out and ran at about half the speed of float SDPA on a CPU without AMX
  (README, "QAT").

Why torchao here, when the linears use core PyTorch's kernels: core PyTorch 2.11 has no int8 attention, and torchao
0.18's x86 template needs no compiled extension of its own (its PyPI wheel ships CUDA extensions only; inductor
compiles the template). It is imported on first use; without it the reference arithmetic runs.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from zoo.errors import ConfigError
from zoo.kernels.int8_attention import available as int8_attention_available
from zoo.kernels.int8_attention import int8_attention
from zoo.layers.attention import ScaledDotProduct, scaled_dot_product
from zoo.quant.fake_quant import (
    FakeQuantizer,
    QuantMethod,
    check_bits,
    check_method,
    fake_quantize,
    quant_range,
    quantize_codes,
)
from zoo.quant.kernels import UINT8_OFFSET

__all__ = [
    "QATScaledDotProduct",
    "QuantizedScaledDotProduct",
    "codes_product",
    "integer_attention_kernel",
    "quantized_product",
]

#: the tensors with a static scale, in the order of :class:`QuantizedScaledDotProduct`'s buffers
TENSORS = ("q", "k", "v", "out")


def _mask_(logits: Tensor, attn_mask: Tensor | None) -> Tensor:
    """``attn_mask`` applied to float32 ``logits`` in place, as SDPA applies it: bool (``True`` = may attend) or
    float (added)."""
    if attn_mask is None:
        return logits
    if attn_mask.dtype == torch.bool:
        return logits.masked_fill_(~attn_mask, float("-inf"))
    return logits.add_(attn_mask.float())


def quantized_product(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attn_mask: Tensor | None,
    quantize: Mapping[str, Callable[[Tensor], Tensor]],
    prob_bits: int,
    dropout_p: float = 0.0,
) -> Tensor:
    """Attention with quantized operands: ``[B, H, T, Dh]`` three times -> ``[B, H, T, Dh]``.

    ``quantize`` maps each of :data:`TENSORS` to a fake quantizer; the probabilities are rounded to ``prob_bits``
    unsigned codes of scale ``1 / (2^prob_bits - 1)`` (straight-through gradient). ``attn_mask`` as SDPA's: bool
    (``True`` = may attend) or float (added to the logits). The logits and the softmax are float32 whatever the
    inputs' dtype, as in the integer kernel.
    """
    q, k, v = quantize["q"](q), quantize["k"](k), quantize["v"](v)
    # in place where autograd allows (a matmul's backward does not read its output): the [B, H, T, T] passes are
    # what this costs
    logits = _mask_((q @ k.transpose(-2, -1)).float().mul_(q.shape[-1] ** -0.5), attn_mask)
    probs = logits.softmax(-1)
    levels = 2**prob_bits - 1
    if probs.requires_grad:  # codes round(p * levels), straight-through
        codes = probs * levels
        probs = (codes + (torch.round(codes) - codes).detach()) / levels
    else:  # the same values in three in-place passes
        probs = probs.mul_(levels).round_().div_(levels)
    if dropout_p:
        probs = F.dropout(probs, dropout_p)
    return quantize["out"](probs.to(v.dtype) @ v)


def codes_product(
    codes: tuple[Tensor, Tensor, Tensor],
    scales: tuple[Tensor, Tensor, Tensor],
    attn_mask: Tensor | None,
    *,
    prob_bits: int,
    pv_dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Attention on integer codes (float tensors of whole numbers, zero points already subtracted) ``[B, H, T, Dh]``
    three times, with the query, key and value ``scales`` -> float32 ``[B, H, T, Dh]``, not yet quantized.

    :func:`quantized_product`'s arithmetic on the codes themselves: ``q k^T`` of the codes in float32 (exact while the
    sums stay below 2^24), scaled once; the softmax in float32; the probabilities rounded to ``prob_bits`` unsigned
    codes; ``p v`` of the codes in ``pv_dtype``. bfloat16 holds every code of 8 bits or fewer exactly and its GEMM sums
    in float32, so bfloat16 rounds only the sums, once (a relative error of at most 2^-9). No gradient: the roundings
    pass none.
    """
    (q, k, v), (sq, sk, sv) = codes, scales
    with torch.autocast(q.device.type, enabled=False):  # CPU bf16 autocast would round q k^T's sums
        logits = _mask_((q @ k.transpose(-2, -1)) * (sq * sk * q.shape[-1] ** -0.5), attn_mask)
        levels = 2**prob_bits - 1
        probs = torch.round(logits.softmax(-1) * levels)
        return (probs.to(pv_dtype) @ v.to(pv_dtype)).float() * (sv / levels)


class QATScaledDotProduct(ScaledDotProduct):
    """Fake-quantized attention product: ``[B, H, T, Dh]`` three times -> ``[B, H, T, Dh]`` (see the module docstring).

    Args:
        bits: bit width of the query, key, value, probabilities and output (2..8; the integer kernel takes 8).
        quant_method: ``"symmetric"`` or ``"asymmetric"`` for the query, key, value and output.
        learnable_scales: LSQ scales for those four instead of observed ranges.

    The quantizers are ``act_quant.q``, ``.k``, ``.v``, ``.out``: per-tensor ``FakeQuantizer`` modules that observe in
    training until frozen (``zoo.quant.freeze_observers``), and that ``zoo.quant.calibrating`` covers. With them
    disabled (``enable_fake_quant(model, False)``, the float phase of a QAT schedule) this is float SDPA.
    """

    def __init__(self, *, bits: int = 8, quant_method: QuantMethod = "symmetric", learnable_scales: bool = False):
        super().__init__()
        symmetric = check_method(quant_method)
        self.config = {
            "bits": check_bits(bits, "attention_bit"),
            "quant_method": quant_method,
            "learnable_scales": learnable_scales,
        }
        self.act_quant = nn.ModuleDict(
            {
                name: FakeQuantizer(
                    bits=bits, symmetric=symmetric, granularity="per_tensor", learnable=learnable_scales
                )
                for name in TENSORS
            }
        )

    @property
    def bits(self) -> int:
        return self.config["bits"]

    def forward(
        self, q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None = None, dropout_p: float = 0.0
    ) -> Tensor:
        if not self.act_quant["q"].enabled:
            return super().forward(q, k, v, attn_mask, dropout_p)
        return quantized_product(q, k, v, attn_mask, self.act_quant, self.bits, dropout_p)

    def get_extra_state(self) -> dict[str, Any]:
        return {"zoo_qat": "attention", **self.config}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        if {k: state[k] for k in self.config} != self.config:
            raise ValueError(f"QATScaledDotProduct: the state dict has {state}, this module {self.config}")

    def extra_repr(self) -> str:
        return f"bits={self.bits}, {self.config['quant_method']}"


@functools.cache
def integer_attention_kernel() -> Callable[..., Tensor] | None:
    """torchao's int8 attention op (``torch.ops.torchao.qscaled_dot_product``, lowered by inductor to its AMX
    template) when torchao imports and this CPU has AMX tiles; ``None`` otherwise."""
    amx = getattr(torch.cpu, "_is_amx_tile_supported", None)
    if amx is None or not amx():
        return None
    try:
        import torchao.ops  # noqa: F401  (defines the op)
        from torchao.prototype.inductor import qsdpa_lowering  # noqa: F401  (registers inductor's lowering)
    except Exception:  # not installed, or built for another torch: the reference arithmetic runs instead
        return None
    return torch.ops.torchao.qscaled_dot_product.default


class QuantizedScaledDotProduct(nn.Module):
    """The integer form of :class:`QATScaledDotProduct`: ``[B, H, T, Dh]`` three times -> ``[B, H, T, Dh]`` in the
    query's dtype, from 8-bit codes of the query, key, value and probabilities (see the module docstring for where
    the integer kernel runs). The buffers ``scale`` and ``zero_point`` hold the four static quantizers' parameters,
    in the order of :data:`TENSORS`.

    ``exact``: where torchao's kernel does not run, run the fake-quantized model's arithmetic (its output to the
    last bit) rather than zoo's VNNI kernel (a CPU with AVX-512 VNNI: its exp may move a probability code by one),
    :func:`codes_product` (compiled on a CPU; ``p v`` rounded once in bfloat16 where the CPU has it) or float SDPA on
    the dequantized codes (eager, or a GPU, at 8 bits: the probabilities are not rounded to their codes, an error of
    at most 1/510 each, and no ``[B, H, T, T]`` tensor is written out). A runtime choice, not saved with the state
    dict; set it on a loaded model with ``layer.exact = True``. ``float_sdpa``, another runtime choice: float SDPA on
    the dequantized codes on a CPU too, eager or compiled (the path before zoo's kernel and :func:`codes_product`;
    for comparison).
    """

    zoo_converted = True
    float_sdpa = False

    def __init__(
        self,
        *,
        bits: int = 8,
        symmetric: bool = True,
        exact: bool = False,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.bits, self.symmetric, self.exact = check_bits(bits, "attention_bit"), symmetric, exact
        self.register_buffer("scale", torch.ones(len(TENSORS), device=device))
        self.register_buffer("zero_point", torch.zeros(len(TENSORS), device=device))
        self.register_load_state_dict_post_hook(lambda module, _: module._refresh())
        self._refresh()

    @classmethod
    def from_qat(cls, layer: QATScaledDotProduct) -> QuantizedScaledDotProduct:
        quantizers = [layer.act_quant[name] for name in TENSORS]
        unobserved = [name for name, q in zip(TENSORS, quantizers, strict=True) if not q.initialized]
        if unobserved:
            raise ConfigError(
                f"QATScaledDotProduct: the {unobserved[0]} quantizer has observed no data; calibrate or train first"
            )
        new = cls(bits=layer.bits, symmetric=quantizers[0].symmetric, device=quantizers[0].min_val.device)
        with torch.no_grad():
            for i, quantizer in enumerate(quantizers):
                scale, zero_point = quantizer.static_qparams()
                new.scale[i], new.zero_point[i] = scale.reshape(()), zero_point.reshape(())
        new._refresh()
        return new

    def _refresh(self) -> None:
        # Python numbers for the integer kernel, which takes scalars
        self._qparams = [(float(s), int(z)) for s, z in zip(self.scale.tolist(), self.zero_point.tolist(), strict=True)]
        self._has_kernel = integer_attention_kernel() is not None  # looked up here: compiled code reads the flags
        self._has_vnni = int8_attention_available()
        # without it the product's bfloat16 GEMM is emulated, slower than float32's (read on this machine, as the flag
        # above: a module pickled whole keeps the choice of the machine that built or loaded it)
        self._pv_dtype = torch.bfloat16 if torch.cpu._is_avx512_bf16_supported() else torch.float32

    def forward(
        self, q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None = None, dropout_p: float = 0.0
    ) -> Tensor:
        if self._runs_kernel(q, dropout_p):
            return self._integer(q, k, v, attn_mask)
        if self._runs_vnni(q, k, v, dropout_p):
            return self._vnni(q, k, v, attn_mask)
        if self._runs_codes(q, dropout_p):
            # inductor fuses the quantization, the mask, the softmax and the rounding into the GEMMs' neighbours:
            # faster than float SDPA on a CPU, whose flash kernel is slow at short sequences (README, "QAT")
            return self._codes(q, k, v, attn_mask)
        if self.exact or self.bits != 8:  # below 8 bits the probabilities' rounding is too coarse to drop
            quantize = {name: functools.partial(self._fake_quantize, i) for i, name in enumerate(TENSORS)}
            return quantized_product(q, k, v, attn_mask, quantize, self.bits, dropout_p)
        q, k, v = (self._fake_quantize(i, x) for i, x in enumerate((q, k, v)))
        return self._fake_quantize(TENSORS.index("out"), scaled_dot_product(q, k, v, attn_mask, dropout_p))

    def _fake_quantize(self, index: int, x: Tensor) -> Tensor:
        # the trained quantizer's arithmetic on its frozen scale, held as a tensor as the quantizer held it, so that the
        # codes agree to the last rounding
        qmin, qmax = quant_range(self.bits, self.symmetric)
        return fake_quantize(x.float(), self.scale[index], self.zero_point[index], qmin, qmax).to(x.dtype)

    def _runs_kernel(self, q: Tensor, dropout_p: float) -> bool:
        return (
            self.bits == 8
            and dropout_p == 0.0
            and q.device.type == "cpu"
            and q.dtype == torch.float32
            # with one head the kernel's [B, 1, T, Dh] output has the layout of the dequantization after it, so inductor
            # fuses that into torchao 0.18's template, which cannot take it ("Unsupported for `epilogue_nodes`")
            and q.shape[1] > 1
            and torch.compiler.is_compiling()  # the op has no eager CPU kernel: inductor generates it
            and self._has_kernel
        )

    def _runs_on_codes(self, q: Tensor, dropout_p: float) -> bool:
        """What the two CPU paths on the codes (zoo's VNNI kernel, :func:`codes_product`) share."""
        return (
            not (self.exact or self.float_sdpa)
            # below 8 bits coarse probability codes tie, and float rounding breaks ties unlike the trained arithmetic
            and self.bits == 8
            and dropout_p == 0.0
            and not (torch.is_grad_enabled() and q.requires_grad)  # their roundings pass no gradient
            and q.device.type == "cpu"
        )

    def _runs_vnni(self, q: Tensor, k: Tensor, v: Tensor, dropout_p: float) -> bool:
        return (
            self._runs_on_codes(q, dropout_p)
            and self.symmetric  # the kernel takes int8 codes with zero point 0
            and q.shape[-1] % 4 == 0
            and k.shape == q.shape == v.shape  # self-attention: the kernel takes one sequence length
            and self._has_vnni
        )

    def _runs_codes(self, q: Tensor, dropout_p: float) -> bool:
        # eager, its [B, H, T, T] passes are slower than SDPA
        return self._runs_on_codes(q, dropout_p) and torch.compiler.is_compiling()

    def _signed_codes(self, q: Tensor, k: Tensor, v: Tensor) -> list[Tensor]:
        """The query, key and value as whole numbers less their zero points (float32; symmetric codes have none)."""
        qmin, qmax = quant_range(self.bits, self.symmetric)
        codes = [
            quantize_codes(x.float(), self.scale[i], self.zero_point[i], qmin, qmax) for i, x in enumerate((q, k, v))
        ]
        return codes if self.symmetric else [c - self.zero_point[i] for i, c in enumerate(codes)]

    def _integer(self, q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None) -> Tensor:
        qmin, qmax = quant_range(self.bits, self.symmetric)
        # a signed code c is the unsigned c + UINT8_OFFSET (128), so the kernel's zero points are z + UINT8_OFFSET
        codes = [
            (quantize_codes(x, self.scale[i], self.zero_point[i], qmin, qmax) + UINT8_OFFSET).to(torch.uint8)
            for i, x in enumerate((q, k, v))
        ]
        return self.integer_product(*codes, attn_mask)

    def _vnni(self, q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None) -> Tensor:
        codes = [c.to(torch.int8) for c in self._signed_codes(q, k, v)]
        (sq, _), (sk, _), (sv, _), _ = self._qparams
        levels = 2**self.bits - 1
        out = int8_attention(*codes, attn_mask, sq * sk * q.shape[-1] ** -0.5, sv / levels, levels)
        return self._fake_quantize(TENSORS.index("out"), out).to(q.dtype)

    def _codes(self, q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None) -> Tensor:
        codes = tuple(self._signed_codes(q, k, v))
        out = codes_product(codes, tuple(self.scale[:3]), attn_mask, prob_bits=self.bits, pv_dtype=self._pv_dtype)
        return self._fake_quantize(TENSORS.index("out"), out).to(q.dtype)

    def integer_product(self, q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None) -> Tensor:
        """The product of uint8 codes ``[B, H, T, Dh]`` (``c + 128`` for each signed code ``c`` at this module's
        scales) through torchao's kernel, under ``torch.compile`` only: float32 ``[B, H, T, Dh]``."""
        if attn_mask is not None:
            if attn_mask.dtype == torch.bool:
                attn_mask = torch.zeros(attn_mask.shape, device=q.device).masked_fill(~attn_mask, float("-inf"))
            attn_mask = attn_mask.float()
            while attn_mask.dim() < 4:
                attn_mask = attn_mask.unsqueeze(0)
        (sq, zq), (sk, zk), (sv, zv), (so, zo) = self._qparams
        levels = 2**self.bits - 1
        out = torch.ops.torchao.qscaled_dot_product.default(
            q, k, v, attn_mask, 0.0, False, q.shape[-1] ** -0.5,
            sq, zq + UINT8_OFFSET, sk, zk + UINT8_OFFSET, sv, zv + UINT8_OFFSET, 1.0 / levels, 0, so, zo + UINT8_OFFSET,
        )  # fmt: skip
        return (out.float() - (zo + UINT8_OFFSET)) * so

    def get_extra_state(self) -> dict[str, Any]:
        return {"zoo_converted": "attention", "bits": self.bits, "symmetric": self.symmetric}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        if state != self.get_extra_state():
            raise ValueError(f"QuantizedScaledDotProduct: state dict configuration {state} differs from this layer's")

    def extra_repr(self) -> str:
        exact = ", exact" if self.exact else ""
        return f"bits={self.bits}, {'symmetric' if self.symmetric else 'asymmetric'}{exact}"
