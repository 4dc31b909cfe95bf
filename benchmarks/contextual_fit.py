"""What the ``contextual_label`` augmentation of the WordNet supersense training split costs on a device: the
masked-LM fit per step, a copy, the BERTScore of a copy, and the whole split extrapolated from them (the default fit
of 2,000 steps of 128, and the copies that ``augmentation_strength`` 0.6 and ``max_copies`` 8 ask for).

The fit's time per step is the difference of two fits (``--steps`` short and long) over their difference in steps, so
model loading and the first slow steps drop out. Copies and scores are timed on the first ``--sentences`` training
glosses with the longer fit's model. Writes ``benchmarks/results/contextual_fit_<device>_<date>.json``::

    python benchmarks/contextual_fit.py                   # the CPU (about 3 minutes on 2 cores)
    python benchmarks/contextual_fit.py --device cuda
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

import numpy as np  # noqa: E402
from _common import table, write_result  # noqa: E402

from datamodules.ddae.augment import copies_per_class  # noqa: E402
from datamodules.ddae.contextual import ContextualSubstituteAug, fit_masked_lm  # noqa: E402
from datamodules.ddae.filter import BERTScoreFilter  # noqa: E402
from datamodules.wordnet_supersense import WordNetSupersenseDataModule  # noqa: E402

FIT_STEPS = 2000  # TextAugmenter's contextual_steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--steps", type=int, nargs=2, default=(5, 25), help="the two fit lengths timed")
    parser.add_argument("--sentences", type=int, default=200, help="copies made and scored")
    parser.add_argument("--strength", type=float, default=0.6)
    parser.add_argument("--max-copies", type=int, default=8)
    parser.add_argument("--cache-dir", default=str(Path(os.environ.get("ZOO_DATA_DIR") or "~/.cache/zoo").expanduser()))
    parser.add_argument("--out-dir", default=None)
    args = parser.parse_args()
    short, long = args.steps
    if not 1 <= short < long:
        parser.error(f"--steps {short} {long}: want 1 <= short < long")

    dm = WordNetSupersenseDataModule(data_dir=str(Path(args.cache_dir) / "wordnet_supersense"))
    texts, labels = dm.load_splits().train
    counts = np.bincount(np.asarray(labels), minlength=dm.num_classes)
    copies = float(copies_per_class(counts, strength=args.strength, max_copies=args.max_copies)[labels].sum())

    seconds = {}
    for steps in (short, long):  # no cache: each fit is timed from scratch
        start = time.perf_counter()
        model = fit_masked_lm(list(texts), list(labels), steps=steps, device=args.device)
        seconds[steps] = time.perf_counter() - start
    per_step = (seconds[long] - seconds[short]) / (long - short)

    aug = ContextualSubstituteAug(model, conditional=True, aug_p=0.5 * args.strength)
    sample = list(range(min(args.sentences, len(texts))))
    start = time.perf_counter()
    made = []
    for i in sample:
        aug.label = labels[i]
        random.seed(i)
        made.append(aug.substitute(texts[i]))
    per_copy = (time.perf_counter() - start) / len(sample)
    scorer = BERTScoreFilter(device=args.device, progress=False)
    start = time.perf_counter()
    scorer.score(made, [texts[i] for i in sample])
    per_score = (time.perf_counter() - start) / len(sample)

    rows = [
        {"part": f"masked-LM fit, {FIT_STEPS} steps of 128", "each (s)": f"{per_step:.3f}",
         "whole split (s)": f"{per_step * FIT_STEPS:.0f}"},
        {"part": f"copies ({copies:.0f})", "each (s)": f"{per_copy:.4f}",
         "whole split (s)": f"{per_copy * copies:.0f}"},
        {"part": "BERTScore of the copies", "each (s)": f"{per_score:.4f}",
         "whole split (s)": f"{per_score * copies:.0f}"},
    ]  # fmt: skip
    total = per_step * FIT_STEPS + (per_copy + per_score) * copies
    rows.append({"part": "in all", "each (s)": "", "whole split (s)": f"{total:.0f} ({total / 60:.1f} min)"})
    print(table(rows, ["part", "each (s)", "whole split (s)"]))
    payload = {
        "settings": vars(args) | {"fit_steps": FIT_STEPS, "expected_copies": copies},
        "fit_seconds": seconds,
        "seconds_per_step": per_step,
        "seconds_per_copy": per_copy,
        "seconds_per_score": per_score,
        "whole_split_seconds": total,
        "rows": rows,
    }
    print(f"wrote {write_result('contextual_fit', payload, Path(args.out_dir) if args.out_dir else None)}")


if __name__ == "__main__":
    main()
