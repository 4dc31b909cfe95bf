"""The adaptive choice of how to train across devices: ``select_parallelism(model_size, device_count)``.

The rule follows the memory of training, not a table of model names. Training state costs ``bytes_per_parameter``
bytes per parameter (16 with AdamW: fp32 weights 4, gradients 4, two moments 8; bf16-mixed autocast keeps the fp32
weights, so it costs the same), and only ``memory_fraction`` of a device goes to it (the rest holds activations and
workspace). In order of preference:

1. ``single``: one device.
2. ``ddp``: the whole state fits on each device: replicate (Lightning's ``DDPStrategy``), the fastest when it fits.
3. ``fsdp``: the state sharded over all devices fits, with room for what FSDP2 gathers whole in fp32 at once
   (:func:`gathered_bytes`: the root unit, which stays gathered from its forward to the end of the backward, with
   its gradients, and three blocks: the running one, the prefetched one and the running one's gradients before their
   reduce-scatter):
   Lightning's ``ModelParallelStrategy`` with tensor parallelism 1, the layers sharded by
   :func:`zoo.parallel.parallelize.apply_fsdp`.
4. ``fsdp_tp``: a gathered layer is too large even so: tensor parallelism inside a node (the smallest power of two
   that fits and divides the attention heads and the node's devices), FSDP across the rest.

A model that fits none of them is refused with the figures.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from zoo.errors import ConfigError

ParallelKind = Literal["single", "ddp", "fsdp", "fsdp_tp"]

#: training-state bytes per parameter with AdamW: fp32 weight, fp32 gradient, two fp32 moments
ADAMW_BYTES_PER_PARAMETER = 16


@dataclass(frozen=True)
class ParallelPlan:
    """How a model trains on ``devices`` devices: ``data_parallel_size x tensor_parallel_size == devices``.

    ``state_bytes_per_device`` is the estimated training state each device holds (weights, gradients, optimizer
    moments; FSDP's gathered layers included), ``budget_bytes`` what the plan allowed for it (``None``: unknown
    device memory, e.g. a CPU).
    """

    kind: ParallelKind
    devices: int
    data_parallel_size: int
    tensor_parallel_size: int
    state_bytes_per_device: int
    budget_bytes: int | None
    reason: str

    def strategy(self):
        """The Lightning strategy that runs this plan: ``"auto"`` (one device), ``DDPStrategy`` or
        ``ModelParallelStrategy`` (FSDP2, with tensor parallelism when ``tensor_parallel_size > 1``; the task applies
        both in ``configure_model``). Checkpoints are gathered into one file (``save_distributed_checkpoint=False``)
        so that they load anywhere, as a single-device run's do."""
        from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy

        if self.kind == "single":
            return "auto"
        if self.kind == "ddp":
            return DDPStrategy()
        return ModelParallelStrategy(
            data_parallel_size=self.data_parallel_size,
            tensor_parallel_size=self.tensor_parallel_size,
            save_distributed_checkpoint=False,
        )

    def describe(self) -> str:
        """One line for the log: the choice, the sizes and why."""
        gib = 2**30
        budget = f" of a {self.budget_bytes / gib:.1f} GiB budget" if self.budget_bytes else ""
        return (
            f"select_parallelism: {self.kind} on {self.devices} device(s) (data parallel {self.data_parallel_size} x "
            f"tensor parallel {self.tensor_parallel_size}); training state {self.state_bytes_per_device / gib:.2f} "
            f"GiB per device{budget}: {self.reason}"
        )


