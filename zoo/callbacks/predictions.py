"""Writes what ``python -m zoo predict`` predicts to a JSON Lines file, one line per example."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities.rank_zero import rank_zero_info


class PredictionWriter(BasePredictionWriter):
    """One JSON object per predicted example, in the order of the predict loader, to ``path``.

    Each line holds ``index`` (the example's index in the predict dataset), ``prediction`` (the predicted label's
    name: the datamodule's ``answers`` or ``class_names``, the index when it has neither), ``prediction_index`` and
    ``confidence`` (its softmax probability), and when the batch has them, ``label`` (the true label's name; absent
    where it is ignored, ``-100``) and ``text`` (the input text, e.g. the question), and ``file`` when the predict
    dataset reads files (a ``files`` list, as the audio folder's does). The task's ``predict_step``
    returns ``{"answer" or "label": [B], "confidence": [B]}``, as the zoo's tasks do.

    The file appears when the loop ends, complete (written beside it, then renamed), so a reader never sees half of
    it. Under several processes each writes its own, ``<stem>.rank<r>.jsonl``. ``python -m zoo predict`` adds this
    callback when the config has no prediction writer, writing to the run's log folder.

    Args:
        path: the JSON Lines file; ``None`` writes ``predictions.jsonl`` in the trainer's log folder.
    """

    def __init__(self, path: str | None = None) -> None:
        super().__init__(write_interval="batch")
        self.path = path
        self.written: Path | None = None
        self._file = None
        self._tmp: Path | None = None
        self._names: list[str] | None = None
        self._files: list[str] | None = None
        self._seen = 0

    def _target(self, trainer) -> Path:
        path = Path(self.path) if self.path else Path(trainer.log_dir or trainer.default_root_dir) / "predictions.jsonl"
        if trainer.world_size > 1:
            path = path.with_name(f"{path.stem}.rank{trainer.global_rank}{path.suffix}")
        return path.expanduser()

    def on_predict_start(self, trainer, pl_module) -> None:
        target = self._target(trainer)
        target.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = target.with_name(f".{target.name}.tmp")
        self._file = self._tmp.open("w", encoding="utf8")
        self._seen = 0
        datamodule = getattr(trainer, "datamodule", None)
        names = getattr(datamodule, "answers", None) or getattr(datamodule, "class_names", None)
        self._names = list(names) if names else None
        loaders = trainer.predict_dataloaders
        loader = loaders[0] if isinstance(loaders, (list, tuple)) and loaders else loaders
        self._files = getattr(getattr(loader, "dataset", None), "files", None)

    def _name(self, index: int) -> str | int:
        return self._names[index] if self._names is not None and 0 <= index < len(self._names) else index

    def write_on_batch_end(
        self,
        trainer,
        pl_module,
        prediction: dict[str, torch.Tensor],
        batch_indices: list[int] | None,
        batch: dict[str, Any],
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        predicted = prediction["answer"] if "answer" in prediction else prediction["label"]
        predicted, confidence = predicted.tolist(), prediction["confidence"].float().tolist()
        labels = batch["label"].tolist() if isinstance(batch.get("label"), torch.Tensor) else None
        texts = batch.get("text") if isinstance(batch.get("text"), list) else None
        # the predict loader keeps the dataset's order: without tracked indices, a running count is the index
        indices = list(batch_indices) if batch_indices else range(self._seen, self._seen + len(predicted))
        self._seen += len(predicted)
        for row, index in enumerate(indices):
            line: dict[str, Any] = {
                "index": int(index),
                "prediction": self._name(predicted[row]),
                "prediction_index": predicted[row],
                "confidence": round(confidence[row], 6),
            }
            if labels is not None and labels[row] >= 0:
                line["label"] = self._name(labels[row])
            if texts is not None:
                line["text"] = texts[row]
            if self._files is not None:
                line["file"] = str(self._files[index])
            self._file.write(json.dumps(line) + "\n")

    def on_predict_end(self, trainer, pl_module) -> None:
        self._file.close()
        self.written = self._target(trainer)
        os.replace(self._tmp, self.written)
        rank_zero_info(f"predictions: {self.written}")

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if self._file is not None and not self._file.closed:
            self._file.close()
            self._tmp.unlink(missing_ok=True)


__all__ = ["PredictionWriter"]
