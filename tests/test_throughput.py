"""ThroughputMonitor: the FLOPs of the first training batch are counted exactly and feed Lightning's throughput
metrics, per micro-batch under gradient accumulation, without keeping compiled regions from compiling; a module's own
``flops_per_batch`` wins; the zoo's batches are sized without a ``batch_size_fn``; the callback builds from YAML."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import Callback
from lightning.pytorch.cli import LightningArgumentParser
from lightning.pytorch.loggers import Logger
from torch import nn
from torch.utils._python_dispatch import _get_current_dispatch_mode_stack
from torch.utils.data import DataLoader

from zoo.callbacks.throughput import ThroughputMonitor, batch_size
from zoo.errors import ConfigError, DataError

IN, HIDDEN, CLASSES, BATCH = 12, 16, 5, 8
# FlopCounterMode counts a [B, i] @ [i, o] product as 2*B*i*o. Forward: one product per layer. Backward: the weight
# gradient of every layer, and the input gradient of every layer but the first, whose input needs no gradient.
LAYER_1 = 2 * BATCH * IN * HIDDEN
LAYER_2 = 2 * BATCH * HIDDEN * CLASSES
FLOPS_PER_BATCH = (LAYER_1 + LAYER_1) + (LAYER_2 + 2 * LAYER_2)
TRAIN_KEYS = {
    "train/time",
    "train/batches",
    "train/samples",
    "train/device/batches_per_sec",
    "train/device/samples_per_sec",
    "train/device/flops_per_sec",
}


class TwoLinear(nn.Module):
    """``x [B, IN]`` -> logits ``[B, CLASSES]`` through two ``nn.Linear`` layers with a ReLU between."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(IN, HIDDEN), nn.Linear(HIDDEN, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


class LinearTask(pl.LightningModule):
    """:class:`TwoLinear` trained on zoo-style dict batches ``{"x": [B, IN], "label": [B]}``."""

    def __init__(self) -> None:
        super().__init__()
        self.net = TwoLinear()

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self.net(batch["x"]), batch["label"])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class RecordingLogger(Logger):
    """Keeps every metrics dict logged, in order."""

    def __init__(self) -> None:
        super().__init__()
        self.logged: list[dict[str, float]] = []

    @property
    def name(self) -> str:
        return "recording"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass

    def log_metrics(self, metrics, step=None) -> None:
        self.logged.append(dict(metrics))

    def series(self, key: str) -> list[float]:
        return [m[key] for m in self.logged if key in m]


def _loader(batches: int = 8) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    data = [
        {"x": torch.randn(IN, generator=g), "label": torch.randint(0, CLASSES, (), generator=g)}
        for _ in range(batches * BATCH)
    ]
    return DataLoader(data, batch_size=BATCH)


def _fit(tmp_path, model: pl.LightningModule, *callbacks: Callback, **kwargs) -> RecordingLogger:
    logger = RecordingLogger()
    trainer = pl.Trainer(
        default_root_dir=tmp_path,
        accelerator="cpu",
        devices=1,
        logger=logger,
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=list(callbacks),
        **{"max_steps": 3, **kwargs},
    )
    trainer.fit(model, _loader())
    return logger


def test_counted_flops_of_a_linear_stack_equal_its_forward_and_backward_matmuls(tmp_path):
    torch.manual_seed(0)
    model = LinearTask()
    _fit(tmp_path, model, ThroughputMonitor(window_size=2), max_steps=1)
    assert model.flops_per_batch == FLOPS_PER_BATCH
    assert _get_current_dispatch_mode_stack() == [], "the counter was left entered"


def test_fit_logs_lightning_throughput_per_micro_batch_under_gradient_accumulation(tmp_path):
    torch.manual_seed(0)
    model = LinearTask()
    logger = _fit(tmp_path, model, ThroughputMonitor(window_size=2), max_steps=3, accumulate_grad_batches=2)
    assert model.flops_per_batch == FLOPS_PER_BATCH, "FLOPs of one micro-batch, not of the accumulated step"
    logged = set().union(*logger.logged)
    assert TRAIN_KEYS <= logged
    assert "train/device/mfu" not in logged, "Lightning knows no peak FLOP/s for a CPU"
    # one log per optimizer step, each micro-batch one batch of BATCH samples
    assert logger.series("train/batches") == [2, 4, 6]
    assert logger.series("train/samples") == [2 * BATCH, 4 * BATCH, 6 * BATCH]
    # a window of 2 micro-batches spans one micro-batch: FLOP/s = FLOPs of one micro-batch x micro-batches/s
    # (rel 1e-9: the two sides divide in a different order)
    for metrics in logger.logged:
        if "train/device/flops_per_sec" in metrics:
            expected = FLOPS_PER_BATCH * metrics["train/device/batches_per_sec"]
            assert metrics["train/device/flops_per_sec"] == pytest.approx(expected, rel=1e-9)


def test_peak_flops_gives_mfu_as_device_flops_per_sec_over_the_peak(tmp_path):
    torch.manual_seed(0)
    peak = 3.5e9
    logger = _fit(tmp_path, LinearTask(), ThroughputMonitor(window_size=2, peak_flops=peak))
    logged = [m for m in logger.logged if "train/device/mfu" in m]
    assert len(logged) == 2, "steps 2 and 3 fill the window of 2"
    for metrics in logged:
        assert metrics["train/device/mfu"] == pytest.approx(metrics["train/device/flops_per_sec"] / peak, rel=1e-12)


