"""A size of a model part that cannot work (a zero width, no heads, no blocks) is a ConfigError from the constructor
that takes it, naming the part, the key and the value, instead of an error from deep inside a forward pass."""

from __future__ import annotations

import pytest

from zoo.encoders import ConvImageEncoder, SpectrogramAudioEncoder, TransformerTextEncoder
from zoo.errors import ConfigError
from zoo.fusion import MIE, TwoTower
from zoo.layers.attention import SelfAttention


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: SelfAttention(0, 4), "SelfAttention: dim=0 must be at least 1"),
        (lambda: SelfAttention(32, 0), "SelfAttention: num_heads=0 must be at least 1"),
        (lambda: SelfAttention(32, 4, dropout=1.5), "SelfAttention: dropout=1.5 must be in [0, 1)"),
        (lambda: MIE(dim=0), "MIE: dim=0 must be at least 1"),
        (lambda: MIE(num_heads=-2), "MIE: num_heads=-2 must be at least 1"),
        (lambda: MIE(depth=0, modality_fusion_layers=0), "MIE: depth=0 must be at least 1"),
        (lambda: MIE(mlp_ratio=0.0), "MIE: mlp_ratio=0.0 must be > 0"),
        (lambda: TwoTower(dim=0), "TwoTower: dim=0 must be at least 1"),
        (lambda: TwoTower(depth=0), "TwoTower: depth=0 must be at least 1"),
        (lambda: TransformerTextEncoder(dim=0), "TransformerTextEncoder: dim=0 must be at least 1"),
        (lambda: TransformerTextEncoder(num_heads=0), "TransformerTextEncoder: num_heads=0 must be at least 1"),
        (lambda: ConvImageEncoder(channels=(32, 0)), "ConvImageEncoder: channels[1]=0 must be at least 1"),
        (lambda: ConvImageEncoder(dim=0), "ConvImageEncoder: dim=0 must be at least 1"),
        (lambda: SpectrogramAudioEncoder(hop_length=0), "SpectrogramAudioEncoder: hop_length=0 must be at least 1"),
        (lambda: SpectrogramAudioEncoder(dim=0), "SpectrogramAudioEncoder: dim=0 must be at least 1"),
    ],
)
def test_a_size_that_cannot_work_is_named_by_the_constructor(build, message):
    with pytest.raises(ConfigError) as info:
        build()
    assert str(info.value) == message


def test_zero_fusion_width_from_the_cli_is_one_line(elsewhere, cli_error):
    flags = ["--model.init_args.fusion.init_args.dim=0", "--trainer.fast_dev_run=true"]
    err = cli_error(["fit", "--config", "vqa.yaml", *flags])
    assert err == "zoo: error: MIE: dim=0 must be at least 1\n"
