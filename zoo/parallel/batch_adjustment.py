"""Dynamic Batch Adjustment: a micro-batch sized to the device's memory, gradient accumulation keeping the global batch.

The global batch is ``micro_batch x accumulation x data-parallel world size``. :class:`DynamicBatchAdjustment` picks
the largest micro-batch the device holds (measured on CUDA, the datamodule's ``batch_size`` elsewhere), then the fewest
accumulation steps that reach the target, then evens the micro-batch out so that the realised global batch is the
smallest at least the target (:func:`plan_accumulation`). From YAML::

    trainer:
      callbacks:
        - class_path: zoo.parallel.batch_adjustment.DynamicBatchAdjustment
          init_args: {global_batch_size: 256}

Lightning's ``BatchSizeFinder`` searches for the largest batch that runs, by trial training steps that may run out of
memory, and leaves the global batch to follow it; here the global batch is fixed and two probe steps fit the memory as a
line in the micro-batch size.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from itertools import islice
from numbers import Real
from typing import Any, NamedTuple

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import GradientAccumulationScheduler
from lightning.pytorch.strategies import DeepSpeedStrategy, ParallelStrategy
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.seed import isolate_rng
from lightning.pytorch.utilities.signature_utils import is_param_in_hook_signature
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset
from torchmetrics import Metric

from zoo.errors import ConfigError

_GIB, _MIB = 2**30, 2**20
_UNBOUNDED = 2**62  # a micro-batch limit memory does not set


def plan_accumulation(*, global_batch_size: int, micro_batch_size: int, world_size: int) -> tuple[int, int]:
    """``(micro_batch, accumulation)`` for a target ``global_batch_size`` (samples per optimizer step over all ranks).

    ``micro_batch_size`` is the largest micro-batch allowed per rank, ``world_size`` the number of data-parallel ranks.
    The accumulation is the fewest steps that reach the target, ``ceil(global / (micro_batch_size * world))``; the
    micro-batch is then evened out to ``ceil(global / (accumulation * world))`` (never above ``micro_batch_size``), so
    that ``micro_batch * accumulation * world`` is the smallest global batch at least the target with that accumulation.
    """
    for name, value in (
        ("global_batch_size", global_batch_size),
        ("micro_batch_size", micro_batch_size),
        ("world_size", world_size),
    ):
        if not _is_count(value):
            raise ConfigError(f"plan_accumulation: {name}={value!r} must be an integer >= 1")
    accumulation = -(-global_batch_size // (micro_batch_size * world_size))
    return -(-global_batch_size // (accumulation * world_size)), accumulation


@dataclass(frozen=True)
class BatchPlan:
    """The batch sizes of a run. ``micro_batch_limit`` is the largest micro-batch that memory and the caps allowed on
    each rank, before :func:`plan_accumulation` evened it out to ``micro_batch_size``."""

    global_batch_size: int
    micro_batch_size: int
    accumulation: int
    world_size: int
    micro_batch_limit: int

    @classmethod
    def make(cls, *, global_batch_size: int, micro_batch_limit: int, world_size: int) -> BatchPlan:
        micro, accumulation = plan_accumulation(
            global_batch_size=global_batch_size, micro_batch_size=micro_batch_limit, world_size=world_size
        )
        return cls(global_batch_size, micro, accumulation, world_size, micro_batch_limit)

    @property
    def realised_global_batch(self) -> int:
        """Samples per optimizer step over all ranks: ``micro_batch_size * accumulation * world_size``."""
        return self.micro_batch_size * self.accumulation * self.world_size

    def describe(self) -> str:
        """The plan in one line, for messages."""
        return (
            f"micro-batch {self.micro_batch_size} x accumulation {self.accumulation} x {self.world_size} "
            f"data-parallel rank(s) = global batch {self.realised_global_batch} (target {self.global_batch_size})"
        )


class MemoryLine(NamedTuple):
    """Peak device memory of one training step (forward and backward) at micro-batch ``m``, in bytes:
    ``fixed_bytes + bytes_per_sample * m``."""

    fixed_bytes: float
    bytes_per_sample: float

    @classmethod
    def through(cls, sizes: tuple[int, int], peaks: tuple[int, int]) -> MemoryLine:
        """The line through the peaks measured at two different micro-batch sizes."""
        per_sample = (peaks[1] - peaks[0]) / (sizes[1] - sizes[0])
        return cls(peaks[0] - per_sample * sizes[0], per_sample)

    def largest_micro_batch(self, budget_bytes: float) -> int | None:
        """The largest ``m`` with ``fixed_bytes + bytes_per_sample * m <= budget_bytes`` (below 1 when even one sample
        does not fit); ``None`` when the memory does not grow with the micro-batch."""
        if self.bytes_per_sample <= 0:
            return None
        return math.floor((budget_bytes - self.fixed_bytes) / self.bytes_per_sample)


def slice_batch(batch: Any, size: int) -> Any:
    """The first ``size`` samples of a collated batch: in a dict, tensors and lists (one entry per sample, e.g.
    ``text: list[str]``) are cut along dim 0 and nested dicts likewise; a batch that is a list or tuple (a
    ``TensorDataset``'s ``[x, y]``) is cut element by element in the same way; anything else is kept."""
    if isinstance(batch, Mapping):
        return {key: _slice_entry(value, size) for key, value in batch.items()}
    if isinstance(batch, (list, tuple)):
        entries = [_slice_entry(value, size) for value in batch]
        return entries if isinstance(batch, list) else tuple(entries)
    return _slice_entry(batch, size)


def _slice_entry(value: Any, size: int) -> Any:
    if isinstance(value, Mapping):
        return slice_batch(value, size)
    return value[:size] if isinstance(value, (Tensor, list, tuple)) else value


def _rows(batch: Any) -> int | None:
    """The number of samples in a collated batch, as :func:`slice_batch` reads it; ``None`` if it holds none."""
    if isinstance(batch, Mapping):
        counts = [_entry_rows(value) for value in batch.values()]
    elif isinstance(batch, (list, tuple)):
        counts = [_entry_rows(value) for value in batch]
    else:
        counts = [_entry_rows(batch)]
    counts = [count for count in counts if count is not None]
    return min(counts) if counts else None


def _entry_rows(value: Any) -> int | None:
    if isinstance(value, Mapping):
        return _rows(value)
    if isinstance(value, Tensor):
        return value.shape[0] if value.ndim else None
    return len(value) if isinstance(value, (list, tuple)) else None


def data_parallel_size(trainer: Trainer) -> int:
    """Ranks that each see different samples: the replicas of the strategy's distributed sampler (data parallel only,
    not the tensor-parallel ranks of ``ModelParallelStrategy``); 1 on a single device."""
    sampler_kwargs = getattr(trainer.strategy, "distributed_sampler_kwargs", None) or {}
    return int(sampler_kwargs.get("num_replicas", 1)) or 1


class DynamicBatchAdjustment(Callback):
    """Sets the datamodule's ``batch_size`` (the micro-batch) and ``trainer.accumulate_grad_batches`` so that each
    optimizer step sees ``global_batch_size`` samples, or the fewest more that divide evenly
    (:func:`plan_accumulation`).

    The micro-batch before evening out is the smallest of ``max_micro_batch_size``, ``ceil(global_batch_size / world)``
    and what the device holds:

    - on CUDA, measured: training steps (forward and backward of ``training_step``, no optimizer step) at ``n // 2``
      and ``n`` samples of one training batch (``n``, the probe size, is the datamodule's ``batch_size``, at least 2),
      each holding the gradients of the step before as in an accumulation window, fit the peak allocated memory as a
      :class:`MemoryLine`; the micro-batch is the largest whose peak stays within ``memory_fraction`` of the device's
      memory, less ``optimizer_states_per_parameter`` times the bytes of the trainable parameters, since the
      optimizer's states only appear at its first step. Under a distributed strategy the smallest over the ranks.
    - elsewhere (CPU), the datamodule's ``batch_size``.

    The probe leaves the run as it was: weights, gradients, buffers (batch-norm statistics), train/eval modes, the
    global random state (``isolate_rng``) and the torchmetrics that ``training_step`` updates are restored, and what it
    logs is dropped; rebuilding the training loader and the optimizers afterwards also runs under ``isolate_rng``. A
    measured run is then the run one would get by setting the two values by hand, except that its training loader
    iterator draws its worker base seed at another point of the random stream. Each probe step slices a batch of the
    first ``n`` samples of the training set, so a padded batch has the same length at both sizes. Its peak includes
    the precision plugin's autocast and the batch transfer hooks, as in training; under DDP its backward does not
    synchronise gradients (``block_backward_sync``, as Lightning's own accumulation steps), so ranks probe
    independently. A probe step that runs out of memory stops the fit: lower the datamodule's ``batch_size``.

    The plan is saved in checkpoints (:meth:`state_dict`); a fit resumed with ``ckpt_path`` reuses it without
    probing, whatever this callback's own arguments say. When the data-parallel world size changed, the accumulation
    is planned again as a new run would plan it, measured where the device allows (a warning says so): the saved
    limit was capped by the old ranks' share of the global batch and measured under their shards. The checkpoint's
    ``global_batch_size`` wins over a different one given here (a warning too).

    The datamodule must have a settable integer ``batch_size`` that its ``train_dataloader`` reads when called (the
    zoo's datamodules do); the setting also reaches its validation and test loaders. Strategies: a single device,
    DDP, and ``ModelParallelStrategy`` (FSDP2 and tensor parallelism: the plan, its saving and resume are tested on
    CPU processes, 2 x 2, where only the data-parallel ranks count; the CUDA probe under it is not); DeepSpeed is
    refused (it takes the accumulation into its engine when the strategy sets up). Conflicts with
    ``GradientAccumulationScheduler``, a ``trainer.accumulate_grad_batches`` set by hand and manual optimization are
    refused. Put this callback before callbacks that keep references to the
    optimizers in ``on_fit_start``: a measured plan replaces them there.

    Args:
        global_batch_size: samples per optimizer step over all data-parallel ranks.
        max_micro_batch_size: the largest micro-batch per rank, or ``None`` for no cap beyond memory.
        memory_fraction: the fraction of the device's memory a training step may take, in ``(0, 1]``; the rest
            absorbs the allocator's fragmentation and what the probe does not see.
        optimizer_states_per_parameter: how many parameter-sized tensors the optimizer keeps per trainable parameter,
            reserved from the budget: 2 for Adam and AdamW (the zoo's default), 1 for SGD with momentum, 0 without.
    """

    def __init__(
        self,
        global_batch_size: int,
        *,
        max_micro_batch_size: int | None = None,
        memory_fraction: float = 0.85,
        optimizer_states_per_parameter: float = 2.0,
    ) -> None:
        name = type(self).__name__
        if not _is_count(global_batch_size):
            raise ConfigError(f"{name}: global_batch_size={global_batch_size!r} must be an integer >= 1")
        if max_micro_batch_size is not None and not _is_count(max_micro_batch_size):
            raise ConfigError(f"{name}: max_micro_batch_size={max_micro_batch_size!r} must be an integer >= 1 or None")
        if isinstance(memory_fraction, bool) or not isinstance(memory_fraction, Real) or not 0 < memory_fraction <= 1:
            raise ConfigError(f"{name}: memory_fraction={memory_fraction!r} must be in (0, 1]")
        if not isinstance(optimizer_states_per_parameter, Real) or not optimizer_states_per_parameter >= 0:
            raise ConfigError(
                f"{name}: optimizer_states_per_parameter={optimizer_states_per_parameter!r} must be a number >= 0"
            )
        self.global_batch_size = global_batch_size
        self._replaced_global_batch_size: int | None = None  # set while a resumed fit follows its checkpoint's
        self.max_micro_batch_size = max_micro_batch_size
        self.memory_fraction = float(memory_fraction)
        self.optimizer_states_per_parameter = float(optimizer_states_per_parameter)
        #: the plan in use; ``None`` before the first fit
        self.plan: BatchPlan | None = None
        #: the measured memory of a training step; ``None`` when not measured
        self.memory_line: MemoryLine | None = None
        self.restored_plan: BatchPlan | None = None
        self._origin = ""  # where the plan comes from, for the message
        self._probe_size = 0
        self._optimizers_built = False  # strategy.setup has built the optimizers and maybe the loader
        self._deferred = False
        self._plan_again = False
        self._measured_limit: int | None = None
        self._measured_line: MemoryLine | None = None

    # -- the hooks, in the order Lightning 2.6 calls them in Trainer._run ---------------------------------------------
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        # Callback setup runs before strategy.setup, which calls configure_optimizers, where the zoo's tasks read
        # trainer.estimated_stepping_batches, which builds the training loader: a plan applied here shapes both. It is
        # the datamodule's batch size until a measurement (on_fit_start) or the checkpoint (on_load_checkpoint) says
        # otherwise.
        if stage != TrainerFn.FITTING:
            return
        datamodule = self._check_run(trainer, pl_module)
        self._optimizers_built, self._deferred, self.restored_plan, self.memory_line = False, False, None, None
        self._plan_again = False  # the checkpoint's plan was made for another number of ranks: measure again
        self._measured_limit = None  # this fit's measured micro-batch limit
        if self._replaced_global_batch_size is not None:  # a resumed fit followed its checkpoint's
            self.global_batch_size, self._replaced_global_batch_size = self._replaced_global_batch_size, None
        self._probe_size = datamodule.batch_size
        self._apply(
            trainer, self._plan(trainer, datamodule.batch_size), f"the datamodule's batch_size={self._probe_size}"
        )

    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        # Lightning restores callbacks after setup and before strategy.setup, or, for strategies that restore after
        # setup (FSDP), after on_fit_start; in both cases before the optimizer and scheduler states. on_load_checkpoint
        # runs for every callback, load_state_dict only for those with a state, which is why the work is done here.
        if trainer.state.fn != TrainerFn.FITTING:
            return
        state = (checkpoint.get("callbacks") or {}).get(self.state_key)
        if state:
            self.load_state_dict(state)
            self._resume(trainer, pl_module)
        elif self._deferred:
            self._deferred = False
            self._measure(trainer, pl_module)

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # The first hook with the model on its device, wrapped and converted as it trains, and still before the
        # optimizer and scheduler states are restored and before any step: the place to measure and, if the plan
        # changes, to rebuild the loader and the optimizers.
        self._optimizers_built = True
        if self.restored_plan is not None and not self._plan_again:
            return
        if trainer.ckpt_path is not None and trainer.strategy.restore_checkpoint_after_setup:
            self._deferred = True  # the checkpoint's plan, if any, arrives in on_load_checkpoint after this hook
            return
        self._measure(trainer, pl_module)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        assert self.plan is not None
        loader = trainer.train_dataloader
        if isinstance(loader, DataLoader) and loader.batch_size not in (None, self.plan.micro_batch_size):
            raise ConfigError(
                f"{type(self).__name__}: {type(trainer.datamodule).__name__}.train_dataloader() built batches of "
                f"{loader.batch_size} although its batch_size is {self.plan.micro_batch_size}: it must read "
                "self.batch_size each time it is called"
            )
        if trainer.accumulate_grad_batches != self.plan.accumulation:
            raise ConfigError(
                f"{type(self).__name__}: trainer.accumulate_grad_batches was changed to "
                f"{trainer.accumulate_grad_batches} after this callback set it to {self.plan.accumulation}; "
                "remove the other callback that sets it"
            )
        rank_zero_info(f"{type(self).__name__}: {self.plan.describe()}; {self._origin}")

    # -- checkpoint state ------------------------------------------------------------------------------------------
    @property
    def state_key(self) -> str:
        """``"DynamicBatchAdjustment"``, for subclasses too (they save the same state): a run resumes whichever of
        them saved it."""
        return "DynamicBatchAdjustment"

    def state_dict(self) -> dict[str, Any]:
        """The plan in use (:class:`BatchPlan`'s fields) and the measured ``memory_line``, or ``{}`` before a fit."""
        if self.plan is None:
            return {}
        return {**asdict(self.plan), "memory_line": None if self.memory_line is None else list(self.memory_line)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Keeps a saved plan as :attr:`restored_plan`; a fit resumed from the checkpoint applies it."""
        if self._plan_again:  # Lightning's call after on_load_checkpoint, whose resume planned this fit afresh
            return
        try:
            self.restored_plan = BatchPlan(
                **{field: int(state_dict[field]) for field in BatchPlan.__dataclass_fields__}
            )
        except KeyError as missing:
            raise ConfigError(f"{type(self).__name__}: the checkpoint's state lacks {missing}") from None
        line = state_dict.get("memory_line")
        self.memory_line = None if line is None else MemoryLine(*line)

    # -- measuring: override device_memory_bytes and peak_memory_bytes for another accelerator ----------------------
    def device_memory_bytes(self, trainer: Trainer) -> int | None:
        """Total memory of this rank's device in bytes, or ``None`` where this callback does not measure (anything but
        CUDA): the micro-batch is then the datamodule's ``batch_size``."""
        device = trainer.strategy.root_device
        return torch.cuda.mem_get_info(device)[1] if device.type == "cuda" else None

    def peak_memory_bytes(self, trainer: Trainer, step: Callable[[], None], micro_batch_size: int) -> int:
        """Runs ``step``, one training step of ``micro_batch_size`` samples, and returns the device's peak of allocated
        bytes during it."""
        device = trainer.strategy.root_device
        # the first step at a shape allocates one-off workspaces (cuDNN benchmark trials, torch.compile) that steady
        # training does not hold: measure the second
        step()
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device)

    # -- internals ----------------------------------------------------------------------------------------------------
    def _check_run(self, trainer: Trainer, pl_module: LightningModule) -> Any:
        name = type(self).__name__
        datamodule = trainer.datamodule
        if datamodule is None:
            raise ConfigError(f"{name} needs a LightningDataModule with a batch_size: pass datamodule= to trainer.fit")
        size = getattr(datamodule, "batch_size", None)
        if not _is_count(size):
            raise ConfigError(
                f"{name}: the datamodule {type(datamodule).__name__} has no integer batch_size >= 1 (found {size!r}); "
                "give it a batch_size argument that its train_dataloader reads"
            )
        try:
            datamodule.batch_size = size
        except AttributeError:
            raise ConfigError(f"{name}: {type(datamodule).__name__}.batch_size cannot be set") from None
        if not pl_module.automatic_optimization:
            raise ConfigError(f"{name}: manual optimization does not accumulate gradients; use automatic optimization")
        if isinstance(trainer.strategy, DeepSpeedStrategy):
            raise ConfigError(f"{name}: DeepSpeed fixes the accumulation when it sets up; use DDP or FSDP")
        if any(isinstance(callback, GradientAccumulationScheduler) for callback in trainer.callbacks):
            raise ConfigError(f"{name} and GradientAccumulationScheduler both set the accumulation; keep one")
        ours = 1 if self.plan is None else self.plan.accumulation
        if trainer.accumulate_grad_batches not in (1, ours):
            raise ConfigError(
                f"{name} sets the accumulation: remove trainer.accumulate_grad_batches="
                f"{trainer.accumulate_grad_batches}"
            )
        return datamodule

    def _plan(self, trainer: Trainer, micro_batch_limit: int) -> BatchPlan:
        world = data_parallel_size(trainer)
        cap = -(-self.global_batch_size // world)
        if self.max_micro_batch_size is not None:
            cap = min(cap, self.max_micro_batch_size)
        return BatchPlan.make(
            global_batch_size=self.global_batch_size, micro_batch_limit=min(micro_batch_limit, cap), world_size=world
        )

    def _apply(self, trainer: Trainer, plan: BatchPlan, origin: str) -> None:
        previous, self.plan, self._origin = self.plan, plan, origin
        trainer.datamodule.batch_size = plan.micro_batch_size
        trainer.accumulate_grad_batches = plan.accumulation
        unchanged = previous is not None and (previous.micro_batch_size, previous.accumulation) == (
            plan.micro_batch_size,
            plan.accumulation,
        )
        if self._optimizers_built and not unchanged:
            # Past strategy.setup: the loader (if estimated_stepping_batches asked for it) and the schedule were built
            # with the old values. Drop the loader as Lightning's BatchSizeFinder does, and configure the optimizers
            # again; the precision plugin's connect, which strategy.setup runs after them, is the identity in 2.6.
            with isolate_rng():
                trainer.fit_loop._combined_loader = None
                trainer.strategy.setup_optimizers(trainer)

    def _resume(self, trainer: Trainer, pl_module: LightningModule) -> None:
        saved = self.restored_plan
        assert saved is not None
        name = type(self).__name__
        if saved.global_batch_size != self.global_batch_size:
            rank_zero_warn(
                f"{name}: resuming with the checkpoint's global_batch_size={saved.global_batch_size}, not "
                f"{self.global_batch_size}; start a new run (model.init_args.initial_checkpoint) to change it"
            )
        world = data_parallel_size(trainer)
        if saved.world_size == world:
            self._apply(trainer, saved, "restored from the checkpoint")
            return
        # Another number of ranks: a rank's share of the global batch changed, and what it holds (FSDP's shards), maybe
        # its device too; the saved limit, capped by the old share and measured under the old shards, says neither.
        # Plan as a new run would, for the checkpoint's global batch: measured where the device allows it.
        rank_zero_warn(
            f"{name}: the checkpoint was planned for {saved.world_size} data-parallel rank(s), this run has {world}: "
            f"planning again for the checkpoint's global batch of {saved.global_batch_size} (was {saved.describe()})"
        )
        if saved.global_batch_size != self.global_batch_size:
            self._replaced_global_batch_size = self.global_batch_size
        self.global_batch_size, self._plan_again = saved.global_batch_size, True
        if self._measured_limit is not None:  # restored after on_fit_start (FSDP), which measured these ranks
            self.memory_line = self._measured_line  # not the checkpoint's, which load_state_dict has just read
            self._apply(trainer, self._plan(trainer, self._measured_limit), self._origin)
            return
        self.memory_line = None
        self._apply(trainer, self._plan(trainer, self._probe_size), f"the datamodule's batch_size={self._probe_size}")
        if self._optimizers_built:  # restored after on_fit_start without a measurement: measure now
            self._measure(trainer, pl_module)

    def _measure(self, trainer: Trainer, pl_module: LightningModule) -> None:
        device_bytes = self.device_memory_bytes(trainer)
        cap = self._plan(trainer, self.global_batch_size).micro_batch_limit
        if device_bytes is None or cap == 1:
            return
        name = type(self).__name__
        with _isolated(pl_module), _no_gradient_sync(trainer):
            batch = _first_samples(trainer, max(2, min(self._probe_size, cap)))
            if batch is None:  # no training batches (limit_train_batches=0): nothing to plan for
                return
            rows = _rows(batch) or 0
            if rows < 2:
                raise ConfigError(f"{name}: the probe needs a batch of 2 training samples or more, it got {rows}")
            sizes = (rows // 2, rows)
            try:
                peaks = tuple(
                    self.peak_memory_bytes(trainer, _probe_step(trainer, pl_module, slice_batch(batch, size)), size)
                    for size in sizes
                )
            except torch.cuda.OutOfMemoryError as error:
                raise ConfigError(
                    f"{name}: the probe's training step of {sizes[1]} samples ran out of memory; lower the "
                    f"datamodule's batch_size={self._probe_size} (the probe measures at half of it and at it)"
                ) from error
        line = MemoryLine.through(sizes, peaks)
        reserve = self.optimizer_states_per_parameter * _trainable_bytes(pl_module)
        budget = self.memory_fraction * device_bytes - reserve
        memory = line.largest_micro_batch(budget)
        # every rank measured its own device: all take the smallest (a memory that did not grow: the cap)
        memory = trainer.strategy.reduce(
            torch.tensor(_UNBOUNDED if memory is None else memory, device=trainer.strategy.root_device),
            reduce_op="min",
        )
        memory = int(memory)
        fits = min(memory, cap)
        measured = (
            f"measured peak {line.fixed_bytes / _GIB:.2f} GiB + {line.bytes_per_sample / _MIB:.1f} MiB per sample; "
            f"budget {self.memory_fraction:g} x {device_bytes / _GIB:.1f} GiB - {reserve / _GIB:.2f} GiB of optimizer "
            f"states = {budget / _GIB:.2f} GiB"
        )
        if fits < 1:
            raise ConfigError(
                f"{name}: one sample does not fit ({measured}); raise memory_fraction, shard the model "
                "or checkpoint its activations"
            )
        # the limit of memory alone, for a resume that plans this fit again under another global batch's cap
        self.memory_line, self._measured_line, self._measured_limit = line, line, memory
        self._apply(trainer, self._plan(trainer, fits), f"{measured}; micro-batch limit {fits}")


def _first_samples(trainer: Trainer, count: int) -> Any:
    """The first ``count`` samples of the training set, collated as the training loader collates them, without
    iterating the loader (its sampler and workers keep their state)."""
    loader = trainer.train_dataloader
    if loader is None:
        with isolate_rng():  # the loader's iterator draws a seed as it is built
            trainer.fit_loop.setup_data()
        loader = trainer.train_dataloader
        if loader is None:
            return None
    if not isinstance(loader, DataLoader) or loader.batch_sampler is None:
        raise ConfigError("DynamicBatchAdjustment measures with one training DataLoader that batches samples")
    dataset = loader.dataset
    if isinstance(dataset, IterableDataset):
        samples = list(islice(dataset, count))
    else:
        indices = list(range(min(count, len(dataset))))
        getitems = getattr(dataset, "__getitems__", None)
        samples = getitems(indices) if getitems is not None else [dataset[i] for i in indices]
    return loader.collate_fn(samples)


def _probe_step(trainer: Trainer, pl_module: LightningModule, batch: Any) -> Callable[[], None]:
    """One forward and backward of ``training_step`` on ``batch``, as the training loop runs it
    (``training_epoch_loop.py``: precision input conversion, batch transfer hooks, the strategy's training step).
    ``backward`` is called on the loss directly: no backward hooks, no gradient scaling. The gradients accumulate
    over the probe's steps, so that a measured step holds those of the step before, as in the middle of an
    accumulation window: the most a micro-batch takes."""
    with_index = is_param_in_hook_signature(pl_module.training_step, "batch_idx", min_args=2)

    def step() -> None:
        micro = trainer.precision_plugin.convert_input(batch)
        micro = pl_module._on_before_batch_transfer(micro, dataloader_idx=0)
        micro = trainer.strategy.batch_to_device(micro, dataloader_idx=0)
        output = trainer.strategy.training_step(*((micro, 0) if with_index else (micro,)))
        loss = output.get("loss") if isinstance(output, Mapping) else output
        if not isinstance(loss, Tensor):
            raise ConfigError(
                f"DynamicBatchAdjustment: training_step returned {type(output).__name__} for the probe batch; "
                "it needs a loss tensor"
            )
        loss.backward()

    return step


@contextmanager
def _isolated(pl_module: LightningModule) -> Iterator[None]:
    """Runs the probe steps in training mode, without logging, and restores gradients, buffers, modes, the global
    random state and the torchmetrics that the steps updated."""
    grads = [(p, p.grad) for p in pl_module.parameters()]
    buffers = {name: b.detach().to("cpu", copy=True) for name, b in pl_module.named_buffers()}
    modes = [(module, module.training) for module in pl_module.modules()]
    metrics = [(m, m.update_count) for m in pl_module.modules() if isinstance(m, Metric)]
    for p, _ in grads:
        p.grad = None
    pl_module.train()
    pl_module.log = pl_module.log_dict = _discard  # the probe's losses are no training results
    try:
        with isolate_rng():
            yield
    finally:
        del pl_module.log, pl_module.log_dict
        for p, grad in grads:
            p.grad = grad
        with torch.no_grad():
            for name, saved in buffers.items():
                pl_module.get_buffer(name).copy_(saved)
        for module, training in modes:
            module.train(training)
        for metric, count in metrics:
            if metric.update_count != count:
                if count:
                    rank_zero_warn(
                        f"DynamicBatchAdjustment: the probe batches entered the metric {type(metric).__name__}"
                    )
                else:
                    metric.reset()


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _discard(*args: Any, **kwargs: Any) -> None:
    return None


def _no_gradient_sync(trainer: Trainer) -> Any:
    strategy = trainer.strategy
    return strategy.block_backward_sync() if isinstance(strategy, ParallelStrategy) else nullcontext()


def _trainable_bytes(pl_module: LightningModule) -> int:
    """Bytes of the trainable parameters on this rank (a sharded DTensor counts its local shard)."""
    total = 0
    for p in pl_module.parameters():
        if p.requires_grad:
            local = p.to_local() if hasattr(p, "to_local") else p
            total += local.numel() * local.element_size()
    return total
