"""Image encoders: any ``timm`` backbone by name, and a small convolutional stem in the manner of Relation Networks.

Both map images ``[B, 3, H, W]`` (float, normalized) to one token per feature-map cell, ``[B, h * w, D]``, with a
fixed 2-D sinusoidal position embedding added so that later layers can reason about where things are.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from zoo.contracts import Encoder, Tokens, upgrade_on_load
from zoo.errors import ConfigError, check_sizes
from zoo.layers.position import sincos_2d


def _pos_scale_with_a_dimension(encoder: nn.Module, state_dict: dict, prefix: str) -> None:
    """``upgrade_state_dict`` of the image encoders: ``pos_scale`` was 0-d before it became ``[1]`` (FSDP2 shards no
    0-d parameter)."""
    key = prefix + "pos_scale"
    if key in state_dict and state_dict[key].dim() == 0:
        state_dict[key] = state_dict[key].reshape(1)


def _with_positions(features: Tensor, norm: nn.Module, scale: Tensor | float) -> Tokens:
    """``[B, C, h, w]`` feature map -> Tokens ``[B, h * w, C]``: LayerNorm-ed content plus 2-D positions.

    The norm puts content and position on the same scale (unit variance each); without it a freshly initialised
    backbone's features are an order of magnitude smaller than the position code and later layers barely see them.
    """
    B, C, h, w = features.shape
    tokens = norm(features.flatten(2).transpose(1, 2))
    return Tokens.dense(tokens + scale * sincos_2d(h, w, C, device=features.device).to(tokens.dtype))


class TimmImageEncoder(Encoder):
    """Feature-map tokens of a ``timm`` backbone: ``[B, 3, H, W] -> Tokens [B, h * w, D]``.

    Args:
        backbone: any ``timm`` model name that supports ``features_only`` (``resnet18``, ``convnext_atto``,
            ``efficientnet_b0``, ...).
        feature_index: which of the backbone's feature levels to take (``-1``: the deepest; a shallower level keeps
            more spatial resolution for small images).
        dim: project the features to this width with a 1x1 convolution; ``None`` keeps the backbone's channels.
        weights_path: a local ``.safetensors`` or ``.pt`` state dict for the backbone. Nothing is downloaded:
            without it the backbone starts from random weights.
        in_chans: input channels.
    """

    def __init__(
        self,
        backbone: str = "resnet18",
        *,
        feature_index: int = -1,
        dim: int | None = None,
        weights_path: str | None = None,
        in_chans: int = 3,
    ) -> None:
        super().__init__()
        import timm

        if dim is not None and dim < 1:
            raise ConfigError(f"TimmImageEncoder: dim={dim} must be at least 1, or None for the backbone's channels")
        if not timm.is_model(backbone):
            raise ConfigError(
                f"TimmImageEncoder: backbone={backbone!r} is not a timm model name (see timm.list_models)"
            )
        probe = timm.create_model(backbone, pretrained=False, features_only=True, in_chans=in_chans)
        levels = len(probe.feature_info)
        if not -levels <= feature_index < levels:
            raise ConfigError(
                f"TimmImageEncoder: feature_index={feature_index} out of range for {backbone} ({levels} levels)"
            )
        index = feature_index % levels
        self.backbone = timm.create_model(
            backbone, pretrained=False, features_only=True, out_indices=(index,), in_chans=in_chans
        )
        if weights_path is not None:
            self._load_weights(Path(weights_path))
        channels = self.backbone.feature_info.channels()[-1]
        self.proj = nn.Conv2d(channels, dim, 1) if dim is not None else nn.Identity()
        self.out_dim = dim if dim is not None else channels
        self.norm = nn.LayerNorm(self.out_dim)
        self.pos_scale = nn.Parameter(torch.ones(1))  # [1], not a scalar: FSDP2 shards no 0-d parameter
        self.register_load_state_dict_pre_hook(upgrade_on_load)

    def _load_weights(self, path: Path) -> None:
        if not path.is_file():
            raise FileNotFoundError(f"TimmImageEncoder: weights_path={str(path)!r} does not exist")
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
        # features_only models drop the classifier; keep only the keys the backbone has
        own = self.backbone.state_dict()
        missing = [k for k in own if k not in state]
        if missing:
            raise ConfigError(f"TimmImageEncoder: {path} lacks {len(missing)} backbone weights, e.g. {missing[:3]}")
        self.backbone.load_state_dict({k: state[k] for k in own})

    upgrade_state_dict = _pos_scale_with_a_dimension

    def forward(self, images: Tensor) -> Tokens:
        features = self.proj(self.backbone(images)[-1])
        return _with_positions(features, self.norm, self.pos_scale)


class ConvImageEncoder(Encoder):
    """A stack of stride-2 3x3 convolutions (BatchNorm, ReLU), as the CNN of Relation Networks (Santoro et al. 2017):
    ``[B, 3, H, W] -> Tokens [B, ceil(H / 2^n) * ceil(W / 2^n), dim]`` for ``n = len(channels)``.

    Small and fast; suited to synthetic scenes such as Sort-of-CLEVR (75x75 -> 10x10 tokens with 3 stages).

    Args:
        channels: output channels of each stage.
        dim: token width (a 1x1 projection of the last stage).
        in_chans: input channels.
    """

    def __init__(self, *, channels: tuple[int, ...] = (32, 64, 128), dim: int = 128, in_chans: int = 3) -> None:
        super().__init__()
        if not channels:
            raise ConfigError("ConvImageEncoder: channels must name at least one stage")
        stages = {f"channels[{i}]": c for i, c in enumerate(channels)}
        check_sizes("ConvImageEncoder", **stages, dim=dim, in_chans=in_chans)
        layers: list[nn.Module] = []
        previous = in_chans
        for c in channels:
            layers += [nn.Conv2d(previous, c, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU()]
            previous = c
        self.stages = nn.Sequential(*layers)
        self.proj = nn.Conv2d(previous, dim, 1)
        self.out_dim = dim
        self.norm = nn.LayerNorm(dim)
        self.pos_scale = nn.Parameter(torch.ones(1))  # [1], not a scalar: FSDP2 shards no 0-d parameter
        self.register_load_state_dict_pre_hook(upgrade_on_load)

    upgrade_state_dict = _pos_scale_with_a_dimension

    def forward(self, images: Tensor) -> Tokens:
        return _with_positions(self.proj(self.stages(images)), self.norm, self.pos_scale)
