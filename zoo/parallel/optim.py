"""Optimizer groups and gradient clipping for a model whose parameters live on several device meshes.

Tensor parallelism without FSDP leaves the layers it does not split (encoders, norms, heads) as plain tensors beside
the DTensors of the split blocks; FSDP over tensor-parallel blocks gives 2-D DTensors beside the 1-D ones of the rest.
torch's multi-tensor (``foreach``) kernels, which the optimizers and ``clip_grad_norm_`` use by default on a GPU, take
a list of tensors together and refuse a list that mixes plain tensors with DTensors ("got mixed torch.Tensor and
DTensor"). So the optimizer gets one group per mesh, and the norm is summed mesh by mesh.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor


def _mesh(tensor: Tensor):
    return tensor.device_mesh if isinstance(tensor, DTensor) else None


def split_by_mesh(group: dict) -> list[dict]:
    """``group`` (an optimizer parameter group) split into one group per device mesh of its parameters, each with
    the group's other options; ``[group]`` itself where all its parameters share one (or none: plain tensors), so
    that a model on one device gets the same groups, and loads the same optimizer checkpoints, as before."""
    by_mesh: dict = {}
    for param in group["params"]:
        by_mesh.setdefault(_mesh(param), []).append(param)
    if len(by_mesh) <= 1:
        return [group]
    return [{**group, "params": params} for params in by_mesh.values()]


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
    device = norms[0].device
    total = torch.nn.utils.get_total_norm([n.to(device) for n in norms], norm_type)
    for params in by_mesh.values():
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total.to(params[0].grad.device))
    return total
