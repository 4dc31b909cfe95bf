"""Training throughput, MFU and memory of the VQA model across Lightning strategies on one machine's GPUs, side by
side: one device, DDP, FSDP2, tensor parallelism, FSDP2 across tensor-parallel pairs (``fsdp_tp``, 4 devices or
more; Lightning's ``ModelParallelStrategy`` with the zoo's plans, ``zoo.parallel.parallelize``), ``strategy:
adaptive`` (``zoo.parallel.plan.select_parallelism``), and one device or FSDP2 with the micro-batch measured by
``zoo.parallel.batch_adjustment.DynamicBatchAdjustment`` (``single_dba``, ``fsdp_dba``).

Each variant is a ``python -m zoo fit`` of ``vqa.yaml`` widened to ``--width`` / ``--depth`` / ``--heads`` (so that
the GEMMs, not the launch overheads, dominate), in its own processes, one after the other, with
``zoo.callbacks.throughput.ThroughputMonitor`` (samples per second, MFU where Lightning knows the GPU's peak),
Lightning's ``DeviceStatsMonitor`` (peak memory) and a ``last.ckpt`` written at the end, which the parent then reads
back (``weights_only=True``) and checks against the one-device run's: same keys, same full shapes, whatever the
sharding. The per-device batch is ``--batch-size``; a tensor-parallel group shares one batch, so the global batch is
``batch size x data-parallel size``. Writes ``benchmarks/results/parallel_<device>_<date>.json``::

    python benchmarks/parallel.py --devices 2 --peak-flops 989e12   # two H200s: bash benchmarks/h200.sh parallel
    python benchmarks/parallel.py --devices 2 --width 64 --depth 2 --heads 4 --steps 6 --batch-size 8 \\
        --variants single ddp --precision 32-true                    # CPU smoke run (DDP on gloo)
"""

from __future__ import annotations

import argparse
import csv
import functools
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from _common import table, write_result  # noqa: E402


def _strategy(kind: str, devices: int) -> dict | str:
    model_parallel = "lightning.pytorch.strategies.ModelParallelStrategy"
    if kind == "fsdp":
        sizes = {"data_parallel_size": devices, "tensor_parallel_size": 1}
    elif kind == "tp":
        sizes = {"data_parallel_size": 1, "tensor_parallel_size": devices}
    elif kind == "fsdp_tp":  # pairs of devices split each block, FSDP across the pairs
        sizes = {"data_parallel_size": devices // 2, "tensor_parallel_size": 2}
    else:
        return kind
    return {"class_path": model_parallel, "init_args": {**sizes, "save_distributed_checkpoint": False}}


#: variant -> (devices it uses, or None for --devices; trainer.strategy kind)
VARIANTS = {
    "single": (1, "auto"),
    "ddp": (None, "ddp"),
    "fsdp": (None, "fsdp"),
    "tp": (None, "tp"),
    "fsdp_tp": (None, "fsdp_tp"),  # 4 devices or more
    "adaptive": (None, "adaptive"),
    # one device, the micro-batch measured by DynamicBatchAdjustment for --dba-global-batch (probe: --batch-size)
    "single_dba": (1, "auto"),
    "fsdp_dba": (None, "fsdp"),  # the same under FSDP2, each rank probing its shard
}


def _config(args, name: str, devices: int, kind: str, work: Path) -> Path:
    """The YAML that overrides vqa.yaml's trainer for one variant (a file: lists of callbacks and a strategy with
    arguments are clearer there than as flags)."""
    import yaml

    trainer = {
        "devices": devices,
        "strategy": _strategy(kind, devices),
        "precision": args.precision,
        "max_steps": args.steps,
        "max_epochs": -1,
        "limit_train_batches": args.steps,
        "limit_val_batches": 0,
        "num_sanity_val_steps": 0,
        "log_every_n_steps": 1,
        "enable_progress_bar": False,
        "logger": {
            "class_path": "lightning.pytorch.loggers.CSVLogger",
            "init_args": {"save_dir": str(work), "name": name, "version": 0},
        },
        "callbacks": [
            *([_batch_adjustment(args)] if name.endswith("_dba") else []),
            {
                "class_path": "zoo.callbacks.throughput.ThroughputMonitor",
                "init_args": {"window_size": args.window, "peak_flops": args.peak_flops},
            },
            {"class_path": "lightning.pytorch.callbacks.DeviceStatsMonitor", "init_args": {"cpu_stats": False}},
            {
                "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                "init_args": {"dirpath": str(work / name / "checkpoints"), "save_last": True, "save_top_k": 0},
            },
        ],
    }
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"trainer": trainer, "test_after_fit": False}))
    return path


