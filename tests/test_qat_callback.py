"""QATScheduleCallback: bit widths switch at the configured steps, a resumed run continues in its stage, observers and
batch norm freeze, bits and errors are logged; and a QAT checkpoint converts through ``python -m zoo convert``."""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from zoo.callbacks import QATScheduleCallback
from zoo.errors import ConfigError, DataError
from zoo.layers import TransformerBlock
from zoo.quant import QuantizedLinear, QuantizedScaledDotProduct, calibrate, calibrating, load_converted, quantize_
from zoo.quant.convert import main as convert_main

DIM, TOKENS, CLASSES = 16, 6, 3
# attention 8-bit, FFN 4-bit (the default overrides); the head at 8
QUANT = {"weight_bit": 8, "activation_bit": 8}


class TinyTask(pl.LightningModule):
    """A transformer block, batch norm and a head over random token sequences."""

    def __init__(self, dim: int = DIM) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.block = TransformerBlock(dim, 2)
        self.norm = nn.BatchNorm1d(dim)
        self.head = nn.Linear(dim, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.block(x).mean(1)))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def predict_step(self, batch, batch_idx):
        return self(batch[0])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


class TinyData(pl.LightningDataModule):
    """Random token sequences and labels; records its hyper-parameters, as LightningCLI datamodules do."""

    def __init__(self, scale: float = 1.0) -> None:
        super().__init__()
        self.save_hyperparameters()

    def train_dataloader(self) -> DataLoader:
        g = torch.Generator().manual_seed(0)
        x = self.hparams.scale * torch.randn(64, TOKENS, DIM, generator=g)
        return DataLoader(TensorDataset(x, torch.randint(0, CLASSES, (64,), generator=g)), batch_size=8)


class BitsProbe(pl.Callback):
    """Records (global step, fc1 weight bits, qkv weight bits) at the start of every training batch."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, int, int]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        block = pl_module.block
        self.seen.append((trainer.global_step, block.ffn.fc1.weight_quant.bits, block.attn.qkv.weight_quant.bits))


def _loader() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(64, TOKENS, DIM, generator=g), torch.randint(0, CLASSES, (64,), generator=g))
    return DataLoader(data, batch_size=8)


def _trainer(tmp_path, max_steps: int, *callbacks: pl.Callback, **kwargs) -> pl.Trainer:
    return pl.Trainer(
        default_root_dir=tmp_path,
        max_steps=max_steps,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=list(callbacks),
        log_every_n_steps=1,
        **kwargs,
    )


def test_bits_switch_at_the_configured_steps_and_respect_layer_targets(tmp_path):
    torch.manual_seed(0)
    probe = BitsProbe()
    schedule = QATScheduleCallback([8, 6, 4], [2, 4], unit="step", quant=QUANT)
    _trainer(tmp_path, 6, schedule, probe).fit(TinyTask(), _loader())
    # FFN (target 4) follows the schedule down; attention (target 8) stays at 8
    assert probe.seen == [(0, 8, 8), (1, 8, 8), (2, 6, 8), (3, 6, 8), (4, 4, 8), (5, 4, 8)]
    assert schedule.transitions == [(0, 8), (2, 6), (4, 4)]


class StopAt(pl.Callback):
    """Interrupts training after ``step`` optimizer steps, as a crash or a time limit would."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step >= self.step:
            trainer.should_stop = True


def _stage_lines(caplog) -> list[str]:
    lines = [record.getMessage() for record in caplog.records]
    return [line for line in lines if line.startswith("QAT:") and ": stage " in line]


