"""Throughput and MFU of training runs: Lightning's ``ThroughputMonitor`` with the zoo's batch size and FLOPs counted
from the first training batch."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from contextlib import ExitStack
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ThroughputMonitor as LightningThroughputMonitor
from torch import Tensor
from torch.distributed.tensor import DTensor
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode

from zoo.errors import ConfigError, DataError


def batch_size(batch: Any) -> int:
    """Samples in a batch: ``len(batch["label"])`` for the zoo's dict batches (``"label"`` is ``[B]``), otherwise
    dim 0 of the first tensor with at least one dimension in the batch's nesting of dicts, lists and tuples."""
    if isinstance(batch, Mapping) and isinstance(batch.get("label"), Tensor):
        return len(batch["label"])
    for leaf in tree_leaves(batch):
        if isinstance(leaf, Tensor) and leaf.ndim > 0:
            return leaf.shape[0]
    raise DataError(
        f"ThroughputMonitor: no tensor with a batch dimension in a batch of type {type(batch).__name__}; set "
        "trainer.callbacks' init_args.batch_size_fn to a function (an import path in YAML) that returns its size"
    )


class RankFlopCounter(FlopCounterMode):
    """``FlopCounterMode`` counting this rank's share of a tensor-parallel group's FLOPs.

    The dispatch mode sees an operation on DTensors at their global shapes, which the ``tensor_parallel_size`` ranks
    of the group compute together: its count is divided among them. An operation on plain tensors is counted whole:
    it is this rank's own (the attention over the rank's heads, which the split projections hand on as local
    tensors; dividing the whole count by the group's size counted it twice divided).
    """

    def __init__(self, tensor_parallel_size: int = 1) -> None:
        super().__init__(display=False)
        self.tensor_parallel_size = tensor_parallel_size

    def _count_flops(self, func_packet: Any, out: Any, args: Any, kwargs: Any) -> Any:
        # FlopCounterMode's per-operation hook (torch 2.11); tests/test_parallel.py checks the counts it gives
        count = self.flop_registry.get(func_packet)
        if count is None:
            return out
        flops = count(*args, **kwargs, out_val=out)
        if self.tensor_parallel_size > 1 and any(isinstance(a, DTensor) for a in tree_leaves((args, kwargs))):
            flops //= self.tensor_parallel_size
        for parent in set(self.mod_tracker.parents):
            self.flop_counts[parent][func_packet] += flops
        return out


def _tensor_parallel_size(pl_module: pl.LightningModule) -> int:
    mesh = getattr(pl_module, "device_mesh", None)
    if mesh is None or "tensor_parallel" not in (mesh.mesh_dim_names or ()):
        return 1
    return mesh["tensor_parallel"].size()