def _batch_adjustment(args) -> dict:
    return {
        "class_path": "zoo.parallel.batch_adjustment.DynamicBatchAdjustment",
        "init_args": {"global_batch_size": args.dba_global_batch},
    }


def _model_flags(args) -> list[str]:
    w, h = args.width, args.heads
    compile_ = "{whole_fusion: true}" if args.whole_fusion else "true"
    return [
        f"--model.init_args.encoders.image.init_args.dim={w}",
        f"--model.init_args.encoders.text.init_args.dim={w}",
        f"--model.init_args.encoders.text.init_args.num_heads={h}",
        f"--model.init_args.fusion.init_args.dim={w}",
        f"--model.init_args.fusion.init_args.depth={args.depth}",
        f"--model.init_args.fusion.init_args.num_heads={h}",
        # vqa.yaml's proportion: the last two thirds of the layers fuse the modalities
        f"--model.init_args.fusion.init_args.modality_fusion_layers={max(1, 2 * args.depth // 3)}",
        f"--data.init_args.batch_size={args.batch_size}",
        f"--data.init_args.num_workers={args.num_workers}",
        *([f"--model.init_args.compile={compile_}"] if args.compile else []),
    ]


def _metrics(path: Path) -> dict:
    """The last logged value of each throughput column, and the largest peak of allocated memory on any step."""
    last, peak = {}, 0.0
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            for key, value in row.items():
                if not value:
                    continue
                if "samples_per_sec" in key or "mfu" in key or "flops_per_sec" in key or "batches_per_sec" in key:
                    last[key] = float(value)
                if key.endswith("allocated_bytes.all.peak"):
                    peak = max(peak, float(value))
    return {"throughput": last, "peak_allocated_gib": round(peak / 2**30, 2) if peak else None}


def _data_parallel_size(run: dict) -> int:
    strategy = run["strategy"]
    if isinstance(strategy, dict):
        return strategy["init_args"]["data_parallel_size"]
    plan = run.get("plan") or ""
    if "tensor parallel" in plan:  # "... (data parallel D x tensor parallel T) ..."
        return int(plan.split("data parallel ")[1].split(" x")[0])
    return run["devices"]


@functools.cache
def _checkpoint_shapes(path: Path) -> dict[str, list[int]]:
    import torch

    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)["state_dict"]
    return {k: list(v.shape) for k, v in state.items()}


