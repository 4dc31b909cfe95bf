"""The progressive quantization schedule of quantization-aware training, as a Lightning callback."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from numbers import Real
from typing import Any, Literal

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn

from zoo.errors import ConfigError
from zoo.quant.fake_quant import FakeQuantizer, check_bits
from zoo.quant.qat import (
    enable_fake_quant,
    freeze_observers,
    qat_layers,
    quantize_,
    set_schedule_bits,
    weight_quant_error,
)

Point = int | float


class QATScheduleCallback(Callback):
    """Steps the weight bit widths of quantization-aware training through ``schedule`` (e.g. 8 -> 6 -> 4), freezes
    range observers and batch-norm statistics late in training, and logs bits and quantization errors per layer.

    **Bits per layer.** Every QAT layer has its own target (from ``quantize_``'s ``weight_bit`` and ``overrides``:
    attention 8-bit and FFN 4-bit by default). Stage ``i`` runs each layer at ``max(target, schedule[i])``: the
    schedule is a ceiling that comes down, and a layer follows it down to its own target and no further. With
    ``schedule=[8, 6, 4]``, 4-bit FFN layers train at 8, then 6, then 4 bits while 8-bit attention layers stay at 8
    throughout; ``schedule=[4]`` trains every layer at its target from the start. The last entry should not exceed
    the smallest target, or layers end training (and are converted) above their targets; a warning says so.
    Activation bits are not scheduled: they stay as configured.

    **When.** ``start`` is where quantization-aware training begins: before it every fake quantizer is off and the
    model trains in float (the usual recipe fine-tunes a trained float model; a float phase does the same within one
    run, and lets a model trained from scratch learn before quantization noise is added). ``milestones[i]`` is where
    stage ``i + 1`` begins. Both are in ``unit`` (``"epoch"``: from the start of that epoch; ``"step"``: from that
    optimizer step, ``trainer.global_step``): an integer is an absolute epoch or step, a float in ``(0, 1)`` a
    fraction of the run (``max_epochs`` or the estimated optimizer steps). ``milestones=None`` spreads the stages
    evenly from ``start`` to the end of the run. ``freeze_observers_at`` and ``freeze_bn_at`` are points of the
    same kind (``None``: never): from then on static ranges stop following the data (per-token activation scales are
    dynamic and unaffected) and every BatchNorm uses its running statistics.

    **Resuming.** ``state_dict`` holds the resolved milestones and the current stage, and each layer's bits are in
    the model's state dict, so a run resumed from a checkpoint continues in the stage it was in, on the same step
    boundaries even if the run's length changed.

    **Logging** (every ``trainer.log_every_n_steps``): ``qat/schedule_bits`` (32 before ``start``), and per layer
    ``qat/bits/<name>``, ``qat/weight_error/<name>`` (``||w_hat - w|| / ||w||``) and ``qat/input_error/<name>`` (the
    same for the layer's quantized input on that batch).

    Args:
        schedule: weight bits of each stage, each in 2..8.
        milestones: ``len(schedule) - 1`` increasing points where the next stage begins (see above), or ``None``.
        start: point where fake quantization begins (``None``: at once).
        unit: ``"epoch"`` or ``"step"``.
        freeze_observers_at: point from which static range observers are frozen, or ``None``.
        freeze_bn_at: point from which BatchNorm statistics are frozen, or ``None``.
        quant: keyword arguments of :func:`zoo.quant.quantize_`; when given and the model has no QAT layer yet, it
            is quantized at setup (through the task's ``quantize`` method when it has one). ``None``: the model was
            quantized already (e.g. ``task.quantize(...)`` in code).
        log_layers: log the per-layer bits and errors (the schedule bits are always logged).
    """

    def __init__(
        self,
        schedule: Sequence[int] = (8, 6, 4),
        milestones: Sequence[Point] | None = None,
        *,
        start: Point | None = None,
        unit: Literal["epoch", "step"] = "epoch",
        freeze_observers_at: Point | None = None,
        freeze_bn_at: Point | None = None,
        quant: Mapping[str, Any] | None = None,
        log_layers: bool = True,
    ) -> None:
        super().__init__()
        if isinstance(schedule, int | str) or not schedule:
            raise ConfigError(f"schedule={schedule!r} must be a non-empty list of bit widths, e.g. [8, 6, 4]")
        self.schedule = [check_bits(b, f"schedule[{i}]") for i, b in enumerate(schedule)]
        if unit not in ("epoch", "step"):
            raise ConfigError(f"unit={unit!r} must be 'epoch' or 'step'")
        self.unit = unit
        if milestones is not None:
            milestones = list(milestones)
            if len(milestones) != len(self.schedule) - 1:
                raise ConfigError(
                    f"milestones={milestones} must have len(schedule) - 1 = {len(self.schedule) - 1} entries: where "
                    "each stage after the first begins"
                )
            for i, m in enumerate(milestones):
                _check_point(m, f"milestones[{i}]")
        self.milestones = milestones
        self.start = _check_point(start, "start")
        self.freeze_observers_at = _check_point(freeze_observers_at, "freeze_observers_at")
        self.freeze_bn_at = _check_point(freeze_bn_at, "freeze_bn_at")
        self.quant = dict(quant) if quant is not None else None
        self.log_layers = log_layers
        # resolved when training starts (or restored from a checkpoint): absolute epochs or steps
        self._resolved: dict[str, Any] | None = None
        self.stage: int = 0
        self.quantizing = True  # fake quantizers on; off before `start`
        self.observers_frozen = False
        self.bn_frozen = False
        self.transitions: list[tuple[int, int]] = []  # (epoch or step, schedule bits) where each stage began
        self._input_errors: dict[str, float] = {}
        self._capture = False
        self._hooks: list[Any] = []

    # -- setup ------------------------------------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if any(getattr(m, "zoo_converted", False) for m in pl_module.modules()):
            return  # an integer model (zoo.quant.convert_), e.g. tested by the same trainer: nothing to schedule
        if not any(True for _ in qat_layers(pl_module)):
            if self.quant is None:
                raise ConfigError(
                    f"QATScheduleCallback: {type(pl_module).__name__} has no quantization-aware layer; give the "
                    "callback `quant` (quantize_ arguments) or call model.quantize(...) before fitting"
                )
            quantize = getattr(pl_module, "quantize", None)
            if callable(quantize):
                quantize(**self.quant)
            else:
                quantize_(pl_module, **self.quant)
        if stage == "fit" and not self.transitions:
            # the first stage's bits for the sanity check; on_train_start records and logs the stage in force, once a
            # resumed run's checkpoint has restored its own (logging here announced stage 0 to every resumed run)
            set_schedule_bits(pl_module, self.schedule[0])
        targets = [layer.target_weight_bit for _, layer in qat_layers(pl_module)]
        if min(targets) < self.schedule[-1]:
            rank_zero_warn(
                f"QATScheduleCallback: the schedule ends at {self.schedule[-1]} bits but some layers target "
                f"{min(targets)}; they end training, and are converted, at {self.schedule[-1]} bits"
            )
        for hook in self._hooks:
            hook.remove()
        self._hooks = [
            layer.act_quant.register_forward_hook(self._input_error_hook(name))
            for name, layer in qat_layers(pl_module)
            if hasattr(layer, "act_quant")
        ]

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    def _resolve(self, trainer: pl.Trainer) -> dict[str, Any]:
        if self.unit == "epoch":
            total = trainer.max_epochs if trainer.max_epochs is not None and trainer.max_epochs > 0 else None
        else:
            total = trainer.estimated_stepping_batches
            total = int(total) if total is not None and math.isfinite(total) else None

        def absolute(point: Point | None, key: str) -> int | None:
            if point is None or isinstance(point, int):
                return point
            if total is None:
                raise ConfigError(
                    f"{key}={point} is a fraction of the run, but the run's length in {self.unit}s is "
                    "unknown (set max_epochs / max_steps, or give an absolute point)"
                )
            return int(round(point * total))

        start = absolute(self.start, "start") or 0
        if self.milestones is None:
            if len(self.schedule) > 1 and total is None:
                raise ConfigError(
                    f"milestones=None spreads the stages over the run, but its length in {self.unit}s is unknown; "
                    "give milestones"
                )
            stages = len(self.schedule)
            milestones = [start + round(i * (total - start) / stages) for i in range(1, stages)]
        else:
            milestones = [absolute(m, f"milestones[{i}]") for i, m in enumerate(self.milestones)]
        points = [start, *milestones]  # stage 1 may begin at start itself (a run too short for stage 0)
        if any(b <= a for a, b in zip(milestones, milestones[1:], strict=False)) or min(points) < start:
            raise ConfigError(
                f"milestones={self.milestones} (start={self.start}) resolve to {milestones} {self.unit}s "
                f"(start {start}): they must increase, from start on"
            )
        return {
            "schedule": list(self.schedule),
            "unit": self.unit,
            "start": start,
            "milestones": milestones,
            "freeze_observers_at": absolute(self.freeze_observers_at, "freeze_observers_at"),
            "freeze_bn_at": absolute(self.freeze_bn_at, "freeze_bn_at"),
        }

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # not on_fit_start: Lightning restores the loops (global step, epoch) of a resumed run after that hook
        resolved = self._resolve(trainer)
        restored = self._resolved
        if restored is not None and (restored["schedule"], restored["unit"]) == (self.schedule, self.unit):
            resolved = restored  # keep the boundaries of the run being resumed
        elif restored is not None:
            rank_zero_warn(
                f"QATScheduleCallback: the checkpoint's schedule {restored['schedule']} per {restored['unit']} "
                f"differs from this one, {self.schedule} per {self.unit}; following the new one"
            )
        self._resolved = resolved
        self._update(trainer, pl_module)

    # -- the schedule -----------------------------------------------------------------------------------------------
    def _position(self, trainer: pl.Trainer) -> int:
        return trainer.current_epoch if self.unit == "epoch" else trainer.global_step

    def stage_at(self, position: int) -> int:
        """Index of the stage in force at ``position`` (an epoch or an optimizer step, per ``unit``)."""
        assert self._resolved is not None, "the schedule is resolved when training starts"
        return sum(position >= m for m in self._resolved["milestones"])

    def _apply_stage(self, pl_module: nn.Module, stage: int, *, position: int) -> None:
        bits = set_schedule_bits(pl_module, self.schedule[stage])
        self.stage = stage
        self.transitions.append((position, self.schedule[stage]))
        by_bits: dict[int, int] = {}
        for b in bits.values():
            by_bits[b] = by_bits.get(b, 0) + 1
        rank_zero_info(
            f"QAT: {self.unit} {position}: stage {stage} ({self.schedule[stage]} bits); layers by weight bits: "
            + ", ".join(f"{n} at {b}" for b, n in sorted(by_bits.items(), reverse=True))
        )

    def _update(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        position = self._position(trainer)
        quantizing = position >= self._resolved.get("start", 0)
        if quantizing != self.quantizing or not self.transitions:
            count = enable_fake_quant(pl_module, quantizing)
            if quantizing != self.quantizing:
                rank_zero_info(
                    f"QAT: {self.unit} {position}: {count} fake quantizers "
                    + ("on: quantization-aware training begins" if quantizing else "off until start: float training")
                )
            self.quantizing = quantizing
        stage = self.stage_at(position)
        if stage != self.stage or not self.transitions:
            self._apply_stage(pl_module, stage, position=position)
        resolved = self._resolved
        if resolved["freeze_observers_at"] is not None and position >= resolved["freeze_observers_at"]:
            if not self.observers_frozen:
                count = freeze_observers(pl_module)
                rank_zero_info(f"QAT: {self.unit} {position}: froze {count} range observers")
            self.observers_frozen = True
        if resolved["freeze_bn_at"] is not None and position >= resolved["freeze_bn_at"]:
            if not self.bn_frozen:
                rank_zero_info(f"QAT: {self.unit} {position}: froze batch-norm statistics")
            self.bn_frozen = True
        if self.bn_frozen:  # Lightning puts the module back in train mode each epoch and after validation
            for m in pl_module.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._update(trainer, pl_module)

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._update(trainer, pl_module)
        every = max(1, trainer.log_every_n_steps)
        self._capture = self.log_layers and trainer.global_step % every == 0
        self._input_errors = {}

    # -- logging ----------------------------------------------------------------------------------------------------
    def _input_error_hook(self, name: str):
        def hook(module: FakeQuantizer, inputs: tuple, output: Any) -> None:
            if self._capture:
                x = inputs[0].detach().float()
                err = (output.detach().float() - x).norm() / x.norm().clamp_min(1e-12)
                self._input_errors[name] = err.item()

        return hook

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        metrics = {"qat/schedule_bits": float(self.schedule[self.stage] if self.quantizing else 32)}
        if self._capture:
            for name, layer in qat_layers(pl_module):
                metrics[f"qat/bits/{name}"] = float(layer.weight_quant.bits)
                metrics[f"qat/weight_error/{name}"] = weight_quant_error(layer)
            metrics |= {f"qat/input_error/{name}": err for name, err in self._input_errors.items()}
            self._capture = False
        pl_module.log_dict(metrics, on_step=True, on_epoch=False, batch_size=1)

    # -- checkpoint -------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "resolved": self._resolved,
            "stage": self.stage,
            "quantizing": self.quantizing,
            "observers_frozen": self.observers_frozen,
            "bn_frozen": self.bn_frozen,
            "transitions": [list(t) for t in self.transitions],
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._resolved = state_dict["resolved"]
        self.stage = state_dict["stage"]
        self.quantizing = state_dict.get("quantizing", True)
        self.observers_frozen = state_dict["observers_frozen"]
        self.bn_frozen = state_dict["bn_frozen"]
        self.transitions = [tuple(t) for t in state_dict["transitions"]]


def _check_point(point: Any, key: str) -> Point | None:
    if point is None:
        return None
    if isinstance(point, bool) or not isinstance(point, Real):
        raise ConfigError(f"{key}={point!r} must be an epoch/step (integer) or a fraction of the run in (0, 1)")
    if isinstance(point, int) or float(point).is_integer() and point >= 1:
        if point < 0:
            raise ConfigError(f"{key}={point} must not be negative")
        return int(point)
    if not 0 < point < 1:
        raise ConfigError(f"{key}={point} must be an epoch/step (integer) or a fraction of the run in (0, 1)")
    return float(point)
