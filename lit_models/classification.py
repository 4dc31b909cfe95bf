"""Classification of one modality: any zoo encoder, pooled, and a classifier head; long-tail metrics."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch.cli import OptimizerCallable
from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters
from torch import Tensor, nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix, MulticlassF1Score

from lit_models._task import ZooTask
from zoo.contracts import Encoder
from zoo.errors import ConfigError
from zoo.layers.pooling import build_pool
from zoo.optim import ScheduleFactory, WarmupCosine


class Classifier(ZooTask):
    """Classifies one input of a batch: ``batch[modality]`` -> logits ``[B, num_classes]``.

    The encoder reads the batch field named ``modality`` (``"text"``: ``list[str]``; ``"audio"``: ``{"waveform":
    [B, S], "lengths": [B]}``; ``"image"``: ``[B, 3, H, W]``; see ``docs/ARCHITECTURE.md``); its tokens are pooled
    into one vector per example (``pool``: their mean, or a learned query attending over them) and fed to the head.
    The batch also holds ``"label"`` ``[B]`` and ``"group"`` ``[B]`` (an index into ``group_names``, e.g. the
    ``head``/``medium``/``tail`` frequency bin of the class). Validation and test report, with torchmetrics: accuracy,
    macro-F1, accuracy per group, and F1 of every class (``{stage}/f1/{class}``, logged at epoch end). The test also
    saves the confusion matrix as ``confusion_matrix.png`` (rows: true class, normalized) in the logger's folder.

    ``TextClassifier`` is this class under its former name (``modality="text"`` is the default), so configs and
    checkpoints that name it keep working.

    Args:
        encoder: any :class:`~zoo.contracts.Encoder` of the ``modality`` (``batch[modality] -> Tokens``).
        modality: the batch field the encoder reads.
        num_classes: classes (linked from the datamodule by the CLI).
        pool: ``"mean"`` (the mean of the real tokens, no parameters) or ``"attention"`` (one learned query attends
            over the real tokens, :class:`~zoo.layers.pooling.AttentionPool`; it reads which tokens matter, which a
            frozen encoder's mean cannot: README, "DDAE").
        pool_heads: attention heads of ``pool="attention"``; must divide the encoder's ``out_dim``.
        group_names: evaluation groups (linked from the datamodule by the CLI).
        head_hidden: hidden width of an MLP head; ``0`` for a linear head (LayerNorm + Linear).
        dropout: dropout before the last layer of the head.
        label_smoothing: cross-entropy label smoothing.
        optimizer: see :class:`lit_models._task.ZooTask`.
        scheduler: see :class:`lit_models._task.ZooTask`.
        compile, initial_checkpoint: see :class:`lit_models._task.ZooTask`.
    """

    def __init__(
        self,
        encoder: Encoder,
        *,
        modality: str = "text",
        num_classes: int,
        pool: Literal["mean", "attention"] = "mean",
        pool_heads: int = 8,
        group_names: list[str] | None = None,
        head_hidden: int = 0,
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
        self.save_hyperparameters(ignore=[] if _given_hyperparameters.get() is not None else ["encoder"])
        name = type(self).__name__
        if not isinstance(modality, str) or not modality:
            raise ConfigError(f"{name}: modality={modality!r} must name a field of the batch, such as 'text'")
        if num_classes < 2:
            raise ConfigError(f"{name}: num_classes={num_classes} must be at least 2")
        if head_hidden < 0:
            raise ConfigError(f"{name}: head_hidden={head_hidden} must be >= 0")
        self.encoder = encoder
        self.modality = modality
        dim = encoder.out_dim
        self.pool = build_pool(pool, dim, num_heads=pool_heads, owner=f"{name}: pool")
        if head_hidden:
            layers = [nn.Linear(dim, head_hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(head_hidden, num_classes)]
        else:
            layers = [nn.Dropout(dropout), nn.Linear(dim, num_classes)]
        self.head = nn.Sequential(nn.LayerNorm(dim), *layers)
        self.num_classes = num_classes
        self.label_smoothing = label_smoothing
        self.group_names = list(group_names or [])
        accuracy = lambda: MulticlassAccuracy(num_classes, average="micro")  # noqa: E731
        for stage in ("val", "test"):
            metrics = {"acc": accuracy(), "macro_f1": MulticlassF1Score(num_classes, average="macro")}
            metrics |= {f"acc_{g}": accuracy() for g in self.group_names}
            setattr(self, f"{stage}_metrics", MetricCollection(metrics, prefix=f"{stage}/"))
            setattr(self, f"{stage}_class_f1", MulticlassF1Score(num_classes, average="none"))
        self.test_confusion = MulticlassConfusionMatrix(num_classes)

    def forward(self, batch: dict[str, Any]) -> Tensor:
        if self.modality not in batch:
            raise ConfigError(
                f"{type(self).__name__}: modality={self.modality!r} is not a field of the batch, whose fields are "
                f"{sorted(batch)}; set model.init_args.modality to the one the encoder reads"
            )
        return self.head(self.pool(self.encoder(batch[self.modality])))

    def _evaluate(self, batch: dict[str, Any], stage: str) -> None:
        logits = self(batch)
        labels, groups = batch["label"], batch["group"]
        self.log(f"{stage}/loss", self._loss(logits, labels), batch_size=len(labels), sync_dist=True)
        metrics: MetricCollection = getattr(self, f"{stage}_metrics")
        preds = logits.argmax(-1)
        updated = ["acc", "macro_f1"]
        metrics["acc"].update(preds, labels)
        metrics["macro_f1"].update(preds, labels)
        for index, name in enumerate(self.group_names):
            in_group = groups == index
            if in_group.any():
                metrics[f"acc_{name}"].update(preds[in_group], labels[in_group])
                updated.append(f"acc_{name}")
        getattr(self, f"{stage}_class_f1").update(preds, labels)
        if stage == "test":
            self.test_confusion.update(preds, labels)
        # a group absent from the batch is not logged for it: its epoch value is computed over the batches it was in
        for key in updated:
            self.log(f"{stage}/{key}", metrics[key], prog_bar=stage == "val" and key in ("acc", "macro_f1"))

    def _class_names(self) -> list[str]:
        names = getattr(getattr(self.trainer, "datamodule", None), "class_names", None)
        if names is None or len(names) != self.num_classes:
            return [str(i) for i in range(self.num_classes)]
        return list(names)

    def _log_class_f1(self, stage: str) -> None:
        metric: MulticlassF1Score = getattr(self, f"{stage}_class_f1")
        if not metric.update_called:
            return
        scores = metric.compute()
        self.log_dict({f"{stage}/f1/{name}": score for name, score in zip(self._class_names(), scores, strict=True)})
        metric.reset()

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()  # a NaN loss stops the run before its weights are checkpointed
        self._log_class_f1("val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def on_test_epoch_end(self) -> None:
        super().on_test_epoch_end()
        self._log_class_f1("test")
        if self.test_confusion.update_called:
            matrix = self.test_confusion.compute().cpu()
            self.test_confusion.reset()
            if self.trainer.is_global_zero:
                self.confusion_matrix_path = save_confusion_matrix(matrix, self._class_names(), self._log_dir())

    def _log_dir(self) -> Path:
        logger = self.logger
        folder = getattr(logger, "log_dir", None) if logger is not None else None
        return Path(folder or self.trainer.log_dir or self.trainer.default_root_dir)

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Tensor]:
        probs = self(batch).float().softmax(-1)
        confidence, label = probs.max(-1)
        return {"label": label, "confidence": confidence}


def save_confusion_matrix(matrix: Tensor, class_names: list[str], folder: str | Path) -> Path:
    """Plot a confusion matrix of counts ``[C, C]`` (rows: true class), each row normalized to fractions, to
    ``folder/confusion_matrix.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    size = max(4.0, 0.22 * len(class_names) + 2)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    counts = matrix.float()
    rows = counts / counts.sum(dim=1, keepdim=True).clamp_min(1.0)  # a class absent from the test set: a zero row
    image = ax.imshow(rows.numpy(), cmap="viridis", vmin=0.0, vmax=1.0)
    ax.set_xticks(range(len(class_names)), class_names, rotation=90, fontsize=6)
    ax.set_yticks(range(len(class_names)), class_names, fontsize=6)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    fig.tight_layout()
    path = folder / "confusion_matrix.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


#: the former name of :class:`Classifier` (text was its only modality), kept for configs and checkpoints that name it
TextClassifier = Classifier

__all__ = ["Classifier", "TextClassifier", "save_confusion_matrix"]
