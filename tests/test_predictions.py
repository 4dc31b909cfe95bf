"""`python -m zoo predict` writes its predictions: one JSON line per example, with names, whole or not at all."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tiny_vqa import QUIET, TINY_SORT_OF_CLEVR

from zoo.callbacks import PredictionWriter
from zoo.cli import main

SMALL = [*TINY_SORT_OF_CLEVR, "--data.init_args.batch_size=16", *QUIET]


def test_predict_writes_every_test_question_with_the_accuracy_test_reports(elsewhere):
    fit = ["--trainer.max_steps=3", "--trainer.limit_val_batches=1", "--trainer.val_check_interval=1.0"]
    main(["fit", "--config", "vqa.yaml", *fit, "--trainer.default_root_dir=run", "--test_after_fit=false", *SMALL])
    checkpoint = next(Path("run").rglob("last.ckpt"))
    main(["predict", "--config", "vqa.yaml", f"--ckpt_path={checkpoint}", "--trainer.default_root_dir=pred", *SMALL])
    (path,) = Path("pred").rglob("predictions.jsonl")
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [row["index"] for row in rows] == list(range(4 * 20))  # 4 test images, 20 questions each, in order
    from datamodules.sort_of_clevr import ANSWERS

    assert all(row["prediction"] == ANSWERS[row["prediction_index"]] and row["label"] in ANSWERS for row in rows)
    assert all(0 < row["confidence"] <= 1 and row["text"].endswith("?") for row in rows)
    from zoo.cli import ZooCLI, resolve_config_args

    cli = ZooCLI(args=resolve_config_args(["--config", "vqa.yaml", *SMALL]), run=False)
    metrics = cli.trainer.test(cli.model, datamodule=cli.datamodule, ckpt_path=str(checkpoint), verbose=False)[0]
    accuracy = sum(row["prediction"] == row["label"] for row in rows) / len(rows)
    assert accuracy == pytest.approx(metrics["test/acc"], abs=1e-6)


class _Trainer:
    """What the writer reads of a trainer."""

    def __init__(self, log_dir: Path, world_size: int = 1, global_rank: int = 0, names=None) -> None:
        self.log_dir, self.default_root_dir = str(log_dir), str(log_dir)
        self.world_size, self.global_rank = world_size, global_rank
        self.datamodule = type("DataModule", (), {"class_names": names})()
        self.predict_dataloaders = []


def test_names_ignored_labels_and_one_file_per_process(tmp_path):
    trainer = _Trainer(tmp_path, world_size=2, global_rank=1, names=["cat", "dog", "owl"])
    writer = PredictionWriter()
    writer.on_predict_start(trainer, None)
    prediction = {"label": torch.tensor([2, 0]), "confidence": torch.tensor([0.9, 0.6])}
    batch = {"audio": {"waveform": torch.zeros(2, 8)}, "label": torch.tensor([2, -100])}
    writer.write_on_batch_end(trainer, None, prediction, None, batch, 0)
    writer.write_on_batch_end(trainer, None, prediction, [7, 9], batch, 1)
    writer.on_predict_end(trainer, None)
    assert writer.written == tmp_path / "predictions.rank1.jsonl"
    rows = [json.loads(line) for line in writer.written.read_text().splitlines()]
    assert [r["index"] for r in rows] == [0, 1, 7, 9]  # a running count where the loop tracks no indices
    assert rows[0] == {"index": 0, "prediction": "owl", "prediction_index": 2, "confidence": 0.9, "label": "owl"}
    assert "label" not in rows[1] and rows[1]["prediction"] == "cat"  # -100: no label to report
    assert list(tmp_path.iterdir()) == [writer.written]  # the temporary file is gone


def test_a_failed_loop_leaves_no_file(tmp_path):
    trainer = _Trainer(tmp_path)
    writer = PredictionWriter(path=str(tmp_path / "out" / "p.jsonl"))
    writer.on_predict_start(trainer, None)
    writer.write_on_batch_end(trainer, None, {"answer": torch.tensor([1]), "confidence": torch.tensor([0.5])},
                              None, {"label": torch.tensor([1])}, 0)  # fmt: skip
    writer.on_exception(trainer, None, RuntimeError("stopped"))
    assert list((tmp_path / "out").iterdir()) == []


def test_predict_without_weights_warns_that_they_are_untrained(elsewhere):
    with pytest.warns(UserWarning, match="initial, untrained weights"):
        main(["predict", "--config", "vqa.yaml", "--trainer.default_root_dir=pred", "--trainer.limit_predict_batches=1",
              *SMALL])  # fmt: skip
