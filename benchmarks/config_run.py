"""A shipped config trained as a user would (``python -m zoo fit --config NAME``), with a CSV logger: its test metrics,
validation curve, throughput (``zoo.callbacks.ThroughputMonitor``'s, when the config has it) and the wall time of the
command, written as JSON to ``benchmarks/results/config_run_<device>_<date>.json``::

    python benchmarks/config_run.py vqa_gpu.yaml            # H200: bash benchmarks/h200.sh config-run vqa_gpu.yaml
    python benchmarks/config_run.py vqa.yaml --trainer.limit_train_batches=20      # CPU smoke run

``--from-logs DIR`` records the logs of a run made elsewhere (``DIR`` holds its ``metrics.csv``); ``--ran-on`` says
where, since the JSON's ``machine`` is then the one that recorded it.
"""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from _common import write_result  # noqa: E402


def summarize(log_dir: Path) -> dict:
    """From a CSVLogger's ``metrics.csv``: the last value of every test and throughput metric, the validation metrics
    per epoch, and the steps and epochs trained."""
    with open(log_dir / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    last: dict[str, float] = {}
    curve: dict[int, dict[str, float]] = {}
    for row in rows:
        for key, value in row.items():
            if not value or key in ("epoch", "step"):
                continue
            if key.startswith("val/") and row.get("epoch"):
                curve.setdefault(int(row["epoch"]), {})[key] = round(float(value), 4)
            last[key] = float(value)
    kept = ("test/", "train/device/", "train/time", "train/samples")
    return {
        "epochs": max((int(r["epoch"]) for r in rows if r.get("epoch")), default=None),
        "steps": max((int(r["step"]) for r in rows if r.get("step")), default=None),
        "final": {k: round(v, 5) for k, v in sorted(last.items()) if k.startswith(kept)},
        "validation": [{"epoch": e, **m} for e, m in sorted(curve.items())],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="a config of cli_configs/ or a YAML path")
    parser.add_argument("--out-dir", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--work-dir", default="/tmp/zoo_config_run")
    parser.add_argument("--from-logs", default=None, help="record this finished run's log folder instead of training")
    parser.add_argument("--ran-on", default=None, help="with --from-logs: the machine, versions and commit it ran at")
    args, flags = parser.parse_known_args()
    seconds = None
    if args.from_logs:
        log_dir, command = Path(args.from_logs), None
    else:
        work = Path(args.work_dir)
        log_dir = work / "csv" / "version_0"
        logger = [
            "--trainer.logger=lightning.pytorch.loggers.CSVLogger",
            f"--trainer.logger.init_args.save_dir={work}",
            "--trainer.logger.init_args.name=csv",
            "--trainer.logger.init_args.version=0",
            "--trainer.enable_progress_bar=false",
        ]
        command = [sys.executable, "-m", "zoo", "fit", "--config", args.config, *logger, *flags]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
        work.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        with open(work / "fit.log", "w") as out:
            code = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT).returncode
        seconds = round(time.perf_counter() - start, 1)  # the whole command, as a user waits for it
        if code != 0:
            raise SystemExit(f"{args.config} failed ({code}); log: {work / 'fit.log'}")
    payload = {"config": args.config, "flags": flags, "command": command, "seconds": seconds, **summarize(log_dir)}
    if args.from_logs:
        payload["ran_on"] = args.ran_on
        payload["note"] = "recorded from the logs of a run made elsewhere; `machine` is where they were recorded"
    final = payload["final"]
    print({k: v for k, v in final.items() if k.startswith("test/") or k.endswith(("samples_per_sec", "mfu"))})
    print(f"wrote {write_result('config_run', payload, Path(args.out_dir))}")


if __name__ == "__main__":
    main()
