"""Runs of ``benchmarks/ddae.py`` on the same seeds, each against a base run: per metric, the mean over the seeds of
(the run of seed s) minus (the base run of seed s), with its standard error, and which of the issue's targets
(macro-F1 +3, tail F1 +5, head accuracy -1 at most) the mean meets::

    python benchmarks/ddae_paired.py plain=results/x_plain.json c=results/x_augment_only.json d=results/x_d.json#d

Each argument is ``LABEL=PATH`` or ``LABEL=PATH#VARIANT`` (the variant letter, a-e, for a JSON that holds several);
the first is the base. Pairing seed by seed removes what a seed does to every variant alike, so the standard errors
are smaller than the spread of either run. The runs must share their seeds and corpus. Writes
``benchmarks/results/ddae_paired_<device>_<date>.json`` (the base's device and date), or ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from _common import device_tag, table  # noqa: E402
from ddae import TARGETS  # noqa: E402

METRICS = ("macro_f1", "tail_f1", "head_acc", "acc")


def load_run(spec: str) -> tuple[str, dict]:
    """``LABEL=PATH[#VARIANT]`` -> ``(label, run)``: the run's test metrics per seed, its seeds, corpus and source."""
    label, _, where = spec.partition("=")
    path, _, variant = where.partition("#")
    if not label or not path:
        raise SystemExit(f"{spec!r}: want LABEL=PATH or LABEL=PATH#VARIANT (a ddae.py JSON)")
    try:
        result = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise SystemExit(f"{label}: cannot read {path}: {err}") from None
    runs = result.get("runs")
    if not isinstance(runs, dict) or not runs:
        raise SystemExit(f"{label}: {path} holds no ddae.py runs")
    if not variant:
        if len(runs) > 1:
            raise SystemExit(f"{label}: {path} holds variants {sorted(runs)}: name one, as {path}#{sorted(runs)[0]}")
        variant = next(iter(runs))
    if variant not in runs:
        raise SystemExit(f"{label}: {path} has no variant {variant!r} (it has {sorted(runs)})")
    run, arguments = runs[variant], result["arguments"]
    first = int(arguments.get("first_seed", 0))  # JSONs written before --first-seed ran seeds 0..n-1
    return label, {
        "path": path,
        "variant": variant,
        "seeds": list(range(first, first + len(run["per_seed"]))),
        "corpus": result.get("corpus"),
        "per_seed": {m: np.array([s[m] for s in run["per_seed"]], dtype=np.float64) for m in METRICS},
        "val_macro_f1": run.get("val_mean", {}).get("macro_f1"),
        "environment": result.get("environment", {}),
        "date": result.get("date", ""),
    }


def paired(base: dict, run: dict) -> dict[str, dict[str, float]]:
    """Per metric: the mean difference from ``base`` over the shared seeds, its standard error (0 for one seed) and
    the smallest difference of a seed."""
    out = {}
    for m in METRICS:
        diff = run["per_seed"][m] - base["per_seed"][m]
        se = float(diff.std(ddof=1) / np.sqrt(len(diff))) if len(diff) > 1 else 0.0
        out[m] = {"mean": float(diff.mean()), "se": se, "min": float(diff.min())}
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="LABEL=PATH[#VARIANT]; the first is the base")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    runs = dict(load_run(spec) for spec in args.runs)
    if len(runs) != len(args.runs):
        raise SystemExit("every run needs its own label")
    (base_label, base), *others = runs.items()
    for label, run in others:
        if run["seeds"] != base["seeds"]:
            raise SystemExit(f"{label}: seeds {run['seeds']}, but the base {base_label} ran {base['seeds']}")
        if run["corpus"] != base["corpus"]:
            raise SystemExit(f"{label}: its corpus differs from the base {base_label}'s")
    rows = [{"run": f"{base_label} (n={len(base['seeds'])})"}]
    for m in METRICS:
        rows[0][m] = f"{base['per_seed'][m].mean():.2f} ± {base['per_seed'][m].std():.2f}"
    rows[0]["val macro-F1"] = f"{base['val_macro_f1']:.2f}" if base["val_macro_f1"] is not None else ""
    summary: dict = {"base": base_label, "seeds": base["seeds"], "runs": {}}
    for label, run in runs.items():
        entry = {k: run[k] for k in ("path", "variant", "val_macro_f1")}
        entry["mean"] = {m: float(run["per_seed"][m].mean()) for m in METRICS}
        entry["std"] = {m: float(run["per_seed"][m].std()) for m in METRICS}
        if run is not base:
            entry["minus_base"] = paired(base, run)
            entry["targets_met"] = [m for m, least in TARGETS.items() if entry["minus_base"][m]["mean"] >= least]
            row = {"run": label}
            row.update({m: f"{d['mean']:+.2f} ± {d['se']:.2f}" for m, d in entry["minus_base"].items()})
            row["val macro-F1"] = f"{run['val_macro_f1']:.2f}" if run["val_macro_f1"] is not None else ""
            row["targets met"] = ", ".join(entry["targets_met"]) or "none"
            rows.append(row)
        summary["runs"][label] = entry
    columns = ["run", *METRICS, "val macro-F1"] + (["targets met"] if others else [])
    text = table(rows, columns)
    print(text)
    name = f"ddae_paired_{device_tag(base['environment'])}_{base['date'][:10] or 'undated'}.json"
    out = Path(args.out or ROOT / "benchmarks" / "results" / name)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"environment": base["environment"], **summary, "table": text}, indent=2) + "\n")
    print(f"wrote {out}")
    return summary


if __name__ == "__main__":
    main()