def test_a_given_peak_silences_lightnings_unknown_device_warning(tmp_path, monkeypatch, recwarn):
    """On a GPU Lightning's table lacks (a plain "NVIDIA H200") Lightning warns "FLOPs not found"; with peak_flops
    given that is answered, and only then is the warning dropped."""
    import lightning.pytorch.callbacks.throughput_monitor as lightning_monitor
    from lightning.pytorch.utilities import rank_zero_warn

    def unknown_device(device, dtype):
        rank_zero_warn("FLOPs not found for 'NVIDIA H200', chip is 'nvidia h200'")

    monkeypatch.setattr(lightning_monitor, "get_available_flops", unknown_device)
    torch.manual_seed(0)
    _fit(tmp_path / "peak", LinearTask(), ThroughputMonitor(window_size=2, peak_flops=3.5e9))
    assert not [w for w in recwarn if "FLOPs not found" in str(w.message)]
    with pytest.warns(UserWarning, match="FLOPs not found"):
        _fit(tmp_path / "none", LinearTask(), ThroughputMonitor(window_size=2))


class OwnFlopsTask(LinearTask):
    """Declares its own FLOPs per batch, as a user who measured them would."""

    flops_per_batch = 123_457


def test_module_that_defines_flops_per_batch_keeps_its_value(tmp_path):
    torch.manual_seed(0)
    model = OwnFlopsTask()
    logger = _fit(tmp_path, model, ThroughputMonitor(window_size=2))
    assert model.flops_per_batch == 123_457
    metrics = logger.logged[-1]
    expected = 123_457 * metrics["train/device/batches_per_sec"]
    assert metrics["train/device/flops_per_sec"] == pytest.approx(expected, rel=1e-9)


def test_counting_the_first_batch_does_not_keep_compiled_regions_from_compiling(tmp_path):
    torch.manual_seed(0)
    graphs: list[torch.fx.GraphModule] = []

    def recording_backend(graph: torch.fx.GraphModule, example_inputs):
        graphs.append(graph)
        return graph.forward

    model = LinearTask()
    model.net.compile(backend=recording_backend)  # a region compiled in place, as zoo.compile.compile_regions does
    _fit(tmp_path, model, ThroughputMonitor(window_size=2), max_steps=2)
    assert model.flops_per_batch == FLOPS_PER_BATCH
    assert graphs, "a region first run under the FLOP counter was never compiled"


class SkipsFirstEpochTask(LinearTask):
    """Skips the rest of its first epoch from its first batch on (``on_train_batch_start`` returns -1)."""

    def on_train_batch_start(self, batch, batch_idx):
        return -1 if self.current_epoch == 0 else None


def test_a_skipped_first_batch_is_not_counted_and_the_next_one_is(tmp_path):
    torch.manual_seed(0)
    model = SkipsFirstEpochTask()
    _fit(tmp_path, model, ThroughputMonitor(window_size=2), max_steps=2, max_epochs=2)
    assert model.flops_per_batch == FLOPS_PER_BATCH
    assert _get_current_dispatch_mode_stack() == []


class FailingTask(LinearTask):
    """Raises in its first training step."""

    def training_step(self, batch, batch_idx):
        raise RuntimeError("boom")


def test_an_error_in_the_counted_batch_leaves_no_flop_counter_running(tmp_path):
    with pytest.raises(RuntimeError, match="boom"):
        _fit(tmp_path, FailingTask(), ThroughputMonitor(window_size=2))
    assert _get_current_dispatch_mode_stack() == []


def test_default_batch_size_reads_the_label_of_a_zoo_batch_and_dim_0_of_other_batches():
    g = torch.Generator().manual_seed(0)
    # the first tensor is not [B, ...]: the label decides
    zoo_batch = {"vocab_mask": torch.rand(7, generator=g) > 0.5, "label": torch.randint(0, 3, (5,), generator=g)}
    assert batch_size(zoo_batch) == 5
    assert batch_size(torch.randn(6, 3, generator=g)) == 6
    assert batch_size((torch.randn(4, 2, generator=g), torch.randint(0, 3, (4,), generator=g))) == 4
    assert batch_size({"scale": torch.tensor(2.0), "tokens": [torch.randn(3, 9, generator=g)]}) == 3
    with pytest.raises(DataError, match="batch_size_fn"):
        batch_size({"ids": [1, 2, 3]})
    assert ThroughputMonitor().batch_size_fn is batch_size


CALLBACKS_YAML = """
callbacks:
  - class_path: zoo.callbacks.throughput.ThroughputMonitor
    init_args: {window_size: 20}
  - class_path: zoo.callbacks.throughput.ThroughputMonitor
    init_args: {batch_size_fn: builtins.len, peak_flops: 9.89e+14, separator: "|"}
"""


def test_callback_builds_from_yaml_through_lightning_cli_parser():
    parser = LightningArgumentParser(exit_on_error=False)
    parser.add_argument("--callbacks", type=list[Callback])
    default, custom = parser.instantiate_classes(parser.parse_string(CALLBACKS_YAML)).callbacks
    assert isinstance(default, ThroughputMonitor) and default.kwargs == {"window_size": 20, "separator": "/"}
    assert default.batch_size_fn is batch_size and default.peak_flops is None
    assert custom.batch_size_fn is len and custom.peak_flops == 9.89e14 and custom.kwargs["separator"] == "|"


@pytest.mark.parametrize(("kwargs", "message"), [({"window_size": 1}, "window_size=1"), ({"peak_flops": 0}, "peak")])
def test_unusable_window_or_peak_is_refused_where_it_is_given(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        ThroughputMonitor(**kwargs)
