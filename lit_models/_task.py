"""What every task of the zoo shares: optimizer and schedule from YAML, weight-decay groups, divergence checks."""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import OptimizerCallable
from lightning.pytorch.trainer.states import TrainerFn
from torch import Tensor, nn

from zoo.contracts import IGNORE_INDEX, Encoder
from zoo.errors import ConfigError, ZooUserError
from zoo.layers.dsa import compensation_loss, dsa_layers
from zoo.optim import ScheduleFactory, WarmupCosine


class TrainingDivergedError(ZooUserError, FloatingPointError):
    """The training, validation or test loss became NaN or infinite."""


class ZooTask(LightningModule):
    """Base of the zoo's LightningModules.

    Args:
        optimizer: builds the optimizer from parameter groups (LightningCLI's ``OptimizerCallable``); AdamW by
            default. Biases, norms, embeddings and other 1-D parameters get no weight decay, as in timm.
        scheduler: builds the per-step LR schedule from ``(optimizer, total_steps)``; warm-up + cosine by default,
            ``None`` for a constant rate.
        compile: ``torch.compile`` the fusion module, the tensor-input encoders and the other transformer blocks
            when the trainer sets the model up (:func:`zoo.compile.compile_regions`); ``True``, or a dict of its
            keyword arguments (``whole_fusion``, and ``torch.compile``'s options). Under FSDP the fusion module's
            blocks are compiled one by one, each an FSDP unit, unless ``whole_fusion`` is set.
        initial_checkpoint: weights to start training from: a Lightning checkpoint of a task with the same layers,
            or a plain state dict (:func:`zoo.weights.load_weights`). Only the weights are taken; optimizer,
            schedule and epoch start afresh (``--ckpt_path`` resumes a run instead, and ``python -m zoo fit`` then
            skips this). Loaded when the first ``fit`` sets the task up, after a QAT callback has quantized it, so that
            quantization-aware fine-tuning of a float model is ``--model.init_args.initial_checkpoint=float.ckpt``.
    """

    def __init__(
        self,
        *,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        scheduler: ScheduleFactory | None = WarmupCosine,
        compile: bool | dict[str, Any] = False,
        initial_checkpoint: str | None = None,
    ) -> None:
        super().__init__()
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.compile_options = {} if compile is True else compile
        self.compiled_regions: list[str] = []
        self.initial_checkpoint = initial_checkpoint
        self._parallelized = False
        self._foreach_given: dict[int, dict[int, Any]] = {}  # optimizer -> group -> foreach, where turned off
        self._dsa_layers: list[nn.Module] | None = None  # found when training starts, not walked every step

    def setup(self, stage: str) -> None:
        self.check_sample_rate()
        # in setup, not __init__: rebuilding the task from its hyper-parameters (load_from_checkpoint, zoo convert)
        # must not need the file; and after the callbacks' setup, so that a QAT callback has quantized the layers
        if stage == "fit" and self.initial_checkpoint:
            from zoo.weights import load_weights

            load_weights(self, self.initial_checkpoint, what="model.init_args.initial_checkpoint")
            self.initial_checkpoint = None  # once: a second fit of this task continues from its trained weights

    def check_sample_rate(self) -> None:
        """ConfigError when an encoder's ``sample_rate`` differs from the datamodule's: a clip at another rate than
        the encoder's mel filters expect trains without any error, on the wrong features."""
        data_rate = getattr(getattr(self._trainer, "datamodule", None), "sample_rate", None)
        for name, module in self.named_modules():
            model_rate = getattr(module, "sample_rate", None)
            if isinstance(module, Encoder) and None not in (data_rate, model_rate) and data_rate != model_rate:
                raise ConfigError(
                    f"{type(self).__name__}: the encoder {name} expects sample_rate={model_rate} Hz but the data is at "
                    f"sample_rate={data_rate} Hz; set both to the same rate"
                )

    def configure_model(self) -> None:
        # under ModelParallelStrategy (zoo.parallel.select_parallelism's fsdp / fsdp_tp plans) the trainer gives a
        # device mesh: tensor parallelism, then compilation, then FSDP, as torchtitan orders them. Lightning calls
        # this hook for every fit / validate / test, so each step runs once.
        mesh = None if self._parallelized else self.device_mesh
        if mesh is not None and mesh["tensor_parallel"].size() > 1:
            from zoo.parallel.parallelize import apply_tensor_parallel

            apply_tensor_parallel(self, mesh["tensor_parallel"])
        if self.compile_options is not False and not self.compiled_regions:
            from zoo.compile import compile_regions

            options = dict(self.compile_options)
            if mesh is not None and mesh["data_parallel"].size() > 1:
                # torchtitan's order: each FSDP unit (a block) compiled alone, its parameters gathered in hooks
                # between the graphs. An explicit whole_fusion=true trains correctly too (tests/test_parallel.py)
                options.setdefault("whole_fusion", False)
            self.compiled_regions = compile_regions(self, **options)
        if mesh is not None:
            from zoo.parallel.parallelize import apply_fsdp

            if mesh["data_parallel"].size() > 1:
                bf16 = str(getattr(self._trainer, "precision", "")) == "bf16-mixed" and mesh.device_type == "cuda"
                apply_fsdp(self, mesh["data_parallel"], param_dtype=torch.bfloat16 if bf16 else None)
            self._parallelized = True

    def parameter_groups(self) -> list[dict]:
        decay, no_decay = [], []
        for name, param in self.named_parameters():
            if not param.requires_grad:
                continue
            (no_decay if param.ndim <= 1 or name.endswith(".bias") or "embed" in name else decay).append(param)
        return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]

    def configure_optimizers(self):
        optimizer = _build("model.init_args.optimizer", self.optimizer_factory, self.parameter_groups())
        if self.scheduler_factory is None:
            return optimizer
        total_steps = int(self.trainer.estimated_stepping_batches)
        scheduler = _build("model.init_args.scheduler", self.scheduler_factory, optimizer, total_steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_train_start(self) -> None:
        self._dsa_layers = list(dsa_layers(self).values())
        # here, after a checkpoint's optimizer state (which carries the groups' options) is restored: groups that mix
        # plain tensors and DTensors (tensor parallelism without FSDP) cannot run torch's foreach kernels
        if self._parallelized:
            from zoo.parallel.optim import foreach_off_where_mixed

            self._foreach_given = {i: foreach_off_where_mixed(opt) for i, opt in enumerate(self.trainer.optimizers)}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        _cut_epoch_as_unfinished(checkpoint)
        # the options the user gave, so that a run resumed on one device steps with foreach again
        states = checkpoint.get("optimizer_states") or []
        for i, given in self._foreach_given.items():
            groups = states[i].get("param_groups") if i < len(states) else None  # None on ranks that save nothing
            if groups:
                for j, value in given.items():
                    groups[j]["foreach"] = value

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        # torch's clip_grad_norm_ cannot take parameters on several meshes (tensor parallelism): zoo.parallel.optim's
        # sums the norm mesh by mesh. Clipping by value is elementwise, and Lightning's own does it.
        if self._parallelized and gradient_clip_val and (gradient_clip_algorithm or "norm") == "norm":
            from zoo.parallel.optim import clip_grad_norm_

            clip_grad_norm_([p for group in optimizer.param_groups for p in group["params"]], gradient_clip_val)
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    # -- every task of the zoo classifies: logits [B, num_classes] against batch["label"] [B] (-100 is ignored) ----
    def _loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        """Mean cross-entropy over the labelled examples; 0 for a batch with none (the mean reduction gives NaN there,
        which the NaN checks would take for a diverged run: a VQA batch of answers outside ``max_answers``)."""
        total = F.cross_entropy(
            logits.float(), labels, ignore_index=IGNORE_INDEX, label_smoothing=getattr(self, "label_smoothing", 0.0),
            reduction="sum",
        )  # fmt: skip
        return total / (labels != IGNORE_INDEX).sum().clamp(min=1)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        logits = self(batch)
        labels = batch["label"]
        loss = self._loss(logits, labels)
        self.check_finite(loss)
        valid = labels != IGNORE_INDEX
        # masked sums rather than boolean indexing, whose data-dependent shape waits for the device every step
        acc = ((logits.argmax(-1) == labels) & valid).sum() / valid.sum()
        # Lightning turns progress-bar metrics into Python numbers every step, one host-device sync each: only when
        # a bar shows them (a run without one, e.g. on a cluster, keeps its steps free of those waits)
        shown = self.trainer.progress_bar_callback is not None
        self.log_dict({"train/loss": loss, "train/acc": acc}, prog_bar=shown, batch_size=len(labels))
        # DSA's gradient compensation, part of the loss so that accumulation and loss scaling apply to it too
        compensation = compensation_loss(self if self._dsa_layers is None else self._dsa_layers)
        return loss if compensation is None else loss + compensation

    def check_finite(self, loss: Tensor) -> None:
        """Stop with a clear message when the loss is NaN or infinite, instead of training on garbage."""
        if not torch.isfinite(loss):
            raise TrainingDivergedError(
                f"the training loss became {loss.item()} at epoch {self.current_epoch}, global step "
                f"{self.global_step}; checkpoints written so far are intact: lower the learning rate, enable "
                "gradient clipping (trainer.gradient_clip_val) or resume from the last checkpoint with --ckpt_path"
            )

    def on_validation_epoch_end(self) -> None:
        # here, before ModelCheckpoint's on_validation_end saves the weights that gave the loss; once per epoch, on
        # the loss Lightning averaged over the batches and devices: no wait for the device per batch, and every rank
        # stops together
        self.check_epoch_finite("val")

    def on_test_epoch_end(self) -> None:
        self.check_epoch_finite("test")

    def check_epoch_finite(self, stage: str) -> None:
        """Stop with a clear message when the epoch's ``{stage}/loss`` (``stage``: ``"val"`` or ``"test"``) is NaN or
        infinite, instead of checkpointing or reporting it."""
        loss = self.trainer.callback_metrics.get(f"{stage}/loss")
        if loss is None or math.isfinite(float(loss)):
            return
        what, command = ("validation", "validate") if stage == "val" else ("test", "test")
        if self.trainer.state.fn != TrainerFn.FITTING:  # validate or test: the weights given, or the data
            raise TrainingDivergedError(
                f"the {what} loss became {float(loss)} with the weights of epoch {self.current_epoch}, global step "
                f"{self.global_step}: they or the {what} data hold NaN or infinite values; {command} another "
                "checkpoint with --ckpt_path, or check the data"
            )
        if self.trainer.sanity_checking:  # no step has run: the weights given or the data
            raise TrainingDivergedError(
                f"the validation loss became {float(loss)} in the sanity check before training: the initial weights "
                "(model.init_args.initial_checkpoint, --ckpt_path) or the validation data hold NaN or infinite values"
            )
        where = f"at epoch {self.current_epoch}, global step {self.global_step}"
        raise TrainingDivergedError(
            f"the validation loss became {float(loss)} {where}; the run stopped before checkpointing these weights: "
            "lower the learning rate, enable gradient clipping (trainer.gradient_clip_val), check the validation data "
            "and model.init_args.initial_checkpoint for NaN or infinite values, or resume from the last checkpoint "
            "with --ckpt_path"
        )

    # -- DSA and quantization act on every layer of the task, wherever it sits ----------------------------------
    def set_gate_threshold(self, threshold: float) -> int:
        """Set the active fraction of every DSA FFN in the task; returns how many layers were set."""
        from zoo.layers.dsa import set_gate_threshold

        return set_gate_threshold(self, threshold)

    def quantize(self, **quant_config) -> nn.Module:
        """Prepare the task for quantization-aware training in place (see :func:`zoo.quant.quantize_`)."""
        from zoo.quant import quantize_

        return quantize_(self, **quant_config)


def _build(key: str, factory: Callable[..., Any], *args: Any) -> Any:
    """``factory(*args)``: the configured optimizer or schedule under config key ``key``. The ``ValueError`` or
    ``TypeError`` its constructor raises for a bad value (``Invalid learning rate: -1.0``) becomes a ConfigError
    naming the key and the class."""
    try:
        return factory(*args)
    except ZooUserError:
        raise
    except (ValueError, TypeError) as err:
        raise ConfigError(f"{key} ({_class_path(factory)}): {err}") from err


def _class_path(factory: Callable[..., Any]) -> str:
    """The class a factory builds, as a config names it: the class itself, or the one in a jsonargparse ``partial``,
    under the shortest module that exports it (``torch.optim.AdamW``, not ``torch.optim.adamw.AdamW``)."""
    target = next((a for a in (factory, *getattr(factory, "args", ())) if isinstance(a, type)), None)
    if target is None:
        return getattr(factory, "__qualname__", type(factory).__qualname__)
    parts = target.__module__.split(".")
    for n in range(1, len(parts) + 1):
        module = ".".join(parts[:n])
        if getattr(sys.modules.get(module), target.__qualname__, None) is target:
            return f"{module}.{target.__qualname__}"
    return f"{target.__module__}.{target.__qualname__}"


def _cut_epoch_as_unfinished(checkpoint: dict[str, Any]) -> None:
    """Record an epoch that ``max_steps``, ``max_time`` or a stop request cut short as unfinished.

    Saved at the end of such an epoch (a checkpoint callback's ``on_train_epoch_end``: no validation, or once an epoch),
    Lightning 2.6's loop state counts the epoch as processed though its last batch never came. Resumed from it, the
    loop finishes the epoch and counts it again: it runs one epoch fewer, and tells the samplers the next epoch's
    number for the rest of the current one. Counted as unprocessed, the checkpoint is a mid-epoch one, which Lightning
    resumes exactly.
    """
    loop = checkpoint.get("loops", {}).get("fit_loop")
    if not loop or loop.get("epoch_loop.batch_progress", {}).get("is_last_batch", True):
        return
    progress = loop["epoch_progress"]
    total = progress["total"]
    if total["processed"] == total["started"] and total["completed"] == total["processed"] - 1:
        total["processed"] -= 1
        progress["current"]["processed"] -= 1
