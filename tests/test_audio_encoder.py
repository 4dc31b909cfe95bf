"""The audio encoder: token count and padding mask from the clip lengths, SpecAugment in training only."""

from __future__ import annotations

import pytest
import torch

from zoo.encoders import SpectrogramAudioEncoder
from zoo.errors import ConfigError


def _encoder(**kwargs) -> SpectrogramAudioEncoder:
    torch.manual_seed(0)
    return SpectrogramAudioEncoder(sample_rate=8000, hop_length=80, n_mels=32, dim=16, depth=1, num_heads=2, **kwargs)


def test_tokens_cover_each_clip_and_padding_is_masked():
    encoder = _encoder().eval()
    waveform = torch.randn(3, 16000, generator=torch.Generator().manual_seed(1))
    lengths = torch.tensor([16000, 8000, 800])
    tokens = encoder({"waveform": waveform, "lengths": lengths})
    frames = lengths // 80 + 1  # the STFT is centred: one frame per hop plus one
    assert tokens.embeddings.shape == (3, 51, 16)
    assert tokens.mask.sum(1).tolist() == ((frames + 3) // 4).tolist()  # two stride-2 convolutions


def test_spec_augment_masks_bands_and_spans_to_each_clips_mean():
    encoder = _encoder(freq_masks=2, freq_mask_width=6, time_masks=2, time_mask_width=10)
    mel = torch.randn(4, 32, 101, generator=torch.Generator().manual_seed(2)) + torch.arange(4.0).view(4, 1, 1) * 5
    torch.manual_seed(3)
    out = encoder.spec_augment(mel)
    mean = mel.mean(dim=(1, 2), keepdim=True)
    changed = out != mel
    assert torch.allclose(out[changed], mean.expand_as(mel)[changed])  # masked entries hold the clip's own mean
    rows, columns = changed.all(2), changed.all(1)  # whole mel bands, whole frames
    assert (changed == (rows[:, :, None] | columns[:, None, :])).all()  # nothing else moved
    assert (rows.sum(1) <= 2 * 6).all() and (columns.sum(1) <= 2 * 10).all()
    assert rows.any() and columns.any()
    assert len({tuple(r.nonzero().flatten().tolist()) for r in rows}) > 1  # each clip draws its own masks


def test_spec_augment_acts_in_training_only_and_is_off_by_default():
    waveform = torch.randn(2, 8000, generator=torch.Generator().manual_seed(4))
    inputs = {"waveform": waveform, "lengths": torch.tensor([8000, 8000])}
    augmented = _encoder(freq_masks=2, time_masks=2)
    plain = _encoder()  # the same weights: the same seed, and the masks add no parameters
    with torch.no_grad():
        augmented.eval()
        assert torch.equal(augmented(inputs).embeddings, plain.eval()(inputs).embeddings)
        plain.train()
        augmented.train()
        assert torch.equal(plain(inputs).embeddings, plain(inputs).embeddings)  # no masks drawn: deterministic
        assert not torch.equal(augmented(inputs).embeddings, plain(inputs).embeddings)


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"freq_masks": -1}, "freq_masks=-1"),
        ({"time_mask_width": 2.5}, "time_mask_width=2.5"),
        ({"freq_mask_width": 40}, "freq_mask_width=40 exceeds n_mels=32"),
    ],
)
def test_bad_spec_augment_settings_name_the_key(kwargs, named):
    with pytest.raises(ConfigError, match=named):
        _encoder(**kwargs)
