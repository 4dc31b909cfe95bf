"""Monitoring and annealing of the DSA FFNs of a model during training."""

from __future__ import annotations

import math
from typing import Literal

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn

from zoo.errors import ConfigError
from zoo.layers.dsa import check_gate_threshold, density_stats, dsa_layers, set_gate_threshold

Schedule = Literal["linear", "cosine"]


class DSAMonitor(Callback):
    """Logs the activation density of every DSA layer every ``log_every_n_steps`` optimizer steps through the
    trainer's loggers, and optionally anneals ``gate_threshold`` over training.

    Logged per layer (``dsa/<layer name>/<stat>``, the statistics of
    :meth:`zoo.layers.dsa.DSAFeedForward.pop_density` over the steps since the last log): ``density`` (mean fraction
    of blocks active per token), ``density_std`` (its spread across tokens), ``gate_mean``, ``gate_std``,
    ``load_max`` (busiest block over the mean; 1 = balanced) and ``gate_threshold``; plus ``dsa/density``, the mean
    over layers.

    Annealing: with ``anneal_to`` set, the threshold goes from ``anneal_from`` (held until ``anneal_start``) to
    ``anneal_to`` (reached at ``anneal_end`` and held after), both fractions of the run's optimizer steps
    (``trainer.estimated_stepping_batches``), linearly or on a half cosine. The value is a function of the global
    step alone, so a resumed run follows the same schedule; the layers also save their current threshold in the
    checkpoint. Validation during training runs at the current threshold; test and predict run at ``anneal_to``
    (a best checkpoint saved mid-schedule carries an older threshold). Starting dense (``anneal_from=1.0``) and
    sparsifying lets the blocks learn before they compete.

    Args:
        log_every_n_steps: optimizer steps between logs.
        anneal_to: final ``gate_threshold`` in ``(0, 1]``; ``None`` leaves the threshold alone.
        anneal_from: starting ``gate_threshold`` in ``(0, 1]``.
        anneal_start: fraction of training at which annealing starts, in ``[0, 1]``.
        anneal_end: fraction of training at which ``anneal_to`` is reached, in ``[anneal_start, 1]``.
        schedule: ``"linear"`` or ``"cosine"``.
    """

    def __init__(
        self,
        *,
        log_every_n_steps: int = 50,
        anneal_to: float | None = None,
        anneal_from: float = 1.0,
        anneal_start: float = 0.0,
        anneal_end: float = 0.5,
        schedule: Schedule = "linear",
    ) -> None:
        if log_every_n_steps < 1:
            raise ConfigError(f"DSAMonitor: log_every_n_steps={log_every_n_steps} must be at least 1")
        if anneal_to is not None:
            check_gate_threshold(anneal_to, name="DSAMonitor: anneal_to")
        check_gate_threshold(anneal_from, name="DSAMonitor: anneal_from")
        if not 0.0 <= anneal_start <= anneal_end <= 1.0:
            raise ConfigError(
                f"DSAMonitor: anneal_start={anneal_start} and anneal_end={anneal_end} must satisfy "
                "0 <= anneal_start <= anneal_end <= 1"
            )
        if schedule not in ("linear", "cosine"):
            raise ConfigError(f"DSAMonitor: schedule={schedule!r} must be 'linear' or 'cosine'")
        self.log_every_n_steps = log_every_n_steps
        self.anneal_to, self.anneal_from = anneal_to, anneal_from
        self.anneal_start, self.anneal_end = anneal_start, anneal_end
        self.schedule = schedule
        self._last_logged_step = -1

    def threshold_at(self, progress: float) -> float:
        """The annealed ``gate_threshold`` at ``progress`` (fraction of training done, in ``[0, 1]``)."""
        if self.anneal_to is None:
            raise ValueError("DSAMonitor.threshold_at: no annealing configured (anneal_to is None)")
        if progress <= self.anneal_start:
            return self.anneal_from
        if progress >= self.anneal_end or self.anneal_end == self.anneal_start:
            return self.anneal_to
        u = (progress - self.anneal_start) / (self.anneal_end - self.anneal_start)
        if self.schedule == "cosine":
            u = 0.5 - 0.5 * math.cos(math.pi * u)
        return self.anneal_from + u * (self.anneal_to - self.anneal_from)

    def _anneal(self, trainer: Trainer, pl_module: LightningModule, step: int) -> None:
        if self.anneal_to is None:
            return
        total = trainer.estimated_stepping_batches
        if not math.isfinite(total):
            raise ConfigError("DSAMonitor: annealing needs a finite run; set trainer.max_steps or trainer.max_epochs")
        total = max(1, int(total))
        set_gate_threshold(pl_module, self.threshold_at(min(1.0, step / total)))

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not dsa_layers(pl_module):
            rank_zero_warn("DSAMonitor: the model has no DSAFeedForward layer; nothing to log or anneal")

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch, batch_idx: int) -> None:
        self._anneal(trainer, pl_module, trainer.global_step)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int) -> None:
        step = trainer.global_step
        if step % self.log_every_n_steps or step == self._last_logged_step or not trainer.loggers:
            return
        self._last_logged_step = step
        stats = density_stats(pl_module)
        if not stats:
            return
        metrics = {f"dsa/{name}/{key}": value for name, layer in stats.items() for key, value in layer.items()}
        metrics["dsa/density"] = sum(s["density"] for s in stats.values()) / len(stats)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)

    def on_test_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # A best checkpoint saved mid-annealing carries its threshold of the time; evaluate at the schedule's end.
        if self.anneal_to is not None:
            set_gate_threshold(pl_module, self.anneal_to)

    on_predict_start = on_test_start

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Evaluation after fit runs at the final threshold, whatever fraction of the planned steps ran.
        if self.anneal_to is not None and trainer.global_step >= trainer.estimated_stepping_batches:
            set_gate_threshold(pl_module, self.anneal_to)
