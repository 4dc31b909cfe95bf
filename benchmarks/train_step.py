"""Training-step time of a CLI config, eager against ``compile: true`` (and any other variant), side by side.

Each variant runs in its own process (compiled code and caches do not leak between them): the train loader alone
for ``--steps`` batches (batches per second: can the data keep up?), then ``trainer.fit`` for ``--steps`` optimizer
steps without validation; the step time is the median interval between consecutive ``on_train_batch_end`` calls
over the second half of the steps (after warm-up and compilation), so it is the steady-state throughput of the whole
loop (loader, forward, backward, optimizer, Lightning's hooks).

    python benchmarks/train_step.py --steps 200                                   # H200: vqa.yaml, bf16, batch 256
    python benchmarks/train_step.py --steps 20 --batch-size 16 --precision 32-true   # CPU smoke run

Other arguments are CLI overrides given to every variant, e.g. ``--model.init_args.fusion.init_args.depth=8``.

``--profile-steps N`` runs N more steps under ``torch.profiler`` and reports, per step, the device's kernel time
against the wall time, the host-device synchronizations and the top host operators and device kernels.
``--sync-steps N`` runs N more steps under torch's CUDA sync debug mode and counts the synchronizations per step by
the Python line that caused them.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
import traceback
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from _common import launch, table, write_result  # noqa: E402

# name -> extra CLI overrides
VARIANTS = {
    "eager": [],
    "compile": ["--model.init_args.compile=true"],
    # compile_regions(whole_fusion=False), the default until 2026-11-29: the fusion module's blocks one by one
    "compile_blocks": ["--model.init_args.compile={whole_fusion: false}"],
    "compile_fused_adamw": ["--model.init_args.compile=true", "--model.init_args.optimizer.init_args.fused=true"],
}


def step_profile(prof, steps: int, wall_ms: float) -> dict:
    """Per optimizer step, from a ``torch.profiler`` trace of ``steps`` steps: the device's kernel time against the
    wall time (what is left is the host: Python, Lightning, launches, waits), the calls that may wait for the device
    (``cudaStreamSynchronize`` and the like do; ``aten::item`` does on a device tensor only, and AdamW reads its
    step counts, CPU tensors, that way; ``cudaMemcpyAsync`` does from pageable memory), and the top host operators
    and device kernels by self time. Lightning runs the forward and backward inside
    ``optimizer.step(closure)``, so the ``Optimizer.step`` range's host self time holds their Python too."""
    from torch.autograd import DeviceType

    events = prof.key_averages()

    def per_step(us: float) -> float:
        return round(us / 1e3 / steps, 3)

    host = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)
    # kernels and copies only: a host range (Optimizer.step, Lightning's) has a device twin that spans its kernels
    ranges = {e.key for e in events if e.device_type == DeviceType.CPU}
    device = sorted(
        (e for e in events if e.device_type == DeviceType.CUDA and e.key not in ranges and e.self_device_time_total),
        key=lambda e: -e.self_device_time_total,
    )
    syncs = {
        e.key: e.count / steps
        for e in events
        if e.key in ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "aten::item",
                     "aten::_local_scalar_dense", "cudaMemcpyAsync")
    }  # fmt: skip
    kernel_ms = per_step(sum(e.self_device_time_total for e in device))
    # collectives (FSDP2's all-gathers and reduce-scatters, DDP's all-reduces) run on streams of their own, beside
    # the compute kernels: the compute kernels' time against the wall time is what the device spent computing
    comm_ms = per_step(sum(e.self_device_time_total for e in device if e.key.lower().startswith("nccl")))
    compute_ms = round(kernel_ms - comm_ms, 3)
    return {
        "steps": steps,
        "wall_ms_per_step": round(wall_ms, 2),
        "device_kernel_ms_per_step": kernel_ms,
        "device_busy_fraction": round(kernel_ms / wall_ms, 3) if kernel_ms and wall_ms else None,
        "collective_kernel_ms_per_step": comm_ms,
        "compute_kernel_ms_per_step": compute_ms,
        "compute_busy_fraction": round(compute_ms / wall_ms, 3) if compute_ms and wall_ms else None,
        "host_syncs_per_step": syncs,
        "top_host_ops_ms": {e.key: per_step(e.self_cpu_time_total) for e in host[:20]},
        "top_device_kernels_ms": {e.key[:120]: per_step(e.self_device_time_total) for e in device[:15]},
    }


