"""The contracts every pluggable part of the zoo meets.

* An :class:`Encoder` maps one modality's raw batch to :class:`Tokens`: embeddings ``[B, T, D]`` plus a boolean mask
  ``[B, T]`` (``True`` marks a real token, ``False`` padding), and states its width ``D`` as ``out_dim``.
* A :class:`Fusion` module takes a dict ``{modality: Tokens}`` whose widths all equal its ``dim`` and returns
  :class:`Fused`: a pooled vector ``[B, dim]`` and the fused tokens.
* An :class:`FFN` maps ``[B, T, D] -> [B, T, D]`` position-wise; its constructor takes ``(dim, hidden_dim)``
  positionally so that a transformer block can build one per layer from a factory given in YAML.

A new part that meets its contract works with every other part and task; ``tests/test_contracts.py`` proves it for
every part the package ships.

A part whose saved layout changed converts older state dicts in an ``upgrade_state_dict(state_dict, prefix)`` method,
registered as its load pre-hook (:func:`upgrade_on_load`); :func:`upgrade_state_dict` runs every part's upgrade on a
whole state dict, for code that compares keys and shapes before loading (``zoo.weights.load_weights``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from zoo.errors import ConfigError

__all__ = [
    "FFN",
    "IGNORE_INDEX",
    "FFNFactory",
    "Encoder",
    "Fused",
    "Fusion",
    "Tokens",
    "upgrade_on_load",
    "upgrade_state_dict",
]

#: ``batch["label"]`` of an example that the loss and the metrics leave out (e.g. an answer outside the vocabulary);
#: the default ``ignore_index`` of ``F.cross_entropy``.
IGNORE_INDEX = -100


@dataclass
class Tokens:
    """A batch of token sequences.

    Attributes:
        embeddings: ``[B, T, D]`` float tensor.
        mask: ``[B, T]`` bool tensor; ``True`` marks a real token, ``False`` a padding position.
    """

    embeddings: Tensor
    mask: Tensor

    def __post_init__(self) -> None:
        if self.embeddings.dim() != 3:
            raise ConfigError(f"Tokens.embeddings must be [B, T, D], got shape {tuple(self.embeddings.shape)}")
        if self.mask.shape != self.embeddings.shape[:2] or self.mask.dtype != torch.bool:
            raise ConfigError(
                f"Tokens.mask must be a bool tensor of shape {tuple(self.embeddings.shape[:2])}, "
                f"got {self.mask.dtype} {tuple(self.mask.shape)}"
            )

    @classmethod
    def dense(cls, embeddings: Tensor) -> Tokens:
        """Tokens with no padding."""
        return cls(embeddings, torch.ones(embeddings.shape[:2], dtype=torch.bool, device=embeddings.device))

    @property
    def dim(self) -> int:
        return self.embeddings.shape[-1]

    def pooled_mean(self) -> Tensor:
        """Mean over the real tokens: ``[B, D]``."""
        weights = self.mask.unsqueeze(-1).to(self.embeddings.dtype)
        return (self.embeddings * weights).sum(1) / weights.sum(1).clamp_min(1.0)


@dataclass
class Fused:
    """What a fusion module returns.

    Attributes:
        pooled: ``[B, dim]`` one vector per example, the input of a task head.
        tokens: the fused token sequence, ``[B, T, dim]`` with its mask.
    """

    pooled: Tensor
    tokens: Tokens


class Encoder(nn.Module):
    """Base class of every encoder: raw input of one modality -> :class:`Tokens` of width ``out_dim``.

    Subclasses set ``out_dim`` in ``__init__`` and implement ``forward(inputs) -> Tokens``. What ``inputs`` is depends
    on the modality: images ``[B, C, H, W]`` float, text a list of ``B`` strings, audio a dict with ``waveform``
    ``[B, S]`` and ``lengths`` ``[B]``.
    """

    out_dim: int
    #: whether :func:`zoo.compile.compile_regions` compiles the whole encoder (false where ``forward`` runs Python
    #: code on the raw input, e.g. a tokenizer; its transformer blocks are still compiled)
    compilable: bool = True

    def forward(self, inputs: Any) -> Tokens:  # pragma: no cover - abstract
        raise NotImplementedError


class Fusion(nn.Module):
    """Base class of every fusion module: ``{modality: Tokens [B, T_m, dim]} -> Fused``.

    Subclasses set ``dim`` (the token width they expect and return) and ``modalities`` (the names they accept, in the
    order they concatenate them).
    """

    dim: int
    modalities: tuple[str, ...]

    def forward(self, inputs: dict[str, Tokens]) -> Fused:  # pragma: no cover - abstract
        raise NotImplementedError

    def check_modalities(self, names: Sequence[str]) -> None:
        """Raise a ``ValueError`` naming the mismatch if ``names`` differ from the modalities this module fuses."""
        if set(names) != set(self.modalities):
            raise ConfigError(
                f"{type(self).__name__} fuses modalities {sorted(self.modalities)} but the encoders given are "
                f"{sorted(names)}; set `modalities` of the fusion module or the keys of `encoders` to match"
            )


class FFN(nn.Module):
    """Base class of position-wise feed-forward layers: ``[..., dim] -> [..., dim]``.

    Constructors take ``(dim, hidden_dim)`` positionally and everything else by keyword.
    """

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        if dim <= 0 or hidden_dim <= 0:
            raise ConfigError(f"{type(self).__name__}: dim={dim} and hidden_dim={hidden_dim} must be positive")
        self.dim = dim
        self.hidden_dim = hidden_dim


#: Builds one FFN for a block: ``factory(dim, hidden_dim) -> FFN``. In YAML, a ``class_path`` plus the ``init_args``
#: other than the two dimensions, which the block supplies.
FFNFactory = Callable[[int, int], FFN]


def upgrade_on_load(module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    """A ``register_load_state_dict_pre_hook`` hook: ``module.upgrade_state_dict(state_dict, prefix)``, which
    converts, in place, the entries under ``prefix`` that an older version of the part wrote."""
    module.upgrade_state_dict(state_dict, prefix)


def upgrade_state_dict(module: nn.Module, state_dict: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``state_dict`` (``module``'s keys) as ``module.load_state_dict`` sees it after its parts' upgrades."""
    state = dict(state_dict)
    for name, part in module.named_modules():
        if hasattr(part, "upgrade_state_dict"):
            part.upgrade_state_dict(state, f"{name}." if name else "")
    return state
