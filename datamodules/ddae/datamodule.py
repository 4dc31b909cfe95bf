"""The base of the long-tailed text classification datamodules: splits in, DDAE-rebalanced batches out.

A subclass knows its class names in ``__init__`` and implements :meth:`LongTailTextDataModule.load_splits`; this base
class validates the splits, bins the classes into ``head``/``medium``/``tail`` groups by training frequency, runs the
Dynamic Data Augmentation Engine in :meth:`~LongTailTextDataModule.setup` when ``augmentation_strength > 0``
(augmented copies of rare-class examples, kept when their BERTScore F1 against the original reaches
``filter_threshold``; cached on disk) and samples training batches with a
:class:`~datamodules.ddae.sampler.ClassAwareSampler` when ``class_weights`` is not ``"none"``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch.utils.data import DataLoader, Dataset, Sampler

from datamodules._common import (
    GROUP_NAMES,
    ResumableTrainingOrder,
    SeededShuffleSampler,
    check_loader_args,
    collate,
    data_parallel_shard,
    default_data_dir,
    frequency_groups,
)
from datamodules.ddae.augment import (
    CONTEXTUAL_LAYERS,
    CONTEXTUAL_STEPS,
    DEFAULT_OPERATIONS,
    OPERATIONS,
    TextAugmenter,
    check_contextual_fit,
    check_strength,
)
from datamodules.ddae.filter import DEFAULT_THRESHOLD, BERTScoreFilter, ScoredAugmentations, score_augmentations
from datamodules.ddae.sampler import WEIGHT_SCHEMES, ClassAwareSampler, copy_quality
from zoo.contracts import IGNORE_INDEX
from zoo.errors import ConfigError, DataError


@dataclass
class TextSplits:
    """``(texts, labels)`` of each split; ``val``/``test`` may be ``None`` when the data has none. ``predict``, when
    given, is what ``predict`` classifies instead of the test split; its labels may be ``IGNORE_INDEX`` (unknown)."""

    train: tuple[list[str], list[int]]
    val: tuple[list[str], list[int]] | None = None
    test: tuple[list[str], list[int]] | None = None
    predict: tuple[list[str], list[int]] | None = None


class TextClassificationDataset(Dataset):
    """``{"text": str, "label": long [], "group": long []}`` for each example; an unknown label (``IGNORE_INDEX``)
    gets group 0."""

    def __init__(self, texts: list[str], labels: list[int] | np.ndarray, class_groups: np.ndarray) -> None:
        self.texts = list(texts)
        self.labels = torch.as_tensor(np.asarray(labels, dtype=np.int64))
        known = self.labels >= 0
        self.groups = torch.where(known, torch.as_tensor(class_groups)[self.labels.clamp(min=0)], 0)

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"text": self.texts[index], "label": self.labels[index], "group": self.groups[index]}


class LongTailTextDataModule(ResumableTrainingOrder):
    """Text classification batches ``{"text": list[str], "label": long [B], "group": long [B]}``, rebalanced by DDAE.

    Args:
        class_names: name of each label, known at ``__init__`` (so ``num_classes`` is).
        batch_size: examples per batch.
        num_workers: DataLoader worker processes.
        pin_memory: pin batches in page-locked memory; ``None`` pins when CUDA is available.
        seed: seed of the training order, the augmentation and the sampler.
        class_weights: ``w_y`` of the class-aware sampler: ``"none"`` (no resampling: a seeded shuffle of the
            training set), ``"inverse"``, ``"sqrt_inverse"``, ``"effective_number"`` or one float per class (see
            :mod:`datamodules.ddae.sampler`). Computed on the training set after augmentation.
        effective_number_beta: ``beta`` of ``"effective_number"``.
        rebalance_from_epoch: deferred re-balancing: epochs before this one train on a plain shuffle of the original
            examples (no resampling, no augmented copies), later ones on the class-aware draws over originals and
            copies (Cao et al. 2019; see :mod:`datamodules.ddae.sampler`). 0: rebalanced from the first epoch.
        sample_quality: ``f(x)`` of the sampler: ``"bertscore"`` (1 for an original example, its BERTScore F1 raised
            to ``sample_quality_power`` for an augmented copy; the default) or ``"uniform"`` (1 for all).
        sample_quality_power: ``p`` in ``f(x) = F1^p`` for a copy: 1 (the default) barely separates the copies, whose
            F1 mostly lies between 0.8 and 1; 10-20 draws a copy at 0.9 a third to an eighth as often as a perfect one
            (a soft filter: on the WordNet long tail it kept most of the tail's gain at a fraction of the head's
            loss; README, "DDAE"); 0 weighs copies like originals. A class is drawn with share ``w_y * sum f(x)``, so
            a power above 1 also lowers the share of the classes that own the most copies, the rarest.
        augmentation_strength: in ``[0, 1]``; 0 turns augmentation off (see :mod:`datamodules.ddae.augment`).
        max_copies: augmented copies per example of the rarest class at strength 1.
        augmentation_ops: nlpaug operations to draw from (names in ``datamodules.ddae.augment.OPERATIONS``).
        filter_threshold: keep an augmented copy when its BERTScore F1 against its original is at least this;
            ``None`` keeps every copy (no filter; scores are still computed for ``sample_quality``).
        filter_device: where BERTScore's MiniLM runs (``"cpu"``, ``"cuda"``), and the MiniLM of the ``contextual`` and
            ``contextual_label`` augmentation (fitted there: about 6 minutes on a 2-core CPU with the defaults).
        contextual_steps: optimizer steps of that masked-LM fit (128 texts each).
        contextual_layers: MiniLM's first layers that the fit keeps (1 to 6; ``null``: all), as
            :class:`~datamodules.ddae.augment.TextAugmenter`'s.
        filter_batch_size: sentences per BERTScore forward pass.
        cache_dir: folder of the DDAE cache; default ``$ZOO_DATA_DIR/ddae`` or ``~/.cache/zoo/ddae``.

    Attributes:
        num_classes: ``len(class_names)``.
        class_names: as given.
        group_names: ``["head", "medium", "tail"]``.
        class_groups: group of each class (after :meth:`setup`), int64 ``[num_classes]``.
        augmentations: the scored copies of the last :meth:`setup` (``None`` without augmentation).
        ddae_stats: counts and timings of the augmentation (after :meth:`setup`).
    """

    def __init__(
        self,
        *,
        class_names: list[str],
        batch_size: int = 64,
        num_workers: int = 0,
        pin_memory: bool | None = None,
        seed: int = 0,
        class_weights: str | list[float] = "none",
        effective_number_beta: float = 0.999,
        rebalance_from_epoch: int = 0,
        sample_quality: str = "bertscore",
        sample_quality_power: float = 1.0,
        augmentation_strength: float = 0.0,
        max_copies: int = 8,
        augmentation_ops: list[str] | None = None,
        filter_threshold: float | None = DEFAULT_THRESHOLD,
        filter_device: str = "cpu",
        filter_batch_size: int = 64,
        cache_dir: str | None = None,
        contextual_steps: int = CONTEXTUAL_STEPS,
        contextual_layers: int | None = CONTEXTUAL_LAYERS,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        check_loader_args(name, batch_size=batch_size, num_workers=num_workers, seed=seed)
        if len(class_names) < 2:
            raise ConfigError(f"{name}: {len(class_names)} classes found; classification needs at least 2")
        if isinstance(class_weights, str):
            if class_weights not in WEIGHT_SCHEMES:
                raise ConfigError(f"{name}: class_weights={class_weights!r} must be one of {list(WEIGHT_SCHEMES)}")
        elif len(class_weights) != len(class_names) or any(w < 0 for w in class_weights):
            raise ConfigError(
                f"{name}: class_weights must hold {len(class_names)} non-negative floats, got {list(class_weights)}"
            )
        start = rebalance_from_epoch
        if isinstance(start, bool) or not isinstance(start, int) or start < 0:
            raise ConfigError(f"{name}: rebalance_from_epoch={start!r} must be an integer >= 0")
        if not 0 <= effective_number_beta < 1:
            raise ConfigError(f"{name}: effective_number_beta={effective_number_beta} must be in [0, 1)")
        if sample_quality not in ("bertscore", "uniform"):
            raise ConfigError(f"{name}: sample_quality={sample_quality!r} must be 'bertscore' or 'uniform'")
        if isinstance(sample_quality_power, bool) or not (
            isinstance(sample_quality_power, int | float) and 0 <= sample_quality_power < float("inf")
        ):
            raise ConfigError(f"{name}: sample_quality_power={sample_quality_power!r} must be a finite number >= 0")
        try:
            check_strength(augmentation_strength)
        except ConfigError as err:
            raise ConfigError(f"{name}: {err}") from None
        if max_copies < 0:
            raise ConfigError(f"{name}: max_copies={max_copies} must be >= 0")
        ops = list(DEFAULT_OPERATIONS if augmentation_ops is None else augmentation_ops)
        if not ops:  # was silently the defaults
            raise ConfigError(
                f"{name}: augmentation_ops=[] names no operation; leave it out for the defaults "
                f"{list(DEFAULT_OPERATIONS)}, or set augmentation_strength: 0 for no augmentation"
            )
        if not set(ops) <= set(OPERATIONS):
            raise ConfigError(f"{name}: augmentation_ops={ops} must be taken from {list(OPERATIONS)}")
        try:
            check_contextual_fit(contextual_steps, contextual_layers)
        except ConfigError as err:
            raise ConfigError(f"{name}: {err}") from None
        if filter_threshold is not None and not 0 <= filter_threshold <= 1:
            raise ConfigError(f"{name}: filter_threshold={filter_threshold} must be in [0, 1] or null")
        self.class_names = list(class_names)
        self.num_classes = len(self.class_names)
        self.group_names = list(GROUP_NAMES)
        self.batch_size, self.num_workers, self.pin_memory, self.seed = batch_size, num_workers, pin_memory, seed
        self.class_weights, self.effective_number_beta = class_weights, effective_number_beta
        self.rebalance_from_epoch = rebalance_from_epoch
        self.sample_quality, self.sample_quality_power = sample_quality, float(sample_quality_power)
        self.augmentation_strength, self.max_copies, self.augmentation_ops = augmentation_strength, max_copies, ops
        self.filter_threshold, self.filter_device, self.filter_batch_size = (
            filter_threshold,
            filter_device,
            filter_batch_size,
        )
        self.contextual_steps, self.contextual_layers = contextual_steps, contextual_layers
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else default_data_dir("ddae")
        self.class_groups: np.ndarray | None = None
        self.augmentations: ScoredAugmentations | None = None
        self.ddae_stats: dict[str, float] = {}
        self.train_dataset: TextClassificationDataset | None = None
        self._train_quality: np.ndarray | None = None
        self._original_train: tuple[list[str], list[int]] = ([], [])

    # -- what a subclass provides ---------------------------------------------------------------------------------
    def load_splits(self) -> TextSplits:  # pragma: no cover - abstract
        """The raw splits; labels index ``class_names``."""
        raise NotImplementedError

    # -- setup ----------------------------------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        """Load and check the splits and bin the classes (once); for ``fit`` (or no stage), run DDAE on the training
        split (once; cached on disk). ``validate``/``test``/``predict`` alone do not augment."""
        if self.train_dataset is None:
            splits = self.load_splits()
            texts, labels = splits.train
            self._check_split("train", texts, labels)
            counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=self.num_classes)
            self.class_groups = frequency_groups(counts)
            self._original_train = (list(texts), list(labels))
            self._train_quality = np.ones(len(texts))
            self.train_dataset = TextClassificationDataset(texts, labels, self.class_groups)
            self.val_dataset = self._eval_dataset("val", splits.val)
            self.test_dataset = self._eval_dataset("test", splits.test)
            self.predict_dataset = self._eval_dataset("predict", splits.predict)
        if stage in (None, "fit") and self.augmentations is None and self.augmentation_strength > 0 and self.max_copies:
            self._augment(*self._original_train)

    def _augment(self, texts: list[str], labels: list[int]) -> None:
        self.augmentations = aug = score_augmentations(
            texts,
            labels,
            augmenter=TextAugmenter(
                strength=self.augmentation_strength,
                max_copies=self.max_copies,
                operations=self.augmentation_ops,
                seed=self.seed,
                cache_dir=self.cache_dir,
                device=self.filter_device,
                contextual_steps=self.contextual_steps,
                contextual_layers=self.contextual_layers,
            ),
            scorer=BERTScoreFilter(device=self.filter_device, batch_size=self.filter_batch_size),
            num_classes=self.num_classes,
            cache_dir=self.cache_dir,
        )
        keep = np.ones(len(aug.texts), bool) if self.filter_threshold is None else aug.f1 >= self.filter_threshold
        train_texts = texts + [t for t, k in zip(aug.texts, keep, strict=True) if k]
        train_labels = labels + [labels[s] for s, k in zip(aug.source, keep, strict=True) if k]
        quality = np.concatenate([np.ones(len(texts)), copy_quality(aug.f1[keep], self.sample_quality_power)])
        self._train_quality = quality if self.sample_quality == "bertscore" else np.ones(len(train_texts))
        self.train_dataset = TextClassificationDataset(train_texts, train_labels, self.class_groups)
        self.ddae_stats = {
            "original": len(texts),
            "augmented": len(aug.texts),
            "kept": int(keep.sum()),
            "rejected_fraction": float(1 - keep.mean()) if len(keep) else 0.0,
            "augment_seconds": aug.augment_seconds,
            "score_seconds": aug.score_seconds,
            "from_cache": aug.from_cache,
        }
        # on the console (Lightning's logger), not only Python's logging, which the CLI leaves unconfigured
        rank_zero_info(
            f"DDAE: {self.ddae_stats['augmented']} augmented copies of {self.ddae_stats['original']} training texts, "
            f"{self.ddae_stats['kept']} kept by the filter ({100 * self.ddae_stats['rejected_fraction']:.1f}% "
            f"rejected){', from the cache' if aug.from_cache else ''}"
        )

    def _eval_dataset(self, split: str, data: tuple[list[str], list[int]] | None) -> TextClassificationDataset | None:
        if data is None:
            return None
        self._check_split(split, *data)
        return TextClassificationDataset(data[0], data[1], self.class_groups)

    def _check_split(self, split: str, texts: list[str], labels: list[int]) -> None:
        name = type(self).__name__
        if len(texts) != len(labels):
            raise DataError(f"{name}: the {split} split has {len(texts)} texts but {len(labels)} labels")
        if split == "train" and not texts:
            raise DataError(f"{name}: the training split is empty")
        for i, (text, label) in enumerate(zip(texts, labels, strict=True)):
            if not isinstance(text, str) or not text.strip():
                raise DataError(f"{name}: {split} example {i} has an empty or non-string text: {text!r}")
            if not 0 <= label < self.num_classes and not (split == "predict" and label == IGNORE_INDEX):
                raise DataError(f"{name}: {split} example {i} has label {label} outside [0, {self.num_classes})")

    # -- loaders --------------------------------------------------------------------------------------------------
    def train_sampler(self) -> Sampler:
        """The training order: a :class:`ClassAwareSampler` (``class_weights`` not ``"none"``, or deferred
        re-balancing) or a seeded shuffle."""
        if self.train_dataset is None:
            raise RuntimeError(f"{type(self).__name__}: call setup() before asking for the training sampler")
        shard = data_parallel_shard(getattr(self, "trainer", None))
        if self.class_weights == "none" and not self.rebalance_from_epoch:
            sampler: Sampler = SeededShuffleSampler(self.train_dataset, self.seed, **shard)
        else:
            sampler = ClassAwareSampler(
                self.train_dataset.labels.numpy(),
                class_weights=self.class_weights,
                quality=self._train_quality,
                num_classes=self.num_classes,
                beta=self.effective_number_beta,
                seed=self.seed,
                rebalance_from_epoch=self.rebalance_from_epoch,
                originals=len(self._original_train[0]),  # the dataset holds the originals first, then the copies
                **shard,
            )
        return sampler

    def _loader(self, dataset: Dataset, sampler: Sampler | None = None) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            pin_memory=torch.cuda.is_available() if self.pin_memory is None else self.pin_memory,
            collate_fn=collate,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_dataset, self._track_train_sampler(self.train_sampler()))

    def val_dataloader(self) -> DataLoader | list:
        return self._loader(self.val_dataset) if self.val_dataset is not None else []

    def test_dataloader(self) -> DataLoader | list:
        return self._loader(self.test_dataset) if self.test_dataset is not None else []

    def predict_dataloader(self) -> DataLoader | list:
        if self.predict_dataset is not None:
            return self._loader(self.predict_dataset)
        return self.test_dataloader()


__all__ = [
    "GROUP_NAMES",
    "LongTailTextDataModule",
    "TextClassificationDataset",
    "TextSplits",
    "frequency_groups",
]