def select_parallelism(
    model_size: int | nn.Module,
    device_count: int,
    *,
    device_memory: int | None = None,
    largest_layer: int | None = None,
    devices_per_node: int | None = None,
    head_count: int | None = None,
    bytes_per_parameter: int = ADAMW_BYTES_PER_PARAMETER,
    memory_fraction: float = 0.5,
) -> ParallelPlan:
    """Choose single-device, DDP, FSDP or FSDP + tensor parallelism for training a model on ``device_count`` devices.

    Args:
        model_size: the parameter count, or the model itself; from a model, the units
            :func:`zoo.parallel.parallelize.apply_fsdp` gathers are read from it (each transformer block, and the
            root: all that lies outside the blocks), ``head_count`` is the greatest common divisor of its attention
            heads, and the tensor-parallel
            estimate counts the layers :func:`~zoo.parallel.parallelize.tensor_parallel_plan` splits (a count alone
            is assumed to split whole).
        device_count: devices in the job (all nodes).
        device_memory: bytes per device; by default the first CUDA device's total memory, ``None`` without CUDA
            (everything is assumed to fit: on CPUs the choice is replication).
        largest_layer: with a parameter count, the parameters of the largest unit FSDP gathers at once, taken for
            the root unit and for each block alike (the worst case); ``None``: not checked. A model's units are read
            from it (given with a model: an error).
        devices_per_node: devices sharing a node (tensor parallelism stays inside one); ``device_count`` by default.
        head_count: attention heads, which the tensor-parallel size must divide; ``None``: any power of two.
        bytes_per_parameter: training-state bytes per parameter (16 for AdamW in fp32 or bf16-mixed).
        memory_fraction: the share of a device's memory the training state may take.
    """
    if isinstance(device_count, bool) or not isinstance(device_count, int) or device_count < 1:
        raise ConfigError(f"select_parallelism: device_count={device_count!r} must be an integer >= 1")
    if not 0 < memory_fraction <= 1:
        raise ConfigError(f"select_parallelism: memory_fraction={memory_fraction} must be in (0, 1]")
    if bytes_per_parameter <= 0:
        raise ConfigError(f"select_parallelism: bytes_per_parameter={bytes_per_parameter} must be > 0")
    for key, value in (("device_memory", device_memory), ("devices_per_node", devices_per_node)):
        if value is not None and value < 1:  # devices_per_node=0 stood for device_count; device_memory=-1 a budget of 0
            raise ConfigError(f"select_parallelism: {key}={value} must be at least 1, or None")
    units = None  # (the root unit's parameters, [(a block's parameters, those tensor parallelism splits)])
    if isinstance(model_size, nn.Module):
        if largest_layer is not None:
            raise ConfigError(
                "select_parallelism: largest_layer goes with a parameter count; a model's are read from it"
            )
        module = model_size
        model_size = sum(p.numel() for p in module.parameters())
        head_count = head_count if head_count is not None else _head_count(module)
        units = _units(module)
    if isinstance(model_size, bool) or not isinstance(model_size, int) or model_size < 1:
        raise ConfigError(f"select_parallelism: model_size={model_size!r} must be a parameter count >= 1 or a module")
    nodes_devices = min(devices_per_node or device_count, device_count)  # 4 devices of an 8-device node: 4
    if device_count % nodes_devices:
        raise ConfigError(
            f"select_parallelism: device_count={device_count} must be a multiple of devices_per_node={nodes_devices}"
        )
    if device_memory is None and torch.cuda.is_available():
        device_memory = torch.cuda.get_device_properties(0).total_memory
    budget = None if device_memory is None else int(memory_fraction * device_memory)
    state = model_size * bytes_per_parameter

    def plan(kind: ParallelKind, dp: int, tp: int, per_device: int, reason: str) -> ParallelPlan:
        return ParallelPlan(kind, device_count, dp, tp, int(per_device), budget, reason)

    if device_count == 1:
        if budget is not None and state > budget:
            raise _does_not_fit(model_size, state, device_count, budget)
        return plan("single", 1, 1, state, "one device")
    if budget is None or state <= budget:
        return plan("ddp", device_count, 1, state, "the whole training state fits on each device: replicate")
    sharded = state / device_count
    if units is not None:
        root, blocks = units
        gathered = gathered_bytes(root, max([size for size, _ in blocks], default=0))
    else:
        gathered = gathered_bytes(largest_layer or 0, largest_layer or 0)
    if sharded + gathered <= budget:
        return plan("fsdp", device_count, 1, sharded + gathered, "the state fits only when sharded over every device")

    def split_per_device(dp: int, tp: int) -> float:
        """Training state per device under FSDP over ``dp`` x tensor parallelism over ``tp``. With ``dp == 1`` the
        task applies no FSDP: what tensor parallelism does not split is whole on every device, and nothing is
        gathered. A count without the module is assumed to split whole."""
        if units is None:
            return state / (dp * tp) + (gathered / tp if dp > 1 else 0)
        root, blocks = units
        split = sum(s for _, s in blocks)
        per_device = bytes_per_parameter * (model_size - split + split / tp) / dp
        if dp > 1:  # the root unit is never split; a block's unsplit layers (norms, a DSA FFN) gather whole
            per_device += gathered_bytes(root, max([size - s + s / tp for size, s in blocks], default=0))
        return per_device

    splits = [tp for tp in _powers_of_two(2, nodes_devices) if head_count is None or head_count % tp == 0]
    for tp in splits:
        per_device = split_per_device(device_count // tp, tp)
        if per_device <= budget:
            return plan(
                "fsdp_tp",
                device_count // tp,
                tp,
                per_device,
                f"the state fits only when the blocks' attention and FFN layers are also split over {tp} devices "
                "of a node",
            )
    best = min([split_per_device(device_count // tp, tp) for tp in splits], default=sharded + gathered)
    raise _does_not_fit(model_size, best, device_count, budget)


def gathered_bytes(root: float, block: float) -> float:
    """Bytes FSDP2 holds gathered at its peak, in fp32, for a root unit of ``root`` parameters and blocks of at most
    ``block`` (:func:`zoo.parallel.parallelize.apply_fsdp`'s units). FSDP2 does not reshard the root after its
    forward (its parameters are needed at once by the backward), so the root stays gathered throughout, and the
    gradients of its layers after the blocks (a head, a final norm) are whole from the start of the backward to the
    root's reduce-scatter at its end: counted as the root's whole gradient. Beside them, a running block, the
    prefetched next one and the running one's unsharded gradients (before their reduce-scatter). (Observed at every
    block's forward and backward hooks, ``tests/test_parallel.py``; the prefetch is FSDP2's documented default.)"""
    return 4 * (2 * root + 3 * block)


def _does_not_fit(model_size: int, per_device: float, devices: int, budget: int) -> ConfigError:
    gib = 2**30
    return ConfigError(
        f"select_parallelism: a model of {model_size:,} parameters needs {per_device / gib:.2f} GiB of training state "
        f"per device with the best plan on {devices} device(s), over the {budget / gib:.2f} GiB budget "
        "(memory_fraction of a device): add devices, or lower memory per parameter (a lighter optimizer)"
    )


def _powers_of_two(low: int, high: int) -> list[int]:
    return [2**i for i in range(int(math.log2(low)), int(math.log2(high)) + 1) if high % 2**i == 0]


def _units(module: nn.Module) -> tuple[int, list[tuple[int, int]]]:
    """The parameters of the root unit FSDP gathers (all that lies outside the transformer blocks), and of each block
    with those of its layers that tensor parallelism splits (:func:`zoo.parallel.parallelize.tensor_parallel_plan`)."""
    from zoo.layers.transformer import TransformerBlock
    from zoo.parallel.parallelize import tensor_parallel_plan

    blocks = []
    for block in (m for m in module.modules() if isinstance(m, TransformerBlock)):
        split = sum(p.numel() for name in tensor_parallel_plan(block) for p in block.get_submodule(name).parameters())
        blocks.append((sum(p.numel() for p in block.parameters()), split))
    return sum(p.numel() for p in module.parameters()) - sum(size for size, _ in blocks), blocks


def _head_count(module: nn.Module) -> int | None:
    from zoo.layers.attention import SelfAttention

    heads = [m.num_heads for m in module.modules() if isinstance(m, SelfAttention)]
    return math.gcd(*heads) if heads else None
