"""Audio classification from the user's own sound files: a folder per class, or a manifest CSV.

Folders (as torchvision's ImageFolder and Hugging Face's audiofolder read them)::

    root/train/<class>/**/<file>.wav    the class is the folder under the split; files at any depth below it
    root/val/<class>/...                optional (``validation/`` is accepted too)
    root/test/<class>/...               optional

Manifest (``manifest`` set; ESC-50's ``meta/esc50.csv``, UrbanSound8K's ``metadata/UrbanSound8K.csv``): a CSV file
with a header and one row per sound file, giving its path (``path_column``), its class (``label_column``) and its
split, either by name (``split_column``: ``train``, ``val`` or ``validation``, ``test``) or by fold (``fold_column``:
the folds in ``val_folds`` and ``test_folds`` are evaluated on, every other fold is trained on). Paths are relative
to ``audio_dir`` (default: the manifest's folder). ``path_column`` may also be a template over the row's columns, as
UrbanSound8K, which keeps each fold in its own folder, needs: ``fold{fold}/{slice_file_name}``. ESC-50::

    root=ESC-50-master manifest=meta/esc50.csv audio_dir=audio path_column=filename label_column=category
    fold_column=fold val_folds=[4] test_folds=[5]

Sound files are whatever libsndfile decodes: in the folder layout, the files whose extension is in
``AUDIO_EXTENSIONS`` (any case), hidden files (``.name``, such as macOS's ``._clip.wav``) left out. Each is decoded
when a batch asks for it (in the DataLoader's workers when ``num_workers > 0``) by
:func:`~datamodules._audio.read_audio`: channels averaged to mono, resampled to ``sample_rate``. A clip longer than
``max_seconds`` is cut to that length: training takes a window at a random offset drawn from ``(seed, epoch,
index)``, a new one each epoch and the same after a resume; validation and test take the first ``max_seconds``.
A file is decoded whole before it is cut: right for clips of seconds to minutes; cut hour-long recordings into clips
first.

The classes are the sorted training labels (or ``classes``), read in ``__init__`` with everything but the sound
itself, so that a user's mistake stops the run before the model is built, naming the file, line or column: a
missing ``root`` or manifest, a missing column (the message lists the columns), a path in the manifest that does not
exist (the first few are listed), a fold in ``val_folds``/``test_folds`` that no row has, a split without files, a
validation or test label that training lacks. A class with fewer than ``min_examples_per_class`` training files (an
empty class folder has 0) follows ``rare_classes`` as :mod:`datamodules.text_folder` does: ``"error"`` (the default)
stops with the classes and counts, ``"drop"`` removes them from every split, ``"keep"`` trains on them. A corrupt,
truncated, empty or NaN sound file raises DataError naming it when a batch needs it (through the DataLoader's workers
too).
"""

from __future__ import annotations

import csv
import string
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from datamodules._audio import pad_clips, read_audio
from datamodules._common import (
    GROUP_NAMES,
    SplitLoaders,
    check_class_rules,
    check_loader_args,
    frequency_groups,
    select_classes,
)
from zoo.contracts import IGNORE_INDEX
from zoo.errors import ConfigError, DataError

