"""What the benchmark scripts share: the machine description, writing results as JSON, starting parallel runs."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = RESULTS.parents[1]


#: environment variables recorded with every result
ENV_THAT_TIMES = ("GLIBC_TUNABLES", "LD_PRELOAD", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "KMP_AFFINITY")


def cpu_model() -> str:
    """The CPU's name, core count and the instruction set torch dispatches to, e.g. ``"AMD EPYC, 2 cores, AVX512"``:
    which CPU ran a result matters (oneDNN's int8 kernels differ between CPUs with AMX and without)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                return f"{name}, {os.cpu_count()} cores, {torch.backends.cpu.get_cpu_capability()}"
    except OSError:
        pass
    return "unknown"


def machine() -> dict:
    """Where a result was measured: host, CPU, GPU, library versions, date."""
    info = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "gpu_count": torch.cuda.device_count(),
        "threads": torch.get_num_threads(),
        # what changes CPU timings from outside the code: the allocator (a glibc that returns every buffer over 32 MB
        # to the OS page-faults it back on each call; docs/qat.md) and the thread settings
        "env": {k: v for k, v in os.environ.items() if k in ENV_THAT_TIMES or k.startswith("MALLOC_")},
    }
    try:
        import lightning

        info["lightning"] = lightning.__version__
    except ImportError:  # pragma: no cover
        pass
    try:
        info["git_commit"] = (
            subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=RESULTS.parent, check=False
            ).stdout.strip()
            or None
        )
    except OSError:  # pragma: no cover
        info["git_commit"] = None
    # the GPU machine gets a copy of the working tree whose .git may be stale or absent: the caller passes the commit
    info["git_commit"] = os.environ.get("ZOO_GIT_COMMIT") or info["git_commit"]
    return info


def device_tag(info: dict) -> str:
    """``h200``, ``gpu`` or ``cpu``: the device part of a result's file name, from a :func:`machine` description."""
    return "h200" if info.get("gpu") and "H200" in info["gpu"] else ("gpu" if info.get("gpu") else "cpu")


def write_result(name: str, payload: dict, out_dir: Path | None = None) -> Path:
    """Write ``payload`` with the machine description to ``<out_dir>/<name>_<device>_<date>.json``."""
    out_dir = Path(out_dir or RESULTS)
    out_dir.mkdir(parents=True, exist_ok=True)
    info = machine()
    path = out_dir / f"{name}_{device_tag(info)}_{info['date'][:10]}.json"
    path.write_text(json.dumps({"machine": info, **payload}, indent=2, default=str))
    return path


def table(rows: list[dict], columns: list[str]) -> str:
    """A plain-text table of ``rows`` restricted to ``columns``."""
    cells = [[str(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)


def training_overrides(args, *extra: str) -> list[str]:
    """The zoo CLI flags of a GPU- or CPU-sized VQA training run, from a benchmark's parsed arguments
    (``epochs``, ``limit_train_batches``, ``precision``, ``batch_size``, ``num_workers``, ``lr``, and optionally
    ``max_time``, ``data_dir`` and ``seed``, the run's ``seed_everything``). ``precision`` defaults to bf16-mixed on
    a GPU and 32-true on the CPU."""
    precision = args.precision or ("bf16-mixed" if torch.cuda.is_available() else "32-true")
    flags = [
        f"--trainer.max_epochs={args.epochs}",
        f"--trainer.limit_train_batches={args.limit_train_batches}",
        "--trainer.val_check_interval=1.0",
        f"--trainer.precision={precision}",
        "--trainer.enable_progress_bar=false",
        *extra,
        f"--data.init_args.batch_size={args.batch_size}",
        f"--data.init_args.num_workers={args.num_workers}",
        f"--model.init_args.optimizer.init_args.lr={args.lr}",
    ]
    if getattr(args, "data_dir", None):
        flags.append(f"--data.init_args.data_dir={args.data_dir}")
    if getattr(args, "max_time", None):
        flags.append(f"--trainer.max_time={args.max_time}")
    if getattr(args, "seed", None) is not None:
        flags.append(f"--seed_everything={args.seed}")
    return flags


def add_training_arguments(parser, *, epochs: int, lr: float = 3e-4, batch_size: int = 256) -> None:
    """The arguments of a benchmark that trains configs through the CLI, read by :func:`training_overrides`, and
    its runs: ``--variant`` (:func:`parse_variants`), ``--parallel``, ``--work-dir``."""
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME=CONFIG[:OVERRIDE,...]",
        help="an extra run: a config plus comma-separated CLI overrides",
    )
    parser.add_argument("--epochs", type=int, default=epochs)
    parser.add_argument("--batch-size", type=int, default=batch_size)
    parser.add_argument("--lr", type=float, default=lr)
    parser.add_argument("--precision", default=None, help="default: bf16-mixed on a GPU, 32-true on the CPU")
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--limit-train-batches", default="1.0")
    parser.add_argument("--max-time", default=None, help="trainer.max_time guard, e.g. 00:00:09:00")
    parser.add_argument("--parallel", action="store_true", help="run all at once, one process each")
    parser.add_argument("--work-dir", default=None, help="checkpoints and logs (default: a folder in --out-dir)")


def parse_variants(specs: list[str]) -> dict[str, tuple[str, list[str]]]:
    """``--variant NAME=CONFIG[:OVERRIDE,...]`` values -> ``{name: (config, overrides)}``; overrides are split at
    the commas that start a new ``--flag``, so that a value may hold commas."""
    runs = {}
    for spec in specs:
        name, _, rest = spec.partition("=")
        config, _, overrides = rest.partition(":")
        runs[name] = (config, [o for o in re.split(r",(?=--)", overrides) if o])
    return runs


def start_runs(
    script: str, runs: dict[str, tuple[str, list[str]]], common: list[str], work: Path, *, parallel: bool
) -> dict[str, tuple[subprocess.Popen, Path]]:
    """Run ``script --run-one CONFIG OUT <common> <overrides>`` for every run (one after another, or all at once
    when ``parallel``), each with its own ``trainer.default_root_dir`` and log in ``work``: the processes and result
    paths :func:`finished_runs` collects."""
    work.mkdir(parents=True, exist_ok=True)
    procs = {}
    for name, (config, overrides) in runs.items():
        out = work / f"{name}.json"
        cmd = [sys.executable, script, "--run-one", config, str(out), *common, *overrides]
        cmd.append(f"--trainer.default_root_dir={work / name}")
        procs[name] = (launch(cmd, work / f"{name}.log", len(procs)), out)
        if not parallel:
            procs[name][0].wait()
    return procs


def launch(cmd: list[str], log: Path, index: int | None) -> subprocess.Popen:
    """Start one run of a benchmark in its own process, stdout and stderr to ``log``, the repository on its path.

    With several GPUs visible (all of the machine's, or those ``CUDA_VISIBLE_DEVICES`` lists), run ``index`` gets
    the ``index mod count``-th, so that parallel runs spread over the GPUs instead of all sharing the first;
    ``index=None`` leaves it every visible GPU (a run that uses several).
    """
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    gpus = visible.split(",") if visible else [str(i) for i in range(torch.cuda.device_count())]
    if index is not None and len(gpus) > 1:
        env["CUDA_VISIBLE_DEVICES"] = gpus[index % len(gpus)]
    with open(log, "w") as out:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)


