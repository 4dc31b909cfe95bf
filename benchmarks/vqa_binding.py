"""Where MIE's Sort-of-CLEVR learning stalls: reading an object's attributes, or finding the object the question names?

Trains the VQA parts of ``cli_configs/vqa.yaml`` (conv stem, 1-layer text transformer, 6-layer MIE with 4 fused
layers, an MLP head), narrowed to width ``--width``, on two subsets of the non-relational questions, with the same
steps, batch and learning rate, and prints validation accuracy per question subtype every ``--every`` steps:

* ``one colour``: only questions about the red object. The answer needs the image alone (the question's colour is
  always the same), so this measures how fast the model reads position and shape.
* ``all colours``: questions about any of the six objects. The answer also needs the colour named in the question
  bound to the image tokens of that colour.

A large gap between the two is the binding plateau that the image-token resolution decides (README, "Results").
Runs in one process per task, in parallel, one thread each (``--threads``)::

    python benchmarks/vqa_binding.py                       # CPU: about 6 minutes on 2 cores
    python benchmarks/vqa_binding.py --channels 32,64,128,128 --steps 1000   # the earlier 5x5-token stem

Writes ``benchmarks/results/vqa_binding_<device>_<date>.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from _common import table, write_result  # noqa: E402
from torch import nn  # noqa: E402

TASKS = {"one colour": [0], "all colours": [0, 1, 2, 3, 4, 5]}  # question colours (0 = red)
SUBTYPES = ("shape", "left/right", "top/bottom")


def run_task(colours: list[int], args: argparse.Namespace) -> dict:
    """Train on the non-relational questions about ``colours``; validation accuracy per subtype over training."""
    from datamodules._common import normalize_image
    from datamodules.sort_of_clevr import generate_sort_of_clevr, question_text
    from zoo.encoders import ConvImageEncoder, TransformerTextEncoder
    from zoo.fusion import MIE

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    scenes = generate_sort_of_clevr(args.images, seed=args.seed)
    images = normalize_image(scenes.images)

    def questions(first: int, last: int) -> tuple[np.ndarray, np.ndarray]:
        n, q = np.meshgrid(np.arange(first, last), np.arange(20), indexing="ij")
        n, q = n.ravel(), q.ravel()
        keep = (scenes.question_group[n, q] == 0) & np.isin(scenes.question_colour[n, q], colours)
        return n[keep], q[keep]

    val, train = questions(0, args.val_images), questions(args.val_images, args.images)
    dim = args.width
    channels = tuple(int(c) for c in args.channels.split(","))
    model = nn.ModuleDict(
        {
            "image": ConvImageEncoder(channels=channels, dim=dim),
            "text": TransformerTextEncoder(dim=dim, depth=1, num_heads=4),
            "fusion": MIE(modalities=("image", "text"), dim=dim, depth=6, num_heads=4, modality_fusion_layers=4),
            "head": nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, 12)),
        }
    )

    def forward(n: np.ndarray, q: np.ndarray) -> torch.Tensor:
        texts = [
            question_text(0, int(scenes.question_subtype[i, j]), int(scenes.question_colour[i, j]))
            for i, j in zip(n, q, strict=True)
        ]
        tokens = {"image": model["image"](images[n]), "text": model["text"](texts)}
        return model["head"](model["fusion"](tokens).pooled)

    def evaluate() -> dict[str, float]:
        model.eval()
        n, q = val
        with torch.no_grad():
            pred = torch.cat([forward(n[i : i + 500], q[i : i + 500]).argmax(-1) for i in range(0, len(n), 500)])
        model.train()
        correct = pred.numpy() == scenes.answers[n, q]
        subtype = scenes.question_subtype[n, q]
        return {name: round(100 * float(correct[subtype == s].mean()), 1) for s, name in enumerate(SUBTYPES)}

    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.05)
    warmup = max(1, args.steps // 20)

    def lr_factor(step: int) -> float:  # linear warm-up, cosine decay (as zoo.optim.WarmupCosine)
        return min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(step, args.steps) / args.steps))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    rng = np.random.default_rng(args.seed)
    curve, start = [], time.perf_counter()
    for step in range(1, args.steps + 1):
        pick = rng.integers(0, len(train[0]), args.batch_size)
        n, q = train[0][pick], train[1][pick]
        loss = F.cross_entropy(forward(n, q), torch.from_numpy(scenes.answers[n, q]))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % args.every == 0 or step == args.steps:
            curve.append({"step": step, "seconds": round(time.perf_counter() - start, 1), **evaluate()})
            print(json.dumps(curve[-1]), file=sys.stderr, flush=True)
    return {"colours": colours, "train_questions": len(train[0]), "val_questions": len(val[0]), "curve": curve}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--every", type=int, default=250, help="validate every this many steps")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--width", type=int, default=64, help="token width of every part (vqa.yaml: 128)")
    parser.add_argument("--channels", default="32,64,128", help="conv stem stages (vqa.yaml: 32,64,128 = 10x10 tokens)")
    parser.add_argument("--images", type=int, default=10000)
    parser.add_argument("--val-images", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per task (both tasks run at once)")
    parser.add_argument("--out-dir", default=None)
    parser.add_argument("--task", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.task is not None:  # a child process: one task, JSON on stdout
        print(json.dumps(run_task(TASKS[args.task], args)))
        return
    argv = list(sys.argv[1:])
    children = {
        name: subprocess.Popen([sys.executable, __file__, *argv, "--task", name], stdout=subprocess.PIPE, text=True)
        for name in TASKS
    }
    results = {}
    for name, child in children.items():
        out, _ = child.communicate()
        if child.returncode != 0:
            raise SystemExit(f"task {name!r} failed ({child.returncode})")
        results[name] = json.loads(out)
    rows = [
        {"task": name, "step": point["step"], **{s: f"{point[s]:.1f}%" for s in SUBTYPES}}
        for name, result in results.items()
        for point in result["curve"]
    ]
    print(table(rows, ["task", "step", *SUBTYPES]))
    path = write_result("vqa_binding", {"settings": vars(args), "tasks": results}, args.out_dir)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
