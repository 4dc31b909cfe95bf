"""Fake quantizers: ``b``-bit integer rounding simulated in floating point, with gradients, for quantization-aware
training.

A quantizer maps a float ``x`` to ``(q - z) * s`` with integer codes ``q = clamp(round(x / s) + z, qmin, qmax)``,
scale ``s > 0`` and zero point ``z`` (0 when symmetric). Codes (:func:`quant_range`):

* symmetric: ``[-(2^(b-1) - 1), 2^(b-1) - 1]`` (``[-127, 127]`` at 8 bits, ``[-7, 7]`` at 4), ``z = 0``;
* asymmetric: ``[-2^(b-1), 2^(b-1) - 1]`` with ``z`` in that range, so that codes of every width fit an int8.

Granularity: ``"per_channel"`` (one ``(s, z)`` per row of a weight ``[out, in]``, i.e. per output channel),
``"per_token"`` (one per row of the activation's last dimension, computed from the row itself at every call:
dynamic, so there is no state to observe, freeze or learn) and ``"per_tensor"`` (one for the whole tensor).
Ranges always include 0, so zero (padding, ReLU) is exact.

Gradients: the straight-through estimator (rounding passes the gradient unchanged; values clipped by the range get
none). With ``learnable=True`` the scale (and the zero point when asymmetric) are parameters trained by the same
autograd graph, which gives exactly LSQ's gradient (Esser et al. 2020, "Learned Step Size Quantization") and LSQ+'s
for the offset, with LSQ's gradient scale ``1 / sqrt(numel_per_scale * qmax)``; the observer gives their first value.

Why not ``torch.ao.quantization.FakeQuantize``: ``torch.ao.quantization`` is deprecated in favour of torchao, its
kernels (``fake_quantize_per_channel_affine`` and the learnable variants) take float32 inputs and integer zero points
only and have no per-token mode; torchao's QAT would fit but converts to its own tensor subclasses, which do not load
with ``weights_only=True`` without registering them, and its CPU int8 path is slower than ``torch._int_mm`` (see
``docs/qat.md``). The arithmetic below is a few lines of plain tensor code that runs in any dtype (in float32 inside)
and that :mod:`zoo.quant.convert` reuses, so that integer inference computes the very codes training simulated.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from torch import Tensor, nn

from zoo.errors import ConfigError

__all__ = [
    "FakeQuantizer",
    "Granularity",
    "MAX_BITS",
    "MIN_BITS",
    "Observer",
    "QuantMethod",
    "check_bits",
    "check_method",
    "fake_quantize",
    "qparams_from_range",
    "quant_range",
    "quantize_codes",
    "row_qparams",
]

MIN_BITS, MAX_BITS = 2, 8
QuantMethod = Literal["symmetric", "asymmetric"]
Granularity = Literal["per_channel", "per_token", "per_tensor"]
Observer = Literal["minmax", "mse"]
_EPS = 1e-12  # smallest scale: a row of zeros quantizes to zeros instead of dividing by zero
_MSE_GRID = tuple(1.0 - 0.025 * i for i in range(21))  # clipping ratios 1.0 .. 0.5 tried by the MSE observer
#: elements of the ``[ratios, channels, in]`` trial tensor the MSE observer builds at once, by device type (others:
#: ``"default"``). On a GPU large chunks: fewer kernels, a VQA QAT step 2.6x faster than one ratio at a time; on the
#: CPU the chunk size moved a step by less than the noise (``benchmarks/mse_observer.py``), so a chunk that stays in
#: cache (the observer alone ran slower with larger ones in a one-off probe)
MSE_CHUNK_ELEMENTS = {"cpu": 1 << 18, "default": 1 << 24}


def check_bits(bits: Any, key: str) -> int:
    """``bits`` if it is an integer in ``[2, 8]``, else a :class:`~zoo.errors.ConfigError` naming ``key``."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise ConfigError(f"{key}={bits!r} must be an integer number of bits between {MIN_BITS} and {MAX_BITS}")
    return bits


def check_method(method: Any, key: str = "quant_method") -> bool:
    """``True`` for ``"symmetric"``, ``False`` for ``"asymmetric"``; anything else raises a ConfigError naming
    ``key``."""
    if method not in ("symmetric", "asymmetric"):
        raise ConfigError(f"{key}={method!r} must be 'symmetric' or 'asymmetric'")
    return method == "symmetric"


def check_observer(observer: Any, key: str = "observer") -> Observer:
    """``observer`` if it is ``"minmax"`` or ``"mse"``, else a ConfigError naming ``key``."""
    if observer not in ("minmax", "mse"):
        raise ConfigError(f"{key}={observer!r} must be 'minmax' or 'mse'")
    return observer


