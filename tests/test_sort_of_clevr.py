"""Sort-of-CLEVR: answers against the geometry, exact pixels, determinism, the cache, splits, batches, the sampler."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from datamodules import sort_of_clevr as soc
from datamodules._common import SeededShuffleSampler, collate
from datamodules.sort_of_clevr import SortOfCLEVRDataModule, generate_sort_of_clevr
from zoo.errors import ConfigError, DataError

NUM_IMAGES = 30


@pytest.fixture(scope="module")
def scenes():
    return generate_sort_of_clevr(NUM_IMAGES, seed=3)


def _expected_answer(centres, shapes, group, subtype, colour) -> str:
    """The answer string, recomputed from centres and shapes with plain Python."""
    x, y = (float(v) for v in centres[colour])
    shape_name = ["square", "circle"]
    if group == 0:
        if subtype == 0:
            return shape_name[shapes[colour]]
        if subtype == 1:
            return "left" if x < 75 / 2 else "right"
        return "top" if y < 75 / 2 else "bottom"
    dist = {k: math.dist(centres[colour], centres[k]) for k in range(6) if k != colour}
    if subtype == 0:
        return shape_name[shapes[min(dist, key=dist.get)]]
    if subtype == 1:
        return shape_name[shapes[max(dist, key=dist.get)]]
    return str(sum(1 for k in range(6) if shapes[k] == shapes[colour]))


def test_answers_match_scene_geometry(scenes):
    for n in range(NUM_IMAGES):
        centres, shapes = scenes.centres[n].tolist(), scenes.shapes[n].tolist()
        # closest and furthest objects are unique, so the questions have one answer
        for k in range(6):
            d = sorted(math.dist(centres[k], centres[j]) for j in range(6) if j != k)
            assert d[0] < d[1] and d[-2] < d[-1]
        for q in range(20):
            group, subtype, colour = (
                int(a[n, q]) for a in (scenes.question_group, scenes.question_subtype, scenes.question_colour)
            )
            assert group == (q >= 10)
            expected = _expected_answer(centres, shapes, group, subtype, colour)
            assert soc.ANSWERS[scenes.answers[n, q]] == expected


def test_questions_cover_every_subtype_and_count_answers(scenes):
    kinds = {
        (int(g), int(s)) for g, s in zip(scenes.question_group.ravel(), scenes.question_subtype.ravel(), strict=True)
    }
    assert kinds == {(g, s) for g in range(2) for s in range(3)}
    assert set(np.unique(scenes.answers).tolist()) <= set(range(12))


def test_each_object_is_drawn_in_its_exact_colour_without_overlap(scenes):
    disk_area = sum(1 for dx in range(-5, 6) for dy in range(-5, 6) if dx * dx + dy * dy <= 25)
    for n in range(NUM_IMAGES):
        image = scenes.images[n]
        for k in range(6):
            x, y = scenes.centres[n, k].tolist()
            assert 5 <= x <= 69 and 5 <= y <= 69
            assert image[y, x].tolist() == soc.COLOUR_RGB[k].tolist()
            # every pixel of the object has its colour and no other object covers any of it
            area = int((image == soc.COLOUR_RGB[k]).all(-1).sum())
            assert area == (121 if scenes.shapes[n, k] == 0 else disk_area)
        colours = {tuple(c) for c in image.reshape(-1, 3).tolist()}
        assert colours <= {(255, 255, 255), *map(tuple, soc.COLOUR_RGB.tolist())}


def test_same_seed_same_data_other_seed_other_data(scenes):
    again = generate_sort_of_clevr(NUM_IMAGES, seed=3)
    other = generate_sort_of_clevr(NUM_IMAGES, seed=4)
    for field in scenes.__dataclass_fields__:
        np.testing.assert_array_equal(getattr(again, field), getattr(scenes, field))
    assert not np.array_equal(other.images, scenes.images)
    assert not np.array_equal(other.answers, scenes.answers)
    # the first images do not depend on how many are drawn: the test split is stable as num_images grows
    prefix = generate_sort_of_clevr(5, seed=3)
    np.testing.assert_array_equal(prefix.images, scenes.images[:5])
    np.testing.assert_array_equal(prefix.answers, scenes.answers[:5])


def _datamodule(tmp_path, **kwargs):
    args = {"data_dir": str(tmp_path), "num_images": NUM_IMAGES, "seed": 3, "val_images": 4, "test_images": 5}
    return SortOfCLEVRDataModule(**{**args, **kwargs})


def test_cache_is_written_once_and_reused(tmp_path, monkeypatch, scenes):
    dm = _datamodule(tmp_path)
    assert dm.num_classes == 12 and dm.group_names == ["non_relational", "relational"]  # before prepare_data
    dm.prepare_data()
    assert dm.cache_path.is_file() and dm.cache_path.parent == tmp_path
    assert [p.name for p in tmp_path.iterdir()] == [dm.cache_path.name]  # no temporary file left behind
    mtime = dm.cache_path.stat().st_mtime_ns

    def must_not_run(*args, **kwargs):
        raise AssertionError("the cache should have been reused")

    monkeypatch.setattr(soc, "generate_sort_of_clevr", must_not_run)
    again = _datamodule(tmp_path)
    again.prepare_data()
    again.setup("fit")
    assert dm.cache_path.stat().st_mtime_ns == mtime
    np.testing.assert_array_equal(again.scenes.images, scenes.images)
    np.testing.assert_array_equal(again.scenes.answers, scenes.answers)
    # another seed or size is another file
    assert _datamodule(tmp_path, seed=4).cache_path != dm.cache_path
    assert _datamodule(tmp_path, num_images=31).cache_path != dm.cache_path


def test_corrupt_cache_raises_data_error_naming_the_file(tmp_path):
    dm = _datamodule(tmp_path)
    dm.cache_path.write_bytes(b"not an npz file")
    with pytest.raises(DataError, match=dm.cache_path.name):
        dm.setup("fit")


def test_default_data_dir_comes_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("ZOO_DATA_DIR", str(tmp_path))
    assert (
        SortOfCLEVRDataModule(num_images=NUM_IMAGES, val_images=2, test_images=2).data_dir == tmp_path / "sort_of_clevr"
    )


def test_splits_are_disjoint_by_image_and_cover_all_questions(tmp_path):
    dm = _datamodule(tmp_path)
    dm.setup("fit")
    splits = [dm.train_dataset, dm.val_dataset, dm.test_dataset]
    images = [set(d.image_indices.tolist()) for d in splits]
    assert [len(s) for s in images] == [NUM_IMAGES - 9, 4, 5]
    assert set.union(*images) == set(range(NUM_IMAGES))
    assert sum(len(s) for s in images) == NUM_IMAGES
    assert [len(d) for d in splits] == [20 * (NUM_IMAGES - 9), 80, 100]


def test_items_match_the_scene_description(tmp_path):
    dm = _datamodule(tmp_path)
    dm.setup("fit")
    s, d = dm.scenes, dm.val_dataset
    for i in (0, 9, 10, 79):
        item = d[i]
        n, q = int(d.image_indices[i // 20]), i % 20
        g, st, c = int(s.question_group[n, q]), int(s.question_subtype[n, q]), int(s.question_colour[n, q])
        assert item["text"] == soc.TEMPLATES[g][st].format(colour=soc.COLOURS[c])
        assert item["label"].item() == s.answers[n, q] and item["group"].item() == g
        expected = (torch.from_numpy(s.images[n]).permute(2, 0, 1).float() / 255 - 0.5) / 0.5
        torch.testing.assert_close(item["image"], expected, rtol=0, atol=1e-6)  # float rounding only
    with pytest.raises(IndexError):
        d[len(d)]


def test_batch_has_documented_keys_types_and_shapes(tmp_path):
    dm = _datamodule(tmp_path, batch_size=8)
    dm.prepare_data()
    dm.setup("fit")
    for loader in (dm.train_dataloader(), dm.val_dataloader(), dm.test_dataloader()):
        batch = next(iter(loader))
        assert set(batch) == {"image", "text", "label", "group"}
        assert batch["image"].dtype == torch.float32 and batch["image"].shape == (8, 3, 75, 75)
        assert -1.0 <= batch["image"].min() and batch["image"].max() <= 1.0
        assert isinstance(batch["text"], list) and len(batch["text"]) == 8
        assert all(isinstance(t, str) and t.endswith("?") for t in batch["text"])
        assert batch["label"].dtype == torch.long and batch["label"].shape == (8,)
        assert batch["group"].dtype == torch.long and batch["group"].shape == (8,)
        assert 0 <= batch["label"].min() and batch["label"].max() < dm.num_classes
    assert isinstance(dm.train_dataloader().sampler, SeededShuffleSampler)
    assert dm.train_dataloader().sampler.seed == 3


def test_batched_fetch_equals_item_by_item(tmp_path):
    dm = _datamodule(tmp_path, batch_size=16)
    dm.setup("fit")
    # val/test loaders keep their order; each batch comes from one __getitems__ call
    expected = collate([dm.val_dataset[i] for i in range(len(dm.val_dataset))])
    batches = list(dm.val_dataloader())
    assert [len(b["text"]) for b in batches] == [16] * 5
    assert sum((b["text"] for b in batches), []) == expected["text"]
    for key in ("image", "label", "group"):
        assert torch.equal(torch.cat([b[key] for b in batches]), expected[key])
    indices = [5, 3, 417]
    fetched = dm.train_dataset.__getitems__(indices)
    assert fetched["text"] == [dm.train_dataset[i]["text"] for i in indices]
    assert torch.equal(fetched["image"], torch.stack([dm.train_dataset[i]["image"] for i in indices]))
    with pytest.raises(IndexError):
        dm.train_dataset.__getitems__([0, len(dm.train_dataset)])


def test_sampler_order_depends_only_on_seed_and_epoch():
    def order(seed, epoch):
        sampler = SeededShuffleSampler(range(50), seed)
        sampler.set_epoch(epoch)
        return list(sampler)

    assert sorted(order(0, 0)) == list(range(50))
    assert order(0, 0) == order(0, 0)
    assert order(0, 1) == order(0, 1)
    assert order(0, 0) != order(0, 1)
    assert order(0, 0) != order(1, 0)

    # a sampler that went through epochs 0..2 and one restored from its state give the same epoch-2 order
    trained = SeededShuffleSampler(50, seed=7)
    for epoch in range(3):
        trained.set_epoch(epoch)
        if epoch < 2:
            assert len(list(trained)) == trained.state_dict()["position"] == 50
    restored = SeededShuffleSampler(50, seed=0)
    restored.load_state_dict(trained.state_dict())
    assert restored.state_dict() == {"seed": 7, "epoch": 2, "position": 0, "num_replicas": 1}
    assert list(restored) == list(trained) == order(7, 2)
    assert len(restored) == 50


@pytest.mark.parametrize("length, replicas", [(10, 2), (10, 3), (2, 4), (0, 2)])
def test_sampler_shards_its_epoch_across_ranks_and_resumes_on_each(length, replicas):
    """Rank ``r`` of ``R`` takes every ``R``-th index of the epoch's permutation, padded cyclically to a multiple of
    ``R`` as ``DistributedSampler`` pads: together the ranks see every index, each as many; a rank restored from its
    state mid-epoch goes on where it stopped."""
    whole = SeededShuffleSampler(length, seed=5)
    whole.set_epoch(3)
    shards = []
    for rank in range(replicas):
        sampler = SeededShuffleSampler(length, seed=5, num_replicas=replicas, rank=rank)
        sampler.set_epoch(3)
        shards.append(list(sampler))
        assert len(sampler) == len(shards[-1]) == math.ceil(length / replicas)
    interleaved = [shard[i] for i in range(len(shards[0])) for shard in shards]
    assert interleaved[:length] == list(whole) and set(interleaved) == set(range(length))

    if length:
        resumed = SeededShuffleSampler(length, seed=0, num_replicas=replicas, rank=1)
        resumed.load_state_dict({"seed": 5, "epoch": 3, "position": 1, "num_replicas": replicas})
        resumed.set_epoch(3)  # Lightning sets the epoch again before iterating: the position survives
        assert list(resumed) == shards[1][1:]
        resumed.set_epoch(4)
        assert len(list(resumed)) == len(shards[1])


def test_sampler_state_moves_exactly_to_another_number_of_ranks_at_an_epoch_end_only():
    finished = SeededShuffleSampler(10, seed=1, num_replicas=2, rank=0).state_dict(consumed=5)
    one = SeededShuffleSampler(10, seed=0)
    one.load_state_dict(finished)  # a finished epoch stays finished: the next one starts at its beginning
    one.set_epoch(1)
    assert list(one) == SeededShuffleSampler(10, seed=1).permutation(1).tolist()
    mid_epoch = SeededShuffleSampler(10, seed=1, num_replicas=2, rank=0).state_dict(consumed=2)
    with pytest.raises(ConfigError, match="resume it on 2, or resume from a checkpoint written at the end of an"):
        SeededShuffleSampler(10).load_state_dict(mid_epoch)
    with pytest.raises(ConfigError, match="rank=2"):
        SeededShuffleSampler(10, num_replicas=2, rank=2)


@pytest.mark.parametrize(
    "kwargs, key",
    [
        ({"num_images": 9}, "num_images"),
        ({"val_images": -1}, "val_images"),
        ({"test_images": -2}, "test_images"),
        ({"batch_size": 0}, "batch_size"),
        ({"num_workers": -1}, "num_workers"),
        ({"seed": -1}, "seed"),
    ],
)
def test_bad_arguments_raise_config_error_naming_the_key(tmp_path, kwargs, key):
    with pytest.raises(ConfigError, match=rf"\b{key}="):
        _datamodule(tmp_path, **kwargs)


def test_trainer_shuffles_each_epoch_by_seed_and_epoch(tmp_path):
    import lightning as L

    class FirstBatches(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.ones(()))
            self.texts: list[list[str]] = []

        def training_step(self, batch, batch_idx):
            self.texts.append(batch["text"])
            return self.weight * batch["image"].mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)

    dm = _datamodule(tmp_path, batch_size=4)
    model = FirstBatches()
    trainer = L.Trainer(
        max_epochs=2,
        limit_train_batches=1,
        limit_val_batches=0,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, datamodule=dm)
    expected = []
    for epoch in range(2):
        sampler = SeededShuffleSampler(dm.train_dataset, 3)
        sampler.set_epoch(epoch)
        expected.append([dm.train_dataset[i]["text"] for i in list(sampler)[:4]])
    assert model.texts == expected and expected[0] != expected[1]


def test_symmetries_keep_every_answer_true(tmp_path):
    """A transformed training item's answer is recomputed from the transformed scene drawn again from scratch."""
    from datamodules.sort_of_clevr import SortOfCLEVRDataset, _answers, _draw, generate_sort_of_clevr

    scenes = generate_sort_of_clevr(12, seed=3)
    dataset = SortOfCLEVRDataset(scenes, np.arange(12), symmetries=True, seed=5)
    dataset.set_epoch(2)
    index = np.arange(len(dataset))
    symmetry = dataset.symmetry_of(index)
    assert set(symmetry.tolist()) == set(range(8)), "all eight symmetries are drawn"
    dataset.set_epoch(3)
    assert not np.array_equal(dataset.symmetry_of(index), symmetry), "a new epoch draws new symmetries"
    dataset.set_epoch(2)
    batch = dataset.__getitems__(index.tolist())
    last = 74
    for i in index.tolist():
        n, q = divmod(i, 20)
        s = int(symmetry[i])
        centres = scenes.centres[n].astype(np.int64).copy()
        if s & 4:
            centres = centres[:, ::-1].copy()
        if s & 1:
            centres[:, 0] = last - centres[:, 0]
        if s & 2:
            centres[:, 1] = last - centres[:, 1]
        image = np.full((75, 75, 3), 255, dtype=np.uint8)
        _draw(image, centres, scenes.shapes[n])
        expected_image = (torch.from_numpy(image).permute(2, 0, 1).float() / 255 - 0.5) / 0.5
        assert torch.equal(batch["image"][i], expected_image), f"item {i}, symmetry {s}"
        answer = _answers(
            centres[None],
            scenes.shapes[n][None],
            scenes.question_colour[n][None, q : q + 1],
            scenes.question_group[n][None, q : q + 1],
            scenes.question_subtype[n][None, q : q + 1],
        )[0, 0]
        assert batch["label"][i].item() == answer, f"item {i}, symmetry {s}"


def test_symmetries_follow_the_sampler_epoch(tmp_path):
    from datamodules.sort_of_clevr import SortOfCLEVRDataModule

    dm = SortOfCLEVRDataModule(data_dir=str(tmp_path), num_images=12, val_images=2, test_images=2, symmetries=True)
    dm.setup()
    loader = dm.train_dataloader()
    loader.sampler.set_epoch(4)
    assert dm.train_dataset.epoch == 4
    assert not dm.test_dataset.symmetries and not dm.val_dataset.symmetries
