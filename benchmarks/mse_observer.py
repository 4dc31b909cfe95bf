"""What the MSE weight observer costs a QAT training step of the VQA model, by how many clipping ratios it tries at
once (``zoo.quant.fake_quant.MSE_CHUNK_ELEMENTS``).

``observer: mse`` refits every weight's per-channel range at each step: 21 clipping ratios, the squared error of each
(benchmarks/qat.py's low-bit variants use it: at 2 and 3 bits a min-max range rounds most weights to zero). One
training step (forward, backward, AdamW) of ``vqa.yaml``'s model quantized with the low-bit policy ``w2ffn``, in
interleaved rounds: the min-max observer, and the MSE observer with chunks of ``[ratios, channels, in]`` trial
tensors up to 1 element (one ratio at a time), 2**18 and 2**24 elements. On a GPU bf16 autocast. Writes
``benchmarks/results/mse_observer_<device>_<date>.json``::

    python benchmarks/mse_observer.py                  # CPU, batch 64
    python benchmarks/mse_observer.py --device cuda    # batch 256
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from _common import table, write_result  # noqa: E402
from qat import LOW_BITS, _questions, side_by_side  # noqa: E402

from zoo.quant import fake_quant, quantize_  # noqa: E402

#: the trial-tensor limits compared (elements; 1: one ratio at a time, as before chunking)
CHUNKS = {"one ratio at a time": 1, "2**18": 1 << 18, "2**24": 1 << 24}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--batch-size", type=int, default=None, help="default: 64 on the CPU, 256 on a GPU")
    parser.add_argument("--reps", type=int, default=15, help="timed rounds")
    parser.add_argument("--out-dir", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args()
    batch_size = args.batch_size or (256 if args.device == "cuda" else 64)
    from zoo.cli import ZooCLI, resolve_config_args

    cli = ZooCLI(args=resolve_config_args(["--config", "vqa.yaml", "--trainer.logger=false"]), run=False)
    task = cli.model.to(args.device).train()
    g = torch.Generator().manual_seed(0)
    batch = {
        "image": torch.rand(batch_size, 3, 75, 75, generator=g).to(args.device),
        "text": _questions(batch_size),
        "label": torch.randint(0, 10, (batch_size,), generator=g).to(args.device),
    }
    runs = {"minmax": (None, {**LOW_BITS["w2ffn"], "observer": "minmax"})}
    runs |= {f"mse, {name}": (limit, LOW_BITS["w2ffn"]) for name, limit in CHUNKS.items()}
    steps = {}
    for name, (limit, policy) in runs.items():
        model = quantize_(copy.deepcopy(task), **policy)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)

        def step(model=model, optimizer=optimizer, limit=limit) -> None:
            if limit is not None:
                fake_quant.MSE_CHUNK_ELEMENTS[args.device] = limit
            with torch.autocast(args.device, dtype=torch.bfloat16, enabled=args.device == "cuda"):
                loss = F.cross_entropy(model(batch).float(), batch["label"])
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        steps[name] = step
    timing = side_by_side(steps, reps=args.reps, device=args.device, base="minmax", inference=False)
    rows = [
        {"observer": name, "step ms": f"{t['median_ms']:.1f}", "against min-max": f"{1 / t['speedup_vs_minmax']:.2f}x"}
        for name, t in timing.items()
    ]
    print(table(rows, ["observer", "step ms", "against min-max"]))
    payload = {"settings": vars(args) | {"batch_size": batch_size, "policy": "w2ffn"}, "rows": rows,
               "timing": timing}  # fmt: skip
    print(f"wrote {write_result('mse_observer', payload, Path(args.out_dir))}")


if __name__ == "__main__":
    main()
