"""A run stopped after an epoch and resumed from its checkpoint ends with the same weights and metrics as a run that
was never interrupted, and checkpoints are written atomically."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback
from tiny_vqa import QUIET, TINY_MIE, TINY_SORT_OF_CLEVR

from zoo.cli import ZooCLI, resolve_config_args

TINY = [
    "--config",
    "vqa.yaml",
    *TINY_SORT_OF_CLEVR,
    "--data.init_args.batch_size=8",
    "--data.init_args.symmetries=true",  # epoch-dependent augmentation must resume too
    *TINY_MIE,
    "--trainer.max_epochs=2",
    "--trainer.limit_train_batches=4",
    "--trainer.limit_val_batches=2",
    "--trainer.val_check_interval=1.0",
    *QUIET,
    "--trainer.logger=false",
]


class StopAfterFirstEpoch(Callback):
    """Simulates an interruption: the run ends after epoch 0, once its checkpoint is written."""

    def on_train_epoch_end(self, trainer, pl_module):
        trainer.should_stop = True


def _cli(root: Path, *extra: str) -> ZooCLI:
    return ZooCLI(args=resolve_config_args([*TINY, f"--trainer.default_root_dir={root}", *extra]), run=False)


def _last_checkpoint(root: Path) -> Path:
    (path,) = root.rglob("last.ckpt")
    return path


@pytest.fixture()
def data_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("ZOO_DATA_DIR", str(tmp_path / "data"))


#: where the bit-identical comparisons run: CPU kernels are deterministic; on a GPU, Lightning's
#: ``deterministic=True`` (``torch.use_deterministic_algorithms`` plus cuBLAS's fixed workspace) makes them so
ACCELERATORS = [
    pytest.param(["--trainer.accelerator=cpu"], id="cpu"),
    pytest.param(
        ["--trainer.accelerator=gpu", "--trainer.devices=1", "--trainer.deterministic=true"],
        id="cuda",
        marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    ),
]


@pytest.fixture()
def deterministic_cublas(monkeypatch):
    # cuBLAS reads it when its handle is created: set before the first GEMM of the test process
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


@pytest.mark.parametrize("accelerator", ACCELERATORS)
def test_resumed_run_matches_uninterrupted_run(tmp_path, data_dir, deterministic_cublas, accelerator):
    straight = _cli(tmp_path / "straight", *accelerator)
    straight.trainer.fit(straight.model, datamodule=straight.datamodule)
    expected_weights = straight.model.state_dict()
    expected_metrics = straight.trainer.validate(straight.model, datamodule=straight.datamodule, verbose=False)[0]

    first = _cli(tmp_path / "resumed", *accelerator)
    first.trainer.callbacks.append(StopAfterFirstEpoch())
    first.trainer.fit(first.model, datamodule=first.datamodule)
    assert first.trainer.current_epoch == 1 and first.trainer.global_step == 4
    interrupted = {k: v.clone() for k, v in first.model.state_dict().items()}

    second = _cli(tmp_path / "resumed", *accelerator)
    second.trainer.fit(second.model, datamodule=second.datamodule, ckpt_path=_last_checkpoint(tmp_path / "resumed"))
    assert second.trainer.global_step == straight.trainer.global_step == 8
    weights = second.model.state_dict()
    moved = [k for k in weights if not torch.equal(weights[k], interrupted[k])]
    assert moved, "the resumed run trained"
    for key, value in expected_weights.items():
        # deterministic kernels: the same data order, symmetries and schedule give bit-identical weights
        assert torch.equal(weights[key], value), key
    metrics = second.trainer.validate(second.model, datamodule=second.datamodule, verbose=False)[0]
    assert metrics == expected_metrics


def test_checkpoint_write_is_atomic(tmp_path, data_dir, monkeypatch):
    """A save that dies half-way leaves the previous checkpoint intact (Lightning writes a temporary file and renames
    it, through fsspec's transaction)."""
    cli = _cli(tmp_path / "run", "--trainer.max_epochs=1")
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    path = _last_checkpoint(tmp_path / "run")
    before = path.read_bytes()

    def dying_write(self, data):
        raise OSError("disk full")

    import fsspec.implementations.local as local

    monkeypatch.setattr(local.LocalFileOpener, "write", dying_write)
    with pytest.raises(OSError, match="disk full"):
        cli.trainer.save_checkpoint(path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert torch.load(path, weights_only=True)["global_step"] == 4


class StopMidEpoch(Callback):
    """Simulates a crash in the middle of epoch 1: a checkpoint after its second batch, then the run ends."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.current_epoch == 1 and batch_idx == 1:
            trainer.save_checkpoint(self.path)
            trainer.should_stop = True


@pytest.mark.parametrize("accelerator", ACCELERATORS)
def test_run_resumed_mid_epoch_matches_uninterrupted_run(
    tmp_path, data_dir, deterministic_cublas, accelerator, recwarn, caplog
):
    straight = _cli(tmp_path / "straight", "--trainer.limit_val_batches=0", *accelerator)
    straight.trainer.fit(straight.model, datamodule=straight.datamodule)

    checkpoint = tmp_path / "mid_epoch.ckpt"
    first = _cli(tmp_path / "resumed", "--trainer.limit_val_batches=0", *accelerator)
    first.trainer.callbacks.append(StopMidEpoch(checkpoint))
    first.trainer.fit(first.model, datamodule=first.datamodule)
    assert torch.load(checkpoint, weights_only=True)["global_step"] == 6

    second = _cli(tmp_path / "resumed", "--trainer.limit_val_batches=0", *accelerator)
    recwarn.clear()
    with caplog.at_level(logging.INFO, logger="lightning.pytorch"):
        second.trainer.fit(second.model, datamodule=second.datamodule, ckpt_path=checkpoint)
    assert second.trainer.global_step == straight.trainer.global_step == 8
    # the datamodule resumes the order, so Lightning's "your dataloader is not resumable" would mislead; it says where
    assert not [w for w in recwarn if "not resumable" in str(w.message)]
    assert "SortOfCLEVRDataModule: epoch 1 resumes after the 16 training examples per rank" in caplog.text
    expected, weights = straight.model.state_dict(), second.model.state_dict()
    for key, value in expected.items():
        assert torch.equal(weights[key], value), key


def test_ckpt_path_last_resumes_the_previous_run(tmp_path, data_dir, caplog):
    """``--ckpt_path last`` under a logger: each run logs to a new ``version_N`` folder, where Lightning alone looked
    for the last checkpoint and, finding none, started afresh; the CLI takes the newest of the earlier runs'."""
    logged = [arg for arg in TINY if arg != "--trainer.logger=false"]
    root = tmp_path / "runs"
    args = [*logged, "--trainer.accelerator=cpu", f"--trainer.default_root_dir={root}", "--trainer.max_epochs=1"]
    first = ZooCLI(args=resolve_config_args(["fit", *args]))
    assert first.trainer.global_step == 4
    (last,) = root.rglob("last.ckpt")
    assert last.parent.parent.name == "version_0"

    with caplog.at_level(logging.INFO, logger="lightning.pytorch"):
        second = ZooCLI(args=resolve_config_args(["fit", *args, "--trainer.max_epochs=2", "--ckpt_path", "last"]))
    assert second.config_init["fit"]["ckpt_path"] == str(last)
    assert f"Restored all states from the checkpoint at {last}" in caplog.text
    assert second.trainer.global_step == 8  # four steps restored, four trained
    assert (root / "lightning_logs" / "version_1" / "checkpoints" / "last.ckpt").is_file()


def test_last_checkpoint_is_the_latest_state_when_the_monitor_stops_improving(tmp_path, data_dir, monkeypatch):
    """The shipped configs' ``last.ckpt`` holds the end of the run, not the best state: Lightning 2.6 writes a
    monitored callback's ``save_last`` copy only when its monitor improves, so a second callback keeps the latest."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    improves = [True]  # the first validation improves the monitor, none after it

    def first_only(self, trainer, current=None):
        return improves.pop() if improves else False

    monkeypatch.setattr(ModelCheckpoint, "check_monitor_top_k", first_only)
    cli = _cli(tmp_path, "--trainer.accelerator=cpu")
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert cli.trainer.global_step == 8
    assert torch.load(_last_checkpoint(tmp_path), weights_only=False)["global_step"] == 8
    assert "step=4" in cli.trainer.checkpoint_callback.best_model_path  # the best is still the first validation's


def test_run_cut_short_by_max_steps_resumes_in_the_same_epoch(tmp_path, data_dir):
    """With validation off, a fit that ``max_steps`` stops mid-epoch writes its last checkpoint at the end of the cut
    epoch, which Lightning then counts as processed but not completed: resumed, its loop finishes that epoch while it
    tells the sampler the next epoch's number. The samplers follow the trainer's epoch, so the resumed run ends with
    the weights of one never stopped."""
    # no schedule: its length follows max_steps, which the resumed run raises
    args = ["--trainer.accelerator=cpu", "--trainer.limit_val_batches=0", "--model.init_args.scheduler=null"]
    straight = _cli(tmp_path / "straight", *args, "--trainer.max_steps=6")
    straight.trainer.fit(straight.model, datamodule=straight.datamodule)

    first = _cli(tmp_path / "resumed", *args, "--trainer.max_steps=2")
    first.trainer.fit(first.model, datamodule=first.datamodule)
    checkpoint = _last_checkpoint(tmp_path / "resumed")
    assert torch.load(checkpoint, weights_only=False)["global_step"] == 2
    second = _cli(tmp_path / "resumed", *args, "--trainer.max_steps=6")
    second.trainer.fit(second.model, datamodule=second.datamodule, ckpt_path=checkpoint)
    assert second.trainer.global_step == straight.trainer.global_step == 6
    expected = straight.model.state_dict()
    for key, value in second.model.state_dict().items():
        assert torch.equal(value, expected[key]), key


@pytest.mark.parametrize(
    "accelerator",
    [
        pytest.param(["--trainer.accelerator=cpu"], id="cpu-gloo"),
        pytest.param(
            ["--trainer.accelerator=gpu", "--trainer.deterministic=true"],
            id="cuda-nccl",
            marks=pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs"),
        ),
    ],
)
def test_ddp_run_cut_mid_epoch_resumes_exactly(tmp_path, data_dir, deterministic_cublas, accelerator):
    """Two processes under DDP, stopped by ``max_steps`` mid-epoch and resumed with ``--ckpt_path last``: the
    training sampler shards itself by rank and each rank goes on where it stopped, so the run ends with the weights of
    one never stopped. (Lightning's wrapper for other samplers shards their index list as a whole, and the run
    restarted its epoch.)"""
    import subprocess
    import sys

    args = [a for a in TINY if a != "--trainer.limit_val_batches=2"]
    args += [*accelerator, "--trainer.devices=2", "--trainer.strategy=ddp"]
    args += ["--trainer.limit_val_batches=0", "--model.init_args.scheduler=null"]

    def fit(root: Path, *extra: str) -> dict:
        command = [sys.executable, "-m", "zoo", "fit", *args, f"--trainer.default_root_dir={root}", *extra]
        done = subprocess.run(command, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        return torch.load(_last_checkpoint(root), weights_only=False)

    straight = fit(tmp_path / "straight", "--trainer.max_steps=6")
    first = fit(tmp_path / "resumed", "--trainer.max_steps=2")
    assert first["global_step"] == 2
    assert first["SortOfCLEVRDataModule"]["sampler"] == {"seed": 0, "epoch": 0, "position": 16, "num_replicas": 2}
    second = fit(tmp_path / "resumed", "--trainer.max_steps=6", "--ckpt_path", "last")
    assert second["global_step"] == straight["global_step"] == 6
    for key, value in straight["state_dict"].items():
        assert torch.equal(second["state_dict"][key], value), key


@pytest.mark.parametrize("num_workers", [0, 2])
def test_model_parallel_strategy_resumes_mid_epoch_at_the_next_batch(tmp_path, num_workers):
    """``ModelParallelStrategy`` restores the datamodule after ``strategy.setup``, by which time the task's schedule
    has built the training loader (``estimated_stepping_batches``) and, with workers, its iterator has drawn the
    epoch's first indices: the datamodule makes Lightning build the loader again. (The state went to the next loader
    built, which was none: the run replayed its epoch's first batches.)"""
    import lightning as L
    from lightning.pytorch.strategies import ModelParallelStrategy
    from torch import nn

    from datamodules._common import SplitLoaders

    class Numbers(torch.utils.data.Dataset):
        def __len__(self):
            return 40

        def __getitem__(self, i):
            return {"x": torch.tensor([float(i)]), "i": torch.tensor(i)}

    class Data(SplitLoaders):
        def __init__(self):
            super().__init__()
            self.batch_size, self.num_workers, self.pin_memory, self.seed = 4, num_workers, False, 0

        def setup(self, stage):
            self.train_dataset = self.val_dataset = self.test_dataset = Numbers()

    class Task(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer, self.seen = nn.Linear(1, 1), []

        def configure_model(self):
            from torch.distributed.fsdp import fully_shard

            fully_shard(self.layer, mesh=self.device_mesh["data_parallel"])

        def training_step(self, batch, batch_idx):
            self.seen.append(batch["i"].tolist())
            return self.layer(batch["x"]).sum()

        def configure_optimizers(self):
            # momentum: Lightning 2.6's ModelParallelStrategy cannot restore an optimizer without state (IndexError)
            optimizer = torch.optim.SGD(self.parameters(), lr=0.0, momentum=0.9)
            assert self.trainer.estimated_stepping_batches  # builds the training loader, as ZooTask's schedule does
            return optimizer

    class SaveAtStep3(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 3 and not (tmp_path / "cut.ckpt").exists():
                trainer.save_checkpoint(tmp_path / "cut.ckpt")

    def fit(ckpt_path=None):
        strategy = ModelParallelStrategy(
            data_parallel_size=1, tensor_parallel_size=1, save_distributed_checkpoint=False
        )
        trainer = L.Trainer(accelerator="cpu", devices=1, strategy=strategy, max_epochs=1, logger=False,
                            enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                            default_root_dir=tmp_path, callbacks=[SaveAtStep3()])  # fmt: skip
        task = Task()
        trainer.fit(task, datamodule=Data(), ckpt_path=ckpt_path)
        return task.seen

    straight = fit()
    assert fit(tmp_path / "cut.ckpt") == straight[3:]
