"""Optimizer steps and gradient clipping for a model whose parameters live on several device meshes.

Tensor parallelism without FSDP leaves the layers it does not split (encoders, norms, heads) as plain tensors beside
the DTensors of the split blocks; FSDP over tensor-parallel blocks gives 2-D DTensors beside the 1-D ones of the rest.
torch's multi-tensor (``foreach``) kernels, the optimizers' default on a GPU, refuse a list that mixes plain tensors
with DTensors ("got mixed torch.Tensor and DTensor"); they take DTensors of several meshes. ``clip_grad_norm_``
refuses both mixes. So a parameter group that mixes steps one tensor at a time, and the norm is summed mesh by mesh.
The parameter groups themselves stay as the task built them, so that checkpoints move between topologies.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor
from torch.optim import Optimizer

from zoo.errors import ConfigError


def _mesh(tensor: Tensor):
    return tensor.device_mesh if isinstance(tensor, DTensor) else None


def foreach_off_where_mixed(optimizer: Optimizer) -> dict[int, Any]:
    """Set ``foreach=False`` on each parameter group of ``optimizer`` that mixes plain tensors and DTensors; returns
    the groups changed, by index, with the value each had. ConfigError for such a group set to ``fused``."""
    changed = {}
    for index, group in enumerate(optimizer.param_groups):
        if len({isinstance(p, DTensor) for p in group["params"]}) < 2:
            continue
        if group.get("fused"):
            raise ConfigError(
                f"optimizer: fused={group['fused']} cannot step parameters that mix plain tensors and DTensors "
                "(tensor parallelism without FSDP); leave fused unset, or add data parallelism (FSDP)"
            )
        if group.get("foreach") is not False:
            changed[index] = group.get("foreach")
            group["foreach"] = False
    return changed


@torch.no_grad()
def clip_grad_norm_(parameters: Iterable[nn.Parameter], max_norm: float, norm_type: float = 2.0) -> Tensor:
    """``torch.nn.utils.clip_grad_norm_`` for parameters on several meshes: the norm of each mesh's gradients (a
    DTensor's reduced over its shards, so every rank gets the norm of the whole model), combined, then each mesh's
    gradients scaled by the same factor. Returns the total norm before clipping (a plain tensor)."""
    by_mesh: dict = {}
    for param in parameters:
        if param.grad is not None:
            by_mesh.setdefault(_mesh(param.grad), []).append(param)
    if not by_mesh:
        return torch.tensor(0.0)
    norms = []
    for params in by_mesh.values():
        norm = torch.nn.utils.get_total_norm([p.grad for p in params], norm_type)
        norms.append(norm.full_tensor() if isinstance(norm, DTensor) else norm)
    total = torch.nn.utils.get_total_norm(norms, norm_type)
    for params in by_mesh.values():
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return total