def finished_runs(
    procs: dict[str, tuple[subprocess.Popen, Path]], work: Path
) -> Iterator[tuple[str, dict | None, list[str]]]:
    """The runs :func:`launch` started (``{name: (process, result JSON path)}``), as each one ends: ``(name, result,
    names still running)``, ``result`` the JSON the run wrote, or ``None`` when it failed (the tail of its log in
    ``work`` goes to stderr). A caller that rewrites its summary after each keeps the figures of the finished runs
    when a time limit kills the call (the device tool ends the whole process group)."""
    pending = dict(procs)
    while pending:
        done = [name for name, (proc, _) in pending.items() if proc.poll() is not None]
        if not done:
            time.sleep(2)
            continue
        for name in done:
            proc, out = pending.pop(name)
            if proc.returncode != 0 or not out.is_file():
                tail = (work / f"{name}.log").read_text()[-3000:]
                print(f"run {name} failed ({proc.returncode}):\n{tail}", file=sys.stderr)
                yield name, None, sorted(pending)
            else:
                yield name, json.loads(out.read_text()), sorted(pending)


class ValidationHistory(Callback):
    """Keeps every validation's ``val/*`` metrics with its epoch and step in ``.history``: the learning curve of a
    benchmark run, written beside its final figures."""

    def __init__(self) -> None:
        self.history: list[dict] = []

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        metrics = {k: round(float(v), 4) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        self.history.append({"epoch": trainer.current_epoch, "step": trainer.global_step, **metrics})


def fit_config(config: str, overrides: list[str]) -> dict:
    """Fit one config through the zoo's CLI in this process: ``{"cli", "model", "data", "trainer", "history"
    (ValidationHistory's), "fit_seconds", "best" (the best checkpoint's path, or "")}``."""
    from zoo.cli import ZooCLI, resolve_config_args

    cli = ZooCLI(args=resolve_config_args(["--config", config, *overrides]), run=False)
    history = ValidationHistory()
    cli.trainer.callbacks.append(history)
    start = time.perf_counter()
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    fit_seconds = time.perf_counter() - start
    checkpoint = cli.trainer.checkpoint_callback
    return {
        "cli": cli, "model": cli.model, "data": cli.datamodule, "trainer": cli.trainer, "history": history,
        "fit_seconds": fit_seconds, "best": checkpoint.best_model_path if checkpoint else "",
    }  # fmt: skip


def fit_and_test(config: str, overrides: list[str], out: Path, *, by_subtype=None) -> None:
    """Fit and test one VQA-style config in this process (``launch`` runs it in its own) and write its figures to
    ``out``: parameters, epochs, fit time, the validation curve, the test metrics of the best checkpoint, and
    ``by_subtype(correct, datamodule)``'s breakdown, ``correct`` a bool array over the test split's questions in
    order."""
    run = fit_config(config, overrides)
    model, data, trainer, best = run["model"], run["data"], run["trainer"], run["best"]
    metrics = trainer.test(model, datamodule=data, ckpt_path=best or None, verbose=False)[0]
    result = {
        "config": config,
        "overrides": overrides,
        "parameters": sum(p.numel() for p in model.parameters()),
        "fusion_parameters": sum(p.numel() for p in model.model.fusion.parameters()),
        "epochs_run": trainer.current_epoch,
        "fit_seconds": round(run["fit_seconds"], 1),
        "best_checkpoint": best,
        "val_history": run["history"].history,
        "test": {k: float(v) for k, v in metrics.items()},
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
    }
    if by_subtype is not None:
        result["test_by_subtype"] = by_subtype(answered_right(model, data), data)
    out.write_text(json.dumps(result, indent=2))


def answered_right(model, data):
    """Whether each question of ``data``'s test split (in order) is answered right by ``model``: bool numpy ``[N]``."""
    from lightning.pytorch.utilities import move_data_to_device

    device = next(model.parameters()).device
    model.eval()
    correct = []
    with torch.no_grad():
        for batch in data.test_dataloader():
            batch = move_data_to_device(batch, device)
            correct.append((model(batch).argmax(-1) == batch["label"]).cpu())
    return torch.cat(correct).numpy()
