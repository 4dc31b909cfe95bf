"""The CSV/JSONL datamodule: configurable columns, and clear errors for the user's data mistakes."""

from __future__ import annotations

import json

import numpy as np
import pytest

from datamodules.text_folder import TextFolderDataModule, read_text_file
from zoo.errors import ConfigError, DataError


def _write_csv(path, rows, header=("text", "label")):
    lines = [",".join(header)] + [",".join(f'"{v}"' for v in row) for row in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf8")
    return str(path)


def _write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf8")
    return str(path)


def _rows(rng, classes=(("sports", 12), ("cooking", 6), ("weather", 3))):
    words = {"sports": "goal match team", "cooking": "oven recipe stew", "weather": "rain cloud storm"}
    return [
        (" ".join(rng.permutation(words[c].split() + ["the", "a", f"n{i}"])), c) for c, n in classes for i in range(n)
    ]


def test_csv_and_jsonl_with_custom_column_names(tmp_path):
    rng = np.random.default_rng(0)
    rows = _rows(rng)
    train = _write_csv(tmp_path / "train.csv", rows, header=("sentence", "topic"))
    test = _write_jsonl(
        tmp_path / "test.jsonl", [{"sentence": t, "topic": y, "id": i} for i, (t, y) in enumerate(rows)]
    )
    dm = TextFolderDataModule(
        train_file=train, test_file=test, text_column="sentence", label_column="topic", batch_size=4
    )
    assert dm.num_classes == 3 and dm.class_names == ["cooking", "sports", "weather"]
    assert dm.group_names == ["head", "medium", "tail"]
    dm.setup("fit")
    assert dm.class_groups.tolist() == [1, 0, 2]  # sports (12) head, cooking (6) medium, weather (3) tail
    batch = next(iter(dm.test_dataloader()))
    assert batch["text"][0] == rows[0][0] and batch["label"][0] == 1 and batch["group"][0] == 0
    assert dm.val_dataloader() == []


def test_integer_labels_are_class_names(tmp_path):
    rows = [{"text": f"example number {i}", "label": i % 2} for i in range(6)]
    dm = TextFolderDataModule(train_file=_write_jsonl(tmp_path / "t.jsonl", rows))
    assert dm.class_names == ["0", "1"]


def test_missing_file_and_column_name_the_argument(tmp_path):
    with pytest.raises(DataError, match="train_file=.*no such file"):
        TextFolderDataModule(train_file=str(tmp_path / "nope.csv"))
    train = _write_csv(tmp_path / "train.csv", [("a text", "x"), ("b text", "x")], header=("body", "label"))
    with pytest.raises(DataError, match=r"no column 'text' \(text_column\); the columns are \['body', 'label'\]"):
        TextFolderDataModule(train_file=train)
    jsonl = _write_jsonl(tmp_path / "t.jsonl", [{"text": "a text", "class": "x"}])
    with pytest.raises(DataError, match=r"t.jsonl:1: no field 'label'"):
        TextFolderDataModule(train_file=jsonl)


def test_empty_text_is_an_error_with_file_and_line(tmp_path):
    train = _write_csv(tmp_path / "train.csv", [("fine text", "x"), ("   ", "x"), ("other", "y")])
    with pytest.raises(DataError, match=r"train.csv:3: empty text in column 'text'"):
        TextFolderDataModule(train_file=train)
    empty_label = _write_csv(tmp_path / "l.csv", [("fine text", ""), ("other", "y")])
    with pytest.raises(DataError, match=r"l.csv:2: empty label"):
        TextFolderDataModule(train_file=empty_label)


@pytest.mark.parametrize("label", [None, 2.5, True, ["a"], {"a": 1}])
def test_non_text_labels_are_errors(tmp_path, label):
    records = [{"text": "good text", "label": "x"}, {"text": "bad label", "label": label}]
    with pytest.raises(DataError, match=r"t.jsonl:2: label .* labels must be class names"):
        TextFolderDataModule(train_file=_write_jsonl(tmp_path / "t.jsonl", records))


def test_non_string_text_is_an_error(tmp_path):
    records = [{"text": 42, "label": "x"}]
    with pytest.raises(DataError, match=r"t.jsonl:1: column 'text' holds int"):
        read_text_file(_write_jsonl(tmp_path / "t.jsonl", records))


def test_single_example_class_errors_by_default_and_can_be_dropped_or_kept(tmp_path):
    rows = [("alpha text one", "a"), ("alpha text two", "a"), ("beta text", "b"), ("gamma one", "c"), ("gamma 2", "c")]
    train = _write_csv(tmp_path / "train.csv", rows)
    test = _write_csv(tmp_path / "test.csv", rows)
    with pytest.raises(DataError, match=r"fewer than min_examples_per_class=2 .*'b': 1.*rare_classes='drop'"):
        TextFolderDataModule(train_file=train)
    dropped = TextFolderDataModule(train_file=train, test_file=test, rare_classes="drop")
    assert dropped.class_names == ["a", "c"]
    dropped.setup("test")
    assert len(dropped.test_dataset) == 4
    kept = TextFolderDataModule(train_file=train, rare_classes="keep")
    assert kept.class_names == ["a", "b", "c"]


def test_unknown_label_in_the_test_file_is_an_error(tmp_path):
    train = _write_csv(tmp_path / "train.csv", [("one", "a"), ("two", "a"), ("three", "b"), ("four", "b")])
    test = _write_csv(tmp_path / "test.csv", [("five", "z")])
    with pytest.raises(DataError, match=r"test.csv: labels \['z'\] do not occur"):
        TextFolderDataModule(train_file=train, test_file=test)


def test_bad_ddae_arguments_raise_config_errors(tmp_path):
    train = _write_csv(tmp_path / "train.csv", [("one", "a"), ("two", "a"), ("three", "b"), ("four", "b")])
    with pytest.raises(ConfigError, match="augmentation_strength"):
        TextFolderDataModule(train_file=train, augmentation_strength=2.0)
    with pytest.raises(ConfigError, match="class_weights"):
        TextFolderDataModule(train_file=train, class_weights="balanced")
    with pytest.raises(ConfigError, match="rare_classes"):
        TextFolderDataModule(train_file=train, rare_classes="ignore")
    with pytest.raises(ConfigError, match=r"augmentation_ops=\[\] names no operation"):  # was the defaults
        TextFolderDataModule(train_file=train, augmentation_ops=[])
    for power in (-1.0, float("nan"), float("inf"), True, "10"):
        with pytest.raises(ConfigError, match="sample_quality_power"):
            TextFolderDataModule(train_file=train, sample_quality_power=power)
    for steps in (0, 2.5):
        with pytest.raises(ConfigError, match=f"contextual_steps={steps}"):
            TextFolderDataModule(train_file=train, contextual_steps=steps)
    for layers in (0, 7, True):
        with pytest.raises(ConfigError, match=f"contextual_layers={layers}"):
            TextFolderDataModule(train_file=train, contextual_layers=layers)


def test_ddae_setup_adds_filtered_copies_for_the_rare_class_and_resamples(tmp_path):
    rng = np.random.default_rng(1)
    train = _write_csv(tmp_path / "train.csv", _rows(rng))

    def ddae(**extra) -> TextFolderDataModule:
        return TextFolderDataModule(
            train_file=train,
            class_weights="inverse",
            augmentation_strength=0.5,
            max_copies=4,
            cache_dir=str(tmp_path / "cache"),
            **extra,
        )

    dm = ddae(batch_size=8)
    dm.setup("test")
    assert dm.augmentations is None and len(dm.train_dataset) == 21  # testing alone does not augment
    dm.setup("fit")
    stats = dm.ddae_stats
    assert stats["augmented"] > 0 and stats["kept"] == len(dm.train_dataset) - 21
    labels = dm.train_dataset.labels.numpy()
    assert np.bincount(labels)[2] > 3  # the tail class (weather) grew
    sampler = dm.train_sampler()
    assert len(sampler) == len(dm.train_dataset)
    again = ddae()
    again.setup("fit")
    assert again.ddae_stats["from_cache"] and again.train_dataset.texts == dm.train_dataset.texts
    # f(x): 1 for the 21 originals, each kept copy's BERTScore F1 to the power sample_quality_power
    kept = dm.augmentations.f1[dm.augmentations.f1 >= dm.filter_threshold]
    np.testing.assert_allclose(sampler.quality, np.concatenate([np.ones(21), kept.clip(0, 1)]))
    sharp = ddae(sample_quality_power=10)
    sharp.setup("fit")
    np.testing.assert_allclose(
        sharp.train_sampler().quality, np.concatenate([np.ones(21), kept.clip(0, 1) ** 10]), rtol=1e-5
    )
    assert (kept < 1).any()  # so the power changed some score


def test_predict_file_needs_texts_alone_and_predict_writes_them(tmp_path, monkeypatch):
    from pathlib import Path

    from zoo.cli import main

    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(1)
    train = _write_csv(tmp_path / "train.csv", _rows(rng), header=("sentence", "topic"))
    new = _write_jsonl(tmp_path / "new.jsonl", [{"sentence": "rain and storm clouds"}, {"sentence": "a goal!"}])
    dm = TextFolderDataModule(train_file=train, predict_file=new, text_column="sentence", label_column="topic")
    dm.setup("predict")
    batch = next(iter(dm.predict_dataloader()))
    assert batch["text"] == ["rain and storm clouds", "a goal!"] and batch["label"].tolist() == [-100, -100]
    with pytest.raises(DataError, match=r"new2\.jsonl:1: no field 'sentence' \(text_column\)"):
        TextFolderDataModule(train_file=train, predict_file=_write_jsonl(tmp_path / "new2.jsonl", [{"x": "y"}]),
                             text_column="sentence", label_column="topic")  # fmt: skip

    data = ["--data=datamodules.text_folder.TextFolderDataModule", f"--data.init_args.train_file={train}",
            "--data.init_args.text_column=sentence", "--data.init_args.label_column=topic",
            "--data.init_args.batch_size=4", "--model.init_args.encoder=zoo.encoders.TransformerTextEncoder",
            "--model.init_args.encoder.init_args.dim=32", "--trainer.enable_progress_bar=false"]  # fmt: skip
    main(["fit", "--config", "text_longtail.yaml", *data, "--trainer.max_steps=2", "--trainer.limit_val_batches=0",
          "--trainer.default_root_dir=run", "--test_after_fit=false"])  # fmt: skip
    checkpoint = next(Path("run").rglob("last.ckpt"))
    main(["predict", "--config", "text_longtail.yaml", *data, f"--data.init_args.predict_file={new}",
          f"--ckpt_path={checkpoint}", "--trainer.default_root_dir=pred"])  # fmt: skip
    (path,) = Path("pred").rglob("predictions.jsonl")
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["text"] for r in rows] == ["rain and storm clouds", "a goal!"]
    assert all(r["prediction"] in ("cooking", "sports", "weather") and "label" not in r for r in rows)
