"""DDAE on the WordNet supersense corpus: does resampling + BERTScore-filtered augmentation help the tail?

Five runs with the same encoder, head, optimizer and budget (optimizer steps x batch size), differing only in the
training data and its sampling:

    (a) plain         the training split, shuffled
    (b) resample      the training split, class-aware sampler (w_y from --class-weights, f(x) = 1)
    (c) augment       training split + filtered augmented copies, shuffled
    (d) DDAE          training split + filtered augmented copies, class-aware sampler, f(x) = F1 ^ --quality-power
    (e) DDAE-nofilter training split + all augmented copies, class-aware sampler, f(x) = 1

Reported on the test split: macro-F1, tail F1 (mean F1 of the rarest third of the classes by training count),
head accuracy (accuracy on examples of the most frequent third), accuracy; and for the augmentation: the time to
augment and to score, and the fraction of copies the filter rejected. Mean and standard deviation over ``--seeds``
(from ``--first-seed``).

Encoders:
* ``minilm-frozen`` (default, CPU): the packaged all-MiniLM-L6-v2, frozen, pooled as ``--pool`` says (``mean``:
  ``Tokens.pooled_mean``; ``attention``: ``zoo.layers.pooling.AttentionPool``, trained with the head; the two
  ``pool`` settings of ``lit_models.classification.TextClassifier``); its features (mean-pooled, or every token's)
  are computed once for every distinct text and cached, and the head (LayerNorm + an MLP of width
  ``--head-hidden``, 512 by default, chosen on the validation split; ``0`` for LayerNorm + Linear) is trained.
* ``transformer``: ``TransformerTextEncoder`` (``--width`` 256, ``--depth`` 4) trained from scratch with the head,
  end to end (``--device cuda``; on the CPU, a smaller ``--width`` and ``--depth``);
* ``minilm-finetune`` (GPU): the packaged MiniLM unfrozen (``--encoder-lr``) with the head.

    python benchmarks/ddae.py                                   # CPU, frozen MiniLM (the committed result)
    python benchmarks/ddae.py --device cuda --encoder transformer --steps 4000 --batch-size 128 --lr 1e-3
    python benchmarks/ddae.py --device cuda --encoder minilm-finetune --steps 2000 --batch-size 64

Writes ``benchmarks/results/ddae_<device>_<date>.json`` (machine, versions, date, arguments, every number;
``_<encoder>`` before ``.json`` for the end-to-end encoders, ``_attention_pool`` for ``--pool attention``;
``--out-dir`` for another folder, ``--out`` for any path).
On the H200 machine: ``bash benchmarks/h200.sh ddae --encoder minilm-finetune ...`` (see that script).
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from _common import machine  # noqa: E402

from datamodules._common import SeededShuffleSampler  # noqa: E402
from datamodules.ddae.augment import (  # noqa: E402
    CONTEXTUAL_LAYERS,
    CONTEXTUAL_STEPS,
    DEFAULT_OPERATIONS,
    OPERATIONS,
    TextAugmenter,
    check_contextual_fit,
    rarity,
)
from datamodules.ddae.datamodule import GROUP_NAMES, frequency_groups  # noqa: E402
from datamodules.ddae.filter import BERTScoreFilter, ScoredAugmentations, score_augmentations  # noqa: E402
from datamodules.ddae.sampler import ClassAwareSampler, class_weights, copy_quality  # noqa: E402
from datamodules.wordnet_supersense import WordNetSupersenseDataModule  # noqa: E402
from zoo.contracts import Tokens  # noqa: E402
from zoo.errors import ConfigError  # noqa: E402
from zoo.layers.pooling import POOLS, build_pool  # noqa: E402

#: the issue's targets: the least difference of DDAE (d) from the plain run (a), per metric (in points)
TARGETS = {"macro_f1": 3.0, "tail_f1": 5.0, "head_acc": -1.0}

VARIANTS = {
    "a": ("plain", False, False, True),  # name, resample, augment, filter
    "b": ("resample", True, False, True),
    "c": ("augment", False, True, True),
    "d": ("DDAE", True, True, True),
    "e": ("DDAE-nofilter", True, True, False),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--encoder", default="minilm-frozen", choices=["minilm-frozen", "transformer", "minilm-finetune"])
    p.add_argument("--encoder-lr", type=float, default=5e-5, help="learning rate of the unfrozen MiniLM")
    p.add_argument("--pool", default="mean", choices=POOLS, help="tokens -> one vector (TextClassifier's pool)")
    p.add_argument("--pool-heads", type=int, default=8, help="heads of --pool attention")
    p.add_argument("--width", type=int, default=256, help="transformer encoder: token width")
    p.add_argument("--depth", type=int, default=4, help="transformer encoder: blocks")
    p.add_argument("--variants", default="abcde", help="which of a-e to run")
    p.add_argument("--strength", type=float, default=0.3, help="augmentation_strength")
    p.add_argument("--max-copies", type=int, default=8)
    p.add_argument(
        "--operations",
        default=",".join(DEFAULT_OPERATIONS),
        help=f"comma-separated augmentation operations, of {','.join(OPERATIONS)}",
    )
    p.add_argument("--contextual-steps", type=int, default=CONTEXTUAL_STEPS,
                   help="steps of the masked-LM fit of the contextual operations")  # fmt: skip
    p.add_argument("--contextual-layers", type=int, default=CONTEXTUAL_LAYERS,
                   help="MiniLM's first layers that the masked-LM keeps (1 to 6)")  # fmt: skip
    p.add_argument("--threshold", type=float, default=0.6, help="BERTScore F1 filter threshold")
    p.add_argument("--quality-power", type=float, default=1.0,
                   help="f(x) = F1^power for a kept copy in (d) (the datamodule's sample_quality_power)")  # fmt: skip
    p.add_argument("--class-weights", default="inverse", help="none, inverse, sqrt_inverse, effective_number")
    p.add_argument(
        "--quality-control",
        default="none",
        choices=["none", "within-class", "masses-only"],
        help="a control of what f(x) does in (d), whose class shares w_y * sum f(x) it also moves (copies: f < 1):\n"
        "within-class: class shares as with f = 1, f(x) only orders the draws inside a class;\n"
        "masses-only: the class shares of (d), every example of a class drawn alike",
    )
    p.add_argument("--beta", type=float, default=0.999, help="beta of effective_number")
    p.add_argument("--steps", type=int, default=1500, help="optimizer steps per run")
    p.add_argument(
        "--resample-from",
        type=float,
        default=0.0,
        help="resampled runs: fraction of the steps trained on the plain shuffle before the class-aware order",
    )
    p.add_argument(
        "--defer-augmentation",
        action="store_true",
        help="with --resample-from: the plain phase shuffles the original examples only; the copies join after it",
    )
    p.add_argument(
        "--retrain-classifier",
        action="store_true",
        help="with --resample-from: the re-balanced phase trains the last Linear layer alone, the rest frozen "
        "(classifier re-training, Kang et al. 2020)",
    )
    p.add_argument(
        "--logit-adjust",
        type=float,
        default=0.0,
        help="post-hoc logit adjustment at evaluation (Menon et al. 2021): logits - tau * log(training class prior);\n"
        "not DDAE: a loss-free reference for what the head/tail trade-off allows (0: off); a negative tau adds the\n"
        "prior back, for a re-balanced model tested on the long-tailed split",
    )
    p.add_argument(
        "--feature-interpolation",
        type=float,
        default=0.0,
        help="frozen encoder: add M * rarity_y points per training example of class y, each between the features of\n"
        "two random examples of y (SMOTE, Chawla et al. 2002); not DDAE: a control for what new in-class points\n"
        "give a head on frozen features, with no text to make (0: off)",
    )
    p.add_argument(
        "--real-copies",
        action="store_true",
        help="replace the augmented copies by real glosses of the same classes that the split leaves unused, as many\n"
        "per class as the filter keeps (where WordNet has them), each with f(x) = 1; not DDAE: what a perfect\n"
        "augmenter could give, at most, with this encoder, head, sampling and budget",
    )
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--head-hidden", type=int, default=512, help="0: linear head; else MLP width")
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--seeds", type=int, default=3, help="runs per variant (seeds first-seed .. first-seed + n - 1)")
    p.add_argument(
        "--first-seed", type=int, default=0, help="first run's seed: fresh seeds confirm a setting chosen on others"
    )
    p.add_argument("--cache-dir", default=str(Path(os.environ.get("ZOO_DATA_DIR") or "~/.cache/zoo").expanduser()))
    p.add_argument("--out", default=None, help="JSON path; out-dir/ddae_<device>_<date>[_<encoder>].json by default")
    p.add_argument("--out-dir", default=None, help="folder of the default-named JSON (default benchmarks/results)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads while training (1 for a CPU head)")
    args = p.parse_args(argv)
    if args.steps < 40:  # OneCycleLR's warm-up (5% of the steps) must be at least one step long
        p.error(f"--steps {args.steps}: at least 40")
    args.operations = [op.strip() for op in args.operations.split(",") if op.strip()]
    if not args.operations or set(args.operations) - set(OPERATIONS):
        p.error(f"--operations {','.join(args.operations)}: choose among {','.join(OPERATIONS)}")
    try:
        check_contextual_fit(args.contextual_steps, args.contextual_layers)
    except ConfigError as err:
        p.error(f"--contextual-steps {args.contextual_steps} --contextual-layers {args.contextual_layers}: {err}")
    if args.seeds < 1 or args.first_seed < 0:
        p.error(f"--seeds {args.seeds} --first-seed {args.first_seed}: at least one run, from a seed >= 0")
    return args


# -- features of the frozen encoder ---------------------------------------------------------------------------------
def frozen_minilm_features(
    texts: list[str], *, device: str, cache_dir: Path, tokens: bool = False, batch_size: int = 128
) -> torch.Tensor | list[torch.Tensor]:
    """Frozen MiniLM features of ``texts``, cached per text (keyed by its SHA-1): mean-pooled, ``[N, 384]``, or with
    ``tokens`` every real token's, a list of ``N`` bf16 tensors ``[T_i, 384]`` (batched by :func:`token_batch`)."""
    from zoo.encoders import MiniLMTextEncoder

    path = cache_dir / ("minilm_token_features.pt" if tokens else "minilm_mean_features.pt")
    cache: dict[str, torch.Tensor] = torch.load(path) if path.is_file() else {}
    keys = [hashlib.sha1(t.encode()).hexdigest() for t in texts]
    missing = {k: t for k, t in zip(keys, texts, strict=True) if k not in cache}
    missing = sorted(missing.items(), key=lambda kv: len(kv[1]))  # similar lengths share a batch: less padding
    if missing:
        encoder = MiniLMTextEncoder().to(device)
        from tqdm.auto import tqdm

        with torch.inference_mode():
            for start in tqdm(range(0, len(missing), batch_size), desc="MiniLM features", unit="batch"):
                chunk = missing[start : start + batch_size]
                out = encoder([t for _, t in chunk])
                if tokens:
                    embeddings, mask = out.embeddings.to(torch.bfloat16).cpu(), out.mask.cpu()
                    cache.update({k: embeddings[i, mask[i]].clone() for i, (k, _) in enumerate(chunk)})
                else:
                    pooled = out.pooled_mean().float().cpu()
                    cache.update({k: v.clone() for (k, _), v in zip(chunk, pooled, strict=True)})
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(cache, path)
    return [cache[k] for k in keys] if tokens else torch.stack([cache[k] for k in keys])


