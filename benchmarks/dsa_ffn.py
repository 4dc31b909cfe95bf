"""DSA FFN benchmarks: (a) layer level, dense FFN against the DSA FFN that skips blocks; (b) model level, VQA.

(a) ``--mode layer`` (default). Dense ``FeedForward`` and ``DSAFeedForward`` with the same ``fc1``/``fc2`` weights, at
active fractions 1.0, 0.5, 0.4, 0.25, side by side in one process: median latency, achieved TFLOP/s counting only the
FLOPs actually done (the DSA layer's selected blocks plus its gate), speed-up over the dense FFN of the same run, and
the FLOP reduction. On a GPU in bf16 (CUDA events through ``triton.testing.do_bench``, medians after warm-up), on the
CPU in fp32 (wall clock, medians of interleaved repeats) at smaller shapes, since a 2-core CPU would need minutes per
point at the largest one. Correctness is checked in the same run: the sparse output against an fp32 dense reference on
the same selection. Variants:

* ``dense``: ``FeedForward`` (``fc2(gelu(fc1(x)))``), cuBLAS / MKL GEMMs;
* ``dsa``: the whole DSA layer in inference (gate, top-k selection, fused Triton kernels on the GPU, per-block
  PyTorch GEMMs on the CPU);
* ``dsa_torch`` (GPU): the per-block ``index_select``/``mm``/``index_add_`` path, for comparison;
* ``naive_grouped_mm`` (GPU): the issue's starting point, ``index_select`` of the chosen rows, ``torch._grouped_mm``
  over the blocks, ``index_add_`` back;
* ``dsa_dense_path``: the DSA layer's dense soft path (training path, all blocks computed).

    PYTHONPATH=. python benchmarks/dsa_ffn.py                        # CPU: fp32, small and medium shapes
    PYTHONPATH=. python benchmarks/dsa_ffn.py --out-dir $OUT         # H200: bf16 up to T=16384, d=2048, FFN 8192

(b) ``--mode model``. Trains the dense VQA model (``cli_configs/vqa.yaml``) and DSA models (``vqa_dsa.yaml``, trained
at ``gate_threshold`` 0.4 and at 0.25) with the same budget, each in its own process through the zoo's CLI, then
evaluates on the test split: overall, relational and non-relational accuracy, the DSA/dense ratio per question type
(the target is at least 98% at 0.4), and end-to-end inference throughput (test samples/s, eval mode, the trainer's
precision). The 0.4 model is also evaluated at 0.25 and 1.0 without retraining.

    PYTHONPATH=. python benchmarks/dsa_ffn.py --mode model --epochs 30 --parallel   # H200
    PYTHONPATH=. python benchmarks/dsa_ffn.py --mode model --epochs 1 --limit-train-batches 5 \\
        --data-args num_images=64,val_images=16,test_images=16                                       # CPU smoke

(c) ``--mode throughput``. End-to-end inference speed alone, on one process and device with nothing training beside
it: the dense VQA model against the DSA one at each active fraction, both with fresh weights (speed does not depend
on training: top-k runs the same number of blocks for any gate), on one test batch of Sort-of-CLEVR, eval mode,
``inference_mode``, bf16 autocast on a GPU and fp32 on the CPU; interleaved rounds, medians, speed-up over dense in
the same run. Also MIE alone at a wide shape (``--wide-dim``, FFN 4x, ``--wide-depth`` blocks, the same tokens per
example), where the FFN is most of the work. Writes ``dsa_throughput_<device>_<date>.json``::

    PYTHONPATH=. python benchmarks/dsa_ffn.py --mode throughput                 # CPU: batch 64
    PYTHONPATH=. python benchmarks/dsa_ffn.py --mode throughput --batch-size 256  # GPU
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from _common import (  # noqa: E402
    finished_runs,
    fit_config,
    launch,
    table,
    training_overrides,
    write_result,
)

from zoo.kernels import block_sparse_ffn_torch  # noqa: E402
from zoo.layers.dsa import DSAFeedForward, active_blocks  # noqa: E402
from zoo.layers.ffn import FeedForward  # noqa: E402

FRACTIONS = [1.0, 0.5, 0.4, 0.25]
# (tokens, dim, hidden)
GPU_SHAPES = {"small": (2048, 512, 2048), "medium": (8192, 1024, 4096), "large": (16384, 2048, 8192)}
CPU_SHAPES = {"small": (1024, 256, 1024), "medium": (2048, 512, 2048), "large": (4096, 512, 2048)}


# -- timing ----------------------------------------------------------------------------------------------------------
def time_gpu(fn) -> float:
    """Median milliseconds of ``fn`` by CUDA events after warm-up."""
    import triton.testing

    if not torch.cuda.is_available():  # --device interpret: a dry run of the GPU code path on the CPU
        return time_cpu_interleaved({"fn": fn}, 2)["fn"]

    return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))


def graphed(fn):
    """``fn`` captured in a CUDA graph (after a warm-up call that compiles and autotunes): its replay times the GPU
    work alone, without Python and launch overhead. A plain function on the CPU."""
    if not torch.cuda.is_available():
        return fn
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def time_cpu_interleaved(fns: dict, repeats: int) -> dict[str, float]:
    """Median milliseconds of each function, repeats interleaved so that load from others hits all alike."""
    for fn in fns.values():
        fn()
    samples = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            samples[name].append(1e3 * (time.perf_counter() - start))
    return {name: statistics.median(v) for name, v in samples.items()}


# -- the layer benchmark ---------------------------------------------------------------------------------------------
def naive_grouped_mm(x, alpha_sel, idx, w1, b1, w2, b2, num_blocks):
    """The issue's starting point: gather the chosen rows, torch._grouped_mm over blocks, index_add_ back."""
    T, k = idx.shape
    hb = w1.shape[0] // num_blocks
    flat = idx.reshape(-1)
    order = torch.sort(flat, stable=True).indices
    offs = torch.bincount(flat, minlength=num_blocks).cumsum(0).to(torch.int32)
    tokens = order // k
    xs = x.index_select(0, tokens)
    w1b = w1.view(num_blocks, hb, -1).transpose(1, 2)  # [N, D, Hb]
    w2b = w2.view(w2.shape[0], num_blocks, hb).permute(1, 2, 0)  # [N, Hb, D]
    h = torch._grouped_mm(xs, w1b, offs=offs)
    h = F.gelu(h + b1.view(num_blocks, hb).index_select(0, flat[order])) * alpha_sel.reshape(-1)[order, None]
    out = torch._grouped_mm(h, w2b, offs=offs)
    y = b2.expand(T, -1).clone()
    return y.index_add_(0, tokens, out)


