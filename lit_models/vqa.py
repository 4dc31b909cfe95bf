"""Visual question answering: encoders + fusion + an answer classifier over a fixed answer vocabulary."""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.cli import OptimizerCallable
from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters
from torch import Tensor, nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy

from lit_models._task import ZooTask
from zoo.contracts import IGNORE_INDEX, Encoder, Fusion
from zoo.errors import ConfigError
from zoo.model import MultimodalModel
from zoo.optim import ScheduleFactory, WarmupCosine


class VQA(ZooTask):
    """Answers a question about an image (or any modalities): batch -> logits ``[B, num_classes]``.

    The batch holds one field per encoder (``"image"``, ``"text"``, ...), the answer ``"label"`` ``[B]`` (an index
    into the answer vocabulary; ``-100`` is ignored) and ``"group"`` ``[B]``, the question type, an index into
    ``group_names``. Accuracy is reported overall and per question type with torchmetrics.

    Args:
        encoders: one encoder per modality, keyed by batch field.
        fusion: fuses the encoders' tokens; its pooled vector feeds the answer head.
        num_classes: answers in the vocabulary (linked from the datamodule by the CLI).
        group_names: question types (linked from the datamodule by the CLI).
        head_hidden: hidden width of the answer MLP (``2 * fusion.dim`` by default).
        dropout: dropout before the last layer of the head.
        label_smoothing: cross-entropy label smoothing.
        optimizer: see :class:`lit_models._task.ZooTask`.
        scheduler: see :class:`lit_models._task.ZooTask`.
        compile, initial_checkpoint: see :class:`lit_models._task.ZooTask`.
    """

    def __init__(
        self,
        encoders: dict[str, Encoder],
        fusion: Fusion,
        *,
        num_classes: int,
        group_names: list[str] | None = None,
        head_hidden: int | None = None,
        dropout: float = 0.0,
        label_smoothing: float = 0.0,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        scheduler: ScheduleFactory | None = WarmupCosine,
        compile: bool | dict[str, Any] = False,
        initial_checkpoint: str | None = None,
    ) -> None:
        super().__init__(
            optimizer=optimizer, scheduler=scheduler, compile=compile, initial_checkpoint=initial_checkpoint
        )
        # Under LightningCLI the hyper-parameters are the config (class paths included), so load_from_checkpoint can
        # rebuild the parts; outside it, modules are not hyper-parameters.
        self.save_hyperparameters(ignore=[] if _given_hyperparameters.get() is not None else ["encoders", "fusion"])
        if num_classes < 2:
            raise ConfigError(f"VQA: num_classes={num_classes} must be at least 2")
        self.model = MultimodalModel(encoders, fusion)
        hidden = head_hidden or 2 * fusion.dim
        self.head = nn.Sequential(
            nn.LayerNorm(fusion.dim),
            nn.Linear(fusion.dim, hidden),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        )
        self.label_smoothing = label_smoothing
        self.group_names = list(group_names or [])
        accuracy = lambda: MulticlassAccuracy(num_classes, average="micro", ignore_index=IGNORE_INDEX)  # noqa: E731
        for stage in ("val", "test"):
            metrics = {"acc": accuracy()} | {f"acc_{g}": accuracy() for g in self.group_names}
            setattr(self, f"{stage}_metrics", MetricCollection(metrics, prefix=f"{stage}/"))

    def forward(self, batch: dict[str, Any]) -> Tensor:
        return self.head(self.model(batch).pooled)

    def _evaluate(self, batch: dict[str, Any], stage: str) -> None:
        logits = self(batch)
        labels, groups = batch["label"], batch["group"]
        self.log(f"{stage}/loss", self._loss(logits, labels), batch_size=len(labels), sync_dist=True)
        metrics: MetricCollection = getattr(self, f"{stage}_metrics")
        preds = logits.argmax(-1)
        metrics["acc"].update(preds, labels)
        for index, name in enumerate(self.group_names):  # other groups' labels are ignored: no host sync
            metrics[f"acc_{name}"].update(preds, labels.masked_fill(groups != index, IGNORE_INDEX))
        self.log_dict(metrics, prog_bar=stage == "val")

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Tensor]:
        probs = self(batch).float().softmax(-1)
        confidence, answer = probs.max(-1)
        return {"answer": answer, "confidence": confidence}


__all__ = ["IGNORE_INDEX", "VQA"]
