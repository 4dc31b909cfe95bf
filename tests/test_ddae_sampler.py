"""The class-aware sampler: its frequencies match w_y f(x), its order is (seed, epoch), it shards and resumes."""

from __future__ import annotations

import numpy as np
import pytest

from datamodules.ddae.sampler import ClassAwareSampler, class_weights
from zoo.errors import ConfigError


def _long_tail_labels(rng: np.random.Generator) -> np.ndarray:
    counts = [400, 150, 60, 20, 5, 1]
    return rng.permutation(np.repeat(np.arange(len(counts)), counts))


@pytest.mark.parametrize("scheme", ["none", "inverse", "sqrt_inverse", "effective_number", [0.5, 1, 2, 0, 3, 1]])
def test_empirical_class_frequencies_match_weight_times_quality(scheme):
    rng = np.random.default_rng(0)
    labels = _long_tail_labels(rng)
    quality = rng.uniform(0.2, 1.0, len(labels))
    draws = 100_000
    sampler = ClassAwareSampler(labels, class_weights=scheme, quality=quality, num_samples=draws, beta=0.99, seed=3)
    w = class_weights(np.bincount(labels), scheme, beta=0.99)
    mass = np.array([w[y] * quality[labels == y].sum() for y in range(6)])
    expected = mass / mass.sum()
    observed = np.bincount(labels[np.fromiter(sampler, int)], minlength=6) / draws
    # each class count is binomial(draws, p_y): 5 standard deviations bound a false failure at ~6e-7 per class
    bound = 5 * np.sqrt(expected * (1 - expected) / draws)
    assert np.all(np.abs(observed - expected) <= bound + 1e-12), (observed, expected, bound)


def test_within_a_class_examples_are_drawn_in_proportion_to_quality():
    labels = np.array([0, 0, 0, 1, 1])
    quality = np.array([1.0, 2.0, 5.0, 1.0, 1.0])
    draws = 100_000
    sampler = ClassAwareSampler(labels, class_weights="inverse", quality=quality, num_samples=draws, seed=1)
    observed = np.bincount(np.fromiter(sampler, int), minlength=5)[:3] / draws
    mass = quality / np.array([3, 3, 3, 2, 2])  # w_y = 1 / n_y
    expected = mass[:3] / mass.sum()
    bound = 5 * np.sqrt(expected * (1 - expected) / draws)
    assert np.all(np.abs(observed - expected) <= bound)


def test_inverse_weights_balance_classes_and_effective_number_lies_between():
    counts = np.array([1000, 100, 10])
    inverse = class_weights(counts, "inverse")
    assert np.allclose(inverse * counts, 1.0)
    effective = class_weights(counts, "effective_number", beta=0.99)
    ratio = effective[2] / effective[0]
    assert 1.0 < ratio < inverse[2] / inverse[0]  # milder than inverse, stronger than none


def test_order_is_a_function_of_seed_and_epoch():
    labels = _long_tail_labels(np.random.default_rng(1))
    a = ClassAwareSampler(labels, seed=7)
    b = ClassAwareSampler(labels, seed=7)
    a.set_epoch(3)
    b.set_epoch(3)
    assert list(a) == list(b)
    b.set_epoch(4)
    assert list(a) != list(b)
    assert list(ClassAwareSampler(labels, seed=8)) != list(ClassAwareSampler(labels, seed=7))


def test_ranks_shard_the_global_draw_without_overlap():
    labels = _long_tail_labels(np.random.default_rng(2))
    ranks = [ClassAwareSampler(labels, num_samples=101, seed=5, num_replicas=3, rank=r) for r in range(3)]
    for sampler in ranks:
        sampler.set_epoch(2)
    shards = [list(s) for s in ranks]
    assert all(len(shard) == len(ranks[0]) == 34 for shard in shards)  # ceil(101 / 3)
    interleaved = [shards[r][i] for i in range(34) for r in range(3)]
    assert interleaved == ranks[0].global_indices().tolist()


def test_state_round_trips_for_an_exact_resume_mid_epoch():
    labels = _long_tail_labels(np.random.default_rng(3))
    uninterrupted = ClassAwareSampler(labels, seed=11)
    uninterrupted.set_epoch(5)
    expected = list(uninterrupted)

    first = ClassAwareSampler(labels, seed=11)
    first.set_epoch(5)
    iterator = iter(first)
    seen = [next(iterator) for _ in range(137)]
    state = first.state_dict()
    assert state["position"] == 137 and state["epoch"] == 5

    resumed = ClassAwareSampler(labels, seed=0)  # the seed comes back from the state
    resumed.load_state_dict(state)
    resumed.set_epoch(5)  # Lightning sets the same epoch again on restart: the position survives
    assert seen + list(resumed) == expected
    resumed.set_epoch(6)  # the next epoch starts from the beginning
    assert len(list(resumed)) == len(labels)