def dense_reference(x, alpha_sel, idx, w1, b1, w2, b2, num_blocks):
    """fp32 (or float64) dense computation of the block-sparse FFN on the given selection."""
    T = x.shape[0]
    h = F.gelu(x @ w1.t() + b1).view(T, num_blocks, -1)
    weight = torch.zeros(T, num_blocks, dtype=x.dtype, device=x.device).scatter(1, idx, alpha_sel)
    return (h * weight[..., None]).reshape(T, -1) @ w2.t() + b2


def rel_err(a, b) -> float:
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm())


def layer_benchmark(args) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() and args.device != "cpu" else "cpu")
    gpu = device.type == "cuda" or args.device == "interpret"
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    shapes = GPU_SHAPES if device.type == "cuda" else CPU_SHAPES
    if args.device == "interpret":
        shapes = {"tiny": (96, 32, 128), "large": (160, 32, 256)}
    names = args.shapes.split(",") if args.shapes else list(shapes)
    fractions = [float(f) for f in args.fractions.split(",")]
    torch.manual_seed(0)
    rows, checks = [], []
    for shape_name in names:
        T, D, H = shapes[shape_name]
        for N in [int(n) for n in args.num_blocks.split(",")]:
            dense = FeedForward(D, H).to(device, dtype).eval()
            dsa = DSAFeedForward(D, H, num_blocks=N, track_density=False).to(device, dtype).eval()
            dsa.fc1.load_state_dict(dense.fc1.state_dict())
            dsa.fc2.load_state_dict(dense.fc2.state_dict())
            torch.nn.init.normal_(dsa.gate.proj.weight, std=1.0 / D**0.5)
            x = torch.randn(T, D, device=device, dtype=dtype)
            with torch.no_grad():
                dense_times = {}
                if gpu:
                    dense_times = time_dense(dense, x)
                for f in fractions:
                    dsa.set_gate_threshold(f)
                    times, found = measure_point(dense, dsa, x, gpu=gpu, large=shape_name == "large", args=args)
                    times |= dense_times
                    checks += [{"shape": shape_name, "N": N, "fraction": f, **c} for c in found]
                    k = active_blocks(f, N)
                    dense_flops = 4 * T * D * H
                    flops = 4 * T * k * D * (H // N) + 2 * T * D * N  # selected blocks + the gate
                    for name, ms in times.items():
                        done = dense_flops if name in ("dense", "dense_graph", "dsa_dense_path") else flops
                        rows.append(
                            {
                                "shape": shape_name,
                                "T": T,
                                "D": D,
                                "H": H,
                                "N": N,
                                "fraction": f,
                                "k": k,
                                "active": round(k / N, 4),
                                "variant": name,
                                "ms": round(ms, 4),
                                "tflops": round(done / ms / 1e9, 2),
                                "speedup": round(times["dense"] / ms, 3),
                                "flop_reduction": round(dense_flops / done, 3),
                            }
                        )
                    print(
                        f"{shape_name} N={N} f={f}: " + ", ".join(f"{n} {t:.3f} ms" for n, t in times.items()),
                        flush=True,
                    )
                if gpu and shape_name == "large":
                    rows += stage_breakdown(dsa, x, N, fractions)
    if gpu:
        from zoo.kernels._block_ffn_triton import _down_kernel, _up_kernel

        tuned = {
            name: {str(key): str(config) for key, config in kernel.cache.items()}
            for name, kernel in (("up", _up_kernel), ("down", _down_kernel))
        }
    else:
        tuned = {}
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {
        "device": str(device),
        "dtype": str(dtype),
        "rows": rows,
        "checks": checks,
        "tuned": tuned,
        "threads": torch.get_num_threads(),
        "load_average": load,
    }


def time_dense(dense, x) -> dict[str, float]:
    """The dense FFN's GPU time, launched from Python and replayed from a CUDA graph."""
    return {"dense": time_gpu(lambda: dense(x)), "dense_graph": time_gpu(graphed(lambda: dense(x)))}


def measure_point(dense, dsa, x, *, gpu: bool, large: bool, args) -> tuple[dict[str, float], list[dict]]:
    """Check and time every variant at the DSA layer's current threshold: ``({variant: ms}, [checks])``."""
    N, k = dsa.num_blocks, dsa.active_blocks
    w1, b1, w2, b2 = dsa.fc1.weight, dsa.fc1.bias, dsa.fc2.weight, dsa.fc2.bias
    alpha = dsa.gate(x)
    idx = dsa.select(alpha)
    sel = alpha.gather(1, idx)
    # correctness on the same selection, against fp32 (GPU) / float64 (CPU) dense arithmetic
    ref_dtype = torch.float32 if gpu else torch.float64
    ref = dense_reference(*(t.to(ref_dtype) for t in (x, sel)), idx, *(t.to(ref_dtype) for t in (w1, b1, w2, b2)), N)
    checks = []
    if not gpu:
        checks.append({"variant": "torch", "rel_err": rel_err(dsa(x), ref)})
        return time_cpu_interleaved({"dense": lambda: dense(x), "dsa": lambda: dsa(x)}, args.repeats), checks

    from zoo.kernels._block_ffn_triton import block_sparse_ffn_triton

    def kernels(**kwargs):
        return block_sparse_ffn_triton(x, sel, idx, w1, b1, w2, b2, num_blocks=N, **kwargs)

    if x.is_cuda:  # poison the memory that torch.empty hands out next
        torch.empty(1 << 28, device=x.device).fill_(float("nan"))
    checks.append({"variant": "triton", "rel_err": rel_err(kernels(), ref)})
    # the layer selects on fp32 logits (the fused gate): compare it on that selection
    wg, bg = dsa.gate.proj.weight.float(), dsa.gate.proj.bias.float()
    s32, i32 = torch.sigmoid(x.float() @ wg.t() + bg).topk(k, dim=1)
    ref32 = dense_reference(x.float(), s32.to(x.dtype).float(), i32, *(t.float() for t in (w1, b1, w2, b2)), N)
    checks.append({"variant": "dsa_layer", "rel_err": rel_err(dsa(x), ref32)})
    variants = {"dsa": lambda: dsa(x), "dsa_graph": graphed(lambda: dsa(x)), "kernels": kernels}
    if large or args.all_variants:
        checks.append({"variant": "triton_sorted_out", "rel_err": rel_err(kernels(sorted_out=True), ref)})
        variants["kernels_sorted_out"] = lambda: kernels(sorted_out=True)
        variants["dsa_torch"] = lambda: block_sparse_ffn_torch(x, sel, idx, w1, b1, w2, b2, num_blocks=N)
        try:
            checks.append(
                {
                    "variant": "naive_grouped_mm",
                    "rel_err": rel_err(naive_grouped_mm(x, sel, idx, w1, b1, w2, b2, N), ref),
                }
            )
            variants["naive_grouped_mm"] = lambda: naive_grouped_mm(x, sel, idx, w1, b1, w2, b2, N)
        except Exception as err:  # noqa: BLE001 - report and go on
            print(f"naive_grouped_mm unavailable: {err}", file=sys.stderr)
    times = {name: time_gpu(fn) for name, fn in variants.items()}
    if k == N:
        dsa.inference_path = "dense"
        times["dsa_dense_path"] = time_gpu(lambda: dsa(x))
        dsa.inference_path = "auto"
    return times, checks


def stage_breakdown(dsa, x, N, fractions) -> list[dict]:
    """Time each stage of the fused path alone at the large shape (CUDA graph replays: GPU time only): the fused
    gate and top-k (and, for comparison, PyTorch's gate, sigmoid, topk, gather), routing, the two GEMMs, the
    combine."""
    rows = []
    for f in fractions:
        dsa.set_gate_threshold(f)
        k = dsa.active_blocks
        gemm_flops = 2 * x.shape[0] * k * x.shape[1] * dsa.block_dim
        for name, fn in _stages(dsa, x, N, k).items():
            ms = time_gpu(graphed(fn))
            rows.append(
                {
                    "shape": "large",
                    "N": N,
                    "fraction": f,
                    "k": k,
                    "active": round(k / N, 4),
                    "variant": name,
                    "ms": round(ms, 4),
                    "tflops": round(gemm_flops / ms / 1e9, 1) if "gemm" in name else "",
                }
            )
    return rows


def _stages(dsa, x, N: int, k: int) -> dict:
    from zoo.kernels._block_ffn_triton import (
        _block_m,
        gate_topk_triton,
        launch_combine,
        launch_down,
        launch_up,
        route_triton,
        use_tma_default,
    )

    T = x.shape[0]
    w1, b1, w2, b2 = dsa.fc1.weight, dsa.fc1.bias, dsa.fc2.weight, dsa.fc2.bias
    wg, bg = dsa.gate.proj.weight, dsa.gate.proj.bias
    tma = use_tma_default()

    def gate_torch():
        alpha = dsa.gate(x)
        idx = dsa.select(alpha)
        return alpha.gather(1, idx), idx

    sel, idx = gate_topk_triton(x, wg, bg, k)
    routing = route_triton(idx, N, block_m=_block_m(T * k, N))
    flat = sel.reshape(-1).contiguous()
    h = launch_up(x, w1, b1, flat, routing, num_blocks=N, topk=k, use_tma=tma)
    out = launch_down(h, w2, routing, tokens=T, num_blocks=N, topk=k, use_tma=tma)
    return {
        "stage_gate_topk": lambda: gate_topk_triton(x, wg, bg, k),
        "stage_gate_torch": gate_torch,
        "stage_route": lambda: route_triton(idx, N, block_m=routing.block_m),
        "stage_up_gemm": lambda: launch_up(x, w1, b1, flat, routing, num_blocks=N, topk=k, use_tma=tma),
        "stage_down_gemm": lambda: launch_down(h, w2, routing, tokens=T, num_blocks=N, topk=k, use_tma=tma),
        "stage_combine": lambda: launch_combine(out, b2, routing, tokens=T, topk=k),
    }


def summary(rows: list[dict]) -> str:
    """One line per shape, block count and fraction: every variant's ms and speed-up over dense, DSA's TFLOP/s."""
    keyed = {}
    for r in rows:
        if not r["variant"].startswith("stage_"):
            keyed.setdefault((r["shape"], r["T"], r["D"], r["H"], r["N"], r["fraction"], r["k"]), {})[r["variant"]] = r
    out = []
    for (shape, T, D, H, N, f, k), variants in keyed.items():
        dense, dsa = variants["dense"], variants["dsa"]
        line = {
            "shape": f"{shape} T={T} D={D} H={H}",
            "N": N,
            "fraction": f,
            "active": f"{k}/{N}",
            "dense ms": dense["ms"],
            "dense TF/s": dense["tflops"],
            "dsa ms": dsa["ms"],
            "dsa TF/s": dsa["tflops"],
            "speedup": f"{dsa['speedup']:.2f}x",
            "FLOP reduction": f"{dsa['flop_reduction']:.2f}x",
        }
        for name in (
            "dense_graph",
            "dsa_graph",
            "kernels",
            "kernels_sorted_out",
            "dsa_torch",
            "naive_grouped_mm",
            "dsa_dense_path",
        ):
            if name in variants:
                line[name] = f"{variants[name]['ms']:.3f} ({variants[name]['speedup']:.2f}x)"
        out.append(line)
    columns = [
        "shape",
        "N",
        "fraction",
        "active",
        "dense ms",
        "dense TF/s",
        "dsa ms",
        "dsa TF/s",
        "speedup",
        "FLOP reduction",
        "dense_graph",
        "dsa_graph",
        "kernels",
        "kernels_sorted_out",
        "dsa_torch",
        "naive_grouped_mm",
        "dsa_dense_path",
    ]
    return table(out, [c for c in columns if any(c in line for line in out)])


# -- the model benchmark ---------------------------------------------------------------------------------------------
def _derived_config(config: str, threshold: float, work: Path) -> str:
    """A copy of a DSA config trained (and annealed) to ``threshold``."""
    import yaml

    from zoo.cli import packaged_config

    data = yaml.safe_load(Path(packaged_config(config) or config).read_text())

    def visit(node):
        if isinstance(node, dict):
            if node.get("class_path") == "zoo.layers.dsa.DSAFeedForward":
                node.setdefault("init_args", {})["gate_threshold"] = threshold
            if node.get("class_path") == "zoo.callbacks.DSAMonitor" and "anneal_to" in node.get("init_args", {}):
                node["init_args"]["anneal_to"] = threshold
            for value in node.values():
                visit(value)
        elif isinstance(node, list):
            for value in node:
                visit(value)

    visit(data)
    path = work / f"{Path(config).stem}_{threshold}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return str(path)


def evaluate(model, datamodule, precision: str, device) -> dict:
    """Test accuracy (overall and per question type) and inference throughput over the test split."""
    from lightning.pytorch.utilities import move_data_to_device

    model.eval().to(device)
    loader = datamodule.test_dataloader()
    names = list(getattr(datamodule, "group_names", []))
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision.startswith("bf16"))
    batches = [move_data_to_device(b, device) for b in loader]

    def run():
        correct, total = torch.zeros(len(names) + 1), torch.zeros(len(names) + 1)
        with torch.no_grad(), autocast:
            for batch in batches:
                pred = model(batch).argmax(-1)
                labels, groups = batch["label"], batch["group"]
                ok = (pred == labels) & (labels != -100)
                valid = labels != -100
                correct[0] += ok.sum().item()
                total[0] += valid.sum().item()
                for g in range(len(names)):
                    correct[g + 1] += ok[groups == g].sum().item()
                    total[g + 1] += valid[groups == g].sum().item()
        return correct, total

    run()  # warm-up: kernel compilation and autotuning
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    correct, total = run()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    acc = (correct / total.clamp_min(1)).tolist()
    out = {"acc": acc[0], "samples_per_s": float(total[0]) / seconds, "test_samples": int(total[0])}
    out |= {f"acc_{name}": acc[i + 1] for i, name in enumerate(names)}
    return out