def quant_range(bits: int, symmetric: bool) -> tuple[int, int]:
    """``(qmin, qmax)``, the integer codes of a ``bits``-bit quantizer (see the module docstring)."""
    half = 2 ** (bits - 1)
    return (-(half - 1), half - 1) if symmetric else (-half, half - 1)


def qparams_from_range(lo: Tensor, hi: Tensor, bits: int, symmetric: bool) -> tuple[Tensor, Tensor]:
    """Scale and zero point (both float, same shape as ``lo``) that map ``[min(lo, 0), max(hi, 0)]`` onto the codes.

    Every value in the range then quantizes with an error of at most ``scale / 2``.
    """
    qmin, qmax = quant_range(bits, symmetric)
    lo, hi = lo.clamp(max=0.0), hi.clamp(min=0.0)
    if symmetric:
        scale = (torch.maximum(-lo, hi) / qmax).clamp_min(_EPS)
        return scale, torch.zeros_like(scale)
    scale = ((hi - lo) / (qmax - qmin)).clamp_min(_EPS)
    zero_point = (qmin - torch.round(lo / scale)).clamp(qmin, qmax)
    return scale, zero_point


def row_qparams(x: Tensor, bits: int, symmetric: bool) -> tuple[Tensor, Tensor]:
    """Per-row (last dimension) scale and zero point of ``x`` from its own min and max: ``[..., 1]`` each."""
    # amin and amax, not aminmax: on the CPU the fused reduction over a dimension is several times slower (torch 2.11)
    return qparams_from_range(x.amin(-1, keepdim=True), x.amax(-1, keepdim=True), bits, symmetric)


def _round_ste(x: Tensor) -> Tensor:
    # round(x) forward (exactly: round(x) - x is exact in floating point), identity backward
    return x + (torch.round(x) - x).detach()


def quantize_codes(x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int) -> Tensor:
    """Integer codes ``clamp(round(x / scale) + zero_point, qmin, qmax)`` as a float tensor (no gradient).

    :mod:`zoo.quant.convert` stores these; :func:`fake_quantize` computes the same values with gradients.
    """
    return torch.clamp(torch.round(x / scale) + zero_point, qmin, qmax)


def fake_quantize(x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int) -> Tensor:
    """``(clamp(round(x / s) + z, qmin, qmax) - z) * s`` with the straight-through estimator; ``scale`` and
    ``zero_point`` broadcast against ``x``. Gradients reach ``scale``/``zero_point`` when they require them (LSQ)."""
    q = torch.clamp(_round_ste(x / scale) + zero_point, qmin, qmax)
    return (q - zero_point) * scale


def _grad_scale(x: Tensor, factor: float) -> Tensor:
    # value of x, gradient multiplied by factor (LSQ's step-size gradient scale)
    return (x - x * factor).detach() + x * factor