def _report(args, runs: dict[str, dict]) -> None:
    """Print the table of the variants run so far and (re)write the JSON result with them."""
    import torch

    reference = runs.get("single", {}).get("checkpoint")
    shapes = _checkpoint_shapes(Path(reference)) if reference else None
    rows = []
    base = None
    for name, run in runs.items():
        if run.get("checkpoint") and shapes is not None:
            run["checkpoint_matches_single"] = _checkpoint_shapes(Path(run["checkpoint"])) == shapes
        measured = run.get("throughput", {})
        per_device = next((v for k, v in measured.items() if k.endswith("device/samples_per_sec")), None)
        # Lightning's global rate multiplies by the world size, but a tensor-parallel group shares its samples
        samples = per_device * _data_parallel_size(run) if per_device else None
        run["samples_per_sec"] = samples
        mfu = next((v for k, v in measured.items() if k.endswith("mfu")), None)
        base = base or (samples if name == "single" else None)
        rows.append(
            {
                "variant": name,
                "devices": run["devices"],
                "samples/s": f"{samples:.0f}" if samples else "failed" if run["returncode"] else "",
                "vs single": f"{samples / base:.2f}x" if samples and base else "",
                "MFU": f"{100 * mfu:.1f}%" if mfu else "",
                "peak GiB": run.get("peak_allocated_gib") or "",
                "checkpoint = single's": run.get("checkpoint_matches_single", ""),
            }
        )
    columns = ["variant", "devices", "samples/s", "vs single", "MFU", "peak GiB", "checkpoint = single's"]
    printed = table(rows, columns) if rows else "no variant ran"
    print(printed)
    params = None
    if shapes:
        params = sum(int(torch.tensor(s).prod()) for s in shapes.values())
    payload = {"settings": vars(args), "parameters_in_checkpoint": params, "runs": runs, "printed_table": printed}
    print(f"wrote {write_result('parallel', payload, Path(args.out_dir))}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), help=f"of {list(VARIANTS)}")
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--depth", type=int, default=8)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--window", type=int, default=40, help="ThroughputMonitor's window (batches)")
    parser.add_argument("--batch-size", type=int, default=128, help="per device")
    parser.add_argument(
        "--peak-flops", type=float, default=None, help="a device's dense peak FLOP/s, for MFU (H200 bf16: 989e12)"
    )
    parser.add_argument("--dba-global-batch", type=int, default=4096, help="the *_dba variants' global batch")
    parser.add_argument("--num-workers", type=int, default=4)
    parser.add_argument("--compile", action="store_true", help="the task's compile: true in every variant")
    parser.add_argument("--whole-fusion", action="store_true",
                        help="with --compile: compile {whole_fusion: true}, MIE one graph under FSDP2 too")  # fmt: skip
    parser.add_argument("--precision", default=None, help="default: bf16-mixed on a GPU, 32-true on the CPU")
    parser.add_argument("--out-dir", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--work-dir", default="/tmp/zoo_parallel")
    args = parser.parse_args()

    import torch

    args.precision = args.precision or ("bf16-mixed" if torch.cuda.is_available() else "32-true")
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    runs: dict[str, dict] = {}
    for name in args.variants:
        devices, kind = VARIANTS[name]
        devices = devices or args.devices
        if kind == "fsdp_tp" and (devices < 4 or devices % 2):
            print(f"variant {name} skipped: it needs an even number of devices, at least 4", file=sys.stderr)
            continue
        shutil.rmtree(work / name, ignore_errors=True)  # a last.ckpt left there would make this run's last-v1.ckpt
        config = _config(args, name, devices, kind, work)
        cmd = [sys.executable, "-m", "zoo", "fit", "--config", "vqa.yaml", "--config", str(config), *_model_flags(args)]
        log = work / f"{name}.log"
        with open(log, "w") as out:
            code = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT).returncode
        text = log.read_text()
        plan = next((line for line in text.splitlines() if "select_parallelism:" in line), None)
        batches = [line for line in text.splitlines() if "DynamicBatchAdjustment" in line and "micro-batch" in line]
        run = {"devices": devices, "strategy": _strategy(kind, devices), "returncode": code, "plan": plan}
        run["batch_plan"] = batches[-1] if batches else None
        if code != 0:
            print(f"variant {name} failed ({code}):\n{text[-3000:]}", file=sys.stderr)
            runs[name] = run | {"log_tail": text[-3000:]}
            _report(args, runs)
            continue
        run |= _metrics(work / name / "version_0" / "metrics.csv")
        last = work / name / "checkpoints" / "last.ckpt"
        run["checkpoint"] = str(last) if last.is_file() else None
        runs[name] = run
        # after every variant, so that a run cut short (a device call's time limit) keeps what it measured
        _report(args, runs)


if __name__ == "__main__":
    main()
