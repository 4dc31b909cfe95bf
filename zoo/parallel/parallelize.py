"""Tensor parallelism and FSDP2 applied to a zoo model from outside, on a device mesh with dimensions
``("data_parallel", "tensor_parallel")`` (the mesh Lightning's ``ModelParallelStrategy`` builds).

The order is torchtitan's: tensor parallelism first, then (optionally) ``torch.compile`` of the blocks, then FSDP.
:class:`lit_models._task.ZooTask` does this in ``configure_model`` when the trainer gives it a mesh.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor.parallel import ColwiseParallel, ParallelStyle, RowwiseParallel, parallelize_module

from zoo.errors import ConfigError
from zoo.layers.ffn import FeedForward
from zoo.layers.transformer import TransformerBlock


def tensor_parallel_plan(block: TransformerBlock) -> dict[str, ParallelStyle]:
    """Megatron's split of one block: ``attn.qkv`` and ``ffn.fc1`` by output features (whole heads, contiguous
    hidden units), ``attn.proj`` and ``ffn.fc2`` by input features, so each half-block needs one all-reduce. FFNs
    other than the dense :class:`FeedForward` (e.g. DSA's blocks) stay replicated."""
    plan: dict[str, ParallelStyle] = {"attn.qkv": ColwiseParallel(), "attn.proj": RowwiseParallel()}
    if type(block.ffn) is FeedForward:
        plan |= {"ffn.fc1": ColwiseParallel(), "ffn.fc2": RowwiseParallel()}
    return plan


def apply_tensor_parallel(module: nn.Module, tp_mesh: DeviceMesh) -> int:
    """Split every :class:`TransformerBlock` of ``module`` over ``tp_mesh`` (in place); returns the blocks split.

    Preconditions, checked: every block's head count divides by the mesh size, and the layers to split are plain
    ``nn.Linear`` (quantization-aware layers are not split: train those with FSDP alone).
    """
    size = tp_mesh.size()
    blocks = [m for m in module.modules() if isinstance(m, TransformerBlock)]
    for block in blocks:
        if block.attn.num_heads % size:
            raise ConfigError(
                f"tensor parallelism over {size} devices needs a head count divisible by {size}; a block has "
                f"num_heads={block.attn.num_heads}"
            )
        plan = tensor_parallel_plan(block)
        for name in plan:
            layer = block.get_submodule(name)
            if type(layer) is not nn.Linear:
                raise ConfigError(
                    f"tensor parallelism splits nn.Linear layers; {name} is a {type(layer).__name__} (quantization-"
                    "aware layers train with FSDP alone: a plan with tensor_parallel_size 1)"
                )
    _check_heads_share_masks(module, size)
    for block in blocks:
        parallelize_module(block, tp_mesh, tensor_parallel_plan(block))
    return len(blocks)


def apply_fsdp(
    module: nn.Module, dp_mesh: DeviceMesh, *, param_dtype: torch.dtype | None = None, **fsdp_kwargs
) -> None:
    """Shard ``module`` over ``dp_mesh`` with FSDP2 (in place): each :class:`TransformerBlock` is a unit of its
    own, gathered just before it runs, and the rest of the model (encoders' stems, embeddings, heads) is the root
    unit. The last block, the first of the backward, keeps its weights gathered after the forward rather than
    gathering them again at once (torchtitan's choice). ``fsdp_kwargs`` go to ``fully_shard``.

    ``param_dtype`` (the task gives bf16 under ``bf16-mixed`` on CUDA): the blocks gather their weights in it, half
    the all-gather traffic of fp32, and reduce their gradients in fp32. Their inputs are left as they come, so that
    autocast computes as on one device (an fp32 residual stream, layer norms in fp32; CPU autocast leaves a layer
    norm's bf16 weight beside an fp32 input, which fails, hence CUDA only)."""
    blocks = [m for m in module.modules() if isinstance(m, TransformerBlock)]
    policy = {}
    if param_dtype is not None:
        policy["mp_policy"] = MixedPrecisionPolicy(
            param_dtype=param_dtype, reduce_dtype=torch.float32, cast_forward_inputs=False
        )
    for i, block in enumerate(blocks):  # modules() order: a fusion module's blocks come after its encoders'
        fully_shard(block, mesh=dp_mesh, **{"reshard_after_forward": i < len(blocks) - 1, **policy, **fsdp_kwargs})
    fully_shard(module, mesh=dp_mesh, **fsdp_kwargs)


def _check_heads_share_masks(module: nn.Module, size: int) -> None:
    # a mask with one slice per head ([B, H, T, T], MIE's "learned" schedule) cannot meet the H / tp local heads
    from zoo.fusion.mie import MIE

    for m in module.modules():
        if isinstance(m, MIE) and m.fusion_schedule == "learned" and size > 1:
            raise ConfigError(
                "tensor parallelism: MIE with fusion_schedule='learned' builds a per-head mask of all heads; use "
                "'linear' or 'open', or a plan with tensor_parallel_size 1"
            )