#: extensions of the sound files the folder layout picks up (compared in lower case): formats libsndfile decodes.
AUDIO_EXTENSIONS = (".wav", ".wave", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aiff", ".aif", ".au", ".caf")
#: the names a split may have, as a folder or in a manifest's split column (lower case).
SPLIT_NAMES = {"train": ("train",), "val": ("val", "validation"), "test": ("test",)}

Examples = list[tuple[str, str]]  # (sound file, class name)


class AudioClipDataset(Dataset):
    """Labelled sound files, decoded when fetched.

    The DataLoader fetches a whole batch with one call of :meth:`__getitems__`: ``{"audio": {"waveform": float32
    [B, S], "lengths": long [B]}, "label": long [B], "group": long [B]}``, each clip mono at ``sample_rate`` Hz,
    zero-padded after its end to the longest one (:func:`~datamodules._audio.pad_clips`).

    Args:
        files: the sound file of each example.
        labels: class index of each example.
        groups: group index of each example.
        sample_rate: Hz the clips are resampled to.
        max_samples: longest clip in samples, ``None`` for no limit.
        random_crop: a longer clip is cut at an offset drawn from ``(seed, epoch, index)`` (training), at its start
            otherwise.
        seed: seed of the offsets.
    """

    def __init__(
        self,
        files: list[str],
        labels: list[int] | np.ndarray,
        groups: list[int] | np.ndarray,
        *,
        sample_rate: int,
        max_samples: int | None = None,
        random_crop: bool = False,
        seed: int = 0,
    ) -> None:
        if not len(files) == len(labels) == len(groups):
            raise ValueError("AudioClipDataset: files, labels and groups differ in length")
        self.files, self.sample_rate, self.max_samples = list(files), sample_rate, max_samples
        self.random_crop, self.seed, self.epoch = random_crop, seed, 0
        self.labels = torch.as_tensor(np.asarray(labels, dtype=np.int64))
        self.groups = torch.as_tensor(np.asarray(groups, dtype=np.int64))

    def __len__(self) -> int:
        return len(self.files)

    def set_epoch(self, epoch: int) -> None:
        """Select the crops of epoch ``epoch`` (the training sampler calls this)."""
        self.epoch = int(epoch)

    def crop_start(self, index: int, length: int) -> int:
        """First sample of the window kept of example ``index``, a clip of ``length`` samples: 0 when the clip fits
        or crops are not random, otherwise a pure function of ``(seed, epoch, index)``."""
        if self.max_samples is None or length <= self.max_samples or not self.random_crop:
            return 0
        return int(np.random.default_rng([self.seed, self.epoch, index]).integers(0, length - self.max_samples + 1))

    def clip(self, index: int) -> np.ndarray:
        """Example ``index`` as float32 ``[S]``, at most ``max_samples`` long."""
        samples = read_audio(self.files[index], sample_rate=self.sample_rate, key="file")
        start = self.crop_start(index, len(samples))
        return samples if self.max_samples is None else samples[start : start + self.max_samples]

    def __getitem__(self, index: int) -> dict[str, Any]:
        batch = self.__getitems__([index])
        audio = {key: value[0] for key, value in batch["audio"].items()}
        audio["waveform"] = audio["waveform"][: int(audio["lengths"])]
        return {"audio": audio, "label": batch["label"][0], "group": batch["group"][0]}

    def __getitems__(self, indices: list[int]) -> dict[str, Any]:
        """The batch of ``indices``."""
        if any(not 0 <= i < len(self) for i in indices):
            raise IndexError(f"indices {indices} out of range for {len(self)} sound files")
        index = torch.as_tensor(indices, dtype=torch.long)
        return {
            "audio": pad_clips([self.clip(int(i)) for i in indices]),
            "label": self.labels[index],
            "group": self.groups[index],
        }


def _is_sound_file(path: Path) -> bool:
    return path.suffix.lower() in AUDIO_EXTENSIONS and not path.name.startswith(".") and path.is_file()


def _split_dir(root: Path, split: str) -> Path | None:
    for name in SPLIT_NAMES[split]:
        if (root / name).is_dir():
            return root / name
    return None


def scan_split_folder(folder: Path) -> tuple[Examples, list[str]]:
    """``(file, class)`` of every sound file under ``folder/<class>/``, sorted by path, and the class folders' names.

    Raises:
        DataError: a sound file directly in ``folder``, outside a class folder.
    """
    entries = sorted(folder.iterdir())
    stray = [p for p in entries if _is_sound_file(p)]
    if stray:
        raise DataError(f"{stray[0]}: a sound file outside a class folder; move it to {folder}/<class>/")
    class_dirs = [p for p in entries if p.is_dir() and not p.name.startswith(".")]
    examples = []
    for class_dir in class_dirs:
        for path in sorted(class_dir.rglob("*")):
            hidden = any(part.startswith(".") for part in path.relative_to(class_dir).parts)
            if not hidden and _is_sound_file(path):
                examples.append((str(path), class_dir.name))
    return examples, [p.name for p in class_dirs]


def read_manifest(
    path: Path,
    *,
    audio_dir: Path,
    path_column: str = "path",
    label_column: str = "label",
    split_column: str = "split",
    fold_column: str | None = None,
    val_folds: Sequence[int | str] = (),
    test_folds: Sequence[int | str] = (),
) -> dict[str, Examples]:
    """``{split: [(file, class), ...]}`` from a manifest CSV (the layout is in the module docstring); files are
    ``audio_dir / path``, not checked here.

    Raises:
        DataError: the file is missing or unreadable, lacks a column, or has a row with an empty path or label, an
            unknown split, or no row has a fold of ``val_folds``/``test_folds``; the message names file and line.
    """
    if not path.is_file():
        raise DataError(f"manifest={str(path)!r}: no such file")
    folds = {**{str(f): "val" for f in val_folds}, **{str(f): "test" for f in test_folds}}
    split_of = {name: split for split, names in SPLIT_NAMES.items() for name in names}
    template = "{" in path_column
    try:
        path_fields = [name for _, name, _, _ in string.Formatter().parse(path_column) if name is not None]
    except ValueError as err:
        raise ConfigError(f"path_column={path_column!r}: not a template of column names ({err})") from None
    if template and (not path_fields or not all(path_fields)):
        raise ConfigError(
            f"path_column={path_column!r}: a template names columns in braces, as 'fold{{fold}}/{{file}}'"
        )
    needed = [(name, "path_column") for name in (path_fields if template else [path_column])]
    needed.append((label_column, "label_column"))
    needed.append((split_column, "split_column") if fold_column is None else (fold_column, "fold_column"))
    splits: dict[str, Examples] = {"train": [], "val": [], "test": []}
    seen_folds: set[str] = set()
    try:
        with path.open(encoding="utf-8-sig", newline="") as file:
            reader = csv.DictReader(file)
            columns = reader.fieldnames or []
            for name, key in needed:
                if name not in columns:
                    hint = "; or set fold_column for a split by folds" if key == "split_column" else ""
                    raise DataError(f"{path}: no column {name!r} ({key}); the columns are {columns}{hint}")
            for row in reader:
                line = reader.line_num
                label = (row.get(label_column) or "").strip()
                try:
                    file_name = (path_column.format_map(row) if template else row.get(path_column) or "").strip()
                except (ValueError, TypeError) as err:  # a format spec the column's text does not fit
                    raise DataError(f"{path}:{line}: path_column={path_column!r} does not apply ({err})") from None
                if not label:
                    raise DataError(f"{path}:{line}: empty label in column {label_column!r}")
                if not file_name:
                    raise DataError(f"{path}:{line}: empty path in column {path_column!r}")
                if fold_column is not None:
                    fold = (row.get(fold_column) or "").strip()
                    seen_folds.add(fold)
                    split = folds.get(fold, "train")
                else:
                    value = (row.get(split_column) or "").strip()
                    split = split_of.get(value.lower())
                    if split is None:
                        raise DataError(
                            f"{path}:{line}: split {value!r} in column {split_column!r} must be 'train', 'val' "
                            "(or 'validation') or 'test'"
                        )
                splits[split].append((str(audio_dir / file_name), label))
    except (UnicodeDecodeError, csv.Error) as err:
        raise DataError(f"{path}: not a readable CSV file ({err})") from None
    unknown = sorted(set(folds) - seen_folds)
    if unknown:
        raise DataError(
            f"{path}: no row has {fold_column}={unknown[0]!r} (val_folds/test_folds); the folds are "
            f"{sorted(seen_folds, key=lambda f: (len(f), f))}"
        )
    return splits


class AudioFolderDataModule(SplitLoaders):
    """The user's sound files in batches ``{"audio": {"waveform": [B, S], "lengths": [B]}, "label": [B],
    "group": [B]}``.

    The layouts, the checks made in ``__init__`` and the cropping rules are in the module docstring. ``group`` is the
    class's frequency third among the training files (``head``/``medium``/``tail``). The training loader shuffles
    with a :class:`~datamodules._common.SeededShuffleSampler`, so order and crops depend only on ``(seed, epoch)``
    and survive a resume; validation and test keep their (sorted) order. A split without files on disk or in the
    manifest has no loader (no validation, or no test).

    Args:
        root: the folder of the ``train/``, ``val/``, ``test/`` folders, or of the manifest (required).
        manifest: a CSV file listing the files (relative to ``root`` unless absolute); ``None`` for the folders.
        audio_dir: the folder the manifest's paths are relative to (relative to ``root`` unless absolute); the
            manifest's folder by default.
        path_column: the manifest's column of file paths, or a template over its columns (``fold{fold}/{name}``).
        label_column: the manifest's column of class names.
        split_column: the manifest's column of split names (``train``, ``val``/``validation``, ``test``).
        fold_column: the manifest's column of fold numbers; when set, the split comes from ``val_folds`` and
            ``test_folds`` and ``split_column`` is not read.
        val_folds: the folds validated on.
        test_folds: the folds tested on.
        classes: the class names in label order; the sorted training labels by default.
        min_examples_per_class: fewest training files a class may have without ``rare_classes`` acting.
        rare_classes: ``"error"``, ``"drop"`` or ``"keep"`` for classes below ``min_examples_per_class``.
        predict_dir: a folder of unlabelled sound files (at any depth, sorted by path) that ``predict`` classifies;
            the test split when ``None``. ``python -m zoo predict`` writes each file's path with its prediction.
        sample_rate: Hz the clips are resampled to; the audio encoder's ``sample_rate``.
        max_seconds: longest clip in seconds (see the module docstring), ``None`` for whole files.
        batch_size: clips per batch.
        num_workers: DataLoader worker processes (they decode the files).
        pin_memory: pin batches in page-locked memory; ``None`` pins when CUDA is available.
        seed: seed of the training order and of the crops.

    Attributes:
        num_classes: ``len(class_names)``.
        class_names: the class of each label.
        group_names: ``["head", "medium", "tail"]``.
        class_groups: group of each class, int64 ``[num_classes]``.
        layout: ``"folders"`` or ``"manifest"``.
        examples: ``{split: (files, labels)}`` of the splits that have files.
    """

    def __init__(
        self,
        *,
        root: str | None = None,
        manifest: str | None = None,
        audio_dir: str | None = None,
        path_column: str = "path",
        label_column: str = "label",
        split_column: str = "split",
        fold_column: str | None = None,
        val_folds: list[int | str] | None = None,
        test_folds: list[int | str] | None = None,
        classes: list[str] | None = None,
        min_examples_per_class: int = 2,
        rare_classes: str = "error",
        predict_dir: str | None = None,
        sample_rate: int = 16000,
        max_seconds: float | None = 10.0,
        batch_size: int = 32,
        num_workers: int = 0,
        pin_memory: bool | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        check_loader_args(name, batch_size=batch_size, num_workers=num_workers, seed=seed)
        check_class_rules(name, min_examples_per_class=min_examples_per_class, rare_classes=rare_classes)
        if isinstance(sample_rate, bool) or not isinstance(sample_rate, int) or sample_rate < 1:
            raise ConfigError(f"{name}: sample_rate={sample_rate!r} must be a positive integer (Hz)")
        if max_seconds is not None and not max_seconds > 0:
            raise ConfigError(f"{name}: max_seconds={max_seconds} must be > 0, or null for whole files")
        val_folds, test_folds = list(val_folds or []), list(test_folds or [])
        if (val_folds or test_folds) and fold_column is None:
            raise ConfigError(f"{name}: val_folds/test_folds need fold_column, the manifest's column of folds")
        both = sorted({str(f) for f in val_folds} & {str(f) for f in test_folds})
        if both:
            raise ConfigError(f"{name}: folds {both} are in both val_folds and test_folds")
        if root is None:  # optional only so that a config without it fails with this line, not a parser dump
            raise ConfigError(
                f"{name}: root is required: the folder of train/<class>/ (and val/, test/) or of the manifest; "
                "--data.init_args.root=PATH"
            )
        self.save_hyperparameters()
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise DataError(f"{name}: root={str(self.root)!r}: folder not found")
        self.sample_rate, self.max_seconds = sample_rate, max_seconds
        self.batch_size, self.num_workers, self.pin_memory, self.seed = batch_size, num_workers, pin_memory, seed

        if manifest is None:
            self.layout = "folders"
            splits, sources, folder_classes = self._scan_folders()
        else:
            self.layout = "manifest"
            path = self.root / Path(manifest).expanduser()
            files_dir = path.parent if audio_dir is None else self.root / Path(audio_dir).expanduser()
            splits = read_manifest(
                path,
                audio_dir=files_dir,
                path_column=path_column,
                label_column=label_column,
                split_column=split_column,
                fold_column=fold_column,
                val_folds=val_folds,
                test_folds=test_folds,
            )
            sources = dict.fromkeys(splits, str(path))
            folder_classes = []
            _check_files_exist(path, splits, path_column=path_column, audio_dir=files_dir)
        if not splits["train"]:
            what = f"sound files ({', '.join(AUDIO_EXTENSIONS)})" if manifest is None else "rows"
            raise DataError(f"{sources['train']}: the training split holds no {what}")

        counts = Counter(dict.fromkeys(folder_classes, 0))  # an empty class folder is a class of 0 files
        counts.update(y for _, y in splits["train"])
        classes, dropped = select_classes(
            counts,
            owner=name,
            source=sources["train"],
            classes=classes,
            min_examples_per_class=min_examples_per_class,
            rare_classes=rare_classes,
        )
        if len(classes) < 2:
            raise DataError(f"{sources['train']}: {len(classes)} class(es) {classes}; classification needs at least 2")
        self.class_names = list(classes)
        self.num_classes = len(classes)
        self.group_names = list(GROUP_NAMES)
        index = {c: i for i, c in enumerate(classes)}
        train_counts = np.array([counts.get(c, 0) for c in classes], dtype=np.int64)
        self.class_groups = frequency_groups(train_counts)
        self.examples: dict[str, tuple[list[str], list[int]]] = {}
        for split, examples in splits.items():
            kept = [(f, y) for f, y in examples if y not in dropped]
            unknown = sorted({y for _, y in kept} - set(index))
            if unknown:
                first = next(f for f, y in kept if y == unknown[0])
                raise DataError(
                    f"{sources[split]}: the {split} split has label(s) {unknown[:10]} that the training split lacks "
                    f"(first file: {first})"
                )
            if kept:
                self.examples[split] = ([f for f, _ in kept], [index[y] for _, y in kept])
        self.predict_files: list[str] | None = None
        if predict_dir is not None:
            folder = Path(predict_dir).expanduser()
            if not folder.is_dir():
                raise DataError(f"{name}: predict_dir={str(folder)!r}: folder not found")
            self.predict_files = [str(p) for p in sorted(folder.rglob("*")) if _is_sound_file(p)]
            if not self.predict_files:
                raise DataError(f"{folder}: holds no sound files ({', '.join(AUDIO_EXTENSIONS)}) to predict")
        self.train_dataset = self.val_dataset = self.test_dataset = self.predict_dataset = None

    def _scan_folders(self) -> tuple[dict[str, Examples], dict[str, str], list[str]]:
        splits, sources, folder_classes = {}, {}, []
        for split in SPLIT_NAMES:
            folder = _split_dir(self.root, split)
            if folder is None:
                if split == "train":
                    raise DataError(
                        f"{self.root / 'train'}: folder not found; expected {self.root}/train/<class>/<file>.wav "
                        "(val/ and test/ optional), or set manifest to read a CSV"
                    )
                splits[split], sources[split] = [], str(self.root / split)
                continue
            splits[split], names = scan_split_folder(folder)
            sources[split] = str(folder)
            if split == "train":
                folder_classes = names
            elif not splits[split]:
                raise DataError(f"{folder}: holds no sound files ({', '.join(AUDIO_EXTENSIONS)}) in class folders")
        return splits, sources, folder_classes

    def dataset(self, split: str) -> AudioClipDataset | None:
        """The files of ``split`` (``"train"``, ``"val"`` or ``"test"``), ``None`` when it has none."""
        if split not in SPLIT_NAMES:
            raise ConfigError(f"{type(self).__name__}: split={split!r} must be one of {list(SPLIT_NAMES)}")
        if split not in self.examples:
            return None
        files, labels = self.examples[split]
        return AudioClipDataset(
            files,
            labels,
            self.class_groups[np.asarray(labels, dtype=np.int64)],
            sample_rate=self.sample_rate,
            max_samples=self._max_samples(),
            random_crop=split == "train",
            seed=self.seed,
        )

    def _max_samples(self) -> int | None:
        return None if self.max_seconds is None else max(1, round(self.max_seconds * self.sample_rate))

    def setup(self, stage: str | None = None) -> None:
        """Build the datasets of the splits found in ``__init__`` (no file is decoded here)."""
        if self.train_dataset is None:
            self.train_dataset = self.dataset("train")
            self.val_dataset = self.dataset("val")
            self.test_dataset = self.dataset("test")
        if self.predict_files is not None and self.predict_dataset is None:
            unlabelled = np.full(len(self.predict_files), IGNORE_INDEX)  # no label: the task ignores it
            self.predict_dataset = AudioClipDataset(
                self.predict_files,
                unlabelled,
                np.zeros(len(self.predict_files), dtype=np.int64),
                sample_rate=self.sample_rate,
                max_samples=self._max_samples(),
            )

    def val_dataloader(self) -> DataLoader | list:
        return self._loader(self.val_dataset, shuffle=False) if self.val_dataset is not None else []

    def test_dataloader(self) -> DataLoader | list:
        return self._loader(self.test_dataset, shuffle=False) if self.test_dataset is not None else []

    def predict_dataloader(self) -> DataLoader | list:
        if self.predict_dataset is not None:
            return self._loader(self.predict_dataset, shuffle=False)
        return self.test_dataloader()


def _check_files_exist(manifest: Path, splits: dict[str, Examples], *, path_column: str, audio_dir: Path) -> None:
    missing = [f for examples in splits.values() for f, _ in examples if not Path(f).is_file()]
    if missing:
        shown = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
        raise DataError(
            f"{manifest}: {len(missing)} file(s) of column {path_column!r} not found under "
            f"audio_dir={str(audio_dir)!r}: {shown}"
        )


__all__ = ["AUDIO_EXTENSIONS", "AudioClipDataset", "AudioFolderDataModule", "read_manifest", "scan_split_folder"]
