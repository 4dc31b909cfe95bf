"""Every config shipped in cli_configs/ instantiates and runs one batch of fit (and test) through the CLI."""

from __future__ import annotations

from importlib import resources

import numpy as np
import pytest
from tiny_vqa import TINY_SORT_OF_CLEVR

from zoo.cli import main

CONFIGS = sorted(p.name for p in resources.files("cli_configs").iterdir() if p.name.endswith(".yaml"))


def _small_audio_folder(tmp_path) -> list[str]:
    """Two classes of tones in the folder layout, 4 training and 2 validation/test clips each, 0.2 s at 8 kHz."""
    import soundfile

    rng = np.random.default_rng(0)
    for split, n in (("train", 4), ("val", 2), ("test", 2)):
        for label, hz in (("low", 300), ("high", 2000)):
            folder = tmp_path / "audio" / split / label
            folder.mkdir(parents=True)
            for i in range(n):
                t = np.arange(1600) / 8000
                wave = 0.5 * np.sin(2 * np.pi * hz * t + rng.uniform(0, 6)) + 0.05 * rng.standard_normal(len(t))
                soundfile.write(folder / f"{i}.wav", wave.astype(np.float32), 8000)
    return [f"--data.init_args.root={tmp_path / 'audio'}", "--data.init_args.batch_size=4"]


# Small data for each datamodule the configs use: the same code paths, sized for a CPU test; a function writes the
# data under the test's folder and returns the flags.
SMALL_DATA = {
    "datamodules.sort_of_clevr.SortOfCLEVRDataModule": [*TINY_SORT_OF_CLEVR, "--data.init_args.batch_size=8"],
    "datamodules.wordnet_supersense.WordNetSupersenseDataModule": [
        "--data.init_args.max_train_per_class=6",
        "--data.init_args.val_per_class=2",
        "--data.init_args.test_per_class=2",
        "--data.init_args.batch_size=8",
    ],
    "datamodules.sound_scenes.SoundScenesDataModule": [
        "--data.init_args.num_clips=12",
        "--data.init_args.val_clips=2",
        "--data.init_args.test_clips=2",
        "--data.init_args.batch_size=8",
    ],
    "datamodules.audio_folder.AudioFolderDataModule": _small_audio_folder,
}


def test_every_config_is_covered():
    assert {"vqa.yaml", "vqa_two_tower.yaml"} <= set(CONFIGS)
    for name in CONFIGS:
        text = resources.files("cli_configs").joinpath(name).read_text()
        assert text.startswith("#"), f"{name} must say in a comment what it trains and how long it takes"
        assert any(cls in text for cls in SMALL_DATA), f"{name}: add its datamodule's small settings to SMALL_DATA"


@pytest.mark.parametrize("name", CONFIGS)
def test_config_runs_fast_dev_run(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ZOO_DATA_DIR", str(tmp_path / "data"))
    text = resources.files("cli_configs").joinpath(name).read_text()
    data_args = next(args for cls, args in SMALL_DATA.items() if cls in text)
    data_args = data_args(tmp_path) if callable(data_args) else data_args
    # one device: `devices: auto` on a machine with several GPUs would launch DDP, whose launcher runs this process's
    # command line (pytest) again in each new rank
    args = ["--trainer.fast_dev_run=true", "--trainer.devices=1", "--trainer.enable_progress_bar=false", *data_args]
    main(["fit", "--config", name, *args])
