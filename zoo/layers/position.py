"""Fixed sinusoidal position embeddings."""

from __future__ import annotations

import torch
from torch import Tensor

from zoo.errors import ConfigError


def sincos_1d(positions: Tensor, dim: int) -> Tensor:
    """Sinusoidal embedding of float positions ``[N] -> [N, dim]`` (``dim`` even), as in Vaswani et al."""
    if dim % 2:
        raise ConfigError(f"sincos_1d: dim={dim} must be even")
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64, device=positions.device) / (dim // 2))
    angles = positions.double()[:, None] * omega[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=1).float()


def sincos_2d(height: int, width: int, dim: int, device: torch.device | None = None) -> Tensor:
    """2-D sinusoidal embedding of a ``height x width`` grid, row-major: ``[height * width, dim]`` (``dim % 4 == 0``).

    Half the channels encode the row, half the column, so relative offsets are linear functions of the embedding,
    which lets attention compare positions (distances between objects, left/right, above/below).
    """
    if dim % 4:
        raise ConfigError(f"sincos_2d: dim={dim} must be divisible by 4")
    rows = torch.arange(height, device=device).repeat_interleave(width)
    cols = torch.arange(width, device=device).repeat(height)
    return torch.cat([sincos_1d(rows, dim // 2), sincos_1d(cols, dim // 2)], dim=1)