def token_batch(features: list[torch.Tensor], index, device: torch.device) -> Tokens:
    """The :class:`Tokens` ``[B, max T_i, 384]`` (float32, zero-padded) of ``features[i]`` for ``i`` in ``index``."""
    rows = [features[i] for i in index]
    lengths = torch.tensor([len(r) for r in rows])
    embeddings = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True).to(device, torch.float32)
    mask = torch.arange(embeddings.shape[1]) < lengths[:, None]
    return Tokens(embeddings, mask.to(device))


class Head(nn.Module):
    """The head of ``TextClassifier``: LayerNorm, then Linear (``hidden=0``) or a GELU MLP."""

    def __init__(self, dim: int, num_classes: int, *, hidden: int, dropout: float) -> None:
        super().__init__()
        if hidden:
            layers = [nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, num_classes)]
        else:
            layers = [nn.Dropout(dropout), nn.Linear(dim, num_classes)]
        self.net = nn.Sequential(nn.LayerNorm(dim), *layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class TextModel(nn.Module):
    """A zoo text encoder + pooling (``pool``) + :class:`Head`, trained end to end: ``TransformerTextEncoder`` from
    scratch (``"transformer"``) or the packaged MiniLM, unfrozen (``"minilm-finetune"``)."""

    def __init__(
        self,
        kind: str,
        num_classes: int,
        *,
        hidden: int,
        dropout: float,
        pool: str = "mean",
        pool_heads: int = 8,
        width: int = 256,
        depth: int = 4,
    ) -> None:
        super().__init__()
        from zoo.encoders import MiniLMTextEncoder, TransformerTextEncoder

        if kind == "transformer":
            self.encoder = TransformerTextEncoder(dim=width, depth=depth, num_heads=4, max_length=64, dropout=dropout)
        else:
            self.encoder = MiniLMTextEncoder(freeze=False, max_length=64)
        self.pool = build_pool(pool, self.encoder.out_dim, num_heads=pool_heads, owner="--pool")
        self.head = Head(self.encoder.out_dim, num_classes, hidden=hidden, dropout=dropout)

    def forward(self, texts: list[str]) -> torch.Tensor:
        return self.head(self.pool(self.encoder(texts)))


def _shuffled_order(n: int, total: int, seed: int) -> np.ndarray:
    """``total`` indices of ``range(n)``: consecutive seeded epochs of :class:`SeededShuffleSampler`."""
    shuffle = SeededShuffleSampler(n, seed)
    order = []
    for epoch in range(-(-total // n)):
        shuffle.set_epoch(epoch)
        order.append(shuffle.permutation())
    return np.concatenate(order)[:total]


# -- one run --------------------------------------------------------------------------------------------------------
def train_and_test(
    args: argparse.Namespace,
    *,
    train_x,
    train_y: np.ndarray,
    quality: np.ndarray | None,
    resample: bool,
    eval_x: dict,
    num_classes: int,
    seed: int,
    originals: int | None = None,
) -> dict[str, np.ndarray]:
    """Train for ``args.steps`` steps; predictions on each of ``eval_x`` (``{"val": x, "test": x}``), int64.
    ``originals``: the first ``originals`` examples are the un-augmented ones, which alone make the plain phase of
    deferred re-sampling (the augmented copies re-balance the classes, so they join with the class-aware order)."""
    torch.manual_seed(seed)
    total = args.steps * args.batch_size
    if resample:
        sampler = ClassAwareSampler(
            train_y,
            class_weights=args.class_weights,
            quality=quality,
            num_classes=num_classes,
            num_samples=total,
            beta=args.beta,
            seed=seed,
        )
        order = sampler.indices(0)
        if args.resample_from > 0:  # deferred re-sampling: the plain shuffle first, the class-aware order after
            plain = _shuffled_order(originals or len(train_y), total, seed)
            cut = int(args.resample_from * args.steps) * args.batch_size
            order = np.concatenate([plain[:cut], order[cut:]])
    else:
        order = _shuffled_order(len(train_y), total, seed)
    device = torch.device(args.device)
    if args.encoder == "minilm-frozen" and args.pool == "mean":
        model = Head(train_x.shape[1], num_classes, hidden=args.head_hidden, dropout=args.dropout).to(device)
        train_x = train_x.to(device)
    elif args.encoder == "minilm-frozen":  # token features: the pool learns with the head
        dim = train_x[0].shape[-1]
        pool = build_pool(args.pool, dim, num_heads=args.pool_heads, owner="--pool")
        model = nn.Sequential(pool, Head(dim, num_classes, hidden=args.head_hidden, dropout=args.dropout)).to(device)
    else:
        model = TextModel(
            args.encoder,
            num_classes,
            hidden=args.head_hidden,
            dropout=args.dropout,
            pool=args.pool,
            pool_heads=args.pool_heads,
            width=args.width,
            depth=args.depth,
        ).to(device)
    labels = torch.as_tensor(train_y, device=device)
    if args.encoder == "minilm-finetune":
        rest = [p for name, p in model.named_parameters() if not name.startswith("encoder.")]  # pool and head
        groups = [{"params": model.encoder.parameters(), "lr": args.encoder_lr}, {"params": rest}]
        max_lr = [args.encoder_lr, args.lr]
    else:
        groups, max_lr = [{"params": model.parameters()}], args.lr
    optimizer = torch.optim.AdamW(groups, lr=args.lr, weight_decay=args.weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=max_lr, total_steps=args.steps, pct_start=0.05)
    model.train()
    frozen_at = int(args.resample_from * args.steps) if resample and args.retrain_classifier else None
    for step in range(args.steps):
        if step == frozen_at:  # classifier re-training: only the last Linear layer learns from here on
            classifier = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
            for param in model.parameters():
                param.requires_grad_(False)
            for param in classifier.parameters():
                param.requires_grad_(True)
            model.eval()  # the frozen body's dropout off, as for the features of a trained model
        batch = order[step * args.batch_size : (step + 1) * args.batch_size]
        inputs = _inputs(args, train_x, batch, device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(inputs)
        loss = F.cross_entropy(logits.float(), labels[torch.as_tensor(batch, device=device)])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    model.eval()
    out = {}
    # post-hoc logit adjustment (Menon et al. 2021): subtract tau * log(class prior of the training examples)
    prior = np.bincount(np.asarray(train_y), minlength=num_classes) / len(train_y)
    adjust = torch.as_tensor(args.logit_adjust * np.log(np.maximum(prior, 1e-12)), dtype=torch.float32, device=device)
    with torch.inference_mode():
        for split, x in eval_x.items():
            preds = []
            for start in range(0, len(x), 512):
                inputs = _inputs(args, x, range(start, min(start + 512, len(x))), device)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                    preds.append((model(inputs).float() - adjust).argmax(-1).cpu())
            out[split] = torch.cat(preds).numpy()
    return out


def _inputs(args: argparse.Namespace, x, index, device: torch.device):
    """The model's input for examples ``index`` of ``x``: mean features ``[B, 384]``, token features as
    :class:`Tokens`, or texts."""
    if args.encoder != "minilm-frozen":
        return [x[i] for i in index]
    if args.pool == "mean":
        return x[torch.as_tensor(np.asarray(index), device=x.device)].to(device)
    return token_batch(x, index, device)


def metrics(preds: np.ndarray, labels: np.ndarray, class_groups: np.ndarray, num_classes: int) -> dict[str, float]:
    """Macro-F1, tail F1, head accuracy and accuracy, in percent (torchmetrics' F1 per class)."""
    from torchmetrics.functional.classification import multiclass_f1_score

    f1 = multiclass_f1_score(torch.as_tensor(preds), torch.as_tensor(labels), num_classes, average="none").numpy()
    head = class_groups[labels] == 0
    return {
        "macro_f1": 100 * float(f1.mean()),
        "tail_f1": 100 * float(f1[class_groups == 2].mean()),
        "head_acc": 100 * float((preds[head] == labels[head]).mean()),
        "acc": 100 * float((preds == labels).mean()),
    }


def environment(device: str) -> dict[str, str]:
    from importlib.metadata import version

    info = {
        "machine": platform.node(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": str(os.cpu_count()),
        "python": platform.python_version(),
        # the installed distributions (bert_score.__version__ says 0.3.12 inside the 0.3.13 wheel)
        **{
            name: version(name)
            for name in ("torch", "lightning", "torchmetrics", "transformers", "bert-score", "nlpaug")
        },
        "load_average": " ".join(f"{x:.1f}" for x in os.getloadavg()),
        "git_commit": machine()["git_commit"],
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def prepare(args: argparse.Namespace) -> dict:
    """Corpus, augmentations (cached) and, for the frozen encoder, features (cached): what every run shares."""
    cache_dir = Path(args.cache_dir).expanduser()
    dm = WordNetSupersenseDataModule(data_dir=str(cache_dir / "wordnet_supersense"))
    splits = dm.load_splits()
    train_texts, train_labels = splits.train
    train_y = np.asarray(train_labels)
    num_classes = dm.num_classes
    print(f"WordNet supersenses: {len(train_texts)} train, {len(splits.val[0])} val, {len(splits.test[0])} test")

    aug, wall, reload = None, 0.0, 0.0
    if any(VARIANTS[v][2] for v in args.variants):

        def augment():
            return score_augmentations(
                train_texts,
                train_labels,
                augmenter=TextAugmenter(
                    strength=args.strength,
                    max_copies=args.max_copies,
                    operations=args.operations,
                    seed=0,
                    cache_dir=cache_dir / "ddae",
                    device=args.device,
                    contextual_steps=args.contextual_steps,
                    contextual_layers=args.contextual_layers,
                ),
                scorer=BERTScoreFilter(threshold=args.threshold, device=args.device),
                num_classes=num_classes,
                cache_dir=cache_dir / "ddae",
            )

        start = time.perf_counter()
        aug = augment()
        wall = time.perf_counter() - start
        start = time.perf_counter()
        again = augment()  # the same call again: what a second run pays before training
        reload = time.perf_counter() - start
        assert again.from_cache and again.texts == aug.texts
        print(
            f"DDAE: {len(aug.texts)} copies, augment {aug.augment_seconds:.1f}s + BERTScore {aug.score_seconds:.1f}s "
            f"(this call {wall:.1f}s, from cache: {aug.from_cache}; a second call reads the cache in {reload:.2f}s); "
            f"filter rejects {1 - (aug.f1 >= args.threshold).mean():.1%}"
        )
    if args.real_copies and aug is None:
        raise SystemExit("--real-copies replaces the copies of (c), (d) or (e): add one of them to --variants")
    if aug is not None and args.real_copies:
        aug = _real_copies(aug, train_texts, train_labels, args.threshold, num_classes, cache_dir)
    texts = list(train_texts) + (aug.texts if aug else [])
    evals = {"val": splits.val, "test": splits.test}
    start = time.perf_counter()
    if args.encoder == "minilm-frozen":
        every = texts + [t for split in evals.values() for t in split[0]]
        all_x = frozen_minilm_features(
            every, device=args.device, cache_dir=cache_dir / "ddae", tokens=args.pool != "mean"
        )
        pool_x, offset, eval_x = all_x[: len(texts)], len(texts), {}
        for name, (split_texts, _) in evals.items():
            eval_x[name] = all_x[offset : offset + len(split_texts)]
            offset += len(split_texts)
    else:
        pool_x, eval_x = texts, {name: list(split[0]) for name, split in evals.items()}
    aug_y = train_y[np.asarray(aug.source, dtype=np.int64)] if aug else np.zeros(0, np.int64)
    return {
        "num_classes": num_classes,
        "train_y": train_y,
        "class_groups": frequency_groups(np.bincount(train_y, minlength=num_classes)),
        "aug": aug,
        "augment_call_seconds": wall,
        "cached_reload_seconds": reload,
        "feature_seconds": time.perf_counter() - start,
        "pool_x": pool_x,
        "pool_y": np.concatenate([train_y, aug_y]),
        "eval_x": eval_x,
        "eval_y": {name: np.asarray(split[1]) for name, split in evals.items()},
        "sizes": {"train": len(train_texts), **{name: len(split[0]) for name, split in evals.items()}},
    }


def _real_copies(
    aug: ScoredAugmentations,
    train_texts: list[str],
    train_labels: list[int],
    threshold: float,
    num_classes: int,
    cache_dir: Path,
) -> ScoredAugmentations:
    """``--real-copies``: for each class, as many real training-pool glosses as ``aug`` has copies kept by
    ``threshold``, taken in the split's order after the ones the long-tailed training split keeps (at most what
    WordNet has: the smallest classes have 5 to 25 more), each with F1 1; ``source`` is an original of its class."""
    natural = WordNetSupersenseDataModule(
        data_dir=str(cache_dir / "wordnet_supersense"), imbalance_ratio=None, max_train_per_class=None
    ).load_splits()
    labels = np.asarray(train_labels)
    kept = np.bincount(labels[np.asarray(aug.source)[aug.f1 >= threshold]], minlength=num_classes)
    counts = np.bincount(labels, minlength=num_classes)
    pool_texts, pool_labels = natural.train
    texts, source = [], []
    for c in range(num_classes):
        members = [t for t, y in zip(pool_texts, pool_labels, strict=True) if y == c]
        originals = np.flatnonzero(labels == c)
        # the long-tailed split keeps a prefix of each class's pool (datamodules/wordnet_supersense.py, step 3)
        if members[: counts[c]] != [train_texts[i] for i in originals]:
            raise SystemExit(f"--real-copies: class {c}'s training split is not a prefix of its natural pool")
        extra = members[counts[c] : counts[c] + kept[c]]
        texts += extra
        source += [int(originals[i % len(originals)]) for i in range(len(extra))]
    print(f"--real-copies: {len(texts)} unused real glosses for {int(kept.sum())} kept copies")
    return ScoredAugmentations(
        texts=texts,
        source=source,
        operation=["real"] * len(texts),
        f1=np.ones(len(texts)),
        augment_seconds=0.0,
        score_seconds=0.0,
    )


def run_variant(args: argparse.Namespace, data: dict, key: str) -> dict:
    """Train variant ``key`` (a-e) with ``args.seeds`` seeds; metrics on val and test, mean and std over seeds."""
    name, resample, augment, use_filter = VARIANTS[key]
    aug, train_y = data["aug"], data["train_y"]
    index = np.arange(len(train_y))
    quality = np.ones(len(train_y))
    if augment:
        kept = np.flatnonzero(aug.f1 >= args.threshold) if use_filter else np.arange(len(aug.texts))
        index = np.concatenate([index, len(train_y) + kept])
        scores = copy_quality(aug.f1[kept], args.quality_power) if use_filter else np.ones(len(kept))
        quality = np.concatenate([quality, scores])
    pool_x = data["pool_x"]
    x = pool_x[torch.as_tensor(index)] if isinstance(pool_x, torch.Tensor) else [pool_x[i] for i in index]
    y = data["pool_y"][index]
    if args.feature_interpolation:
        if args.encoder != "minilm-frozen" or args.pool != "mean":
            raise SystemExit("--feature-interpolation needs --encoder minilm-frozen --pool mean (features, not texts)")
        x, y = _interpolated(x, y, train_y, args.feature_interpolation, data["num_classes"])
        quality = np.concatenate([quality, np.ones(len(y) - len(quality))])
    run_args = args
    if resample and args.quality_control != "none":
        run_args, quality = _quality_control(args, y, quality, data["num_classes"])
    per_seed = {"val": [], "test": []}
    start = time.perf_counter()
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        preds = train_and_test(
            run_args,
            train_x=x,
            train_y=y,
            quality=quality,
            resample=resample,
            eval_x=data["eval_x"],
            num_classes=data["num_classes"],
            seed=seed,
            originals=len(train_y) if args.defer_augmentation or args.feature_interpolation else None,
        )
        for split in per_seed:
            labels = data["eval_y"][split]
            per_seed[split].append(metrics(preds[split], labels, data["class_groups"], data["num_classes"]))
    seconds = time.perf_counter() - start
    run = {"name": name, "train_examples": len(index), "train_seconds": seconds, "per_seed": per_seed["test"]}
    for split, results in per_seed.items():
        prefix = "" if split == "test" else "val_"
        run[prefix + "mean"] = {m: float(np.mean([r[m] for r in results])) for m in results[0]}
        run[prefix + "std"] = {m: float(np.std([r[m] for r in results])) for m in results[0]}
    run["augment_seconds"] = (aug.augment_seconds + aug.score_seconds) if augment else 0.0
    run["rejected_fraction"] = float(1 - (aug.f1 >= args.threshold).mean()) if augment and use_filter else 0.0
    run["class_share_by_group"] = _class_shares(run_args, y, quality, resample, data["class_groups"])
    return run


def _class_shares(
    args: argparse.Namespace, y: np.ndarray, quality: np.ndarray, resample: bool, class_groups: np.ndarray
) -> dict[str, float]:
    """How often the training draws (of the re-balanced phase, with ``--resample-from``) take each class, as a
    multiple of an equal split, averaged over the classes of each frequency group: 1.0 each for class-balanced
    draws; the training set's own proportions for a plain shuffle."""
    num_classes = len(class_groups)
    if resample:
        sampler = ClassAwareSampler(
            y, class_weights=args.class_weights, quality=quality, num_classes=num_classes, beta=args.beta
        )
        share = np.bincount(y, weights=sampler.probabilities, minlength=num_classes)
    else:
        share = np.bincount(y, minlength=num_classes) / len(y)
    return {name: float(num_classes * share[class_groups == g].mean()) for g, name in enumerate(GROUP_NAMES)}


def _quality_control(
    args: argparse.Namespace, y: np.ndarray, quality: np.ndarray, num_classes: int
) -> tuple[argparse.Namespace, np.ndarray]:
    """``--quality-control``: the arguments (given class weights) and ``f(x)`` of the control. The sampler draws class
    ``y`` with share ``w_y * sum_{x in y} f(x)``; ``within-class`` gives it ``w_y * n_y`` (the share with ``f = 1``)
    and keeps ``f``, ``masses-only`` keeps the share and sets ``f = 1``."""
    counts = np.bincount(y, minlength=num_classes).astype(np.float64)
    weights = class_weights(counts, args.class_weights, beta=args.beta)
    totals = np.bincount(y, weights=quality, minlength=num_classes)
    safe = np.where(totals > 0, totals, 1.0)
    if args.quality_control == "within-class":
        given = np.where(totals > 0, weights * counts / safe, 0.0)
    else:
        given = np.where(counts > 0, weights * totals / np.maximum(counts, 1.0), 0.0)
        quality = np.ones_like(quality)
    return argparse.Namespace(**{**vars(args), "class_weights": given.tolist()}), quality


def _interpolated(
    x: torch.Tensor, y: np.ndarray, train_y: np.ndarray, copies: float, num_classes: int
) -> tuple[torch.Tensor, np.ndarray]:
    """``x`` ``[N, D]`` and ``y`` with, appended, ``round(copies * rarity_y * n_y)`` points of each class ``y``, each
    ``a + u (b - a)`` for two random original examples ``a``, ``b`` of ``y`` and ``u ~ U(0, 1)`` (seed 0); ``rarity_y``
    as the augmenter's (``datamodules.ddae.augment.rarity``): 0 for the largest class, 1 for the smallest."""
    rarity_y = rarity(np.bincount(train_y, minlength=num_classes))
    rng = np.random.default_rng(0)
    xs, ys = [x], [y]
    for c in range(num_classes):
        members = np.flatnonzero(train_y == c)  # the originals come first in x
        k = int(round(copies * rarity_y[c] * len(members)))
        if k:
            a, b = x[rng.choice(members, k)], x[rng.choice(members, k)]
            xs.append(a + torch.as_tensor(rng.random((k, 1)), dtype=x.dtype) * (b - a))
            ys.append(np.full(k, c, dtype=y.dtype))
    return torch.cat(xs), np.concatenate(ys)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    started = time.perf_counter()
    data = prepare(args)
    aug = data["aug"]
    if args.encoder == "minilm-frozen" and args.device == "cpu":
        # a small head trains ~15x faster on one thread than on two busy ones (measured on the 2-core CPU)
        torch.set_num_threads(args.threads or 1)
    elif args.threads:
        torch.set_num_threads(args.threads)
    rows, runs = [], {}
    for key in args.variants:
        runs[key] = run_variant(args, data, key)
        rows.append((key, runs[key]))
        m, s = runs[key]["mean"], runs[key]["std"]
        print(f"  ({key}) {runs[key]['name']}: " + ", ".join(f"{k} {m[k]:.2f}±{s[k]:.2f}" for k in m), flush=True)

    table = format_table(rows)
    print()
    print(table)
    verdict = targets(runs)
    for line in verdict["lines"]:
        print(line)

    today = dt.date.today().isoformat()
    device_name = "cuda" if args.device.startswith("cuda") else "cpu"
    suffix = "" if args.encoder == "minilm-frozen" else f"_{args.encoder}"
    suffix += "" if args.pool == "mean" else f"_{args.pool}_pool"
    out_dir = Path(args.out_dir) if args.out_dir else ROOT / "benchmarks" / "results"
    out = Path(args.out) if args.out else out_dir / f"ddae_{device_name}_{today}{suffix}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "benchmark": "ddae",
        "date": today,
        "environment": environment(args.device),
        "arguments": vars(args),
        "corpus": {
            "name": "WordNet 3.0 supersenses (datamodules/wordnet_supersense.py, split v1, defaults)",
            **data["sizes"],
            "num_classes": data["num_classes"],
        },
        "augmentation": None
        if aug is None
        else {
            "copies": len(aug.texts),
            "kept": int((aug.f1 >= args.threshold).sum()),
            "rejected_fraction": float(1 - (aug.f1 >= args.threshold).mean()),
            "augment_seconds": aug.augment_seconds,
            "score_seconds": aug.score_seconds,
            "from_cache": aug.from_cache,
            "per_operation": per_operation(aug, args.threshold),
        },
        "augment_call_seconds": data["augment_call_seconds"],
        "cached_reload_seconds": data["cached_reload_seconds"],
        "feature_seconds": data["feature_seconds"],
        "runs": runs,
        "table": table,
        "targets": verdict,
        "total_seconds": time.perf_counter() - started,
    }
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    return report


def per_operation(aug: ScoredAugmentations, threshold: float) -> dict[str, dict[str, float]]:
    """For each augmentation operation: its copies, their median BERTScore F1 and the fraction the filter rejects."""
    operation = np.asarray(aug.operation)
    out = {}
    for name in dict.fromkeys(aug.operation):
        f1 = aug.f1[operation == name]
        out[name] = {
            "copies": int(len(f1)),
            "median_f1": float(np.median(f1)),
            "rejected_fraction": float((f1 < threshold).mean()),
        }
    return out


def format_table(rows: list[tuple[str, dict]]) -> str:
    header = (
        "| run | train ex. | macro-F1 | tail F1 | head acc | acc | augment+filter s | rejected |\n"
        "|---|---:|---:|---:|---:|---:|---:|---:|"
    )
    lines = [header]
    for key, run in rows:

        def cell(k: str, m: dict = run["mean"], s: dict = run["std"]) -> str:
            return f"{m[k]:.2f} ± {s[k]:.2f}"

        lines.append(
            f"| ({key}) {run['name']} | {run['train_examples']} | {cell('macro_f1')} | {cell('tail_f1')} | "
            f"{cell('head_acc')} | {cell('acc')} | {run['augment_seconds']:.0f} | {run['rejected_fraction']:.1%} |"
        )
    return "\n".join(lines)


def targets(runs: dict) -> dict:
    """The issue's :data:`TARGETS` for (d) over (a) (``d_vs_a``: the differences of the means, ``met``: which reach
    their target), and (d) over (e), the filter's worth."""
    out = {"lines": [], "targets": TARGETS}
    if "a" in runs and "d" in runs:
        a, d = runs["a"]["mean"], runs["d"]["mean"]
        out["d_vs_a"] = {m: d[m] - a[m] for m in TARGETS}
        out["met"] = {m: out["d_vs_a"][m] >= least for m, least in TARGETS.items()}
        out["lines"].append(
            "(d) vs (a): "
            + ", ".join(f"{m} {out['d_vs_a'][m]:+.2f} (target >= {least:+g})" for m, least in TARGETS.items())
        )
    if "d" in runs and "e" in runs:
        d, e = runs["d"]["mean"], runs["e"]["mean"]
        out["d_vs_e"] = {k: d[k] - e[k] for k in d}
        out["lines"].append(
            "(d) vs (e), the filter's worth: " + ", ".join(f"{k} {v:+.2f}" for k, v in out["d_vs_e"].items())
        )
    return out


if __name__ == "__main__":
    main()
