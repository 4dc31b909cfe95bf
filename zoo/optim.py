"""Learning-rate schedules that need the run's length, which LightningCLI's scheduler callables do not get."""

from __future__ import annotations

import math
from collections.abc import Callable

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR, LRScheduler

from zoo.errors import ConfigError


def _warmup_hold_cosine(total: int, warm: int, start: int, min_ratio: float) -> Callable[[int], float]:
    """The rate factor of step ``s``: linear warm-up over ``warm`` steps, 1 until ``start``, then cosine decay to
    ``min_ratio`` at ``total``."""

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if step < start:
            return 1.0
        progress = min(1.0, (step - start) / max(1, total - start))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


class WarmupCosine(LambdaLR):
    """Linear warm-up from 0 over ``warmup`` of the steps, then cosine decay to ``min_ratio`` of the base rate.

    Args:
        optimizer: the optimizer whose rates are scheduled.
        total_steps: optimizer steps in the whole run (a task passes ``trainer.estimated_stepping_batches``).
        warmup: fraction of ``total_steps`` spent warming up, in ``[0, 1)``.
        min_ratio: final rate as a fraction of the base rate.
    """

    def __init__(self, optimizer: Optimizer, total_steps: int, *, warmup: float = 0.05, min_ratio: float = 0.0) -> None:
        if not 0 <= warmup < 1:
            raise ConfigError(f"WarmupCosine: warmup={warmup} must be in [0, 1)")
        total = max(1, int(total_steps))
        warm = int(warmup * total)
        super().__init__(optimizer, _warmup_hold_cosine(total, warm, warm, min_ratio))


class WarmupStableDecay(LambdaLR):
    """Linear warm-up over ``warmup`` of the steps, the base rate until the last ``decay`` of them, then cosine decay
    to ``min_ratio`` of the base rate (the warmup-stable-decay schedule of MiniCPM, Hu et al. 2024).

    Against :class:`WarmupCosine` it keeps the full rate for longer: a model whose learning starts late (Sort-of-CLEVR's
    question-image binding comes after a plateau of several epochs) still learns at the full rate after it.

    Args:
        optimizer: the optimizer whose rates are scheduled.
        total_steps: optimizer steps in the whole run (a task passes ``trainer.estimated_stepping_batches``).
        warmup: fraction of ``total_steps`` spent warming up, in ``[0, 1)``.
        decay: fraction of ``total_steps`` spent decaying at the end, in ``(0, 1]``; ``warmup + decay <= 1``.
        min_ratio: final rate as a fraction of the base rate.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        total_steps: int,
        *,
        warmup: float = 0.05,
        decay: float = 0.25,
        min_ratio: float = 0.0,
    ) -> None:
        if not 0 <= warmup < 1:
            raise ConfigError(f"WarmupStableDecay: warmup={warmup} must be in [0, 1)")
        if not 0 < decay <= 1 or warmup + decay > 1:
            raise ConfigError(f"WarmupStableDecay: decay={decay} must be in (0, 1] with warmup + decay <= 1")
        total = max(1, int(total_steps))
        warm, start = int(warmup * total), total - max(1, int(decay * total))
        super().__init__(optimizer, _warmup_hold_cosine(total, warm, start, min_ratio))


class Constant(LambdaLR):
    """A constant rate (the optimizer's own), with the same ``(optimizer, total_steps)`` signature."""

    def __init__(self, optimizer: Optimizer, total_steps: int) -> None:
        super().__init__(optimizer, lambda step: 1.0)


#: ``schedule(optimizer, total_steps) -> LRScheduler``; from YAML: a class_path plus init_args other than those two.
ScheduleFactory = Callable[[Optimizer, int], LRScheduler]