def run_one(
    config: str, overrides: list[str], steps: int, out: Path, profile_steps: int = 0, sync_steps: int = 0
) -> None:
    """Time the loader and the training loop of one variant in this process; write the figures to ``out``. Of the
    ``steps``, the last ``profile_steps + sync_steps`` stay out of the timed median: ``profile_steps`` run under
    ``torch.profiler`` (:func:`step_profile` summarises them), then ``sync_steps`` under torch's CUDA sync debug mode,
    which names the Python line of every host-device synchronization (:class:`SyncSites`)."""
    import torch
    from lightning.pytorch.callbacks import Callback

    from zoo.cli import ZooCLI, resolve_config_args

    class StepClock(Callback):
        def __init__(self) -> None:
            self.times: list[float] = []

        def on_train_batch_end(self, *args, **kwargs) -> None:
            self.times.append(time.perf_counter())

    class StepProfiler(Callback):
        """Profiles the optimizer steps ``first`` to ``last`` (0-based, ``last`` excluded)."""

        def __init__(self, first: int, last: int) -> None:
            self.first, self.last, self.prof, self.start, self.wall = first, last, None, 0.0, 0.0
            self.running = False

        def on_train_batch_start(self, trainer, *args, **kwargs) -> None:
            if trainer.global_step == self.first and self.prof is None:
                from torch.profiler import ProfilerActivity, profile

                activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
                self.prof = profile(activities=activities)
                self.prof.start()
                self.start, self.running = time.perf_counter(), True
            elif trainer.global_step == self.last:
                self.stop()

        def on_train_end(self, trainer, *args, **kwargs) -> None:
            self.stop()

        def stop(self) -> None:
            if self.running:
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                self.wall = time.perf_counter() - self.start
                self.prof.stop()
                self.running = False

    class SyncSites(Callback):
        """From step ``first`` on, counts the host-device synchronizations by the Python line that caused them:
        torch's CUDA sync debug mode warns at each, and the innermost frame outside torch names it (the innermost
        frame where all are torch's, as in its own threads; "no frame" where there is no Python stack)."""

        def __init__(self, first: int) -> None:
            self.first, self.steps, self.sites, self.on = first, 0, {}, False

        def on_train_batch_start(self, trainer, *args, **kwargs) -> None:
            if trainer.global_step == self.first and not self.on:
                self.shown, warnings.showwarning = warnings.showwarning, self.record
                warnings.filterwarnings("always", message=".*synchroniz.*")
                torch.cuda.set_sync_debug_mode("warn")
                self.on = True

        def on_train_batch_end(self, *args, **kwargs) -> None:
            self.steps += self.on

        def on_train_end(self, *args, **kwargs) -> None:
            if self.on:
                torch.cuda.set_sync_debug_mode(0)
                warnings.showwarning = self.shown

        def record(self, message, category, filename, lineno, file=None, line=None) -> None:
            if "synchroniz" not in str(message):
                return self.shown(message, category, filename, lineno, file, line)
            stack = [
                f for f in traceback.extract_stack()[:-1] if not f.filename.endswith(("warnings.py", "train_step.py"))
            ]
            outside = [f for f in stack if "/torch/" not in f.filename]
            where = (outside or stack or [None])[-1]  # a thread of torch's own: its innermost frame
            site = f"{where.filename.split('site-packages/')[-1]}:{where.lineno} {where.name}" if where else "no frame"
            thread = threading.current_thread().name
            site += "" if thread == "MainThread" else f" (thread {thread})"
            self.sites[site] = self.sites.get(site, 0) + 1

        def per_step(self) -> dict[str, float]:
            ranked = sorted(self.sites.items(), key=lambda kv: -kv[1])
            return {site: round(count / max(1, self.steps), 2) for site, count in ranked}

    cli = ZooCLI(args=resolve_config_args(["--config", config, *overrides]), run=False)
    model, data, trainer = cli.model, cli.datamodule, cli.trainer
    data.prepare_data()
    data.setup("fit")
    loader = data.train_dataloader()
    timed_batches = min(steps, len(loader)) - 1  # one epoch at most: a large batch makes short epochs
    loader = iter(loader)
    batch_size = len(next(loader)["label"])
    first = time.perf_counter()
    for _ in range(timed_batches):
        next(loader)
    loader_rate = timed_batches / (time.perf_counter() - first)
    del loader
    clock = StepClock()
    trainer.callbacks.append(clock)
    profiler = StepProfiler(steps - profile_steps - sync_steps, steps - sync_steps) if profile_steps else None
    syncs = SyncSites(steps - sync_steps) if sync_steps and torch.cuda.is_available() else None
    trainer.callbacks += [c for c in (profiler, syncs) if c is not None]
    start = time.perf_counter()
    trainer.fit(model, datamodule=data)
    fit_seconds = time.perf_counter() - start
    # the profiler's and the sync debug mode's overheads stay out of the step time
    timed = clock.times[: len(clock.times) - profile_steps - sync_steps]
    gaps = [b - a for a, b in zip(timed, timed[1:], strict=False)]
    steady = gaps[len(gaps) // 2 :]
    step = statistics.median(steady)
    result = {
        "overrides": overrides,
        "batch_size": batch_size,
        "steps": len(clock.times),
        "loader_batches_per_s": round(loader_rate, 1),
        "step_ms": round(1e3 * step, 2),
        "step_ms_p10_p90": [round(1e3 * q, 2) for q in statistics.quantiles(steady, n=10)[::8]],
        "samples_per_s": round(batch_size / step, 1),
        "world_size": trainer.world_size,
        "global_samples_per_s": round(trainer.world_size * batch_size / step, 1),
        "first_step_s": round(clock.times[0] - start, 1),
        "fit_seconds": round(fit_seconds, 1),
        "compiled_regions": getattr(model, "compiled_regions", []),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
    }
    if profiler and profiler.prof is not None:
        result["profile"] = step_profile(profiler.prof, profile_steps, 1e3 * profiler.wall / profile_steps)
    if syncs is not None:
        result["sync_sites_per_step"] = syncs.per_step()
    if trainer.global_rank == 0:  # under a multi-device strategy Lightning runs this function on every rank
        out.write_text(json.dumps(result, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="vqa.yaml")
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), help=f"of {list(VARIANTS)}")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--precision", default=None, help="default: bf16-mixed on a GPU, 32-true on the CPU")
    parser.add_argument("--out-dir", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--work-dir", default="/tmp/zoo_train_step")
    parser.add_argument(
        "--profile-steps",
        type=int,
        default=0,
        help="profile this many steps after the timed ones (torch.profiler): device kernel time against wall time, "
        "host-device synchronizations, top host operators and device kernels per step",
    )
    parser.add_argument(
        "--sync-steps",
        type=int,
        default=0,
        help="run this many steps more under torch's CUDA sync debug mode: host-device synchronizations per step, "
        "by the Python line that caused them",
    )
    parser.add_argument("--run-one", nargs=3, metavar=("CONFIG", "STEPS", "OUT"), help=argparse.SUPPRESS)
    args, extra = parser.parse_known_args()
    if args.run_one:
        run_one(
            args.run_one[0], extra, int(args.run_one[1]), Path(args.run_one[2]), args.profile_steps, args.sync_steps
        )
        return

    import torch

    precision = args.precision or ("bf16-mixed" if torch.cuda.is_available() else "32-true")
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    total = args.steps + args.profile_steps + args.sync_steps
    common = [
        f"--trainer.max_steps={total}",
        "--trainer.max_epochs=-1",
        f"--trainer.limit_train_batches={total}",
        "--trainer.limit_val_batches=0",
        "--trainer.enable_checkpointing=false",
        "--trainer.enable_progress_bar=false",
        "--trainer.logger=false",
        "--trainer.callbacks=[]",
        f"--trainer.precision={precision}",
        f"--trainer.default_root_dir={work}",
        f"--data.init_args.batch_size={args.batch_size}",
        f"--data.init_args.num_workers={args.num_workers}",
    ]
    results, rows = {}, []
    for name in args.variants:
        out = work / f"{name}.json"
        out.unlink(missing_ok=True)
        cmd = [sys.executable, __file__, "--run-one", args.config, str(total), str(out),
               f"--profile-steps={args.profile_steps}", f"--sync-steps={args.sync_steps}",
               *common, *extra, *VARIANTS[name]]  # fmt: skip
        proc = launch(cmd, work / f"{name}.log", None)  # one variant at a time: every GPU (--trainer.devices=N)
        proc.wait()
        if proc.returncode != 0 or not out.is_file():
            print(f"variant {name} failed:\n{(work / f'{name}.log').read_text()[-3000:]}", file=sys.stderr)
            continue
        results[name] = json.loads(out.read_text())
    if not results:
        raise SystemExit("every variant failed (their logs are in the work dir)")
    base = results.get("eager", {}).get("step_ms")
    for name, r in results.items():
        rows.append(
            {
                "variant": name,
                "step ms": f"{r['step_ms']:.1f}",
                "samples/s": f"{r['global_samples_per_s']:.0f}",
                "vs eager": f"{base / r['step_ms']:.2f}x" if base else "",
                "loader batches/s": f"{r['loader_batches_per_s']:.0f}",
                "first step s": f"{r['first_step_s']:.0f}",
                "device busy": f"{busy:.0%}" if (busy := r.get("profile", {}).get("device_busy_fraction")) else "",
                "compute busy": f"{busy:.0%}" if (busy := r.get("profile", {}).get("compute_busy_fraction")) else "",
                "collectives ms": r.get("profile", {}).get("collective_kernel_ms_per_step", ""),
            }
        )
    columns = ["variant", "step ms", "samples/s", "vs eager", "loader batches/s", "first step s"]
    printed = table(rows, columns + (["device busy", "compute busy", "collectives ms"] if args.profile_steps else []))
    print(printed)
    path = write_result(
        f"train_step_{Path(args.config).stem}",
        {
            "settings": vars(args) | {"precision": precision, "overrides": extra},
            "runs": results,
            "printed_table": printed,
        },
        Path(args.out_dir),
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
