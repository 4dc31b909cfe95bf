"""The plain multimodal model every task composes: encoders, width adapters and a fusion module."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from zoo.contracts import Encoder, Fused, Fusion, Tokens
from zoo.errors import ConfigError


class MultimodalModel(nn.Module):
    """``{modality: raw input} -> Fused``: each encoder's tokens are projected to the fusion width and fused.

    Args:
        encoders: one encoder per modality; the keys name the modalities and the batch fields they read.
        fusion: the fusion module; its ``modalities`` must equal the keys of ``encoders``.
    """

    def __init__(self, encoders: Mapping[str, Encoder], fusion: Fusion) -> None:
        super().__init__()
        if not encoders:
            raise ConfigError("MultimodalModel: `encoders` is empty; give at least one modality")
        for name, encoder in encoders.items():
            if not isinstance(encoder, Encoder):
                raise ConfigError(f"encoders[{name!r}] is a {type(encoder).__name__}, not a zoo.contracts.Encoder")
        fusion.check_modalities(list(encoders))
        self.encoders = nn.ModuleDict(dict(encoders))
        self.adapters = nn.ModuleDict(
            {
                name: nn.Identity() if enc.out_dim == fusion.dim else nn.Linear(enc.out_dim, fusion.dim)
                for name, enc in encoders.items()
            }
        )
        self.fusion = fusion

    def encode(self, inputs: Mapping[str, Any]) -> dict[str, Tokens]:
        """Run every encoder and adapter: ``{modality: Tokens [B, T_m, fusion.dim]}``."""
        out = {}
        for name, encoder in self.encoders.items():
            if name not in inputs:
                raise ConfigError(
                    f"the batch has no {name!r} field for encoders[{name!r}]; its fields are {sorted(inputs)}: name "
                    "each encoder after the batch field it reads"
                )
            tokens = encoder(inputs[name])
            out[name] = Tokens(self.adapters[name](tokens.embeddings), tokens.mask)
        return out

    def forward(self, inputs: Mapping[str, Any]) -> Fused:
        return self.fusion(self.encode(inputs))