def test_resumed_run_continues_in_its_stage_on_the_saved_boundaries(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    torch.manual_seed(0)
    # fractions of a 6-step run: stages begin at steps 2 and 4; the run is interrupted after step 3
    first = QATScheduleCallback([8, 6, 4], [0.34, 0.67], unit="step", quant=QUANT)
    trainer = _trainer(tmp_path, 6, first, StopAt(3))
    model = TinyTask()
    trainer.fit(model, _loader())
    assert [line.split(";")[0] for line in _stage_lines(caplog)] == [
        "QAT: step 0: stage 0 (8 bits)",
        "QAT: step 2: stage 1 (6 bits)",
    ]
    caplog.clear()
    assert trainer.global_step == 3 and first.stage == 1 and model.block.ffn.fc1.weight_quant.bits == 6
    ckpt = tmp_path / "mid.ckpt"
    trainer.save_checkpoint(ckpt)

    # As a fresh process would: a new model (float, quantized by the callback at setup) and callback. The run is
    # now 12 steps long, which would move fractional boundaries to 4 and 8; the resumed run keeps its own, 2 and 4.
    probe = BitsProbe()
    resumed = QATScheduleCallback([8, 6, 4], [0.34, 0.67], unit="step", quant=QUANT)
    _trainer(tmp_path, 12, resumed, probe, StopAt(6)).fit(TinyTask(), _loader(), ckpt_path=ckpt)
    assert probe.seen[:2] == [(3, 6, 8), (4, 4, 8)], "continues in stage 1 at step 3, enters stage 2 at step 4"
    assert resumed.transitions == [(0, 8), (2, 6), (4, 4)]
    # the resumed run announces only the stage it enters, not a stage 0 it never trains in
    assert [line.split(";")[0] for line in _stage_lines(caplog)] == ["QAT: step 4: stage 2 (4 bits)"]


class AttentionRangeProbe(pl.Callback):
    """Records the attention's query range when training starts (after a checkpoint is restored)."""

    def on_train_start(self, trainer, pl_module):
        self.query = pl_module.block.attn.sdpa.act_quant["q"]
        self.range = (self.query.min_val.clone(), self.query.max_val.clone(), self.query.initialized)


def test_resumed_run_restores_the_attention_quantizers(tmp_path):
    torch.manual_seed(0)
    quant = QUANT | {"activation_granularity": "per_tensor", "attention_bit": 8}
    trainer = _trainer(tmp_path, 6, QATScheduleCallback([8, 4], [2], unit="step", quant=quant), StopAt(3))
    model = TinyTask()
    trainer.fit(model, _loader())
    ckpt = tmp_path / "mid.ckpt"
    trainer.save_checkpoint(ckpt)
    saved = model.block.attn.sdpa.act_quant["q"]
    probe = AttentionRangeProbe()
    resumed = QATScheduleCallback([8, 4], [2], unit="step", quant=quant)
    _trainer(tmp_path, 6, resumed, probe, StopAt(4)).fit(TinyTask(), _loader(), ckpt_path=ckpt)
    low, high, initialized = probe.range
    assert initialized and torch.equal(low, saved.min_val) and torch.equal(high, saved.max_val)


class QuantOnProbe(pl.Callback):
    """Records (global step, fake quantizers on, fc1 weight bits) at the start of every training batch."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, bool, int]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        fc1 = pl_module.block.ffn.fc1
        self.seen.append((trainer.global_step, fc1.weight_quant.enabled and fc1.act_quant.enabled,
                          fc1.weight_quant.bits))  # fmt: skip


def test_float_phase_before_start_then_stages_spread_over_the_rest_and_resume_inside_it(tmp_path):
    torch.manual_seed(0)
    # 8 steps, quantization from step 4; milestones=None spreads [8, 4] over steps 4..8: 4-bit from step 6
    probe = QuantOnProbe()
    first = QATScheduleCallback([8, 4], start=0.5, unit="step", quant=QUANT)
    trainer = _trainer(tmp_path, 8, first, probe, StopAt(2))
    model = TinyTask()
    trainer.fit(model, _loader())
    assert probe.seen == [(0, False, 8), (1, False, 8)]
    x = torch.randn(2, TOKENS, DIM)
    model.eval()
    with torch.no_grad():  # quantizers off: the layers compute exactly what float layers with these weights do
        fc1 = model.block.ffn.fc1
        torch.testing.assert_close(fc1(x), F.linear(x, fc1.weight, fc1.bias), rtol=0, atol=0)
    ckpt = tmp_path / "float_phase.ckpt"
    trainer.save_checkpoint(ckpt)

    probe = QuantOnProbe()
    resumed = QATScheduleCallback([8, 4], start=0.5, unit="step", quant=QUANT)
    _trainer(tmp_path, 8, resumed, probe).fit(TinyTask(), _loader(), ckpt_path=ckpt)
    assert probe.seen == [(2, False, 8), (3, False, 8), (4, True, 8), (5, True, 8), (6, True, 4), (7, True, 4)]
    assert resumed.quantizing and resumed.transitions == [(0, 8), (6, 4)]


def test_single_stage_schedule_with_a_float_phase(tmp_path):
    probe = QuantOnProbe()
    schedule = QATScheduleCallback([4], start=2, unit="step", quant=QUANT)
    _trainer(tmp_path, 4, schedule, probe).fit(TinyTask(), _loader())
    assert probe.seen == [(0, False, 4), (1, False, 4), (2, True, 4), (3, True, 4)]


def test_observers_and_batch_norm_freeze_and_logs_name_layers(tmp_path):
    torch.manual_seed(0)
    schedule = QATScheduleCallback([8, 4], [1], unit="step", freeze_observers_at=2, freeze_bn_at=2, quant=QUANT)

    class Snapshot(pl.Callback):
        def __init__(self):
            self.stats = {}

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.stats[trainer.global_step] = (
                pl_module.norm.running_mean.clone(),
                pl_module.block.ffn.fc1.weight_quant.max_val.clone(),
            )

    snapshot = Snapshot()
    trainer = _trainer(tmp_path, 5, schedule, snapshot)
    model = TinyTask()
    trainer.fit(model, _loader())
    assert schedule.observers_frozen and schedule.bn_frozen
    assert not model.block.ffn.fc1.weight_quant.observer_enabled
    # frozen from step 2: the batches at steps 2, 3, 4 leave the statistics and ranges of step 2's start unchanged
    mean_3, range_3 = snapshot.stats[3]
    mean_5, range_5 = snapshot.stats[5]
    assert torch.equal(mean_3, mean_5) and torch.equal(range_3, range_5)
    assert not torch.equal(snapshot.stats[1][0], mean_3), "before the freeze the statistics moved"
    logged = trainer.logged_metrics
    assert logged["qat/schedule_bits"] == 4
    assert logged["qat/bits/block.ffn.fc1"] == 4 and logged["qat/bits/block.attn.qkv"] == 8
    assert 0 < logged["qat/weight_error/block.ffn.fc1"] < 0.5
    assert 0 < logged["qat/input_error/block.attn.qkv"] < 0.1


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"schedule": [8, 9]}, r"schedule\[1\]=9"),
        ({"schedule": [8, 0]}, r"schedule\[1\]=0"),
        ({"schedule": [8, 6, 4], "milestones": [3]}, "milestones=.*2 entries"),
        ({"schedule": [8, 4], "milestones": [1.5]}, r"milestones\[0\]=1.5"),
        ({"schedule": [8, 4], "unit": "batch"}, "unit='batch'"),
        ({"freeze_bn_at": -1}, "freeze_bn_at=-1"),
    ],
)
def test_invalid_schedule_fails_naming_the_key(kwargs, key):
    with pytest.raises(ConfigError, match=key):
        QATScheduleCallback(**kwargs)


def test_unknown_quant_setting_fails_at_setup_naming_the_key(tmp_path):
    schedule = QATScheduleCallback([8, 4], [1], unit="step", quant={"weight_bit": 4, "overrides": {"*.mlp.*": 8}})
    with pytest.raises(ConfigError, match=r"overrides\['\*.mlp.\*'\] matches no"):
        _trainer(tmp_path, 1, schedule).fit(TinyTask(), _loader())


@pytest.mark.parametrize(
    ("granularity", "attention_bit"), [("per_token", None), ("per_tensor", None), ("per_tensor", 8)]
)
def test_qat_checkpoint_converts_with_the_command_and_matches(tmp_path, granularity, attention_bit):
    torch.manual_seed(0)
    quant = QUANT | {"activation_granularity": granularity, "attention_bit": attention_bit}
    schedule = QATScheduleCallback([8, 4], [2], unit="step", quant=quant)
    trainer = _trainer(tmp_path, 3, schedule)
    model = TinyTask()
    trainer.fit(model, _loader())
    ckpt, out = tmp_path / "qat.ckpt", tmp_path / "int.pt"
    trainer.save_checkpoint(ckpt)
    convert_main(["--ckpt", str(ckpt), "--out", str(out), "--model-class", f"{TinyTask.__module__}.TinyTask"])
    loaded = load_converted(out)
    assert isinstance(loaded.block.ffn.fc1, QuantizedLinear) and loaded.block.ffn.fc1.weight_bit == 4
    assert loaded.block.ffn.fc1.activation_granularity == granularity  # per tensor: the scales trained in the run
    assert loaded.block.ffn.fc1.activation == "gelu" and isinstance(loaded.block.ffn.act, nn.Identity)
    assert isinstance(loaded.block.attn.sdpa, QuantizedScaledDotProduct) == (attention_bit is not None)
    schedule.setup(trainer, loaded, "test")  # testing the integer model with the same trainer: nothing to redo
    x = torch.randn(8, TOKENS, DIM)
    model.eval()
    with torch.no_grad():
        expected, got = model(x), loaded(x)
    # tolerance: see tests/test_quant.py::test_converted_model_matches_fake_quant_model
    torch.testing.assert_close(got, expected, rtol=0.02, atol=0.02 * expected.abs().max().item())
    with pytest.raises(ConfigError, match="already quantization-aware"):
        convert_main(
            [
                "--ckpt",
                str(ckpt),
                "--out",
                str(out),
                "--quant",
                "{}",
                "--model-class",
                f"{TinyTask.__module__}.TinyTask",
            ]
        )


def test_float_checkpoint_converts_after_training_with_quant(tmp_path):
    torch.manual_seed(0)
    trainer = _trainer(tmp_path, 2)
    model = TinyTask()
    trainer.fit(model, _loader())
    ckpt, out = tmp_path / "float.ckpt", tmp_path / "ptq.pt"
    trainer.save_checkpoint(ckpt)
    cls = f"{TinyTask.__module__}.TinyTask"
    with pytest.raises(ConfigError, match="no quantization-aware layers"):
        convert_main(["--ckpt", str(ckpt), "--out", str(out), "--model-class", cls])
    with pytest.raises(ConfigError, match="per tensor.*add --calibrate N"):  # per-tensor PTQ needs calibration
        per_tensor = '{"weight_bit": 8, "activation_granularity": "per_tensor"}'
        convert_main(["--ckpt", str(ckpt), "--out", str(out), "--model-class", cls, "--quant", per_tensor])
    convert_main(["--ckpt", str(ckpt), "--out", str(out), "--model-class", cls, "--quant", '{"weight_bit": 8}'])
    loaded = load_converted(out, copy.deepcopy(TinyTask()))
    assert loaded.block.ffn.fc1.weight_bit == 4 and loaded.head.weight_bit == 8


def test_post_training_per_tensor_quantization_calibrates_on_the_checkpoints_datamodule(tmp_path):
    torch.manual_seed(0)
    trainer = _trainer(tmp_path, 2)
    model = TinyTask()
    trainer.fit(model, datamodule=TinyData(scale=3.0))
    ckpt, out = tmp_path / "float.ckpt", tmp_path / "ptq.pt"
    trainer.save_checkpoint(ckpt)
    flags = ["--ckpt", str(ckpt), "--out", str(out), "--model-class", f"{TinyTask.__module__}.TinyTask"]
    per_tensor = ["--quant", '{"weight_bit": 8, "activation_bit": 8, "activation_granularity": "per_tensor"}']
    convert_main([*flags, *per_tensor, "--calibrate", "3", "--datamodule-class", f"{TinyData.__module__}.TinyData"])
    loaded = load_converted(out, copy.deepcopy(TinyTask()))
    fc1 = loaded.block.ffn.fc1
    assert fc1.activation_granularity == "per_tensor" and fc1.activation == "gelu"
    # the scales of the documented Python procedure on the same three batches
    reference = quantize_(copy.deepcopy(model).eval(), weight_bit=8, activation_granularity="per_tensor")
    with torch.no_grad(), calibrating(reference):
        for _, (x, _) in zip(range(3), TinyData(scale=3.0).train_dataloader(), strict=False):
            reference(x)
    for name in ("attn.qkv", "attn.proj", "ffn.fc1", "ffn.fc2"):
        expected_scale = reference.block.get_submodule(name).act_quant.static_qparams()[0]
        torch.testing.assert_close(loaded.block.get_submodule(name).act_scale, expected_scale.reshape(1))
    # zoo.quant.calibrate, which the command runs, skips a model whose inputs are quantized per token
    per_token = quantize_(copy.deepcopy(model).eval(), weight_bit=8)
    assert calibrate(per_token, TinyData().train_dataloader(), 3) == 0
    assert calibrate(quantize_(copy.deepcopy(model).eval(), activation_granularity="per_tensor"), [(x, None)], 3) == 1
    x = 3.0 * torch.randn(8, TOKENS, DIM)
    model.eval()
    with torch.no_grad():
        expected, got = model(x), loaded(x)
    torch.testing.assert_close(got, expected, rtol=0.1, atol=0.1 * expected.abs().max().item())  # W8A8 error


def test_post_training_integer_attention_needs_and_gets_calibration(tmp_path, capsys):
    torch.manual_seed(0)
    trainer = _trainer(tmp_path, 2)
    model = TinyTask()
    trainer.fit(model, datamodule=TinyData())
    ckpt, out = tmp_path / "float.ckpt", tmp_path / "ptq.pt"
    trainer.save_checkpoint(ckpt)
    flags = ["--ckpt", str(ckpt), "--out", str(out), "--model-class", f"{TinyTask.__module__}.TinyTask"]
    attention = ["--quant", '{"weight_bit": 8, "attention_bit": 8}']  # per-token linears: only attention needs it
    with pytest.raises(ConfigError, match="attention_bit.*add --calibrate N"):
        convert_main([*flags, *attention])
    convert_main([*flags, *attention, "--calibrate", "2", "--datamodule-class", f"{TinyData.__module__}.TinyData"])
    assert "'attention A8': 1" in capsys.readouterr().err  # the command's summary of what it converted
    loaded = load_converted(out, copy.deepcopy(TinyTask()))
    assert isinstance(loaded.block.attn.sdpa, QuantizedScaledDotProduct)
    assert not torch.equal(loaded.block.attn.sdpa.scale, torch.ones(4))  # observed, not the initial scales


def test_calibrate_needs_post_training_quantization_and_a_datamodule(tmp_path):
    torch.manual_seed(0)
    trainer = _trainer(tmp_path, 1)
    trainer.fit(TinyTask(), _loader())  # no datamodule: the checkpoint records none
    ckpt, out = tmp_path / "float.ckpt", str(tmp_path / "ptq.pt")
    trainer.save_checkpoint(ckpt)
    flags = ["--ckpt", str(ckpt), "--out", out, "--model-class", f"{TinyTask.__module__}.TinyTask", "--calibrate", "2"]
    with pytest.raises(ConfigError, match="records no datamodule.*--datamodule-class"):
        convert_main([*flags, "--quant", '{"activation_granularity": "per_tensor"}'])
    schedule = QATScheduleCallback([8], quant=QUANT)
    qat_trainer = _trainer(tmp_path, 1, schedule)
    qat_trainer.fit(TinyTask(), _loader())
    qat_trainer.save_checkpoint(ckpt)
    with pytest.raises(ConfigError, match="--calibrate is for post-training quantization"):
        convert_main(flags)


def test_convert_names_a_missing_or_unreadable_checkpoint(tmp_path):
    out = str(tmp_path / "out.pt")
    with pytest.raises(DataError, match=r"--ckpt: no file .*gone\.ckpt"):
        convert_main(["--ckpt", str(tmp_path / "gone.ckpt"), "--out", out])
    corrupt = tmp_path / "corrupt.ckpt"
    corrupt.write_bytes(b"not a checkpoint")
    with pytest.raises(DataError, match=r"--ckpt: .*corrupt\.ckpt is not a readable PyTorch checkpoint"):
        convert_main(["--ckpt", str(corrupt), "--out", out])
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(DataError, match="has no state_dict"):
        convert_main(["--ckpt", str(tmp_path / "list.pt"), "--out", out])


@pytest.fixture(scope="module")
def float_checkpoint(tmp_path_factory):
    """A Lightning checkpoint of TinyTask after one float training step."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("float")
    trainer = _trainer(root, 1)
    trainer.fit(TinyTask(), _loader())
    trainer.save_checkpoint(root / "float.ckpt")
    return root / "float.ckpt"


def _ptq_flags(ckpt, out) -> list[str]:
    return ["--ckpt", str(ckpt), "--out", str(out), "--model-class", f"{TinyTask.__module__}.TinyTask", "--quant"]


def test_convert_names_unknown_quant_keys_and_the_valid_ones(float_checkpoint, tmp_path):
    with pytest.raises(
        ConfigError, match=r"--quant: unknown key 'weight_bits'; valid keys: weight_bit, activation_bit"
    ):
        convert_main([*_ptq_flags(float_checkpoint, tmp_path / "a.pt"), '{"weight_bits": 4}'])
    assert not (tmp_path / "a.pt").exists()


@pytest.mark.parametrize("batches", ["-1", "0"])
def test_convert_rejects_fewer_than_one_calibration_batch_before_loading(tmp_path, batches):
    flags = _ptq_flags(tmp_path / "gone.ckpt", tmp_path / "a.pt")  # no checkpoint: the flag is checked first
    with pytest.raises(ConfigError, match=rf"--calibrate {batches}: must be at least 1"):
        convert_main([*flags, "{}", "--calibrate", batches])
    with pytest.raises(ValueError, match="num_batches=0 must be at least 1"):  # and Python's calibrate
        calibrate(quantize_(TinyTask().eval(), activation_granularity="per_tensor"), _loader(), 0)


def test_convert_refuses_to_overwrite_the_checkpoint(float_checkpoint, tmp_path, monkeypatch):
    ckpt = tmp_path / "float.ckpt"
    ckpt.write_bytes(float_checkpoint.read_bytes())
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"--out .*float\.ckpt is the --ckpt float\.ckpt"):
        convert_main([*_ptq_flags("float.ckpt", ckpt), "{}"])  # the same file, spelled two ways
    assert ckpt.read_bytes() == float_checkpoint.read_bytes()


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc, where no file can be created")
def test_convert_names_an_out_it_cannot_write_and_creates_missing_folders(float_checkpoint, tmp_path):
    with pytest.raises(ConfigError, match=r"--out .*: cannot write \(it is a directory\)"):
        convert_main([*_ptq_flags(tmp_path / "gone.ckpt", tmp_path), "{}"])  # checked before loading
    with pytest.raises(ConfigError, match=r"--out /proc/a\.pt: cannot write \(No such file or directory\)"):
        convert_main([*_ptq_flags(float_checkpoint, "/proc/a.pt"), "{}"])
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(ConfigError, match=r"--out .*file/a\.pt: cannot write \(.*file"):
        convert_main([*_ptq_flags(float_checkpoint, tmp_path / "file" / "a.pt"), "{}"])
    convert_main([*_ptq_flags(float_checkpoint, tmp_path / "new" / "sub" / "a.pt"), "{}"])
    assert isinstance(load_converted(tmp_path / "new" / "sub" / "a.pt").head, QuantizedLinear)


