"""oneDNN's int8 GEMM on this CPU with signed against unsigned input codes, at the VQA model's shapes: the kernel
oneDNN picks for each (from its verbose log) and the time of each, side by side.

Why the integer linears feed oneDNN uint8 codes (``zoo.quant.kernels.UINT8_OFFSET``): on CPUs with AMX both run the
AMX kernel, but on CPUs with VNNI and no AMX (AMD Zen 4, Intel before Sapphire Rapids) oneDNN runs the signed GEMM on
its reference kernel. Writes ``benchmarks/results/onednn_codes_<device>_<date>.json``::

    python benchmarks/onednn_codes.py                  # both threads of the CI machine
    python benchmarks/onednn_codes.py --threads 2      # a larger host limited to two
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

import torch  # noqa: E402
from _common import cpu_model, table, write_result  # noqa: E402

from zoo.quant.kernels import UINT8_OFFSET, onednn_int8_mm, onednn_prepack  # noqa: E402

#: [tokens, in] x [in, out] of the VQA model's MIE at batch 16 (117 tokens an example): qkv, fc1, fc2, proj
SHAPES = [(1872, 128, 384), (1872, 128, 512), (1872, 512, 128), (1872, 128, 128)]

_KERNEL_NAMES = """
import sys, torch
sys.path.insert(0, sys.argv[1])
from zoo.quant.kernels import UINT8_OFFSET, onednn_int8_mm, onednn_prepack
packed = onednn_prepack(torch.randint(-127, 128, (512, 128), dtype=torch.int8))
a = torch.randint(-127, 128, (64, 128), dtype=torch.int8)
scale, zero = torch.ones(512), torch.zeros(512, dtype=torch.int64)
onednn_int8_mm(a, packed, scale, zero)
onednn_int8_mm((a.to(torch.int16) + UINT8_OFFSET).to(torch.uint8), packed, scale, zero, x_zero_point=UINT8_OFFSET)
"""


def kernel_names() -> dict[str, str]:
    """The implementation oneDNN's verbose log names for a signed and an unsigned GEMM (a subprocess: oneDNN reads
    ``ONEDNN_VERBOSE`` once)."""
    out = subprocess.run(
        [sys.executable, "-c", _KERNEL_NAMES, str(ROOT)],
        env={**os.environ, "ONEDNN_VERBOSE": "1"},
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    names = [line.split(",")[6] for line in out.splitlines() if ",exec,cpu,matmul," in line]
    return dict(zip(("int8", "uint8"), names, strict=True))


def time_shape(m: int, k: int, n: int, reps: int) -> dict[str, float]:
    g = torch.Generator().manual_seed(0)
    a = torch.randint(-127, 128, (m, k), generator=g, dtype=torch.int8)
    unsigned = (a.to(torch.int16) + UINT8_OFFSET).to(torch.uint8)
    packed = onednn_prepack(torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8))
    scale, zero = torch.rand(n, generator=g) * 0.01, torch.zeros(n, dtype=torch.int64)
    calls = {
        "int8": lambda: onednn_int8_mm(a, packed, scale, zero, x_scale=0.1),
        "uint8": lambda: onednn_int8_mm(unsigned, packed, scale, zero, x_scale=0.1, x_zero_point=UINT8_OFFSET),
    }
    assert torch.equal(calls["int8"](), calls["uint8"]()), "the two codings must give the same product"
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(reps):  # interleaved rounds
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - start)
    return {f"{name}_ms": round(1e3 * statistics.median(ts), 4) for name, ts in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=None, help="default: torch's")
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--out-dir", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args()
    if onednn_prepack(torch.zeros(8, 8, dtype=torch.int8)) is None:
        raise SystemExit("oneDNN's int8 GEMM runs on x86 CPUs only")
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for m, k, n in SHAPES:
        row = {"shape": f"{m}x{k}x{n}", **time_shape(m, k, n, args.reps)}
        row["int8 / uint8 time"] = round(row["int8_ms"] / row["uint8_ms"], 2)
        rows.append(row)
    payload = {
        "cpu_model": cpu_model(),
        "amx": bool(torch.cpu._is_amx_tile_supported()),
        "threads": torch.get_num_threads(),
        "kernels": kernel_names(),
        "shapes": rows,
        "method": f"median of {args.reps} interleaved calls per coding; onednn_int8_mm on a prepacked weight",
    }
    path = write_result("onednn_codes", payload, Path(args.out_dir))
    print(f"{payload['cpu_model']}, AMX {payload['amx']}, {payload['threads']} threads; kernels {payload['kernels']}")
    print(table(rows, list(rows[0])))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
