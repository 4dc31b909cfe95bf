"""Several seeds of shipped configs, side by side: mean and standard deviation of the test metrics that
``benchmarks/config_run.py`` recorded, per labelled group of its JSONs, and each group's difference from the first::

    python benchmarks/config_seeds.py plain='runs/plain_s*/*.json' ddae='runs/ddae_s*/*.json' --wordnet-groups

``--wordnet-groups`` adds, for the WordNet supersense configs, the F1 of each frequency group (``f1_head``,
``f1_medium``, ``f1_tail``: the mean test F1 of the classes of that third, as ``benchmarks/ddae.py``'s tail F1) from
the per-class ``test/f1/<class>`` of each run. Writes ``benchmarks/results/config_seeds_<device>_<date>.json`` (the
device and date of the runs, from the first JSON) with every run's figures, or ``--out``.
"""

from __future__ import annotations

import argparse
import glob
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from _common import device_tag, table  # noqa: E402

SHOWN = ("test/macro_f1", "f1_tail", "test/acc_head", "test/acc", "seconds", "steps")


def wordnet_groups() -> dict[str, str]:
    """``{class name: "head" | "medium" | "tail"}`` of the WordNet supersense training split (its defaults)."""
    from datamodules.ddae.datamodule import GROUP_NAMES, frequency_groups
    from datamodules.wordnet_supersense import WordNetSupersenseDataModule

    dm = WordNetSupersenseDataModule()
    labels = dm.load_splits().train[1]
    groups = frequency_groups(np.bincount(labels, minlength=dm.num_classes))
    return {name: GROUP_NAMES[g] for name, g in zip(dm.class_names, groups, strict=True)}


def figures(run: dict, groups: dict[str, str] | None) -> dict[str, float]:
    """The scalar test metrics of one config_run JSON (in %, but for seconds and steps), plus group F1."""
    out = {k: 100 * v for k, v in run["final"].items() if k.startswith("test/") and not k.startswith("test/f1/")}
    out["test/loss"] = run["final"].get("test/loss", float("nan"))
    out["seconds"], out["steps"] = run["seconds"], run["steps"]
    if groups:
        per_class = {k.removeprefix("test/f1/"): v for k, v in run["final"].items() if k.startswith("test/f1/")}
        if set(per_class) != set(groups):
            raise SystemExit(f"{run['config']}: its classes are not the WordNet supersenses of --wordnet-groups")
        for group in dict.fromkeys(groups.values()):
            out[f"f1_{group}"] = 100 * float(np.mean([v for c, v in per_class.items() if groups[c] == group]))
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("groups", nargs="+", help="LABEL=GLOB of config_run JSONs, one per seed")
    p.add_argument("--wordnet-groups", action="store_true", help="add f1_head/f1_medium/f1_tail (see above)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    groups = wordnet_groups() if args.wordnet_groups else None
    runs: dict[str, list[dict]] = {}
    for spec in args.groups:
        label, _, pattern = spec.partition("=")
        paths = sorted(glob.glob(pattern))
        if not label or not paths:
            raise SystemExit(f"{spec!r}: want LABEL=GLOB matching config_run JSONs")
        runs[label] = [json.loads(Path(path).read_text()) | {"path": path} for path in paths]
    summary, rows, base = {}, [], None
    for label, members in runs.items():
        each = [figures(run, groups) for run in members]
        mean = {k: float(np.mean([e[k] for e in each])) for k in each[0]}
        std = {k: float(np.std([e[k] for e in each])) for k in each[0]}
        base = base or mean
        summary[label] = {
            "runs": [
                {"path": run["path"], "config": run["config"], "flags": run["flags"], **e}
                for run, e in zip(members, each, strict=True)
            ],
            "mean": mean,
            "std": std,
            "minus_first": {k: mean[k] - base[k] for k in mean},
        }
        row = {"run": f"{label} (n={len(each)})"}
        for k in SHOWN:
            if k in mean:
                row[k] = f"{mean[k]:.2f} ± {std[k]:.2f}" + (f" ({mean[k] - base[k]:+.2f})" if mean is not base else "")
        rows.append(row)
    text = table(rows, ["run", *[k for k in SHOWN if k in rows[0]]])
    print(text)
    first = next(iter(runs.values()))[0]["machine"]
    name = f"config_seeds_{device_tag(first)}_{first['date'][:10]}.json"
    out = Path(args.out or ROOT / "benchmarks" / "results" / name)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": first, "groups": summary, "table": text}, indent=2) + "\n")
    print(f"wrote {out}")
    return summary


if __name__ == "__main__":
    main()
