"""DSA, Dynamic Sparse Activation: an FFN whose hidden units are split into blocks that each token runs or skips.

A drop-in for :class:`zoo.layers.ffn.FeedForward` in any :class:`zoo.layers.transformer.TransformerBlock`; in YAML::

    ffn:
      class_path: zoo.layers.dsa.DSAFeedForward
      init_args: {num_blocks: 8, gate_threshold: 0.4, compensation: 0.3}

How it computes, for a token ``x`` (``[D]``) and ``N = num_blocks`` blocks of ``Hb = hidden_dim / N`` units:

* **Gate.** :class:`DynamicGate` gives ``alpha = sigmoid(W_g x + b_g)`` (``[N]``), each block's activation
  probability.
* **Selection (the hard choice).** The token runs the ``k = max(1, round(gate_threshold * N))`` blocks of largest
  ``alpha`` (top-``k``). The active fraction is therefore exactly ``k / N`` for every token: the compute is
  predictable, and ``gate_threshold`` is met to within ``1 / (2N)`` (exactly when ``gate_threshold * N`` is an
  integer; below ``1 / (2N)`` one block still runs). The choice is a non-differentiable function of ``alpha``.
* **Output (hard choice and soft gate combined).** ``y = b2 + sum over selected b of alpha_b * W2_b gelu(W1_b x +
  b1_b)``: the selected blocks' outputs weighted by their gate value, in training and in inference alike. The loss
  therefore reaches ``alpha_b`` of a selected block through its weight, ``dL/dalpha_b = <dL/dy, W2_b gelu(...)>``,
  and reaches an unselected block's ``alpha_b`` not at all (``dL/dalpha_b = 0``), which is what the compensation
  below is for.
* **Gradient compensation.** The gradient that reaches the gate through ``alpha`` (its sigmoid output) is, for every
  token and every block, selected or not,

      g = dL/dalpha + (lambda / n) * (1 - alpha) * d(log alpha)/dalpha = dL/dalpha + (lambda / n) * (1 - alpha) / alpha

  with ``lambda = compensation`` and ``n`` the number of tokens in the call (padding included): the term ``lambda *
  (1 - alpha) * grad log alpha`` of the design, averaged over the tokens as a mean loss averages its per-token terms,
  so that its weight does not grow with the batch. Through the sigmoid the term becomes ``(lambda / n) (1 -
  alpha)^2`` on the gate logit: bounded, largest for gates near zero, vanishing for confident gates. Unselected gates
  thus keep a gradient; with ``lambda > 0`` gradient descent lowers ``log alpha`` (a pull towards sparser, sharper
  gates that the loss gradient of the selected blocks balances); a negative ``lambda`` reverses its sign.

  The term is the gradient of an auxiliary loss, ``(lambda / n) * sum(log alpha - alpha)``, that each training
  forward leaves in ``compensation_term`` and that :func:`compensation_loss` collects for the training loss
  (:class:`lit_models.ZooTask` adds it; a loop of one's own adds ``compensation_loss(model)`` to its loss). The
  terms of several calls before an optimizer step add up (in compiled code, the last call's: a block compiled
  alone and called twice in a step keeps the second term); one left uncollected past an optimizer step is
  dropped; a copy of the layer (``copy.deepcopy``, pickling, ``torch.save(model)``) starts without one; the forward
  that non-reentrant activation checkpointing recomputes in backward records none (reentrant checkpointing, which
  runs the forward without gradients, loses the term). Being part of the loss, it is scaled with
  it: divided by Lightning's gradient accumulation, multiplied by fp16's loss scale. (A term added to the gradient in
  backward, as before, grew with the accumulation, which ``DynamicBatchAdjustment`` sets per machine, and vanished
  under a loss scale.)

  The term trains the **gate's own weights only**: it is computed on a second evaluation of the gate on the
  detached input, so the token representations ``x`` receive ``dL/dx`` alone. Passed on to ``x``, the term pulls
  every token the same way (towards lower gates), and Adam, which follows a consistent direction however small the
  gradient, turns that pull into a collapse of every layer below: on Sort-of-CLEVR (vqa_dsa.yaml) the model's
  outputs became the same for every input and it never left the answer priors, at any ``gate_threshold``
  (benchmarks/results/dsa_vqa_h200_2026-11-28_before_fix.json). The tests check ``g`` against the formula, that the
  compensation leaves ``dL/dx`` unchanged, and that accumulation leaves it as one batch would.

Two forward paths give the same output for the same selection (tested): the **dense** path (training, and whenever
gradients are needed) computes every block and multiplies the unselected ones by zero; the **sparse** path (eval mode
with gradients off) never computes the unselected blocks: fused Triton kernels on CUDA, ``index_select`` / ``mm`` /
``index_add_`` per block on the CPU (:mod:`zoo.kernels.block_ffn`).

Names: ``fc1``, ``act``, ``fc2`` as in the dense FFN (block ``b`` is rows ``b*Hb:(b+1)*Hb`` of ``fc1`` and the same
columns of ``fc2``), so quantization patterns such as ``*.ffn.fc1`` match; the gate is ``gate.proj``. When ``fc1`` or
``fc2`` has been replaced by something other than a plain ``nn.Linear`` (a fake-quantized layer, say), the layer uses
the dense path, which calls them as modules.

``gate_threshold`` is saved in the state dict (as extra state), so a checkpoint taken after it was changed or annealed
resumes with the value it had.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from numbers import Real
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from zoo.contracts import FFN
from zoo.errors import ConfigError
from zoo.kernels.block_ffn import block_sparse_ffn, triton_available, triton_supports

InferencePath = Literal["auto", "triton", "torch", "dense"]

#: optimizer steps taken in this process by any ``torch.optim`` optimizer: an uncollected compensation term recorded
#: before the latest one is stale (the gate parameters' version counters alone miss FSDP2's gathered copies and fused
#: optimizers, which leave them unchanged)
_optimizer_steps = [0]


def _count_optimizer_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    _optimizer_steps[0] += 1


register_optimizer_step_post_hook(_count_optimizer_step)

__all__ = [
    "DSAFeedForward",
    "DynamicGate",
    "active_blocks",
    "check_gate_threshold",
    "compensation_loss",
    "density_stats",
    "dsa_layers",
    "set_gate_threshold",
]


def check_gate_threshold(value: Any, *, name: str = "gate_threshold") -> float:
    """``value`` as a float if it is in ``(0, 1]``, else a :class:`zoo.errors.ConfigError` (a ``ValueError``)."""
    if isinstance(value, bool) or not isinstance(value, Real) or not 0.0 < float(value) <= 1.0:
        raise ConfigError(
            f"{name}={value!r} must be a number in (0, 1]: the fraction of FFN blocks each token runs "
            "(1.0 runs all of them)"
        )
    return float(value)


def active_blocks(gate_threshold: float, num_blocks: int) -> int:
    """Blocks each token runs: ``max(1, round(gate_threshold * num_blocks))``, halves rounded up."""
    return max(1, min(num_blocks, math.floor(gate_threshold * num_blocks + 0.5)))


class DynamicGate(nn.Module):
    """Per-token, per-block activation probability: ``[..., dim] -> alpha [..., num_blocks]`` in ``(0, 1)``.

    ``alpha = sigmoid(proj(x))`` with ``proj`` an ``nn.Linear(dim, num_blocks)``; the bias starts at zero, so every
    block starts at ``alpha`` close to 0.5 and the selection is decided by the (small, random) weights.
    """

    def __init__(self, dim: int, num_blocks: int) -> None:
        super().__init__()
        if dim <= 0 or num_blocks <= 0:
            raise ValueError(f"DynamicGate: dim={dim} and num_blocks={num_blocks} must be positive")
        self.proj = nn.Linear(dim, num_blocks)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: Tensor) -> Tensor:
        return torch.sigmoid(self.logits(x))

    def logits(self, x: Tensor) -> Tensor:
        """``proj(x)`` in fp32 (float64 for a float64 input), whatever autocast or the weights' dtype (FSDP's bf16
        gathers): the selection compares gate values, and bf16's (spacing 2^-8 near 1) tie often, where the fused
        inference kernel (fp32 logits, ties to the lower block) and ``topk`` break ties apart."""
        dtype = torch.promote_types(x.dtype, torch.float32)
        proj = self.proj
        with torch.autocast(x.device.type, enabled=False):
            if type(proj) is nn.Linear and not (proj._forward_hooks or proj._forward_pre_hooks):
                bias = None if proj.bias is None else proj.bias.to(dtype)
                return F.linear(x.to(dtype), proj.weight.to(dtype), bias)
            # a fake-quantized or converted projection, or one with hooks: called as it is, on input of its
            # weights' dtype (bf16 under FSDP's bf16 gathers), fp32 where it has none (a converted integer layer)
            weight = getattr(proj, "weight", None)
            if isinstance(weight, Tensor) and weight.is_floating_point():
                dtype = weight.dtype
            return proj(x.to(dtype)).to(torch.promote_types(dtype, torch.float32))


class DSAFeedForward(FFN):
    """Block-sparse FFN with a learned per-token choice of blocks: ``[..., dim] -> [..., dim]`` (module doc).

    Args:
        dim: token width.
        hidden_dim: hidden units in all, split into ``num_blocks`` equal blocks.
        num_blocks: blocks ``N``; must divide ``hidden_dim``. Fewer, wider blocks run faster on a GPU (each block is
            one grouped GEMM operand); more blocks give a finer choice of ``gate_threshold``.
        gate_threshold: fraction of the blocks each token runs, in ``(0, 1]``; ``round(gate_threshold * N)`` blocks
            (at least 1). Change it later with :meth:`set_gate_threshold` or :func:`set_gate_threshold`.
        compensation: ``lambda`` of the gradient compensation (0 turns it off).
        dropout: dropout on the hidden units (dense path, training only).
        inference_path: ``"auto"`` (fused Triton kernels on CUDA, PyTorch per-block GEMMs elsewhere), ``"triton"``,
            ``"torch"``, or ``"dense"`` (never skip compute: the reference).
        track_density: accumulate density statistics in training mode (read by :func:`density_stats`).
    """

    def __init__(
        self,
        dim: int,
        hidden_dim: int,
        *,
        num_blocks: int = 8,
        gate_threshold: float = 0.5,
        compensation: float = 0.3,
        dropout: float = 0.0,
        inference_path: InferencePath = "auto",
        track_density: bool = True,
    ) -> None:
        super().__init__(dim, hidden_dim)
        if num_blocks <= 0 or hidden_dim % num_blocks:
            raise ConfigError(
                f"DSAFeedForward: num_blocks={num_blocks} must be positive and divide hidden_dim={hidden_dim}"
            )
        if not math.isfinite(compensation):
            raise ConfigError(f"DSAFeedForward: compensation={compensation!r} must be a finite number")
        if inference_path not in ("auto", "triton", "torch", "dense"):
            raise ConfigError(
                f"DSAFeedForward: inference_path={inference_path!r} must be 'auto', 'triton', 'torch' or 'dense'"
            )
        self.num_blocks = num_blocks
        self.block_dim = hidden_dim // num_blocks
        self.compensation = float(compensation)
        self.inference_path = inference_path
        self.track_density = track_density
        self.gate = DynamicGate(dim, num_blocks)
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.drop = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden_dim, dim)
        self._gate_threshold = check_gate_threshold(gate_threshold, name="DSAFeedForward: gate_threshold")
        self._density_sums: Tensor | None = None
        #: the compensation's auxiliary loss of the training forwards since the last optimizer step (module doc),
        #: until :func:`compensation_loss` takes it
        self.compensation_term: Tensor | None = None
        self._term_version: tuple[int, int] = (-1, -1)  # optimizer steps and the gate's versions at its recording

    # -- the fraction of blocks run ----------------------------------------------------------------------------
    @property
    def gate_threshold(self) -> float:
        return self._gate_threshold

    def set_gate_threshold(self, value: float) -> None:
        """Run ``round(value * num_blocks)`` blocks per token from now on; ``value`` in ``(0, 1]``."""
        self._gate_threshold = check_gate_threshold(value)

    @property
    def active_blocks(self) -> int:
        """Blocks each token runs at the current ``gate_threshold``."""
        return active_blocks(self._gate_threshold, self.num_blocks)

    def get_extra_state(self) -> dict[str, float]:
        return {"gate_threshold": self._gate_threshold}

    def set_extra_state(self, state: dict[str, float]) -> None:
        self.set_gate_threshold(state["gate_threshold"])

    def __getstate__(self) -> dict[str, Any]:
        # a pending compensation term belongs to this layer's current step, not to a copy: ``copy.deepcopy`` (EMA,
        # QAT preparation) of the non-leaf tensor raises, and pickling (``torch.save(model)``) would carry its value,
        # cut from its graph, into the copy's next loss. The copy starts without one; this layer keeps its own.
        return {**super().__getstate__(), "compensation_term": None, "_term_version": (-1, -1)}

    def extra_repr(self) -> str:
        return (
            f"num_blocks={self.num_blocks}, block_dim={self.block_dim}, gate_threshold={self._gate_threshold}, "
            f"active_blocks={self.active_blocks}, compensation={self.compensation}"
        )

    # -- forward -------------------------------------------------------------------------------------------------
    def select(self, alpha: Tensor) -> Tensor:
        """Indices ``[..., k]`` of the blocks each token runs: top-``k`` of ``alpha`` (no gradient)."""
        return alpha.detach().topk(self.active_blocks, dim=-1, sorted=False).indices

    def forward(self, x: Tensor) -> Tensor:
        if self._use_sparse():
            return self._forward_sparse(x)
        alpha = self.gate(x)  # [..., N]
        idx = self.select(alpha)  # [..., k]
        if self.training and self.track_density:
            self._accumulate_density(alpha.detach(), idx)
        return self._forward_dense(x, alpha, idx)

    def _record_compensation(self, term: Tensor) -> None:
        if torch.compiler.is_compiling():
            # a compiled call leaves its own term, replacing an earlier call's (a block compiled alone and called
            # twice keeps the second): the step counters and the autograd engine's state below do not trace, and
            # adding to an older term there would keep every uncollected one with its graph
            self.compensation_term = term
            return
        # several calls before the optimizer steps (a layer shared by two inputs) add up; a term no loss took before
        # the weights changed is dropped, not kept with its graph
        version = (_optimizer_steps[0], sum(p._version for p in self.gate.parameters()))
        if self.compensation_term is not None and self._term_version == version:
            term = self.compensation_term + term
        # not kept from the forward that non-reentrant activation checkpointing recomputes in backward (computed all
        # the same: the recompute must save what the first run saved); the first run's is in the loss
        if torch._C._current_graph_task_id() == -1:
            self.compensation_term, self._term_version = term, version

    def _records_compensation(self, alpha: Tensor) -> bool:
        """Whether this forward computes a compensation term: in training, with gradients reaching a trainable gate.
        Reentrant activation checkpointing runs the forward without gradients and computes none: use the
        non-reentrant kind with DSA."""
        return (
            bool(self.compensation)
            and self.training
            and torch.is_grad_enabled()
            and alpha.requires_grad
            and any(p.requires_grad for p in self.gate.parameters())
        )

    def _use_sparse(self) -> bool:
        return (
            self.inference_path != "dense"
            and not self.training
            and not torch.is_grad_enabled()
            and type(self.fc1) is nn.Linear
            and type(self.fc2) is nn.Linear
            and type(self.gate.proj) is nn.Linear  # the fused kernel reads its raw weight
        )

    def _forward_dense(self, x: Tensor, alpha: Tensor, idx: Tensor) -> Tensor:
        if self._records_compensation(alpha):
            # on the gate logits z of the detached input: log(alpha) = logsigmoid(z), finite where alpha underflows
            z = self.gate.logits(x.detach())
            tokens = max(1, alpha.numel() // self.num_blocks)
            term = (self.compensation / tokens) * (F.logsigmoid(z) - torch.sigmoid(z)).sum()
            self._record_compensation(term)
        mask = torch.zeros_like(alpha).scatter_(-1, idx, 1.0)
        weight = alpha * mask  # alpha on the selected blocks, 0 elsewhere
        h = self.act(self.fc1(x))
        h = (h.unflatten(-1, (self.num_blocks, self.block_dim)) * weight.unsqueeze(-1).to(h.dtype)).flatten(-2)
        return self.fc2(self.drop(h))

    def _forward_sparse(self, x: Tensor) -> Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if x2.shape[0] == 0:  # no token: the output is as empty
            return x.new_zeros(shape)
        gate_input = x2  # the gate sees what it sees in training: the selection is the same
        if torch.is_autocast_enabled(x.device.type):  # run the kernels in the autocast dtype, as nn.Linear would
            x2 = x2.to(torch.get_autocast_dtype(x.device.type))
        impl = self.inference_path
        if (
            impl != "torch"
            and x2.is_cuda
            and triton_available()
            and triton_supports(x2, self.fc1.weight, self.num_blocks)
        ):
            impl = "triton"
        # the fused kernel: gate, sigmoid and top-k in one pass over x (fp32 logits of the weights in the kernel's
        # dtype, ties to the lower block; a near-tie may go the other way than training's fp32 gate)
        if impl == "triton":
            from zoo.kernels._block_ffn_triton import gate_topk_triton

            proj = self.gate.proj
            bias = None if proj.bias is None else proj.bias.to(x2.dtype)
            alpha_sel, idx = gate_topk_triton(x2, proj.weight.to(x2.dtype), bias, self.active_blocks)
        else:
            alpha = self.gate(gate_input)
            idx = self.select(alpha)
            alpha_sel = alpha.gather(1, idx)
        y = block_sparse_ffn(
            x2,
            alpha_sel,
            idx,
            self.fc1.weight,
            self.fc1.bias,
            self.fc2.weight,
            self.fc2.bias,
            num_blocks=self.num_blocks,
            impl="torch" if impl == "auto" else impl,
        )
        return y.reshape(*shape[:-1], shape[-1])

    # -- density statistics --------------------------------------------------------------------------------------
    def _accumulate_density(self, alpha: Tensor, idx: Tensor) -> None:
        # Sums kept on the device (no sync per step): tokens, active fraction and its square, alpha and its
        # square, then the tokens that chose each block.
        alpha = alpha.reshape(-1, self.num_blocks).double()
        chosen = torch.zeros_like(alpha).scatter_(1, idx.reshape(-1, idx.shape[-1]), 1.0)
        active = chosen.mean(1)
        sums = torch.cat(
            [
                torch.stack(
                    [
                        active.new_tensor(float(alpha.shape[0])),
                        active.sum(),
                        active.square().sum(),
                        alpha.mean(1).sum(),
                        alpha.square().mean(1).sum(),
                    ]
                ),
                chosen.sum(0),
            ]
        )
        if self._density_sums is None or self._density_sums.device != sums.device:
            self._density_sums = torch.zeros_like(sums)
        self._density_sums += sums

    def pop_density(self) -> dict[str, float] | None:
        """Density statistics since the last call, then reset (``None`` if no training step ran since).

        Keys: ``density`` (mean fraction of blocks active per token), ``density_std`` (its spread across tokens:
        0 under top-``k`` by construction), ``gate_mean`` and ``gate_std`` (``alpha`` over tokens and blocks),
        ``load_max`` (the busiest block's share of the selections over the mean share; 1 means balanced),
        ``gate_threshold``.
        """
        if self._density_sums is None:
            return None
        n, act, act2, g, g2, *load = self._density_sums.tolist()
        self._density_sums = None
        if n == 0:
            return None
        density = act / n
        gate_mean = g / n
        mean_load = sum(load) / len(load)
        return {
            "density": density,
            "density_std": math.sqrt(max(act2 / n - density**2, 0.0)),
            "gate_mean": gate_mean,
            "gate_std": math.sqrt(max(g2 / n - gate_mean**2, 0.0)),
            "load_max": max(load) / mean_load if mean_load else 0.0,
            "gate_threshold": self._gate_threshold,
        }


def dsa_layers(module: nn.Module) -> dict[str, DSAFeedForward]:
    """Every :class:`DSAFeedForward` inside ``module`` (itself included), by qualified name."""
    return {name: m for name, m in module.named_modules() if isinstance(m, DSAFeedForward)}


def set_gate_threshold(module: nn.Module, value: float) -> int:
    """Set ``gate_threshold`` of every DSA FFN inside ``module`` (any ``nn.Module``, a LightningModule too).

    Returns how many layers were set (0 for a model without DSA layers). Raises :class:`zoo.errors.ConfigError`
    (a ``ValueError``) naming ``value`` if it is not in ``(0, 1]``, before touching any layer.
    """
    value = check_gate_threshold(value)
    layers = dsa_layers(module)
    for layer in layers.values():
        layer.set_gate_threshold(value)
    return len(layers)


def compensation_loss(module: nn.Module | Iterable[DSAFeedForward]) -> Tensor | None:
    """The gradient compensation of every DSA FFN inside ``module`` (or of the layers given, found once where a step
    should not walk the model), to add to the training loss: the sum of the ``compensation_term`` each left in its
    last training forward, which this clears. ``None`` when there is none (no DSA layer, ``compensation=0``, or no
    training forward since the last call)."""
    terms = []
    for layer in dsa_layers(module).values() if isinstance(module, nn.Module) else module:
        if layer.compensation_term is not None:
            terms.append(layer.compensation_term)
            layer.compensation_term = None
    return torch.stack(terms).sum() if terms else None


def density_stats(module: nn.Module, *, reset: bool = True) -> dict[str, dict[str, float]]:
    """Density statistics of every DSA FFN inside ``module`` that ran in training mode since the last reset.

    ``{layer name: stats}`` with the keys of :meth:`DSAFeedForward.pop_density`. ``reset=False`` leaves the sums.
    """
    out = {}
    for name, layer in dsa_layers(module).items():
        saved = layer._density_sums
        stats = layer.pop_density()
        if not reset:
            layer._density_sums = saved
        if stats is not None:
            out[name] = stats
    return out