def test_bad_arguments_raise_config_errors():
    labels = np.array([0, 1, 1])
    with pytest.raises(ConfigError, match="scheme"):
        ClassAwareSampler(labels, class_weights="balanced")
    with pytest.raises(ConfigError, match="quality"):
        ClassAwareSampler(labels, quality=[1.0, -1.0, 1.0])
    with pytest.raises(ConfigError, match="weights given"):
        ClassAwareSampler(labels, class_weights=[1.0])
    with pytest.raises(ConfigError, match="probability 0"):
        ClassAwareSampler(labels, quality=[0.0, 0.0, 0.0])
    with pytest.raises(ConfigError, match="num_replicas=0"):
        ClassAwareSampler(labels, num_replicas=0)
    with pytest.raises(ConfigError, match="rank=2"):
        ClassAwareSampler(labels, num_replicas=2, rank=2)
    with pytest.raises(ConfigError, match="seed"):
        ClassAwareSampler(labels, seed=-1)
    # a state saved mid-epoch on two ranks cannot resume exactly on one
    state = ClassAwareSampler(labels, num_replicas=2, rank=0).state_dict(consumed=1)
    with pytest.raises(ConfigError, match="saved mid-epoch on 2 data-parallel ranks and is resumed on 1; resume it"):
        ClassAwareSampler(labels, num_replicas=1, rank=0).load_state_dict(state)


@pytest.mark.parametrize("class_weights", ["inverse", "none"])  # the class-aware draw, the plain shuffle
def test_datamodule_checkpoint_state_resumes_the_training_order_after_the_consumed_batches(tmp_path, class_weights):
    from types import SimpleNamespace

    from datamodules.text_folder import TextFolderDataModule

    rows = [f"text number {i},{'abc'[min(i % 7, 2)]}" for i in range(40)]
    train = tmp_path / "train.csv"
    train.write_text("text,label\n" + "\n".join(rows) + "\n")

    def batches(dm):
        return [b["text"] for b in dm.train_dataloader()]

    def make():
        dm = TextFolderDataModule(train_file=str(train), class_weights=class_weights, batch_size=4, seed=2)
        dm.setup("fit")
        return dm

    expected = batches(make())
    first = make()
    first.train_dataloader()
    progress = SimpleNamespace(current=SimpleNamespace(processed=3))  # what Lightning's fit loop counts
    loop = SimpleNamespace(epoch_loop=SimpleNamespace(batch_progress=progress))
    first.trainer = SimpleNamespace(fit_loop=loop, world_size=1)
    state = first.state_dict()
    assert state["sampler"]["position"] == 12
    # several processes: both samplers shard themselves, and the count is this rank's (Lightning does not wrap them)
    first.trainer.world_size = 2
    assert first.state_dict()["sampler"]["position"] == 12
    first.trainer.world_size = 1
    resumed = make()
    resumed.load_state_dict(state)
    assert batches(resumed) == expected[3:]


def test_deferred_rebalancing_shuffles_the_originals_then_draws_class_aware():
    labels = _long_tail_labels(np.random.default_rng(2))  # 636 examples; say the last 36 are augmented copies
    sampler = ClassAwareSampler(labels, class_weights="inverse", rebalance_from_epoch=2, originals=600, seed=4)
    for epoch in (0, 1):  # plain epochs: each original once, then the first 36 of a second permutation; no copy
        sampler.set_epoch(epoch)
        drawn = np.fromiter(sampler, int)
        assert len(drawn) == len(labels)
        assert sorted(drawn[:600]) == list(range(600)) and drawn.max() < 600
    sampler.set_epoch(0)
    first = list(sampler)
    sampler.set_epoch(1)
    assert list(sampler) != first  # a new permutation every epoch
    sampler.set_epoch(2)  # rebalanced: the six classes about equally often, copies included
    drawn = np.fromiter(sampler, int)
    assert drawn.max() >= 600
    shares = np.bincount(labels[drawn], minlength=6) / len(drawn)
    assert np.all(np.abs(shares - 1 / 6) < 5 * np.sqrt((1 / 6) * (5 / 6) / len(drawn)))
    with pytest.raises(ConfigError, match="rebalance_from_epoch"):
        ClassAwareSampler(labels, rebalance_from_epoch=-1)
    with pytest.raises(ConfigError, match="originals"):
        ClassAwareSampler(labels, originals=0)