class FakeQuantizer(nn.Module):
    """Simulates ``bits``-bit quantization of a tensor: ``x -> x_hat`` of the same shape and dtype.

    Args:
        bits: bit width, 2 to 8; change it later with :meth:`set_bits` (the schedule callback does).
        symmetric: symmetric (zero point 0) or asymmetric codes.
        granularity: ``"per_channel"`` (rows of a 2-D weight ``[channels, in]``), ``"per_token"`` (rows of the last
            dimension, dynamic) or ``"per_tensor"``.
        channels: rows of the weight when ``granularity="per_channel"``.
        learnable: learn the scale (and zero point) with LSQ instead of taking them from the observer; not for
            ``"per_token"`` (its scales are recomputed at every call).
        observer: how a static range is estimated: ``"minmax"`` (per channel: the current min/max; per tensor: a
            moving average of batch min/max with ``momentum``) or ``"mse"`` (the clipping ratio in ``[0.5, 1]`` that
            minimises the squared error: of each row per channel; per tensor, of each observed batch, whose clipped
            ranges are then averaged as min-max ones are).
        momentum: weight of a new batch in the moving average of the per-tensor range.

    Static quantizers keep their range in the buffers ``min_val``/``max_val``; they observe while
    ``observer_enabled`` is true: per-channel weight quantizers at every call (so the range follows the weights),
    per-tensor activation quantizers in training mode (and on the first call in any mode). :meth:`freeze_observer`
    stops that. The configuration and these flags are saved in the state dict as extra state.
    """

    def __init__(
        self,
        *,
        bits: int = 8,
        symmetric: bool = True,
        granularity: Granularity = "per_tensor",
        channels: int = 1,
        learnable: bool = False,
        observer: Observer = "minmax",
        momentum: float = 0.01,
    ) -> None:
        super().__init__()
        check_bits(bits, "bits")
        if granularity not in ("per_channel", "per_token", "per_tensor"):
            raise ConfigError(f"granularity={granularity!r} must be 'per_channel', 'per_token' or 'per_tensor'")
        check_observer(observer)
        if learnable and granularity == "per_token":
            raise ConfigError("learnable=True needs a static granularity: per-token scales are computed at each call")
        self.bits, self.symmetric, self.granularity = bits, symmetric, granularity
        self.learnable, self.observer, self.momentum = learnable, observer, momentum
        self.observer_enabled, self.initialized, self.enabled = True, False, True
        # the MSE observer's grid, on the module's device: copied to a GPU at each observation, it made the host wait
        # for the GPU each time
        self.register_buffer("mse_ratios", torch.tensor(_MSE_GRID), persistent=False)
        shape = (channels, 1) if granularity == "per_channel" else (1,)
        if granularity != "per_token":
            self.register_buffer("min_val", torch.zeros(shape))
            self.register_buffer("max_val", torch.zeros(shape))
        if learnable:  # 1-D, so that tasks put them in the group without weight decay
            self.scale = nn.Parameter(torch.ones(shape[0]))
            self.zero_point = None if symmetric else nn.Parameter(torch.zeros(shape[0]))

    @property
    def qrange(self) -> tuple[int, int]:
        return quant_range(self.bits, self.symmetric)

    @property
    def dynamic(self) -> bool:
        return self.granularity == "per_token"

    def set_bits(self, bits: int) -> None:
        """Change the bit width; a learned scale keeps the range it covers (LSQ parameters are rescaled)."""
        check_bits(bits, "bits")
        if bits == self.bits:
            return
        if self.learnable and self.initialized:
            with torch.no_grad():
                lo, hi = self._learned_range()
                self.bits = bits
                self._set_learned(lo, hi)
        self.bits = bits

    def freeze_observer(self, frozen: bool = True) -> None:
        """Stop (or restart) updating the observed range; learned and dynamic scales are not affected."""
        self.observer_enabled = not frozen

    # -- observers --------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def observe(self, x: Tensor) -> None:
        """Update the static range from ``x`` (a weight ``[channels, in]`` or any activation)."""
        if self.dynamic:
            return
        x = x.detach().float()
        if self.granularity == "per_channel":
            rows = x.reshape(x.shape[0], -1)
            lo, hi = rows.amin(1, keepdim=True), rows.amax(1, keepdim=True)
            if self.observer == "mse":
                lo, hi = self._mse_clip(x.reshape(x.shape[0], -1), lo, hi)
            self.min_val.copy_(lo)
            self.max_val.copy_(hi)
        else:
            lo, hi = torch.aminmax(x)
            if self.observer == "mse":  # this batch's best clipping, then the moving average as for min-max
                lo, hi = (r.reshape(()) for r in self._mse_clip(x.reshape(1, -1), lo.reshape(1, 1), hi.reshape(1, 1)))
            if self.initialized and not self.learnable:
                lo = self.min_val + self.momentum * (lo - self.min_val)
                hi = self.max_val + self.momentum * (hi - self.max_val)
            self.min_val.copy_(lo.reshape(1))
            self.max_val.copy_(hi.reshape(1))
        if self.learnable and not self.initialized:
            self._set_learned(self.min_val, self.max_val)
        self.initialized = True

    def _mse_clip(self, w: Tensor, lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor]:
        # several clipping ratios at once ([r, C, in] trial codes): QAT refits the ranges at every step, and one ratio
        # at a time launched 21 times the kernels
        qmin, qmax = self.qrange
        ratios = self.mse_ratios[:, None, None]  # [R, 1, 1]
        limit = MSE_CHUNK_ELEMENTS.get(w.device.type, MSE_CHUNK_ELEMENTS["default"])
        per_chunk = max(1, limit // max(1, w.numel()))
        errors = []
        for chunk in ratios.split(per_chunk):
            s, z = qparams_from_range(lo * chunk, hi * chunk, self.bits, self.symmetric)  # [r, C, 1]
            errors.append((fake_quantize(w, s, z, qmin, qmax) - w).pow(2).sum(-1, keepdim=True))
        best = torch.cat(errors).argmin(0)  # [C, 1]; the first minimum: of equal errors, the widest range
        ratio = ratios.flatten()[best]
        return lo * ratio, hi * ratio

    def _set_learned(self, lo: Tensor, hi: Tensor) -> None:
        s, z = qparams_from_range(lo, hi, self.bits, self.symmetric)
        self.scale.data.copy_(s.reshape(-1))
        if self.zero_point is not None:
            self.zero_point.data.copy_(z.reshape(-1))

    def _learned(self) -> tuple[Tensor, Tensor | None]:
        # the learned parameters in the broadcast shape of the range buffers
        shape = self.min_val.shape
        return self.scale.view(shape), None if self.zero_point is None else self.zero_point.view(shape)

    def _learned_range(self) -> tuple[Tensor, Tensor]:
        qmin, qmax = self.qrange
        scale, zero_point = self._learned()
        s = scale.detach().abs().clamp_min(_EPS)
        z = zero_point.detach().round() if zero_point is not None else torch.zeros_like(s)
        return (qmin - z) * s, (qmax - z) * s

    # -- quantization -----------------------------------------------------------------------------------------------
    def qparams(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Scale and zero point (float32) used for ``x`` now, broadcastable to ``x``; observes first when the
        observer is on (see the class docstring). Differentiable in the learned parameters."""
        x32 = x.float()
        if self.dynamic:
            return row_qparams(x32.detach(), self.bits, self.symmetric)
        if self.observer_enabled and (
            not self.initialized or (not self.learnable and (self.granularity == "per_channel" or self.training))
        ):
            self.observe(x32)
        if not self.learnable:
            return qparams_from_range(self.min_val, self.max_val, self.bits, self.symmetric)
        qmin, qmax = self.qrange
        learned_scale, learned_zero_point = self._learned()
        factor = 1.0 / math.sqrt(max(1, x32.numel() // learned_scale.numel()) * qmax)
        scale = _grad_scale(learned_scale.abs().clamp_min(_EPS), factor)
        if learned_zero_point is None:
            return scale, torch.zeros_like(scale)
        return scale, _grad_scale(_round_ste(learned_zero_point).clamp(qmin, qmax), factor)

    def static_qparams(self) -> tuple[Tensor, Tensor]:
        """The stored scale and zero point of a static quantizer (learned, or from the observed range), without
        observing: what integer inference uses for a per-tensor input."""
        if self.dynamic:
            raise ValueError("a per-token quantizer has no stored scale; its scales are computed at each call")
        with torch.no_grad():
            if not self.learnable:
                return qparams_from_range(self.min_val, self.max_val, self.bits, self.symmetric)
            qmin, qmax = self.qrange
            scale, zero_point = self._learned()
            scale = scale.abs().clamp_min(_EPS)
            zero_point = torch.zeros_like(scale) if zero_point is None else torch.round(zero_point).clamp(qmin, qmax)
            return scale.clone(), zero_point.clone()

    def codes(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(codes, scale, zero_point)`` of ``x`` (float32 tensors, no gradient): what integer inference stores."""
        with torch.no_grad():
            scale, zero_point = self.qparams(x)
            scale, zero_point = scale.detach(), zero_point.detach()
            return quantize_codes(x.float(), scale, zero_point, *self.qrange), scale, zero_point

    def forward(self, x: Tensor) -> Tensor:
        if not self.enabled:
            return x
        scale, zero_point = self.qparams(x)
        return fake_quantize(x.float(), scale, zero_point, *self.qrange).to(x.dtype)

    # -- state ------------------------------------------------------------------------------------------------------
    def get_extra_state(self) -> dict[str, Any]:
        return {
            "bits": self.bits,
            "symmetric": self.symmetric,
            "granularity": self.granularity,
            "learnable": self.learnable,
            "observer": self.observer,
            "observer_enabled": self.observer_enabled,
            "initialized": self.initialized,
            "enabled": self.enabled,
        }

    def set_extra_state(self, state: dict[str, Any]) -> None:
        for key in ("granularity", "symmetric", "learnable"):
            if state[key] != getattr(self, key):
                raise ValueError(
                    f"FakeQuantizer: the state dict has {key}={state[key]!r}, this quantizer {getattr(self, key)!r}"
                )
        self.bits, self.observer = state["bits"], state["observer"]
        self.observer_enabled, self.initialized = state["observer_enabled"], state["initialized"]
        self.enabled = state["enabled"]

    def extra_repr(self) -> str:
        method = "symmetric" if self.symmetric else "asymmetric"
        learn = ", learnable" if self.learnable else ""
        return f"bits={self.bits}, {method}, {self.granularity}{learn}"
