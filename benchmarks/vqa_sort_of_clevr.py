"""MIE against the two-tower baseline on Sort-of-CLEVR, trained on the same data with the same budget.

Trains every run through the zoo's CLI configs (``cli_configs/vqa.yaml``, ``vqa_two_tower.yaml``) with GPU-sized
trainer overrides, in parallel processes when asked (several small models share one H200 well), then prints per run:
parameters, relational and non-relational test accuracy, wall time, beside the Relation Networks paper's figures
(Santoro et al. 2017, Sort-of-CLEVR: CNN+RN 94% relational / 99% non-relational; CNN+MLP 63% / 94%).

    python benchmarks/vqa_sort_of_clevr.py --epochs 30 --parallel     # H200
    python benchmarks/vqa_sort_of_clevr.py --epochs 1 --limit-train-batches 20        # CPU smoke run
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

PAPER = {
    "CNN+RN (Santoro et al. 2017)": {"relational": 0.94, "non_relational": 0.99},
    "CNN+MLP (Santoro et al. 2017)": {"relational": 0.63, "non_relational": 0.94},
}
# name -> (config, extra overrides)
RUNS = {
    "mie": ("vqa.yaml", []),
    "two_tower": ("vqa_two_tower.yaml", []),
}


def accuracy_by_subtype(correct, data) -> dict[str, float]:
    """Test accuracy per question template (``shape``, ``left_right``, ..., ``closest``, ``furthest``, ``count``):
    where the relational gap is. ``correct[i]`` is whether the test split's question ``i`` was answered right."""
    import numpy as np

    from datamodules.sort_of_clevr import QUESTIONS_PER_IMAGE

    names = [["shape", "left_right", "top_bottom"], ["closest", "furthest", "count"]]
    dataset = data.test_dataset
    index = np.arange(len(correct))
    image, q = dataset.image_indices[index // QUESTIONS_PER_IMAGE], index % QUESTIONS_PER_IMAGE
    group, subtype = dataset.groups[image, q], dataset.subtype[image, q]
    return {
        names[g][t]: round(float(correct[(group == g) & (subtype == t)].mean()), 4) for g in range(2) for t in range(3)
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", nargs="*", default=list(RUNS), help=f"which runs, of {list(RUNS)}")
    add_training_arguments(parser, epochs=30)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--out-dir", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--run-one", nargs=2, metavar=("CONFIG", "OUT"), help=argparse.SUPPRESS)
    args, extra = parser.parse_known_args()
    if args.run_one:
        fit_and_test(args.run_one[0], extra, Path(args.run_one[1]), by_subtype=accuracy_by_subtype)
        return

    import torch

    precision = args.precision or ("bf16-mixed" if torch.cuda.is_available() else "32-true")
    common = training_overrides(args)
    runs = {name: RUNS[name] for name in args.runs} | parse_variants(args.variant)
    work = Path(args.work_dir or Path(args.out_dir) / "vqa_runs")
    procs = start_runs(__file__, runs, common, work, parallel=args.parallel)
    # Runs are collected as they finish and the summary is rewritten after each, so that a call stopped by a time
    # limit keeps the figures of the runs that finished (the device tool kills the whole process group).
    results: dict[str, dict] = {}
    for name, result, pending in finished_runs(procs, work):
        if result is not None:
            results[name] = result
        path = _summarize(results, args, precision, common, pending=pending)
    print(f"wrote {path}")


def _summarize(results: dict[str, dict], args, precision: str, common: list[str], *, pending: list[str]) -> Path:
    """Print the table of the finished runs beside the paper's figures and write the summary JSON."""
    rows = []
    for name, result in results.items():
        test = result["test"]
        rows.append(
            {
                "model": name,
                "params": f"{result['parameters'] / 1e6:.2f}M",
                "fusion params": f"{result['fusion_parameters'] / 1e6:.2f}M",
                "relational": f"{100 * test.get('test/acc_relational', float('nan')):.1f}%",
                "non-relational": f"{100 * test.get('test/acc_non_relational', float('nan')):.1f}%",
                "overall": f"{100 * test.get('test/acc', float('nan')):.1f}%",
                "epochs": result["epochs_run"],
                "wall": f"{result['fit_seconds']:.0f}s",
            }
        )
    for name, ref in PAPER.items():
        rows.append(
            {
                "model": name,
                "relational": f"{100 * ref['relational']:.0f}%",
                "non-relational": f"{100 * ref['non_relational']:.0f}%",
            }
        )
    columns = ["model", "params", "fusion params", "relational", "non-relational", "overall", "epochs", "wall"]
    printed = table(rows, columns)
    if "mie" in results and "two_tower" in results:
        gap = results["mie"]["test"]["test/acc_relational"] - results["two_tower"]["test"]["test/acc_relational"]
        printed += f"\nMIE - two-tower relational accuracy: {100 * gap:+.1f} points"
    if pending:
        printed += f"\nstill running: {', '.join(pending)}"
    print(printed, flush=True)
    return write_result(
        "vqa_sort_of_clevr",
        {
            "settings": vars(args) | {"precision": precision, "common": common},
            "runs": results,
            "paper": PAPER,
            "printed_table": printed,
        },
        Path(args.out_dir),
    )


if __name__ == "__main__":
    main()
