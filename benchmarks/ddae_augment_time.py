"""Augmenting and BERTScore-filtering the whole WordNet supersense training split, timed end to end on a device (the
issue's "under 10 minutes on the 2-core CPU, and a cached second run starts training in seconds").

Each ``--operations`` set runs from an empty cache folder, as a first run of the datamodule does:

* ``fit``: :meth:`~datamodules.ddae.augment.TextAugmenter.fit`, the masked-LM of a contextual operation
  (``contextual_steps`` and ``contextual_layers``; nothing for the other operations);
* ``copies``: :class:`~datamodules.ddae.augment.TextAugmenter` over the split, with that masked-LM;
* ``BERTScore``: the F1 of every copy against its original (:class:`~datamodules.ddae.filter.BERTScoreFilter`, its
  model loaded);
* ``in all``: the whole first run, what it waits for before training (the three, WordNet read, the cache written);
  ``second run``: the same :func:`~datamodules.ddae.filter.score_augmentations` call again, read from the cache.

``--keep-dir`` keeps the DDAE cache files (copies and F1) made, e.g. to train on them elsewhere. Writes
``benchmarks/results/ddae_augment_time_<device>_<date>.json``::

    python benchmarks/ddae_augment_time.py          # the default operations, then contextual_label (CPU: ~10 min)
    python benchmarks/ddae_augment_time.py --operations contextual_label --contextual-steps 2000 --contextual-layers 6
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

import numpy as np  # noqa: E402
from _common import table, write_result  # noqa: E402

from datamodules.ddae.augment import (  # noqa: E402
    CONTEXTUAL_LAYERS,
    CONTEXTUAL_OPERATIONS,
    CONTEXTUAL_STEPS,
    DEFAULT_OPERATIONS,
    MINILM_LAYERS,
    OPERATIONS,
    TextAugmenter,
    check_contextual_fit,
)
from datamodules.ddae.filter import BERTScoreFilter, score_augmentations  # noqa: E402
from datamodules.wordnet_supersense import WordNetSupersenseDataModule  # noqa: E402
from zoo.errors import ConfigError  # noqa: E402

COLUMNS = ["operations", "copies", "fit (s)", "copies (s)", "BERTScore (s)", "in all (s)", "second run (s)"]


def time_augmentation(
    texts: list[str],
    labels: list[int],
    num_classes: int,
    *,
    operations: list[str],
    strength: float,
    max_copies: int,
    contextual_steps: int,
    contextual_layers: int | None,
    device: str,
    work_dir: Path,
) -> dict:
    """The timings of one operation set on ``texts`` (see the module docstring), its cache written in ``work_dir``
    (which should be empty)."""

    def run(augmenter: TextAugmenter):
        return score_augmentations(
            texts,
            labels,
            augmenter=augmenter,
            scorer=BERTScoreFilter(device=device, progress=False),
            num_classes=num_classes,
            cache_dir=work_dir,
        )

    def augmenter() -> TextAugmenter:
        return TextAugmenter(
            strength=strength,
            max_copies=max_copies,
            operations=operations,
            seed=0,
            cache_dir=work_dir,
            device=device,
            contextual_steps=contextual_steps,
            contextual_layers=contextual_layers,
        )

    first = augmenter()
    start = time.perf_counter()
    first.fit(texts, labels)  # the masked-LM of a contextual operation, timed apart; nothing for the others
    fit = time.perf_counter() - start
    start = time.perf_counter()
    made = run(first)
    total = fit + time.perf_counter() - start
    start = time.perf_counter()
    again = run(augmenter())  # a second run: a fresh augmenter, the cache
    second = time.perf_counter() - start
    assert again.from_cache and again.texts == made.texts
    contextual = set(operations) & set(CONTEXTUAL_OPERATIONS)
    return {
        "operations": ",".join(operations),
        "contextual_steps": contextual_steps if contextual else None,
        "contextual_layers": (contextual_layers or MINILM_LAYERS) if contextual else None,
        "copies": len(made.texts),
        "median_f1": float(np.median(made.f1)) if len(made.f1) else None,
        "fit_seconds": fit,
        # score_augmentations' own clocks: TextAugmenter's call (the copies) and the scorer's (its model loaded, the
        # F1); the call's remainder (WordNet read, hashing, writing the cache) goes to "in all"
        "copies_seconds": made.augment_seconds,
        "score_seconds": made.score_seconds,
        "total_seconds": total,
        "second_run_seconds": second,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument(
        "--operations",
        action="append",
        help=f"comma-separated operations of {','.join(OPERATIONS)}; repeat for more sets "
        f"(default: {','.join(DEFAULT_OPERATIONS)}, then contextual_label)",
    )
    parser.add_argument("--strength", type=float, default=0.6, help="augmentation_strength")
    parser.add_argument("--max-copies", type=int, default=8)
    parser.add_argument("--contextual-steps", type=int, default=CONTEXTUAL_STEPS)
    parser.add_argument("--contextual-layers", type=int, default=CONTEXTUAL_LAYERS)
    parser.add_argument("--cache-dir", default=str(Path(os.environ.get("ZOO_DATA_DIR") or "~/.cache/zoo").expanduser()),
                        help="where the WordNet split is (its wordnet_supersense folder)")  # fmt: skip
    parser.add_argument("--keep-dir", default=None, help="copy the DDAE cache files made here")
    parser.add_argument("--out-dir", default=None)
    args = parser.parse_args(argv)
    sets = [[op.strip() for op in ops.split(",") if op.strip()] for ops in args.operations or ()]
    sets = sets or [list(DEFAULT_OPERATIONS), ["contextual_label"]]
    for ops in sets:
        if not ops or set(ops) - set(OPERATIONS):
            parser.error(f"--operations {','.join(ops)}: choose among {','.join(OPERATIONS)}")
    try:
        check_contextual_fit(args.contextual_steps, args.contextual_layers)
    except ConfigError as err:
        parser.error(f"--contextual-steps {args.contextual_steps} --contextual-layers {args.contextual_layers}: {err}")

    dm = WordNetSupersenseDataModule(data_dir=str(Path(args.cache_dir).expanduser() / "wordnet_supersense"))
    texts, labels = dm.load_splits().train
    results = []
    for ops in sets:
        with tempfile.TemporaryDirectory() as work:
            result = time_augmentation(
                list(texts),
                list(labels),
                dm.num_classes,
                operations=ops,
                strength=args.strength,
                max_copies=args.max_copies,
                contextual_steps=args.contextual_steps,
                contextual_layers=args.contextual_layers,
                device=args.device,
                work_dir=Path(work),
            )
            if args.keep_dir:
                Path(args.keep_dir).mkdir(parents=True, exist_ok=True)
                for path in Path(work).glob("ddae_*.json"):
                    shutil.copy(path, args.keep_dir)
        results.append(result)
        print(f"{result['operations']}: {result['total_seconds']:.0f} s in all", flush=True)
    rows = [
        {
            "operations": r["operations"]
            + (f" ({r['contextual_layers']} layers, {r['contextual_steps']} steps)" if r["contextual_steps"] else ""),
            "copies": r["copies"],
            "fit (s)": f"{r['fit_seconds']:.0f}",
            "copies (s)": f"{r['copies_seconds']:.0f}",
            "BERTScore (s)": f"{r['score_seconds']:.0f}",
            "in all (s)": f"{r['total_seconds']:.0f} ({r['total_seconds'] / 60:.1f} min)",
            "second run (s)": f"{r['second_run_seconds']:.2f}",
        }
        for r in results
    ]
    print(table(rows, COLUMNS))
    payload = {"settings": vars(args) | {"train_examples": len(texts)}, "results": results, "rows": rows}
    print(f"wrote {write_result('ddae_augment_time', payload, Path(args.out_dir) if args.out_dir else None)}")


if __name__ == "__main__":
    main()
