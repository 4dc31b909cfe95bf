"""What ``audio_folder.yaml`` costs on ESC-50-shaped files: decoding a clip, and a training step of the shipped config.

Writes a class-folder set of synthetic clips shaped like ESC-50's (5 s, 44.1 kHz, 16-bit mono WAV; tones and noise,
so nothing is downloaded), then times, in this process: ``read_audio`` of every clip (decode and resample to 16 kHz),
and ``python -m zoo fit --config audio_folder.yaml`` on it for a few epochs through the CLI's classes (steps of 32
clips, decoding included, as the loader does it with ``num_workers: 0``). Prints a table, writes JSON to
``benchmarks/results/audio_folder_<device>_<date>.json``; the ESC-50 epoch it quotes (1,200 training clips, folds 1-3
of 5) is computed from the measured step, not run.

    python benchmarks/audio_folder.py                   # about 15 s on a 2-core CPU
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from _common import fit_config, table, write_result  # noqa: E402

ESC50_TRAIN_CLIPS = 1200


def write_clips(root: Path, classes: int, per_class: int, seconds: float, rate: int, seed: int = 0) -> list[Path]:
    """``root/train/class<k>/<i>.wav``: a tone of the class's pitch in noise, 16-bit PCM."""
    import soundfile

    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    files = []
    for k in range(classes):
        folder = root / "train" / f"class{k}"
        folder.mkdir(parents=True)
        for i in range(per_class):
            tone = 0.3 * np.sin(2 * np.pi * (200 + 150 * k) * t + rng.uniform(0, 6))
            wave = tone + 0.05 * rng.standard_normal(len(t))
            files.append(folder / f"{i}.wav")
            soundfile.write(files[-1], wave.astype(np.float32), rate, subtype="PCM_16")
    return files


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--classes", type=int, default=8)
    parser.add_argument("--per-class", type=int, default=48)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rate", type=int, default=44100)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--out-dir", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args()

    from datamodules._audio import read_audio

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "clips"
        files = write_clips(root, args.classes, args.per_class, args.seconds, args.rate)
        decode_ms = []
        for path in files:
            start = time.perf_counter()
            read_audio(path, sample_rate=16000)
            decode_ms.append(1e3 * (time.perf_counter() - start))
        overrides = [
            f"--data.init_args.root={root}",
            f"--trainer.max_epochs={args.epochs}",
            "--trainer.enable_progress_bar=false",
            "--trainer.logger=false",
            "--trainer.enable_checkpointing=false",
            "--trainer.callbacks=[]",
            f"--trainer.default_root_dir={tmp}/run",
            "--test_after_fit=false",
        ]
        run = fit_config("audio_folder.yaml", overrides)
        steps = run["trainer"].global_step
        batch_size = run["data"].batch_size
    epoch_steps = steps / args.epochs
    # the whole fit over its steps: set-up and the first epoch's compile-free warm-up included, so an upper bound
    step_seconds = run["fit_seconds"] / steps
    esc50_epoch = step_seconds * ESC50_TRAIN_CLIPS / batch_size
    rows = [
        {"what": f"decode + resample a {args.seconds:g} s clip at {args.rate} Hz to 16 kHz (median of {len(files)})",
         "value": f"{statistics.median(decode_ms):.1f} ms"},
        {"what": f"training step of {batch_size} clips, decoding included ({steps} steps, {args.epochs} epochs)",
         "value": f"{step_seconds:.3f} s"},
        {"what": f"an ESC-50 epoch ({ESC50_TRAIN_CLIPS} training clips), computed from the step",
         "value": f"{esc50_epoch:.0f} s"},
    ]  # fmt: skip
    printed = table(rows, ["what", "value"])
    print(printed)
    path = write_result(
        "audio_folder",
        {
            "settings": vars(args) | {"batch_size": batch_size, "epoch_steps": epoch_steps},
            "decode_ms": {"median": statistics.median(decode_ms), "all": [round(v, 2) for v in decode_ms]},
            "fit_seconds": run["fit_seconds"],
            "steps": steps,
            "step_seconds": step_seconds,
            "esc50_epoch_seconds_computed": esc50_epoch,
            "printed_table": printed,
        },
        Path(args.out_dir),
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
