"""MIE against the two-tower baseline on Sound Scenes (audio question answering), same data and budget.

Trains ``cli_configs/audio_qa.yaml`` (MIE) and the same config with ``--model.init_args.fusion=zoo.fusion.TwoTower``
through the zoo's CLI, in parallel processes when asked, then prints per run: parameters, test accuracy per question
family (count, exists, pitch, order) and per order template (first, last, after, before), the first epoch whose
validation accuracy reached 95% (how fast each fusion learns the task), wall time.

    python benchmarks/audio_qa.py --epochs 12 --seeds 0 1 --parallel --num-workers 3       # H200: h200.sh audio-qa
    python benchmarks/audio_qa.py --epochs 1 --limit-train-batches 20                        # CPU smoke run
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from _common import (  # noqa: E402
    add_training_arguments,
    finished_runs,
    fit_and_test,
    parse_variants,
    start_runs,
    table,
    training_overrides,
    write_result,
)

# name -> (config, extra overrides)
RUNS = {
    "mie": ("audio_qa.yaml", []),
    "two_tower": ("audio_qa.yaml", ["--model.init_args.fusion=zoo.fusion.TwoTower"]),
}
FAMILIES = ("count", "exists", "pitch", "order")
ORDER_TEMPLATES = ("first", "last", "after", "before")


def accuracy_by_subtype(correct, data) -> dict[str, float]:
    """Test accuracy per order template (``first``, ``last``, ``after``, ``before``); ``correct[i]`` is whether the
    test split's question ``i`` was answered right."""
    import numpy as np

    from datamodules.sound_scenes import QUESTIONS_PER_CLIP

    dataset, scenes = data.test_dataset, data.test_dataset.scenes
    index = np.arange(len(correct))
    clip, q = dataset.clip_indices[index // QUESTIONS_PER_CLIP], index % QUESTIONS_PER_CLIP
    group, subtype = scenes.question_group[clip, q], scenes.question_subtype[clip, q]
    order = group == FAMILIES.index("order")
    return {name: round(float(correct[order & (subtype == t)].mean()), 4) for t, name in enumerate(ORDER_TEMPLATES)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", nargs="*", default=list(RUNS), help=f"which runs, of {list(RUNS)}")
    parser.add_argument(
        "--seeds",
        type=int,
        nargs="*",
        default=None,
        help="run each model once per seed (seed_everything: the "
        "initial weights and the training order; the data set stays the one of the config)",
    )
    add_training_arguments(parser, epochs=12)
    parser.add_argument("--out-dir", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--run-one", nargs=2, metavar=("CONFIG", "OUT"), help=argparse.SUPPRESS)
    args, extra = parser.parse_known_args()
    if args.run_one:
        fit_and_test(args.run_one[0], extra, Path(args.run_one[1]), by_subtype=accuracy_by_subtype)
        return

    common = training_overrides(args)
    runs = {name: RUNS[name] for name in args.runs} | parse_variants(args.variant)
    if args.seeds:
        runs = {
            f"{name}_seed{seed}": (config, [*overrides, f"--seed_everything={seed}"])
            for name, (config, overrides) in runs.items()
            for seed in args.seeds
        }
    work = Path(args.work_dir or Path(args.out_dir) / "audio_qa_runs")
    procs = start_runs(__file__, runs, common, work, parallel=args.parallel)
    results: dict[str, dict] = {}
    for name, result, pending in finished_runs(procs, work):  # the summary is rewritten as each run ends
        if result is not None:
            results[name] = result
        path = _summarize(results, args, common, pending=pending)
    print(f"wrote {path}")


def _summarize(results: dict[str, dict], args, common: list[str], *, pending: list[str]) -> Path:
    """Print the table of the finished runs and write the summary JSON."""
    percent = lambda value: f"{100 * value:.1f}%"  # noqa: E731
    rows = []
    for name, result in results.items():
        test, subtype = result["test"], result.get("test_by_subtype", {})
        rows.append(
            {
                "model": name,
                "params": f"{result['parameters'] / 1e6:.2f}M",
                "overall": percent(test["test/acc"]),
                **{family: percent(test.get(f"test/acc_{family}", float("nan"))) for family in FAMILIES},
                **{f"order: {t}": percent(subtype.get(t, float("nan"))) for t in ORDER_TEMPLATES},
                "epoch val >= 95%": next(
                    (h["epoch"] for h in result["val_history"] if h.get("val/acc", 0) >= 0.95), "-"
                ),
                "epochs": result["epochs_run"],
                "wall": f"{result['fit_seconds']:.0f}s",
            }
        )
    columns = ["model", "params", "overall", *FAMILIES, *(f"order: {t}" for t in ORDER_TEMPLATES)]
    columns += ["epoch val >= 95%", "epochs", "wall"]
    printed = table(rows, columns)
    if pending:
        printed += f"\nstill running: {', '.join(pending)}"
    print(printed, flush=True)
    return write_result(
        "audio_qa", {"settings": vars(args) | {"common": common}, "runs": results, "printed_table": printed},
        Path(args.out_dir),
    )  # fmt: skip


if __name__ == "__main__":
    main()