def run_one(config: str, thresholds: list[float], overrides: list[str], out: Path) -> None:
    """Fit one config in this process, load its best checkpoint, evaluate at each threshold; write to ``out``."""
    from zoo.layers.dsa import dsa_layers, set_gate_threshold

    run = fit_config(config, overrides)
    model, data, trainer, best = run["model"], run["data"], run["trainer"], run["best"]
    fit_seconds, history = run["fit_seconds"], run["history"]
    if best:
        model.load_state_dict(torch.load(best, map_location="cpu", weights_only=False)["state_dict"])
    data.setup("test")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precision = str(trainer.precision)
    results = {}
    for threshold in thresholds if dsa_layers(model) else [None]:
        if threshold is not None:
            set_gate_threshold(model, threshold)
        results["dense" if threshold is None else str(threshold)] = evaluate(model, data, precision, device)
    out.write_text(
        json.dumps(
            {
                "config": config,
                "overrides": overrides,
                "fit_seconds": round(fit_seconds, 1),
                "best_checkpoint": best,
                "val_history": history.history,
                "parameters": sum(p.numel() for p in model.parameters()),
                "precision": precision,
                "epochs_run": trainer.current_epoch,
                "eval": results,
            },
            indent=2,
        )
    )


def model_benchmark(args) -> dict:
    precision = args.precision or ("bf16-mixed" if torch.cuda.is_available() else "32-true")
    common = training_overrides(args)
    common += [f"--data.init_args.{kv}" for kv in args.data_args.split(",") if kv]
    work = Path(args.work_dir) if args.work_dir else Path(args.out_dir) / "dsa_vqa_runs"
    work.mkdir(parents=True, exist_ok=True)
    runs = {
        "dense": (args.dense_config, [None]),
        "dsa_0.4": (_derived_config(args.dsa_config, 0.4, work), [0.4, 0.25, 1.0]),
        "dsa_0.25": (_derived_config(args.dsa_config, 0.25, work), [0.25, 0.4]),
    }
    runs = {name: run for name, run in runs.items() if name in args.runs}
    procs = {}
    for name, (config, thresholds) in runs.items():
        out = work / f"{name}.json"
        cmd = [
            sys.executable,
            __file__,
            "--mode",
            "model-one",
            "--run-one",
            config,
            str(out),
            "--thresholds",
            ",".join("none" if t is None else str(t) for t in thresholds),
            "--",
            *common,
            f"--trainer.default_root_dir={work / name}",
        ]
        procs[name] = (launch(cmd, work / f"{name}.log", len(procs)), out)
        if not args.parallel:
            procs[name][0].wait()
    results = {name: result for name, result, _ in finished_runs(procs, work) if result is not None}
    if not results:
        raise SystemExit(f"no run of {sorted(runs)} finished: their logs are {work}/<run>.log")
    rows = []
    dense = results.get("dense", {}).get("eval", {}).get("dense")
    for name, result in results.items():
        for threshold, ev in result["eval"].items():
            row = {
                "run": name,
                "eval_threshold": threshold,
                "acc": f"{100 * ev['acc']:.2f}%",
                "relational": f"{100 * ev.get('acc_relational', float('nan')):.2f}%",
                "non_relational": f"{100 * ev.get('acc_non_relational', float('nan')):.2f}%",
                "samples/s": f"{ev['samples_per_s']:.0f}",
                "fit_s": result["fit_seconds"],
            }
            if dense and name != "dense":
                for group in ("relational", "non_relational"):
                    key = f"acc_{group}"
                    if key in ev and dense.get(key):
                        row[f"{group}/dense"] = f"{ev[key] / dense[key]:.3f}"
                row["speed/dense"] = f"{ev['samples_per_s'] / dense['samples_per_s']:.2f}x"
            rows.append(row)
    columns = [
        "run",
        "eval_threshold",
        "acc",
        "relational",
        "non_relational",
        "relational/dense",
        "non_relational/dense",
        "samples/s",
        "speed/dense",
        "fit_s",
    ]
    print(table(rows, columns))
    return {"settings": vars(args) | {"precision": precision, "common": common}, "runs": results, "table": rows}