def test_vqa_qat_config_gives_the_vqa_model_mixed_bits(tmp_path, monkeypatch):
    from zoo.cli import ZooCLI, resolve_config_args

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ZOO_DATA_DIR", str(tmp_path / "data"))
    cli = ZooCLI(args=resolve_config_args(["--config", "vqa_qat.yaml", "--trainer.logger=false"]), run=False)
    (schedule,) = [c for c in cli.trainer.callbacks if isinstance(c, QATScheduleCallback)]
    assert schedule.schedule == [8, 6, 4] and schedule.unit == "step"
    schedule.setup(cli.trainer, cli.model, "fit")
    fusion = cli.model.model.fusion
    targets = {
        "qkv": fusion.blocks[0].attn.qkv.target_weight_bit,
        "fc2": fusion.blocks[5].ffn.fc2.target_weight_bit,
        "text fc1": cli.model.model.encoders["text"].blocks[0].ffn.fc1.target_weight_bit,
        "head": cli.model.head[4].target_weight_bit,
        "embedding": cli.model.model.encoders["text"].embed.target_weight_bit,
    }
    assert targets == {"qkv": 8, "fc2": 4, "text fc1": 4, "head": 8, "embedding": 8}
    assert fusion.blocks[5].ffn.fc2.weight_quant.bits == 8, "stage 0 runs the 4-bit layers at 8 bits"
