"""The user's own sound files: both layouts, decoding to mono at one rate, crops, clear errors, and training on them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import soundfile
import torch

from datamodules._audio import read_audio
from datamodules.audio_folder import AudioFolderDataModule
from lit_models import Classifier, TextClassifier
from zoo.cli import _one_line, main
from zoo.encoders import SpectrogramAudioEncoder, TransformerTextEncoder
from zoo.errors import ConfigError, DataError

ROOT = Path(__file__).resolve().parents[1]


def _tone(rng, hz: float, seconds: float, rate: int, channels: int = 1) -> np.ndarray:
    """A sine at ``hz`` with a random phase and amplitude plus a little noise, float32 ``[S, channels]``."""
    t = np.arange(round(seconds * rate)) / rate
    wave = rng.uniform(0.2, 0.6) * np.sin(2 * np.pi * hz * t + rng.uniform(0, 2 * np.pi))
    wave = wave + 0.02 * rng.standard_normal(len(t))
    return np.repeat(wave[:, None], channels, axis=1).astype(np.float32)


def _write(path: Path, samples: np.ndarray, rate: int, subtype: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    soundfile.write(path, samples, rate, subtype=subtype)
    return path


def _tone_folder(root: Path, rng, sizes: dict[str, int], *, seconds: float = 0.25, rate: int = 8000) -> Path:
    """``root/<split>/<low|high>/<i>.wav``: low tones (200-400 Hz) and high tones (1.5-3 kHz)."""
    for split, n in sizes.items():
        for label, band in (("low", (200, 400)), ("high", (1500, 3000))):
            for i in range(n):
                _write(root / split / label / f"{i}.wav", _tone(rng, rng.uniform(*band), seconds, rate), rate)
    return root


def _peak_hz(wave: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(wave * np.hanning(len(wave))))
    return float(np.fft.rfftfreq(len(wave), 1 / rate)[spectrum.argmax()])


def test_folders_of_any_format_rate_and_channels_come_out_mono_at_the_sample_rate(tmp_path):
    rng = np.random.default_rng(0)
    train = tmp_path / "train"
    written = {
        "low/a.wav": (_tone(rng, 300, 0.5, 8000), 8000, "PCM_16"),  # int16, mono
        "low/b.WAV": (_tone(rng, 300, 0.3, 22050, channels=2), 22050, "FLOAT"),  # float32, stereo, upper case
        "low/deeper/c.flac": (_tone(rng, 300, 0.4, 16000), 16000, "PCM_24"),  # nested below the class folder
        "high/d.ogg": (_tone(rng, 2000, 0.5, 44100, channels=2), 44100, "VORBIS"),
        "high/e.wav": (_tone(rng, 2000, 0.2, 48000), 48000, "PCM_16"),
        "high/f.mp3": (_tone(rng, 2000, 0.5, 16000), 16000, "MPEG_LAYER_III"),
    }
    for name, (samples, rate, subtype) in written.items():
        _write(train / name, samples, rate, subtype)
    (train / "low" / "._a.wav").write_bytes(b"\x00\x05\x16\x07 macOS metadata, not a sound")  # hidden: skipped
    (train / "high" / "notes.txt").write_text("not a sound file")
    dm = AudioFolderDataModule(root=str(tmp_path), max_seconds=None, batch_size=8)
    assert dm.class_names == ["high", "low"] and dm.num_classes == 2 and dm.group_names == ["head", "medium", "tail"]
    assert dm.layout == "folders" and dm.class_groups.tolist() == [0, 1]  # 3 files each: ties go by class index
    dm.setup("fit")
    files = dm.train_dataset.files
    assert sorted(Path(f).relative_to(train).as_posix() for f in files) == sorted(written)
    batch = dm.train_dataset.__getitems__(list(range(len(files))))
    waveform, lengths = batch["audio"]["waveform"], batch["audio"]["lengths"]
    assert waveform.dtype == torch.float32 and waveform.shape == (6, int(lengths.max()))
    for row, file, length, label in zip(waveform, files, lengths.tolist(), batch["label"].tolist(), strict=True):
        samples, rate, _ = written[Path(file).relative_to(train).as_posix()]
        # resampled to 16 kHz: a duration kept to within one sample (mp3 adds its decoder's padding), the tone's
        # pitch kept to within the 1/duration Hz resolution of the spectrum
        if not file.endswith(".mp3"):
            assert abs(length - len(samples) * 16000 / rate) <= 1, file
        assert abs(_peak_hz(row[:length].numpy(), 16000) - (300 if label == 1 else 2000)) <= 16000 / length + 1, file
        assert bool((row[length:] == 0).all())
    stereo = read_audio(train / "low" / "b.WAV", sample_rate=22050)  # both channels alike: their mean is each one
    np.testing.assert_allclose(stereo, written["low/b.WAV"][0][:, 0], atol=1e-6)


def test_batches_pad_each_clip_after_its_end_and_give_its_real_length(tmp_path):
    rng = np.random.default_rng(1)
    for i, seconds in enumerate((0.1, 0.3, 0.2, 0.25)):
        _write(tmp_path / "train" / ("a" if i % 2 else "b") / f"{i}.wav", _tone(rng, 500, seconds, 16000), 16000)
    dm = AudioFolderDataModule(root=str(tmp_path), batch_size=4)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    waveform, lengths = batch["audio"]["waveform"], batch["audio"]["lengths"]
    assert sorted(lengths.tolist()) == [1600, 3200, 4000, 4800] and waveform.shape == (4, 4800)
    assert batch["label"].dtype == torch.long and batch["group"].dtype == torch.long
    for row, length, label in zip(waveform, lengths, batch["label"], strict=True):
        file = next(f for f in dm.train_dataset.files if soundfile.info(f).frames == length)
        np.testing.assert_array_equal(row[:length].numpy(), read_audio(file, sample_rate=16000))
        assert dm.class_names[label] == Path(file).parent.name and bool((row[length:] == 0).all())
    item = dm.train_dataset[0]  # one example: the waveform without padding
    assert item["audio"]["waveform"].shape == (int(item["audio"]["lengths"]),)


def test_manifest_with_a_split_column_and_custom_column_names(tmp_path):
    rng = np.random.default_rng(2)
    rows = ["file,kind,subset"]
    for i in range(9):
        split = ("train", "train", "validation")[i % 3]
        kind = ("dog", "rain")[i % 2]
        _write(tmp_path / "data" / "clips" / f"{i}.flac", _tone(rng, 300 + 100 * i, 0.1, 16000), 16000)
        rows.append(f"clips/{i}.flac,{kind},{split}")
    (tmp_path / "data" / "list.csv").write_text("\n".join(rows) + "\n")
    dm = AudioFolderDataModule(
        root=str(tmp_path), manifest="data/list.csv", path_column="file", label_column="kind", split_column="subset"
    )
    assert dm.layout == "manifest" and dm.class_names == ["dog", "rain"]
    assert {split: len(files) for split, (files, _) in dm.examples.items()} == {"train": 6, "val": 3}
    dm.setup("fit")
    assert dm.test_dataloader() == [] and len(next(iter(dm.val_dataloader()))["label"]) == 3


def test_manifest_split_by_folds_as_esc50_and_urbansound8k(tmp_path):
    rng = np.random.default_rng(3)
    esc = ["filename,fold,target,category,esc10,src_file,take"]  # ESC-50's meta/esc50.csv
    urban = ["slice_file_name,fsID,start,end,salience,fold,classID,class"]  # UrbanSound8K's metadata CSV
    for i in range(20):
        fold, category = i % 5 + 1, ("dog", "rooster")[i % 2]
        _write(tmp_path / "ESC-50" / "audio" / f"{fold}-{i}-A-{i % 2}.wav", _tone(rng, 440, 0.05, 16000), 16000)
        esc.append(f"{fold}-{i}-A-{i % 2}.wav,{fold},{i % 2},{category},False,{i},A")
        _write(tmp_path / "US8K" / "audio" / f"fold{fold}" / f"{i}-0-0.wav", _tone(rng, 440, 0.05, 16000), 16000)
        urban.append(f"{i}-0-0.wav,{i},0.0,1.0,1,{fold},{i % 2},{category}")
    (tmp_path / "ESC-50" / "meta").mkdir()
    (tmp_path / "ESC-50" / "meta" / "esc50.csv").write_text("\n".join(esc) + "\n")
    (tmp_path / "US8K" / "metadata").mkdir()
    (tmp_path / "US8K" / "metadata" / "UrbanSound8K.csv").write_text("\n".join(urban) + "\n")
    folds = {"fold_column": "fold", "val_folds": [4], "test_folds": [5], "label_column": "category"}
    esc50 = AudioFolderDataModule(
        root=str(tmp_path / "ESC-50"), manifest="meta/esc50.csv", audio_dir="audio", path_column="filename", **folds
    )
    us8k = AudioFolderDataModule(
        root=str(tmp_path / "US8K"),
        manifest="metadata/UrbanSound8K.csv",
        audio_dir="audio",
        path_column="fold{fold}/{slice_file_name}",
        **(folds | {"label_column": "class", "val_folds": ["4"]}),  # folds match as text: 4 and "4" alike
    )
    for dm in (esc50, us8k):
        assert dm.class_names == ["dog", "rooster"]
        sizes = {split: len(files) for split, (files, _) in dm.examples.items()}
        assert sizes == {"train": 12, "val": 4, "test": 4}
        assert all("/4-" in f or "fold4/" in f for f in dm.examples["val"][0])
        assert all("/5-" in f or "fold5/" in f for f in dm.examples["test"][0])


def test_training_crops_follow_seed_and_epoch_and_evaluation_takes_the_start(tmp_path):
    rng = np.random.default_rng(4)
    for split in ("train", "val"):
        for label in ("a", "b"):
            for i in range(2):
                _write(tmp_path / split / label / f"{i}.wav", rng.uniform(-1, 1, (16000, 1)).astype(np.float32), 16000)

    def crops(seed: int, epoch: int, num_workers: int = 0) -> torch.Tensor:
        dm = AudioFolderDataModule(root=str(tmp_path), max_seconds=0.25, seed=seed, num_workers=num_workers)
        dm.setup("fit")
        loader = dm.train_dataloader()
        loader.sampler.set_epoch(epoch)  # what Lightning does before each epoch
        batch = next(iter(loader))
        order = torch.as_tensor(loader.sampler.permutation())
        return batch["audio"]["waveform"][order.argsort()]  # by example, whatever the order

    first = crops(seed=0, epoch=0)
    assert first.shape == (4, 4000)
    assert torch.equal(first, crops(seed=0, epoch=0)), "the same (seed, epoch): the same crops"
    assert torch.equal(first, crops(seed=0, epoch=0, num_workers=1)), "a worker process draws the same crops"
    assert torch.equal(crops(seed=0, epoch=1), crops(seed=0, epoch=1, num_workers=1))
    assert not torch.equal(first, crops(seed=0, epoch=1)) and not torch.equal(first, crops(seed=1, epoch=0))
    dm = AudioFolderDataModule(root=str(tmp_path), max_seconds=0.25)
    dm.setup("fit")
    val = next(iter(dm.val_dataloader()))["audio"]["waveform"]
    for row, file in zip(val, dm.val_dataset.files, strict=True):
        np.testing.assert_array_equal(row.numpy(), read_audio(file, sample_rate=16000)[:4000])


def test_a_run_resumed_mid_epoch_goes_on_with_the_same_files_and_crops(tmp_path):
    rng = np.random.default_rng(13)
    for label in ("a", "b"):
        for i in range(4):
            _write(tmp_path / "train" / label / f"{i}.wav", rng.uniform(-1, 1, (8000, 1)).astype(np.float32), 16000)

    def epoch_one(state: dict | None = None) -> list[torch.Tensor]:
        dm = AudioFolderDataModule(root=str(tmp_path), max_seconds=0.1, batch_size=2, seed=3)
        if state is not None:
            dm.load_state_dict(state)  # what Lightning does with the checkpoint's datamodule state
        dm.setup("fit")
        loader = dm.train_dataloader()
        loader.sampler.set_epoch(1)
        return [batch["audio"]["waveform"] for batch in loader]

    uninterrupted = epoch_one()
    resumed = epoch_one({"sampler": {"seed": 3, "epoch": 1, "position": 4}})  # two batches of epoch 1 trained on
    assert len(uninterrupted) == 4 and len(resumed) == 2
    assert all(torch.equal(a, b) for a, b in zip(uninterrupted[2:], resumed, strict=True))


def _manifest(tmp_path, header: str, rows: list[str]) -> Path:
    for row in rows:
        name = row.split(",")[0]
        if name.endswith(".wav") and not name.startswith("missing"):
            _write(tmp_path / name, _tone(np.random.default_rng(0), 440, 0.05, 8000), 8000)
    path = tmp_path / "list.csv"
    path.write_text("\n".join([header, *rows]) + "\n")
    return path


@pytest.mark.parametrize(
    ("header", "rows", "kwargs", "message"),
    [
        ("path,category,split", ["a.wav,x,train"], {}, r"no column 'label' \(label_column\); the columns are "),
        ("path,label", ["a.wav,x"], {}, r"no column 'split' \(split_column\).*or set fold_column"),
        (
            "name,label,split",
            ["a.wav,x,train"],
            {},
            r"no column 'path' \(path_column\); .* \['name', 'label', 'split'\]",
        ),
        (
            "name,label,fold",
            ["a.wav,x,1"],
            {"fold_column": "fold", "path_column": "fold{fold}/{file}"},
            r"no column 'file' \(path_column\)",
        ),
        (
            "path,label,split",
            ["a.wav,x,train", "missing1.wav,x,train", "missing2.wav,y,test"],
            {},
            r"list.csv: 2 file\(s\) of column 'path' not found under audio_dir=.*missing1.wav, .*missing2.wav",
        ),
        ("path,label,split", ["a.wav,x,train", "b.wav,x,training"], {}, r"list.csv:3: split 'training' in column"),
        ("path,label,split", ["a.wav,,train"], {}, r"list.csv:2: empty label in column 'label'"),
        ("path,label,split", [], {}, r"list.csv: the training split holds no rows"),
        (
            "path,label,fold",
            ["a.wav,x,1", "b.wav,y,2"],
            {"fold_column": "fold", "val_folds": [6]},
            r"no row has fold='6' \(val_folds/test_folds\); the folds are \['1', '2'\]",
        ),
    ],
)
def test_manifest_mistakes_name_the_file_line_or_column(tmp_path, header, rows, kwargs, message):
    _manifest(tmp_path, header, rows)
    with pytest.raises(DataError, match=message):
        AudioFolderDataModule(root=str(tmp_path), manifest="list.csv", **kwargs)


def test_folder_mistakes_name_the_folder_or_file(tmp_path):
    rng = np.random.default_rng(5)
    with pytest.raises(DataError, match=r"root='.*nowhere': folder not found"):
        AudioFolderDataModule(root=str(tmp_path / "nowhere"))
    with pytest.raises(ConfigError, match=r"root is required.*--data.init_args.root=PATH"):
        AudioFolderDataModule()
    with pytest.raises(DataError, match=r"train: folder not found; expected .*/train/<class>/<file>.wav"):
        AudioFolderDataModule(root=str(tmp_path))
    with pytest.raises(DataError, match=r"manifest='.*none.csv': no such file"):
        AudioFolderDataModule(root=str(tmp_path), manifest="none.csv")
    (tmp_path / "train" / "cat").mkdir(parents=True)
    (tmp_path / "train" / "cat" / "notes.txt").write_text("no sound here")
    with pytest.raises(DataError, match=r"train: the training split holds no sound files \(.wav, .wave, .flac"):
        AudioFolderDataModule(root=str(tmp_path))
    _tone_folder(tmp_path, rng, {"train": 2})
    _write(tmp_path / "train" / "stray.wav", _tone(rng, 440, 0.05, 8000), 8000)
    with pytest.raises(DataError, match=r"train/stray.wav: a sound file outside a class folder"):
        AudioFolderDataModule(root=str(tmp_path))
    (tmp_path / "train" / "stray.wav").unlink()
    # train/cat holds no sound: a class of 0 files, rare like a class of 1
    with pytest.raises(DataError, match=r"train: 1 class\(es\) have fewer than min_examples_per_class=2 .*'cat': 0"):
        AudioFolderDataModule(root=str(tmp_path))
    (tmp_path / "train" / "cat" / "notes.txt").unlink()
    (tmp_path / "train" / "cat").rmdir()
    (tmp_path / "val" / "low").mkdir(parents=True)
    with pytest.raises(DataError, match=r"val: holds no sound files"):
        AudioFolderDataModule(root=str(tmp_path))
    _write(tmp_path / "val" / "zebra" / "z.wav", _tone(rng, 440, 0.05, 8000), 8000)
    with pytest.raises(DataError, match=r"val: the val split has label\(s\) \['zebra'\] .*first file: .*z.wav"):
        AudioFolderDataModule(root=str(tmp_path))


def test_rare_classes_stop_the_run_or_are_dropped_from_every_split_or_kept(tmp_path):
    rng = np.random.default_rng(6)
    _tone_folder(tmp_path, rng, {"train": 3, "test": 1})
    _write(tmp_path / "train" / "owl" / "0.wav", _tone(rng, 800, 0.05, 8000), 8000)
    _write(tmp_path / "test" / "owl" / "0.wav", _tone(rng, 800, 0.05, 8000), 8000)
    with pytest.raises(DataError, match=r"fewer than min_examples_per_class=2 training examples: \{'owl': 1\}"):
        AudioFolderDataModule(root=str(tmp_path))
    dropped = AudioFolderDataModule(root=str(tmp_path), rare_classes="drop")
    assert dropped.class_names == ["high", "low"] and len(dropped.examples["test"][0]) == 2
    kept = AudioFolderDataModule(root=str(tmp_path), rare_classes="keep")
    assert kept.class_names == ["high", "low", "owl"] and kept.class_groups.tolist() == [0, 1, 2]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"sample_rate": 0}, "sample_rate=0 must be a positive integer"),
        ({"max_seconds": 0.0}, "max_seconds=0.0 must be > 0"),
        ({"rare_classes": "ignore"}, "rare_classes='ignore'"),
        ({"val_folds": [1]}, "val_folds/test_folds need fold_column"),
        ({"fold_column": "fold", "val_folds": [1], "test_folds": ["1"]}, r"folds \['1'\] are in both"),
        ({"batch_size": 0}, "batch_size=0"),
    ],
)
def test_bad_arguments_raise_config_errors_naming_the_key(tmp_path, kwargs, message):
    _tone_folder(tmp_path, np.random.default_rng(7), {"train": 2})
    with pytest.raises(ConfigError, match=message):
        AudioFolderDataModule(root=str(tmp_path), **kwargs)


def _error_of_first_batch(loader: torch.utils.data.DataLoader) -> DataError:
    iterator = iter(loader)
    try:
        next(iterator)
    except DataError as err:
        return err
    finally:
        # after a worker's exception torch's iterator sits in a reference cycle; left to the garbage collector, its
        # shutdown waits 5 s for the worker, in whichever test runs then
        if hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()
    pytest.fail("the batch was fetched without an error")


@pytest.mark.parametrize("num_workers", [0, 1])
def test_corrupt_or_empty_sound_files_are_named_when_fetched_also_from_worker_processes(tmp_path, num_workers):
    rng = np.random.default_rng(8)
    _tone_folder(tmp_path, rng, {"train": 2})
    (tmp_path / "train" / "low" / "garbage.wav").write_bytes(b"RIFF\x10\x00\x00\x00WAVEnot really a wave file")
    (tmp_path / "train" / "low" / "empty.wav").write_bytes(b"")
    _write(tmp_path / "train" / "high" / "silent.wav", np.zeros((0, 1), np.float32), 8000)
    whole = (tmp_path / "train" / "high" / "0.wav").read_bytes()
    (tmp_path / "train" / "high" / "truncated.wav").write_bytes(whole[: len(whole) // 2])
    dm = AudioFolderDataModule(root=str(tmp_path), num_workers=num_workers)  # the checks pass: nothing is decoded
    dm.setup("fit")
    files = {Path(f).name: f for f in dm.train_dataset.files}
    reasons = {"garbage.wav": "not a readable", "empty.wav": "not a readable", "silent.wav": "holds no samples",
               "truncated.wav": "not a readable sound file (truncated"}  # fmt: skip
    for name, reason in reasons.items():
        dm.train_dataset.files = [files[name]] * len(files)  # every example is the bad file: the first batch fails
        err = _error_of_first_batch(dm.train_dataloader())
        # a worker's exception comes back as the same type, its message after the worker's traceback; the CLI
        # prints the message alone
        assert _one_line(err).startswith(f"{files[name]}: {reason}"), str(err)


@pytest.mark.parametrize(
    "container, subtype, endian, end",
    [
        ("WAV", "PCM_16", "FILE", 60),  # 8000 frames announced, 8 left: libsndfile decodes the 8 without a word
        ("WAV", "PCM_16", "FILE", -1),  # one byte short: the last frame is gone
        ("WAV", "FLOAT", "FILE", -4000),
        ("WAV", "PCM_16", "BIG", -4000),  # RIFX
        ("RF64", "PCM_24", "FILE", -4000),  # the data length in the ds64 chunk
        ("AIFF", "PCM_16", "FILE", -4000),
        ("AIFF", "FLOAT", "FILE", -4000),  # AIFF-C
        ("AU", "PCM_16", "FILE", -4000),
        ("MP3", None, "FILE", -400),  # the frame count of LAME's Xing header
        ("MP3", None, "FILE", 1000),
    ],
)
def test_a_sound_file_cut_short_of_what_its_header_announces_is_named_not_decoded_short(
    tmp_path, container, subtype, endian, end
):
    whole = tmp_path / f"whole.{container.lower()}"
    samples = _tone(np.random.default_rng(13), 440, 1.0, 8000)  # 8000 frames
    soundfile.write(whole, samples, 8000, subtype=subtype, format=container, endian=endian)
    assert read_audio(whole, sample_rate=8000).shape == (8000,)
    cut = tmp_path / f"cut.{container.lower()}"
    cut.write_bytes(whole.read_bytes()[:end])  # as `head -c` leaves a file whose copy was interrupted
    with pytest.raises(DataError) as err:
        read_audio(cut, sample_rate=8000)
    assert str(err.value).startswith(f"{cut}: not a readable sound file (truncated: its header announces "), err.value


def test_an_mp3_behind_an_id3_tag_loads_whole_and_its_cut_copy_is_named(tmp_path):
    whole = tmp_path / "plain.mp3"
    soundfile.write(whole, _tone(np.random.default_rng(15), 440, 1.0, 8000), 8000, format="MP3")
    # an ID3v2.3 tag of 20 bytes of padding before the first frame, as taggers leave it
    tagged = tmp_path / "tagged.mp3"
    tagged.write_bytes(b"ID3\x03\x00\x00\x00\x00\x00\x14" + bytes(20) + whole.read_bytes())
    assert read_audio(tagged, sample_rate=8000).shape == (8000,)
    cut = tmp_path / "cut.mp3"
    cut.write_bytes(tagged.read_bytes()[:-400])
    with pytest.raises(DataError, match="truncated: its header announces 8000 frames"):
        read_audio(cut, sample_rate=8000)


@pytest.mark.parametrize("placeholder", [0xFFFFFFFF, 0x7FFFF000])
def test_a_wav_streamed_with_an_unknown_data_length_still_loads_whole(tmp_path, placeholder):
    # a writer that cannot seek back (ffmpeg to a pipe: 0xFFFFFFFF; SoX: 0x7FFFF000) leaves a placeholder length
    path = tmp_path / "streamed.wav"
    samples = _tone(np.random.default_rng(14), 440, 0.5, 8000)
    soundfile.write(path, samples, 8000, subtype="PCM_16")
    data = bytearray(path.read_bytes())
    assert data[36:40] == b"data"
    data[40:44] = placeholder.to_bytes(4, "little")
    path.write_bytes(bytes(data))
    assert read_audio(path, sample_rate=8000).shape == (4000,)


def test_python_m_zoo_trains_and_tests_the_classifier_on_an_audio_folder(elsewhere, subprocess_env):
    root = _tone_folder(elsewhere / "sounds", np.random.default_rng(9), {"train": 3, "val": 1, "test": 1})
    result = subprocess.run(
        [
            sys.executable, "-m", "zoo", "fit", "--config", "audio_folder.yaml", f"--data.init_args.root={root}",
            "--data.init_args.batch_size=4", "--trainer.fast_dev_run=true", "--trainer.enable_progress_bar=false",
        ],
        cwd=elsewhere, env=subprocess_env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "test/macro_f1" in result.stdout and "test/f1/high" in result.stdout  # test_after_fit ran the test


def test_a_corrupt_file_stops_the_cli_with_one_line_naming_it(elsewhere, capsys):
    root = _tone_folder(elsewhere / "sounds", np.random.default_rng(10), {"train": 2})
    (root / "train" / "low" / "0.wav").write_bytes(b"not a sound")
    with pytest.raises(SystemExit) as exit_info:
        main(
            [
                "fit", "--config", "audio_folder.yaml", f"--data.init_args.root={root}",
                "--data.init_args.batch_size=4", "--trainer.fast_dev_run=true", "--trainer.enable_progress_bar=false",
            ]
        )  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2
    assert err.startswith(f"zoo: error: {root / 'train' / 'low' / '0.wav'}: not a readable sound file"), err
    assert len(err.splitlines()) == 1


def _fit(dm, model, **trainer_args) -> L.Trainer:
    trainer = L.Trainer(
        accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, **trainer_args,
    )  # fmt: skip
    trainer.fit(model, datamodule=dm)
    return trainer


def _small_audio_encoder(sample_rate: int = 8000) -> SpectrogramAudioEncoder:
    return SpectrogramAudioEncoder(sample_rate=sample_rate, n_mels=32, hop_length=80, dim=32, depth=1, num_heads=2)


def test_classifier_learns_low_from_high_tones_in_a_few_steps(tmp_path):
    """Two classes a log-mel spectrogram separates at a glance: far above chance within 60 steps (about 4 s)."""
    torch.manual_seed(0)
    _tone_folder(tmp_path, np.random.default_rng(11), {"train": 32, "val": 16})
    dm = AudioFolderDataModule(root=str(tmp_path), sample_rate=8000, batch_size=16)
    model = Classifier(
        _small_audio_encoder(),
        modality="audio",
        num_classes=dm.num_classes,
        group_names=dm.group_names,
        optimizer=lambda params: torch.optim.AdamW(params, lr=3e-3),
        scheduler=None,
    )
    trainer = _fit(dm, model, max_steps=60, num_sanity_val_steps=0)
    [results] = trainer.validate(model, datamodule=dm, verbose=False)
    assert results["val/acc"] >= 0.95, results  # 32 validation clips: at most one wrong


def test_classifier_reads_the_batch_field_named_by_modality_and_keeps_its_text_name():
    assert TextClassifier is Classifier
    torch.manual_seed(0)
    text = TextClassifier(TransformerTextEncoder(dim=16, depth=1, num_heads=2), num_classes=3)
    assert text.modality == "text" and text({"text": ["a b", "c"]}).shape == (2, 3)
    audio = Classifier(_small_audio_encoder(), modality="audio", num_classes=4)
    clips = {"waveform": torch.randn(2, 2000), "lengths": torch.tensor([2000, 1200])}
    assert audio({"audio": clips}).shape == (2, 4)
    with pytest.raises(ConfigError, match=r"modality='text' is not a field of the batch, whose fields are \['audio'"):
        Classifier(_small_audio_encoder(), num_classes=2)({"audio": clips, "label": torch.zeros(2)})


def test_a_sample_rate_the_encoder_does_not_expect_stops_the_fit(tmp_path):
    _tone_folder(tmp_path, np.random.default_rng(12), {"train": 2})
    dm = AudioFolderDataModule(root=str(tmp_path), sample_rate=16000)
    model = Classifier(_small_audio_encoder(sample_rate=8000), modality="audio", num_classes=2)
    with pytest.raises(ConfigError, match=r"encoder expects sample_rate=8000 Hz but the data is at sample_rate=16000"):
        _fit(dm, model, max_steps=1)


def test_without_the_soundfile_package_the_error_names_it_and_the_file(tmp_path, monkeypatch):
    path = tmp_path / "a.wav"
    soundfile.write(path, np.zeros(800, dtype=np.float32), 8000)
    monkeypatch.setitem(sys.modules, "soundfile", None)  # `import soundfile` now raises ImportError
    with pytest.raises(DataError, match=r"a\.wav: reading sound files needs the package soundfile"):
        read_audio(path, sample_rate=8000)


def test_predict_dir_classifies_unlabelled_files_and_the_cli_writes_their_paths(elsewhere):
    root = _tone_folder(elsewhere / "sounds", np.random.default_rng(3), {"train": 3, "test": 1})
    new = elsewhere / "new"
    rng = np.random.default_rng(4)
    for name in ("b.wav", "a.wav", "deeper/c.flac"):
        _write(new / name, _tone(rng, 300, 0.25, 8000), 8000, "PCM_16" if name.endswith("wav") else "PCM_24")
    flags = [f"--data.init_args.root={root}", "--data.init_args.batch_size=2", "--trainer.enable_progress_bar=false"]
    main(["fit", "--config", "audio_folder.yaml", *flags, "--trainer.max_steps=2", "--trainer.default_root_dir=run",
          "--test_after_fit=false"])  # fmt: skip
    checkpoint = next(Path("run").rglob("last.ckpt"))
    main(["predict", "--config", "audio_folder.yaml", *flags, f"--data.init_args.predict_dir={new}",
          f"--ckpt_path={checkpoint}", "--trainer.default_root_dir=pred"])  # fmt: skip
    (path,) = Path("pred").rglob("predictions.jsonl")
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [Path(r["file"]).relative_to(new).as_posix() for r in rows] == ["a.wav", "b.wav", "deeper/c.flac"]
    assert all(r["prediction"] in ("high", "low") and "label" not in r for r in rows)  # unlabelled: no label


def test_a_predict_dir_without_sound_files_is_named(tmp_path):
    root = _tone_folder(tmp_path / "sounds", np.random.default_rng(3), {"train": 2})
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"empty: holds no sound files"):
        AudioFolderDataModule(root=str(root), predict_dir=str(tmp_path / "empty"))
    with pytest.raises(DataError, match=r"predict_dir=.*nowhere.*folder not found"):
        AudioFolderDataModule(root=str(root), predict_dir=str(tmp_path / "nowhere"))