# -- the end-to-end throughput benchmark -------------------------------------------------------------------------
def throughput_benchmark(args) -> dict:
    """Dense against DSA inference, whole VQA model and a wide MIE, side by side (module doc, (c))."""
    from lightning.pytorch.utilities import move_data_to_device

    from zoo.cli import ZooCLI, resolve_config_args
    from zoo.contracts import Tokens
    from zoo.fusion import MIE
    from zoo.layers.dsa import set_gate_threshold
    from zoo.layers.ffn import FeedForward

    gpu = torch.cuda.is_available()
    device = torch.device("cuda" if gpu else "cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    batch_size = args.batch_size

    def build(config: str):
        flags = ["--config", config, "--trainer.logger=false", f"--data.init_args.batch_size={batch_size}"]
        cli = ZooCLI(args=resolve_config_args(flags), run=False)
        return cli.model.eval().to(device), cli.datamodule

    dense, data = build(args.dense_config)
    dsa, _ = build(args.dsa_config)
    data.prepare_data()
    data.setup("test")
    batch = move_data_to_device(next(iter(data.test_dataloader())), device)
    tokens = {m: enc(batch[m]) for m, enc in dense.model.encoders.items()}  # the wide MIE's input shapes

    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=gpu)
    fractions = [float(f) for f in args.fractions.split(",")]

    def timed(fns: dict) -> dict[str, float]:
        def synced(fn):
            def run():
                with torch.inference_mode(), autocast:
                    fn()
                if gpu:
                    torch.cuda.synchronize()

            return run

        return time_cpu_interleaved({k: synced(f) for k, f in fns.items()}, args.repeats)

    def with_threshold(model, fraction, fn):
        def run():
            set_gate_threshold(model, fraction)
            fn()

        return run

    rows = []
    scopes = {"vqa": (dense, dsa, lambda m: m(batch), batch_size)}
    wide = {}
    for name, ffn in (("dense", FeedForward), ("dsa", partial(DSAFeedForward, num_blocks=8, gate_threshold=0.4))):
        kwargs = dict(dim=args.wide_dim, depth=args.wide_depth, num_heads=args.wide_dim // 64, modality_fusion_layers=1)
        wide[name] = MIE(modalities=tuple(tokens), ffn=ffn, **kwargs).eval().to(device)
    g = torch.Generator(device="cpu").manual_seed(0)
    wide_in = {
        m: Tokens(torch.randn(*t.embeddings.shape[:2], args.wide_dim, generator=g).to(device), t.mask)
        for m, t in tokens.items()
    }
    scopes[f"mie_d{args.wide_dim}"] = (wide["dense"], wide["dsa"], lambda m: m(wide_in), batch_size)
    for scope, (d_model, s_model, call, n) in scopes.items():
        fns = {"dense": (lambda d=d_model, c=call: c(d))}
        for f in fractions:
            fns[f"dsa {f}"] = with_threshold(s_model, f, lambda s=s_model, c=call: c(s))
        ms = timed(fns)
        for variant, value in ms.items():
            rows.append(
                {
                    "scope": scope,
                    "variant": variant,
                    "ms": round(value, 3),
                    "samples/s": round(n / value * 1e3, 1),
                    "speed/dense": f"{ms['dense'] / value:.2f}x",
                }
            )
    print(table(rows, ["scope", "variant", "ms", "samples/s", "speed/dense"]))
    return {
        "settings": vars(args) | {"device": str(device), "threads": torch.get_num_threads(), "batch_size": batch_size},
        "tokens_per_example": {m: int(t.embeddings.shape[1]) for m, t in tokens.items()},
        "rows": rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=["layer", "model", "model-one", "throughput"], default="layer")
    parser.add_argument("--out-dir", default=None, help="where the JSON goes (default benchmarks/results)")
    parser.add_argument("--name", default="dsa_ffn", help="layer mode: JSON name, <name>_<device>_<date>.json")
    # layer mode
    parser.add_argument(
        "--device",
        choices=["auto", "cpu", "interpret"],
        default="auto",
        help="interpret: dry run of the GPU code path under TRITON_INTERPRET=1 at tiny shapes",
    )
    parser.add_argument("--shapes", default=None, help="comma-separated of small,medium,large (default: all)")
    parser.add_argument("--fractions", default=",".join(map(str, FRACTIONS)))
    parser.add_argument("--num-blocks", default="8", help="comma-separated block counts")
    parser.add_argument("--repeats", type=int, default=15, help="CPU: timed repeats per variant")
    parser.add_argument("--threads", type=int, default=None, help="CPU: torch threads (default: torch's choice)")
    parser.add_argument("--all-variants", action="store_true", help="GPU: the slow baselines at every shape")
    # model mode
    parser.add_argument("--dense-config", default="vqa.yaml")
    parser.add_argument("--dsa-config", default="vqa_dsa.yaml")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--precision", default=None, help="default: bf16-mixed on a GPU, 32-true on the CPU")
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--limit-train-batches", default="1.0")
    parser.add_argument("--max-time", default=None, help="trainer.max_time guard, e.g. 00:00:09:00")
    parser.add_argument("--seed", type=int, default=None, help="model mode: every run's seed_everything")
    parser.add_argument("--data-args", default="", help="comma-separated datamodule overrides, key=value")
    parser.add_argument("--parallel", action="store_true", help="model mode: the runs at once")
    parser.add_argument("--runs", nargs="+", choices=["dense", "dsa_0.4", "dsa_0.25"],
                        default=["dense", "dsa_0.4", "dsa_0.25"], help="model mode: which runs")  # fmt: skip
    parser.add_argument("--work-dir", default=None, help="model mode: checkpoints and logs (default out-dir/...)")
    parser.add_argument("--run-one", nargs=2, metavar=("CONFIG", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("--thresholds", default="none", help=argparse.SUPPRESS)
    # throughput mode
    parser.add_argument("--wide-dim", type=int, default=1024, help="throughput: width of the wide MIE")
    parser.add_argument("--wide-depth", type=int, default=2, help="throughput: blocks of the wide MIE")
    args, extra = parser.parse_known_args()
    if extra and extra[0] == "--":
        extra = extra[1:]
    if args.mode == "model-one":
        thresholds = [None if t == "none" else float(t) for t in args.thresholds.split(",")]
        run_one(args.run_one[0], thresholds, extra, Path(args.run_one[1]))
        return
    out_dir = Path(args.out_dir) if args.out_dir else None
    if args.device == "interpret":
        os.environ["TRITON_INTERPRET"] = "1"
    if args.mode == "throughput":
        path = write_result("dsa_throughput", throughput_benchmark(args), out_dir)
        print(f"wrote {path}")
        return
    if args.mode == "model":
        args.out_dir = str(out_dir or ROOT / "benchmarks" / "results")
        payload = model_benchmark(args)
        path = write_result("dsa_vqa", payload, out_dir)
        print(f"wrote {path}")
        return
    import triton

    if args.threads:
        torch.set_num_threads(args.threads)
    payload = layer_benchmark(args)
    payload["triton"] = triton.__version__
    path = write_result(args.name, payload, out_dir)
    worst = {}
    for c in payload["checks"]:
        worst[c["variant"]] = max(worst.get(c["variant"], 0.0), c["rel_err"])
    print(
        "largest relative error against the fp32 dense reference, per variant:",
        {k: f"{v:.2e}" for k, v in worst.items()},
    )
    if payload["tuned"]:
        print("autotuned:", json.dumps(payload["tuned"]))
    stages = [r for r in payload["rows"] if r["variant"].startswith("stage_")]
    if stages:
        print(table(stages, ["shape", "N", "active", "variant", "ms", "tflops"]))
    print(f"wrote {path}")
    print(summary(payload["rows"]))


if __name__ == "__main__":
    main()
