"""The text classification task: trains on a tiny CSV, logs long-tail metrics, saves the confusion matrix PNG."""

from __future__ import annotations

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

from datamodules.text_folder import TextFolderDataModule
from lit_models.classification import TextClassifier
from zoo.encoders import TransformerTextEncoder

WORDS = {
    "sports": "goal match team player score referee",
    "cooking": "oven recipe stew bake flour spice",
    "weather": "rain cloud storm wind snow thunder",
}


def _csv(path, rng, sizes):
    lines = ["text,label"]
    for label, n in sizes.items():
        for _ in range(n):
            lines.append(f"{' '.join(rng.choice(WORDS[label].split(), 5))},{label}")
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_fit_and_test_log_macro_f1_group_accuracy_per_class_f1_and_save_the_confusion_matrix(tmp_path):
    rng = np.random.default_rng(0)
    dm = TextFolderDataModule(
        train_file=_csv(tmp_path / "train.csv", rng, {"sports": 40, "cooking": 15, "weather": 5}),
        val_file=_csv(tmp_path / "val.csv", rng, {"sports": 6, "cooking": 6, "weather": 6}),
        test_file=_csv(tmp_path / "test.csv", rng, {"sports": 6, "cooking": 6, "weather": 6}),
        class_weights="inverse",
        batch_size=16,
    )
    model = TextClassifier(
        TransformerTextEncoder(dim=32, depth=1, num_heads=2, max_length=16),
        num_classes=dm.num_classes,
        group_names=dm.group_names,
        optimizer=lambda params: torch.optim.AdamW(params, lr=1e-2),
        scheduler=None,
    )
    logger = CSVLogger(tmp_path, name="logs")
    trainer = L.Trainer(
        max_epochs=8,
        logger=logger,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        devices=1,
    )
    trainer.fit(model, datamodule=dm)
    [results] = trainer.test(model, datamodule=dm)
    for key in ("test/acc", "test/macro_f1", "test/acc_head", "test/acc_tail", "test/f1/weather"):
        assert key in results, sorted(results)
    assert results["test/acc"] > 0.5  # three keyword-separable classes: far above chance (1/3) after 8 epochs
    png = tmp_path / "logs" / "version_0" / "confusion_matrix.png"
    assert png.is_file() and png.read_bytes()[:4] == b"\x89PNG"


def test_mlp_head_maps_texts_to_logits():
    torch.manual_seed(0)
    model = TextClassifier(TransformerTextEncoder(dim=16, depth=1, num_heads=2), num_classes=5, head_hidden=24)
    logits = model({"text": ["rain and wind", "a goal in the match"]})
    assert logits.shape == (2, 5) and torch.isfinite(logits).all()


def test_rejects_fewer_than_two_classes():
    with pytest.raises(ValueError, match="num_classes=1"):
        TextClassifier(TransformerTextEncoder(dim=16, depth=1, num_heads=2), num_classes=1)


def test_deferred_rebalancing_switches_at_the_configured_epoch_of_a_real_fit(tmp_path):
    class LabelsSeen(L.Callback):
        def __init__(self) -> None:
            self.by_epoch: dict[int, list[int]] = {}

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.by_epoch.setdefault(trainer.current_epoch, []).extend(batch["label"].tolist())

    rng = np.random.default_rng(1)
    sizes = {"sports": 40, "cooking": 15, "weather": 5}
    dm = TextFolderDataModule(
        train_file=_csv(tmp_path / "train.csv", rng, sizes),
        class_weights="inverse",
        rebalance_from_epoch=2,
        batch_size=20,
    )
    model = TextClassifier(TransformerTextEncoder(dim=16, depth=1, num_heads=2, max_length=8), num_classes=3)
    seen = LabelsSeen()
    trainer = L.Trainer(
        max_epochs=4, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, accelerator="cpu", devices=1, callbacks=[seen], limit_val_batches=0,
    )  # fmt: skip
    trainer.fit(model, datamodule=dm)
    index = {name: i for i, name in enumerate(dm.class_names)}
    natural = sorted(index[label] for label, n in sizes.items() for _ in range(n))
    for epoch in (0, 1):  # plain epochs: every example exactly once
        assert sorted(seen.by_epoch[epoch]) == natural
    rebalanced = np.bincount(seen.by_epoch[2] + seen.by_epoch[3], minlength=3)
    assert rebalanced[index["weather"]] > 20  # drawn about 40 times in 120, against 10 in the plain epochs