def test_datamodule_defers_rebalancing_and_resumes_in_the_plain_phase(tmp_path):
    from types import SimpleNamespace

    from datamodules.text_folder import TextFolderDataModule

    rows = [f"text number {i},{'abc'[min(i % 7, 2)]}" for i in range(40)]  # a: 6, b: 6, c: 28
    train = tmp_path / "train.csv"
    train.write_text("text,label\n" + "\n".join(rows) + "\n")

    def make():
        dm = TextFolderDataModule(
            train_file=str(train), class_weights="inverse", rebalance_from_epoch=1, batch_size=4, seed=2
        )
        dm.setup("fit")
        return dm

    dm = make()
    loader = dm.train_dataloader()
    plain = [t for b in loader for t in b["text"]]
    assert sorted(plain) == sorted(r.split(",")[0] for r in rows)  # epoch 0: every example once
    loader.sampler.set_epoch(1)
    balanced = [label for b in loader for label in b["label"].tolist()]
    assert len(balanced) == 40 and balanced.count(2) < 28  # epoch 1: class-aware draws
    # a checkpoint in the plain phase resumes there
    first = make()
    first.train_dataloader()
    progress = SimpleNamespace(current=SimpleNamespace(processed=2))
    loop = SimpleNamespace(epoch_loop=SimpleNamespace(batch_progress=progress))
    first.trainer = SimpleNamespace(fit_loop=loop, world_size=1)
    resumed = make()
    resumed.load_state_dict(first.state_dict())
    assert [t for b in resumed.train_dataloader() for t in b["text"]] == plain[8:]
    with pytest.raises(ConfigError, match="rebalance_from_epoch=-2"):
        TextFolderDataModule(train_file=str(train), rebalance_from_epoch=-2)


@pytest.mark.parametrize("class_weights", ["inverse", "none"])
def test_training_sampler_shards_by_the_strategys_data_parallel_ranks(tmp_path, class_weights):
    """The samplers take their ranks from Lightning's strategy, not the process group: under ModelParallelStrategy the
    tensor-parallel ranks of a data-parallel rank must read the same batch."""
    from types import SimpleNamespace

    from datamodules.text_folder import TextFolderDataModule

    train = tmp_path / "train.csv"
    train.write_text("text,label\n" + "\n".join(f"text number {i},{'ab'[i % 2]}" for i in range(10)) + "\n")
    dm = TextFolderDataModule(train_file=str(train), class_weights=class_weights, batch_size=4)
    dm.setup("fit")
    for kwargs, expected in [(None, (1, 0)), ({"num_replicas": 3, "rank": 2}, (3, 2))]:
        dm.trainer = SimpleNamespace(distributed_sampler_kwargs=kwargs)
        sampler = dm.train_dataloader().sampler
        assert (sampler.num_replicas, sampler.rank, len(sampler)) == (*expected, -(-10 // expected[0]))


def test_a_state_restored_for_validation_does_not_cut_a_later_fit(tmp_path):
    """``trainer.validate(ckpt_path=...)`` restores the datamodule too; its training position must not reach the
    next ``fit`` of the same datamodule."""
    from types import SimpleNamespace

    from lightning.pytorch.trainer.states import TrainerFn

    from datamodules.text_folder import TextFolderDataModule

    train = tmp_path / "train.csv"
    train.write_text("text,label\n" + "\n".join(f"text number {i},{'ab'[i % 2]}" for i in range(12)) + "\n")
    dm = TextFolderDataModule(train_file=str(train), batch_size=4)
    dm.setup("fit")
    state = {"sampler": {"seed": 0, "epoch": 0, "position": 8, "num_replicas": 1}}
    dm.trainer = SimpleNamespace(state=SimpleNamespace(fn=TrainerFn.VALIDATING), distributed_sampler_kwargs=None)
    dm.load_state_dict(state)
    dm.trainer = SimpleNamespace(state=SimpleNamespace(fn=TrainerFn.FITTING), distributed_sampler_kwargs=None)
    assert len(list(dm.train_dataloader().sampler)) == 12
    dm.load_state_dict(state)
    assert len(list(dm.train_dataloader().sampler)) == 4
