"""Sound Scenes: answers against the scene, the rendered sound against the scene, determinism, splits, batches."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from datamodules import sound_scenes as ss
from datamodules.sound_scenes import SoundScenesDataModule, generate_sound_scenes, render_clip
from zoo.errors import ConfigError

NUM_CLIPS = 60


@pytest.fixture(scope="module")
def scenes():
    return generate_sound_scenes(NUM_CLIPS, seed=5)


def _events(scenes, n):
    k = int(scenes.num_events[n])
    return [ss.KINDS[i] for i in scenes.kinds[n, :k]], [ss.PITCHES[i] for i in scenes.pitches[n, :k]]


def _expected_answer(kinds: list[str], pitches: list[str], text: str) -> str:
    """The answer, from the event names in time order and the question's words alone."""
    named = next((kind for kind in ss.KINDS if kind in text), None)
    if text.startswith("How many"):
        return str(len(kinds))
    if text.startswith("Is there"):
        return "yes" if named in kinds else "no"
    if "pitch" in text:
        return pitches[kinds.index(named)]
    if "first" in text:
        return kinds[0]
    if "last" in text:
        return kinds[-1]
    position = kinds.index(named) + (1 if "after" in text else -1)
    return kinds[position] if 0 <= position < len(kinds) else "nothing"


def test_answers_follow_from_the_scene_and_the_question_text(scenes):
    for n in range(NUM_CLIPS):
        kinds, pitches = _events(scenes, n)
        for q in range(ss.QUESTIONS_PER_CLIP):
            group, subtype, kind = (
                int(a[n, q]) for a in (scenes.question_group, scenes.question_subtype, scenes.question_kind)
            )
            text = ss.question_text(group, subtype, kind)
            assert ss.ANSWERS[scenes.answers[n, q]] == _expected_answer(kinds, pitches, text), (n, text)


def test_scenes_are_well_formed(scenes):
    for n in range(NUM_CLIPS):
        k = int(scenes.num_events[n])
        assert 1 <= k <= ss.MAX_EVENTS
        assert (scenes.kinds[n, k:] == -1).all() and len(set(scenes.kinds[n, :k].tolist())) == k  # kinds unique
        start, length = scenes.onsets[n, :k].astype(int), scenes.durations[n, :k].astype(int)
        assert start[0] >= 0 and (start[1:] >= start[:-1] + length[:-1]).all()  # in order, never overlapping
        assert start[-1] + length[-1] <= ss.CLIP_SAMPLES
        for e in range(k):
            low, high = ss.PITCH_BANDS[scenes.pitches[n, e]]
            assert low <= scenes.frequencies[n, e] <= high
        # the two exists questions name two kinds, the two order questions use two templates
        exists, order = scenes.question_group[n] == 1, scenes.question_group[n] == 3
        assert len(set(scenes.question_kind[n, exists].tolist())) == 2
        assert len(set(scenes.question_subtype[n, order].tolist())) == 2


def test_answers_cover_the_vocabulary_and_no_family_is_trivial():
    scenes = generate_sound_scenes(2000, seed=0)
    counts = np.bincount(scenes.answers.ravel(), minlength=len(ss.ANSWERS))
    assert (counts > 0).all()
    for g in range(len(ss.GROUP_NAMES)):
        answers = np.bincount(scenes.answers[scenes.question_group == g])
        assert answers.max() / answers.sum() < 0.7  # the majority answer of each family stays well below certainty


def test_generation_is_a_pure_function_and_a_prefix(scenes):
    again = generate_sound_scenes(NUM_CLIPS, seed=5)
    longer = generate_sound_scenes(NUM_CLIPS + 20, seed=5)
    other = generate_sound_scenes(NUM_CLIPS, seed=6)
    for field in ss.SoundScenes.__dataclass_fields__:
        assert np.array_equal(getattr(scenes, field), getattr(again, field)), field
        assert np.array_equal(getattr(scenes, field), getattr(longer, field)[:NUM_CLIPS]), field
    assert not np.array_equal(scenes.kinds, other.kinds)
    assert np.array_equal(render_clip(scenes, 3), render_clip(again, 3))


def _spectrum_peak(wave: np.ndarray) -> float:
    spectrum = np.abs(np.fft.rfft(wave * np.hanning(len(wave))))
    return float(np.fft.rfftfreq(len(wave), 1 / ss.SAMPLE_RATE)[spectrum.argmax()])


def test_rendered_clip_holds_the_described_events(scenes):
    checked = {kind: 0 for kind in range(len(ss.KINDS))}
    for n in range(NUM_CLIPS):
        clip = render_clip(scenes, n)
        assert clip.dtype == np.float32 and clip.shape == (ss.CLIP_SAMPLES,)
        assert np.abs(clip).max() <= 1.0
        silent = np.ones(ss.CLIP_SAMPLES, dtype=bool)
        for e in range(int(scenes.num_events[n])):
            start, length = int(scenes.onsets[n, e]), int(scenes.durations[n, e])
            kind, frequency = int(scenes.kinds[n, e]), float(scenes.frequencies[n, e])
            event = clip[start : start + length]
            silent[start : start + length] = False
            assert event.std() > 2.5 * scenes.noise_levels[n]  # the event stands out of the background noise
            if kind == 0:  # a tone's spectrum peaks at its frequency
                assert abs(_spectrum_peak(event) - frequency) < 0.03 * frequency
            elif kind in (1, 2):  # a sweep's first and last quarters peak below and above its centre (or back)
                quarter = length // 4
                first, last = _spectrum_peak(event[:quarter]), _spectrum_peak(event[-quarter:])
                assert (first < frequency < last) if kind == 1 else (first > frequency > last)
            else:  # a burst's energy lies in its band
                spectrum = np.abs(np.fft.rfft(event)) ** 2
                bins = np.fft.rfftfreq(length, 1 / ss.SAMPLE_RATE)
                band = (bins >= frequency / ss.SWEEP_SPAN) & (bins <= frequency * ss.SWEEP_SPAN)
                assert spectrum[band].sum() > 0.9 * spectrum.sum()
            checked[kind] += 1
        if silent.any():
            assert clip[silent].std() < 1.5 * scenes.noise_levels[n]  # between events: only the background
    assert min(checked.values()) >= 5