class ThroughputMonitor(LightningThroughputMonitor):
    """Lightning's :class:`~lightning.pytorch.callbacks.ThroughputMonitor`, usable from YAML as it is: the batch size
    is read from the zoo's batch contract, and the FLOPs that MFU needs are counted on the first training batch.

    **Logged** through the trainer's loggers (see :class:`lightning.fabric.utilities.throughput.Throughput`), keys
    prefixed with the stage (``train``, ``validate``, ``test``, ``predict``) and ``separator``: ``train/time``
    (seconds of training so far, validation excluded), ``train/batches`` and ``train/samples`` (totals of rank 0);
    once ``window_size`` batches have been seen, rolling averages over the last ``window_size`` batches:
    ``train/device/batches_per_sec``, ``train/device/samples_per_sec``, ``train/device/flops_per_sec`` (FLOP/s of
    one device) and ``train/device/mfu``; with more than one device also the global ``train/batches_per_sec``,
    ``train/samples_per_sec`` and ``train/flops_per_sec`` (the per-device figure times the world size). Training
    metrics are logged at the optimizer steps that the trainer's ``log_every_n_steps`` selects.

    **Gradient accumulation.** A "batch" here is one micro-batch, as for Lightning: each micro-batch adds one batch,
    its samples and ``flops_per_batch`` FLOPs; ``window_size`` counts micro-batches; metrics are computed after the
    optimizer step that ends an accumulation, so its time is included.

    **FLOPs.** When the LightningModule has no ``flops_per_batch`` attribute at the first training batch of ``fit``,
    the forward and backward of that batch are counted with :class:`torch.utils.flop_counter.FlopCounterMode` and
    the total is set as ``pl_module.flops_per_batch``: FLOPs of one micro-batch on this rank, a multiply-add counted
    as 2, of the operations FlopCounterMode knows: matrix products (``nn.Linear``, ``matmul``), convolutions and
    their gradients, and the fused attention kernels of ``scaled_dot_product_attention`` on CUDA (its CPU kernel
    counts 0). Not counted: elementwise operations, norms, softmax and losses outside those kernels, the optimizer
    step, and communication. The figure is the hardware's FLOPs, not the model's: a forward that activation
    checkpointing recomputes in backward is counted again, the attention kernels' backward counts the scores it
    recomputes, padding tokens count like the others, and a DSA FFN trains on its dense path (every block computed,
    plus its gate), whatever its active fraction. Batches of another shape than the first are assumed to cost the
    same. Under tensor parallelism (a device mesh with a ``tensor_parallel`` dimension, as Lightning's
    ``ModelParallelStrategy`` gives) the count is this rank's share (:class:`RankFlopCounter`): an operation on the
    split layers' DTensors, which FlopCounterMode sees at global shapes and the group computes together, divided by
    the group's size, the attention over the rank's own heads whole; Lightning's global ``samples_per_sec`` still
    multiplies by the whole world size, so it counts each sample once per tensor-parallel rank. The counted batch
    runs eager and slower (every operation passes through Python); regions compiled with ``torch.compile`` compile
    from the next batch on. A module that defines ``flops_per_batch`` itself (a number, or
    ``None`` for no FLOP metrics) keeps it.

    **MFU.** Lightning reports ``device/mfu = device/flops_per_sec / peak``, where ``device/flops_per_sec`` is rank
    0's ``flops_per_batch`` times the batches of the window over its time (every rank is assumed to do the same
    work) and ``peak`` is the dense peak FLOP/s of one device in the run's compute dtype (bf16 under
    ``precision="bf16-mixed"``, tf32 for fp32 on Ampere and later unless the matmul precision is ``"highest"``).
    ``peak`` is taken from ``peak_flops`` when given, else from Lightning's table
    (:func:`lightning.fabric.utilities.throughput.get_available_flops`); where neither knows it (any CPU, and
    GPUs outside the table) ``device/mfu`` is not logged, while ``device/flops_per_sec`` still is. Lightning 2.6's
    table does not recognise the plain name ``"NVIDIA H200"`` (it matches H200 names containing ``sxm1`` or
    ``nvl1`` only): on an H200 SXM pass ``peak_flops=989e12`` (dense bf16, as an H100 SXM, which the table knows as
    ``"NVIDIA H100 80GB HBM3"``; about 835e12 on an H200 NVL). The table's entries for ``h100 nvl``, ``h200 sxm1`` and
    ``h200 nvl1`` are the with-sparsity peaks, twice the dense ones: MFU there reads half of what it is unless
    ``peak_flops`` gives the dense figure.

    **Validation during fit** is logged under ``validate/`` with the same ``flops_per_batch``, that of a training
    batch (forward and backward): its FLOP/s and MFU overstate a forward-only pass about threefold; its samples per
    second are exact.

    Args:
        batch_size_fn: samples in a batch; :func:`batch_size` by default. In YAML an import path, e.g.
            ``mypackage.data.count_samples``.
        length_fn: items (e.g. tokens) in a batch, for ``device/items_per_sec``; ``None`` logs none.
        peak_flops: peak FLOP/s of one device in the run's compute dtype, for MFU; ``None`` takes Lightning's
            table.
        **kwargs: passed on to :class:`~lightning.fabric.utilities.throughput.Throughput`: ``window_size``
            (batches in the rolling average, at least 2; 100 by default) and ``separator`` (``"/"``).
    """

    def __init__(
        self,
        batch_size_fn: Callable[[Any], int] | None = None,
        length_fn: Callable[[Any], int] | None = None,
        *,
        peak_flops: float | None = None,
        **kwargs: Any,
    ) -> None:
        window_size = kwargs.get("window_size")
        if window_size is not None and (not isinstance(window_size, int) or window_size < 2):
            # Throughput only asserts it, at setup; a user should learn it where the value enters
            raise ConfigError(f"ThroughputMonitor: window_size={window_size!r} must be an integer of at least 2")
        if peak_flops is not None and not peak_flops > 0:
            raise ConfigError(f"ThroughputMonitor: peak_flops={peak_flops!r} must be positive FLOP/s, or None")
        super().__init__(batch_size_fn=batch_size_fn or batch_size, length_fn=length_fn, **kwargs)
        self.peak_flops = peak_flops
        self._flop_counter: FlopCounterMode | None = None
        self._counting = ExitStack()

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        with warnings.catch_warnings():
            if self.peak_flops is not None:  # Lightning's "FLOPs not found for <device>" is answered by peak_flops
                warnings.filterwarnings("ignore", message="FLOPs not found")
            super().setup(trainer, pl_module, stage)
        if self.peak_flops is not None:
            self.available_flops = self.peak_flops
            for throughput in self._throughputs.values():
                throughput.available_flops = self.peak_flops

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
        # A batch that LightningModule.on_train_batch_start skipped (-1) never reaches on_train_batch_end: that count
        # is dropped here, or at on_train_end, and the next batch is counted instead.
        self._stop_counting()
        if not hasattr(pl_module, "flops_per_batch"):
            # Lightning's training loop calls this hook, then runs training_step, backward and (at the end of an
            # accumulation) the optimizer step, then on_train_batch_end: the same for automatic and manual
            # optimization (TrainingEpochLoop.advance). The counter sees everything in between on this thread and
            # on autograd's backward threads, which inherit the dispatch mode.
            # Dynamo skips a frame first called under a dispatch mode and, in torch 2.11, never compiles it afterwards
            # (pytorch/pytorch#190286): the counted batch runs eager, and torch.compile'd regions compile at the next.
            self._counting.enter_context(torch.compiler.set_stance("force_eager"))
            counter = RankFlopCounter(_tensor_parallel_size(pl_module))
            self._flop_counter = self._counting.enter_context(counter)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        counter = self._stop_counting()
        if counter is not None:
            # this rank's FLOPs: a tensor-parallel group's shared operations divided among its ranks (RankFlopCounter)
            pl_module.flops_per_batch = counter.get_total_flops()
        # after the attribute is set: the parent decides at its first update whether the module has FLOPs
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._stop_counting()
        super().on_train_end(trainer, pl_module)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        # a counter left entered would count, and slow, every later operation of the process
        self._stop_counting()
        super().on_exception(trainer, pl_module, exception)

    def _stop_counting(self) -> FlopCounterMode | None:
        """Leave the FLOP counter (and the eager stance) if one is counting; returns it, or ``None``."""
        counter, self._flop_counter = self._flop_counter, None
        self._counting.close()
        return counter