def test_dataset_batches_match_items_and_the_contract(scenes):
    dataset = ss.SoundScenesDataset(scenes, np.arange(4, 10))
    assert len(dataset) == 6 * ss.QUESTIONS_PER_CLIP
    indices = [0, 7, 35, 13]
    batch = dataset.__getitems__(indices)
    waveform = batch["audio"]["waveform"]
    assert waveform.shape == (4, ss.CLIP_SAMPLES) and waveform.dtype == torch.float32
    assert batch["audio"]["lengths"].tolist() == [ss.CLIP_SAMPLES] * 4
    assert batch["label"].dtype == torch.long and batch["group"].dtype == torch.long
    for row, i in enumerate(indices):
        item = dataset[i]
        assert torch.equal(item["audio"]["waveform"], batch["audio"]["waveform"][row])
        assert item["text"] == batch["text"][row] and item["label"] == batch["label"][row]
        clip, q = 4 + i // ss.QUESTIONS_PER_CLIP, i % ss.QUESTIONS_PER_CLIP
        assert np.array_equal(item["audio"]["waveform"].numpy(), render_clip(scenes, clip))
        assert item["label"] == scenes.answers[clip, q] and item["group"] == scenes.question_group[clip, q]
    with pytest.raises(IndexError):
        dataset.__getitems__([len(dataset)])


def test_prerendered_clips_match_the_clips_rendered_when_fetched(scenes):
    waveforms = ss.render_clips(scenes)
    assert waveforms.shape == (NUM_CLIPS, ss.CLIP_SAMPLES)
    indices = [0, 13, 40, 41, 100]
    fetched = ss.SoundScenesDataset(scenes, np.arange(NUM_CLIPS)).__getitems__(indices)
    stored = ss.SoundScenesDataset(scenes, np.arange(NUM_CLIPS), waveforms=waveforms).__getitems__(indices)
    torch.testing.assert_close(stored["audio"]["waveform"], fetched["audio"]["waveform"], atol=5e-4, rtol=0)
    assert torch.equal(stored["audio"]["lengths"], fetched["audio"]["lengths"])
    assert stored["text"] == fetched["text"] and torch.equal(stored["label"], fetched["label"])


def test_datamodule_splits_by_clip_and_feeds_the_audio_encoder():
    from zoo.encoders import SpectrogramAudioEncoder

    dm = SoundScenesDataModule(num_clips=20, val_clips=3, test_clips=2, batch_size=5, seed=1)
    assert dm.num_classes == len(ss.ANSWERS) and dm.group_names == ["count", "exists", "pitch", "order"]
    dm.setup("fit")
    assert dm.test_dataset.clip_indices.tolist() == [0, 1]
    assert dm.val_dataset.clip_indices.tolist() == [2, 3, 4]
    assert dm.train_dataset.clip_indices.tolist() == list(range(5, 20))
    batch = next(iter(dm.train_dataloader()))
    torch.manual_seed(0)
    encoder = SpectrogramAudioEncoder(sample_rate=dm.sample_rate, hop_length=80, n_mels=40, dim=32, depth=1)
    tokens = encoder(batch["audio"])
    assert tokens.embeddings.shape == (5, 51, 32) and tokens.mask.all()  # 2 s at 100 frames/s, subsampled by 4


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"num_clips": 10, "val_clips": 5, "test_clips": 5}, "num_clips=10"),
        ({"val_clips": -1}, "val_clips=-1"),
        ({"batch_size": 0}, "batch_size=0"),
        ({"seed": -3}, "seed=-3"),
    ],
)
def test_bad_arguments_name_the_key(kwargs, named):
    with pytest.raises(ConfigError, match=named):
        SoundScenesDataModule(**kwargs)


def test_an_audio_encoder_at_another_sample_rate_stops_the_fit(tmp_path):
    import lightning as L

    from lit_models import VQA
    from zoo.encoders import SpectrogramAudioEncoder, TransformerTextEncoder
    from zoo.fusion import MIE

    dm = SoundScenesDataModule(num_clips=8, val_clips=2, test_clips=2, batch_size=4)
    encoders = {
        "audio": SpectrogramAudioEncoder(sample_rate=16000, dim=32, depth=1, num_heads=2),  # the data is at 8 kHz
        "text": TransformerTextEncoder(dim=32, depth=1, num_heads=2),
    }
    fusion = MIE(modalities=["audio", "text"], dim=32, depth=2, num_heads=2, modality_fusion_layers=1)
    model = VQA(encoders, fusion, num_classes=dm.num_classes)
    trainer = L.Trainer(fast_dev_run=True, default_root_dir=tmp_path, logger=False, enable_progress_bar=False)
    with pytest.raises(ConfigError, match=r"model.encoders.audio expects sample_rate=16000 Hz .*sample_rate=8000 Hz"):
        trainer.fit(model, datamodule=dm)
