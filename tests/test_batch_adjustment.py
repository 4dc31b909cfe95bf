"""DynamicBatchAdjustment: the accumulation arithmetic; the plan reaching the loader, the accumulation and the LR
schedule; a measured plan that leaves the run as if configured by hand; resume; DDP on CPU; errors; the CUDA probe."""

from __future__ import annotations

import copy
import itertools
import math
import re

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import GradientAccumulationScheduler, ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchmetrics import MeanMetric

from zoo.errors import ConfigError
from zoo.parallel.batch_adjustment import (
    BatchPlan,
    DynamicBatchAdjustment,
    MemoryLine,
    plan_accumulation,
    slice_batch,
)

DIM, HIDDEN, CLASSES, SAMPLES = 6, 16, 3, 96


class Samples(Dataset):
    """``SAMPLES`` random examples ``{"x": float [DIM], "label": long []}`` from a fixed seed."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(SAMPLES, DIM, generator=g)
        self.label = torch.randint(0, CLASSES, (SAMPLES,), generator=g)

    def __len__(self) -> int:
        return SAMPLES

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[i], "label": self.label[i]}


class Data(pl.LightningDataModule):
    """Shuffled batches of :class:`Samples`; ``train_dataloader`` reads ``batch_size`` when called."""

    def __init__(self, batch_size: int = 16) -> None:
        super().__init__()
        self.batch_size = batch_size

    def train_dataloader(self) -> DataLoader:
        return DataLoader(Samples(), batch_size=self.batch_size, shuffle=True)


class Net(pl.LightningModule):
    """A classifier with batch norm and dropout (state and randomness a probe must not disturb), a torchmetric
    updated in ``training_step``, and a linear LR decay to 0 over ``trainer.estimated_stepping_batches``."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(DIM, HIDDEN), nn.BatchNorm1d(HIDDEN), nn.ReLU(), nn.Dropout(0.3), nn.Linear(HIDDEN, CLASSES)
        )
        self.seen = MeanMetric()
        self.totals: list[int] = []  # the total steps of every schedule built
        self.schedulers: list[torch.optim.lr_scheduler.LRScheduler] = []

    def training_step(self, batch, batch_idx):
        loss = F.cross_entropy(self.net(batch["x"]), batch["label"])
        self.seen.update(loss.detach())
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)
        total = int(self.trainer.estimated_stepping_batches)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / total)
        self.totals.append(total)
        self.schedulers.append(scheduler)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class StepsAtEpochEnd(pl.Callback):
    def __init__(self) -> None:
        self.steps: list[int] = []

    def on_train_epoch_end(self, trainer, pl_module):
        self.steps.append(trainer.global_step)


class ScriptedMemory(DynamicBatchAdjustment):
    """Measures on CPU: runs the probe's real training steps, and reports a device of 1000 bytes on which a step of
    ``m`` samples peaks at ``100 + 50 m`` bytes."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.probed: list[int] = []

    def device_memory_bytes(self, trainer):
        return 1000

    def peak_memory_bytes(self, trainer, step, micro_batch_size):
        step()
        self.probed.append(micro_batch_size)
        return 100 + 50 * micro_batch_size


def _trainer(tmp_path, *callbacks: pl.Callback, **kwargs) -> pl.Trainer:
    options = dict(
        default_root_dir=tmp_path,
        accelerator="cpu",
        devices=1,
        max_epochs=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    return pl.Trainer(callbacks=list(callbacks), **{**options, **kwargs})


def _final_lr(trainer: pl.Trainer) -> float:
    return trainer.optimizers[0].param_groups[0]["lr"]


# -- the arithmetic ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "target, limit, world, expected",
    [
        (256, 48, 1, (43, 6)),  # 6 steps of 48 overshoot to 288; 43 x 6 = 258
        (256, 1000, 4, (64, 1)),  # the limit is above the per-rank share
        (32, 8, 1, (8, 4)),
        (10, 3, 4, (3, 1)),  # 12: the smallest multiple of 4 ranks at least 10
        (7, 1, 1, (1, 7)),
        (1, 5, 8, (1, 1)),  # more ranks than samples: each rank still needs one
    ],
)
def test_plan_examples(target, limit, world, expected):
    assert plan_accumulation(global_batch_size=target, micro_batch_size=limit, world_size=world) == expected


def test_plan_takes_the_fewest_accumulation_steps_and_the_smallest_global_batch_at_least_the_target():
    cases = itertools.product(range(1, 70), range(1, 20), (1, 2, 3, 8))
    for target, limit, world in cases:
        micro, accumulation = plan_accumulation(global_batch_size=target, micro_batch_size=limit, world_size=world)
        assert 1 <= micro <= limit
        assert accumulation == min(k for k in range(1, target + 1) if limit * k * world >= target)
        smallest = min(m * accumulation * world for m in range(1, limit + 1) if m * accumulation * world >= target)
        assert micro * accumulation * world == smallest, (target, limit, world)


def test_plan_refuses_counts_below_one_by_name():
    with pytest.raises(ConfigError, match="world_size=0"):
        plan_accumulation(global_batch_size=8, micro_batch_size=2, world_size=0)


def test_memory_line_through_two_peaks_gives_the_largest_micro_batch_within_the_budget():
    line = MemoryLine.through((4, 8), (1_400, 1_800))  # 1000 bytes + 100 per sample
    assert line == MemoryLine(1000.0, 100.0)
    assert line.largest_micro_batch(1_999) == 9 and line.largest_micro_batch(2_000) == 10
    assert line.largest_micro_batch(900) < 1
    assert MemoryLine(1000.0, 0.0).largest_micro_batch(10) is None


def test_slice_batch_cuts_every_tensor_and_list_along_the_sample_dim():
    g = torch.Generator().manual_seed(0)
    batch = {
        "image": torch.randn(6, 3, 4, 4, generator=g),
        "text": [f"question {i}" for i in range(6)],
        "label": torch.randint(0, 5, (6,), generator=g),
        "extra": {"mask": torch.rand(6, 7, generator=g) > 0.5},
        "split": "train",
    }
    cut = slice_batch(batch, 2)
    assert torch.equal(cut["image"], batch["image"][:2]) and torch.equal(cut["label"], batch["label"][:2])
    assert cut["text"] == batch["text"][:2] and torch.equal(cut["extra"]["mask"], batch["extra"]["mask"][:2])
    assert cut["split"] == "train"
    pair = [torch.randn(6, 3, generator=g), torch.randint(0, 2, (6,), generator=g)]
    assert [t.shape[0] for t in slice_batch(pair, 4)] == [4, 4]


def test_yaml_class_path_builds_the_callback():
    parser = pytest.importorskip("jsonargparse").ArgumentParser()
    parser.add_argument("--callbacks", type=list[pl.Callback])
    config = parser.parse_string(
        "callbacks:\n"
        "  - class_path: zoo.parallel.batch_adjustment.DynamicBatchAdjustment\n"
        "    init_args: {global_batch_size: 256}\n"
    )
    (callback,) = parser.instantiate(config).callbacks
    assert isinstance(callback, DynamicBatchAdjustment) and callback.global_batch_size == 256


# -- fitting on CPU --------------------------------------------------------------------------------------------------
def test_fit_on_cpu_caps_the_micro_batch_accumulates_to_the_global_batch_and_sizes_the_schedule(tmp_path):
    torch.manual_seed(0)
    adjust, epochs = DynamicBatchAdjustment(32, max_micro_batch_size=8), StepsAtEpochEnd()
    model, data = Net(), Data(batch_size=16)
    trainer = _trainer(tmp_path, adjust, epochs)
    trainer.fit(model, datamodule=data)
    assert adjust.plan == BatchPlan(global_batch_size=32, micro_batch_size=8, accumulation=4, world_size=1,
                                    micro_batch_limit=8)  # fmt: skip
    assert data.batch_size == 8 and trainer.train_dataloader.batch_size == 8
    assert trainer.accumulate_grad_batches == 4
    batches = len(trainer.train_dataloader)
    assert batches == SAMPLES // 8
    assert epochs.steps == [batches // 4, 2 * batches // 4]
    # without the callback the schedule would have counted 2 x 6 steps of 16; it counted the 2 x 3 that ran
    assert model.totals == [6] and _final_lr(trainer) == 0.0


def test_measured_plan_rebuilds_loader_and_optimizers_and_the_run_matches_one_configured_by_hand(tmp_path):
    torch.manual_seed(0)
    model = Net()
    by_hand = copy.deepcopy(model)
    # budget 0.5 x 1000 = 500 bytes = 100 + 50 x 8: micro-batch 8, accumulation 4. Planned at setup from the
    # datamodule's 4: 4 x 8, so strategy.setup built a loader of 4 and a schedule of 1 step per 6-batch epoch.
    adjust = ScriptedMemory(32, memory_fraction=0.5, optimizer_states_per_parameter=0)
    torch.manual_seed(1)
    trainer = _trainer(tmp_path, adjust, limit_train_batches=6)
    trainer.fit(model, datamodule=Data(batch_size=4))
    assert adjust.probed == [2, 4] and adjust.memory_line == MemoryLine(100.0, 50.0)
    assert (adjust.plan.micro_batch_size, adjust.plan.accumulation) == (8, 4)
    assert trainer.train_dataloader.batch_size == 8 and trainer.accumulate_grad_batches == 4
    assert model.totals == [2, 4] and trainer.lr_scheduler_configs[0].scheduler is model.schedulers[-1]

    torch.manual_seed(1)
    reference = _trainer(tmp_path, accumulate_grad_batches=4, limit_train_batches=6)
    reference.fit(by_hand, datamodule=Data(batch_size=8))
    assert by_hand.totals == [4] and trainer.global_step == reference.global_step == 4
    # bit for bit: the probe left dropout's random stream, batch-norm statistics, gradients and metrics untouched
    for (name, value), expected in zip(model.state_dict().items(), by_hand.state_dict().values(), strict=True):
        torch.testing.assert_close(value, expected, rtol=0, atol=0, msg=name)
    assert model.seen.update_count == by_hand.seen.update_count


def test_resume_reuses_the_checkpointed_plan_over_the_new_arguments(tmp_path):
    torch.manual_seed(0)
    first = DynamicBatchAdjustment(32, max_micro_batch_size=8)
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    interrupted = _trainer(tmp_path, first, checkpoints, max_epochs=1, enable_checkpointing=True)
    interrupted.fit(Net(), datamodule=Data(batch_size=16))
    assert interrupted.global_step == 3

    # alone, this callback would plan 2 x 16; the checkpoint's 8 x 4 wins, without a probe
    resumed = ScriptedMemory(32, max_micro_batch_size=2)
    model = Net()
    trainer = _trainer(tmp_path, resumed, max_epochs=2)
    trainer.fit(model, datamodule=Data(batch_size=16), ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    assert resumed.plan == first.plan and resumed.probed == []
    assert trainer.train_dataloader.batch_size == 8 and trainer.accumulate_grad_batches == 4
    assert trainer.global_step == 6
    # the restored schedule decays to 0 exactly at the last step of the resumed run: its total is 2 x 3 steps
    assert model.totals == [6] and _final_lr(trainer) == 0.0


def test_resume_on_another_world_size_replans_from_the_saved_limit_and_warns(tmp_path):
    torch.manual_seed(0)
    first = _trainer(tmp_path, DynamicBatchAdjustment(32, max_micro_batch_size=8), max_epochs=1)
    first.fit(Net(), datamodule=Data(batch_size=16))
    path = tmp_path / "two_ranks.ckpt"
    first.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=False)
    # as if planned on 2 ranks: 8 x 2 x 2
    checkpoint["callbacks"]["DynamicBatchAdjustment"].update(world_size=2, accumulation=2)
    torch.save(checkpoint, path)

    # planned again as a new run on one rank plans it: the datamodule's batch_size (nothing measures on the CPU),
    # under this run's caps; the checkpoint's global batch
    resumed = DynamicBatchAdjustment(64)
    trainer = _trainer(tmp_path, resumed, max_epochs=2)
    with pytest.warns(UserWarning, match=r"planned for 2 data-parallel rank\(s\), this run has 1"):
        trainer.fit(Net(), datamodule=Data(batch_size=16), ckpt_path=path)
    assert resumed.plan == BatchPlan(global_batch_size=32, micro_batch_size=16, accumulation=2, world_size=1,
                                     micro_batch_limit=16)  # fmt: skip
    assert trainer.accumulate_grad_batches == 2


def test_resume_on_fewer_ranks_measures_again_instead_of_reusing_the_old_ranks_limit(tmp_path):
    """Planned on 8 ranks, a rank's micro-batch was capped at its share of the global batch (32 / 8 = 4) and measured
    under the old ranks' shards; resumed on one rank the probe measures again: 8 x 4, as memory allows (device of 1000
    bytes, half of it for 100 + 50 m), not 4 x 8 from the saved limit."""
    torch.manual_seed(0)
    first = _trainer(tmp_path, ScriptedMemory(32, memory_fraction=0.5, optimizer_states_per_parameter=0), max_epochs=1)
    first.fit(Net(), datamodule=Data(batch_size=16))
    path = tmp_path / "eight_ranks.ckpt"
    first.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=False)
    state = checkpoint["callbacks"]["DynamicBatchAdjustment"]
    state.update(world_size=8, micro_batch_size=4, accumulation=1, micro_batch_limit=4)
    torch.save(checkpoint, path)

    resumed = ScriptedMemory(32, memory_fraction=0.5, optimizer_states_per_parameter=0)
    trainer = _trainer(tmp_path, resumed, max_epochs=2)
    with pytest.warns(UserWarning, match=r"planned for 8 data-parallel rank\(s\), this run has 1"):
        trainer.fit(Net(), datamodule=Data(batch_size=16), ckpt_path=path)
    assert resumed.probed == [8, 16]
    assert (resumed.plan.micro_batch_size, resumed.plan.accumulation) == (8, 4)
    assert trainer.accumulate_grad_batches == 4


# -- errors ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"global_batch_size": 0}, "global_batch_size=0 must be an integer >= 1"),
        ({"global_batch_size": 32, "memory_fraction": 1.5}, "memory_fraction=1.5 must be in (0, 1]"),
        ({"global_batch_size": 32, "memory_fraction": 0.0}, "memory_fraction=0.0 must be in (0, 1]"),
        ({"global_batch_size": 32, "max_micro_batch_size": 0}, "max_micro_batch_size=0 must be"),
        ({"global_batch_size": 32, "optimizer_states_per_parameter": -1}, "optimizer_states_per_parameter=-1"),
    ],
)
def test_arguments_that_cannot_work_are_refused_by_name(kwargs, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        DynamicBatchAdjustment(**kwargs)


class NoBatchSize(pl.LightningDataModule):
    def train_dataloader(self) -> DataLoader:
        return DataLoader(Samples(), batch_size=8)


class IgnoresBatchSize(Data):
    def train_dataloader(self) -> DataLoader:
        return DataLoader(Samples(), batch_size=16)


def test_datamodule_without_batch_size_is_refused_naming_its_class(tmp_path):
    with pytest.raises(ConfigError, match="the datamodule NoBatchSize has no integer batch_size"):
        _trainer(tmp_path, DynamicBatchAdjustment(32)).fit(Net(), datamodule=NoBatchSize())


def test_fit_on_bare_dataloaders_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="needs a LightningDataModule"):
        _trainer(tmp_path, DynamicBatchAdjustment(32)).fit(Net(), DataLoader(Samples(), batch_size=8))


def test_datamodule_whose_loader_ignores_batch_size_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"IgnoresBatchSize.train_dataloader\(\) built batches of 16"):
        _trainer(tmp_path, DynamicBatchAdjustment(32, max_micro_batch_size=8)).fit(Net(), datamodule=IgnoresBatchSize())


def test_other_owners_of_the_accumulation_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="GradientAccumulationScheduler"):
        scheduler = GradientAccumulationScheduler({0: 2})
        _trainer(tmp_path, DynamicBatchAdjustment(32), scheduler).fit(Net(), datamodule=Data())
    with pytest.raises(ConfigError, match="remove trainer.accumulate_grad_batches=2"):
        _trainer(tmp_path, DynamicBatchAdjustment(32), accumulate_grad_batches=2).fit(Net(), datamodule=Data())


# -- the CUDA probe --------------------------------------------------------------------------------------------------
WIDTH = 2**18  # floats per sample: 1 MiB


class Wide(Dataset):
    def __len__(self) -> int:
        return 512

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": torch.randn(WIDTH, generator=torch.Generator().manual_seed(i)), "label": torch.tensor(i % 2)}


class WideData(pl.LightningDataModule):
    def __init__(self, batch_size: int = 8) -> None:
        super().__init__()
        self.batch_size = batch_size

    def train_dataloader(self) -> DataLoader:
        return DataLoader(Wide(), batch_size=self.batch_size)


class WideNet(pl.LightningModule):
    """A step of ``m`` samples holds the input, the product and the tanh of ``[m, WIDTH]`` floats, and their
    gradients: a few MiB per sample, next to 2 MiB of weight and gradient."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(WIDTH, generator=torch.Generator().manual_seed(0)))

    def training_step(self, batch, batch_idx):
        return torch.tanh(batch["x"] * self.w).square().mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


class PeakPerBatch(pl.Callback):
    def __init__(self) -> None:
        self.peaks: list[int] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        torch.cuda.synchronize()
        self.peaks.append(torch.cuda.max_memory_allocated())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the probe measures CUDA memory")
def test_probed_micro_batch_trains_within_the_memory_budget_on_cuda(tmp_path):
    total = torch.cuda.mem_get_info()[1]
    budget = 256 * 2**20
    adjust = DynamicBatchAdjustment(512, memory_fraction=budget / total, optimizer_states_per_parameter=0)
    peaks = PeakPerBatch()
    trainer = _trainer(tmp_path, adjust, peaks, accelerator="gpu", max_steps=1)
    trainer.fit(WideNet(), datamodule=WideData(batch_size=8))
    line, plan = adjust.memory_line, adjust.plan
    sample = WIDTH * 4
    assert 2 * sample <= line.bytes_per_sample <= 8 * sample, line
    budget = adjust.memory_fraction * total
    assert plan.micro_batch_limit == math.floor((budget - line.fixed_bytes) / line.bytes_per_sample)
    assert plan.micro_batch_limit >= 16 and len(peaks.peaks) == plan.accumulation
    # training at the planned micro-batch peaks where the line says, and within the budget; the tolerance is the
    # optimizer step and the loop's own tensors, far below one sample
    predicted = line.fixed_bytes + line.bytes_per_sample * plan.micro_batch_size
    assert max(peaks.peaks) <= budget
    assert abs(max(peaks.peaks) - predicted) <= 0.25 * line.bytes_per_sample


# -- DDP on CPU ------------------------------------------------------------------------------------------------------
class RankMemory(ScriptedMemory):
    """Rank 1's device holds half of rank 0's micro-batch: 100 + 50 m bytes on rank 0, 100 + 100 m on rank 1."""

    def peak_memory_bytes(self, trainer, step, micro_batch_size):
        return super().peak_memory_bytes(trainer, step, micro_batch_size) + 50 * trainer.global_rank * micro_batch_size


class Report(pl.Callback):
    """Writes each rank's plan, loader batch size, accumulation, steps and weights to ``folder/rank<r>.pt``."""

    def __init__(self, folder) -> None:
        self.folder = folder

    def on_train_end(self, trainer, pl_module):
        adjust = next(c for c in trainer.callbacks if isinstance(c, DynamicBatchAdjustment))
        report = {
            "plan": adjust.plan,
            "probed": adjust.probed,
            "batch_size": trainer.train_dataloader.batch_size,
            "accumulation": trainer.accumulate_grad_batches,
            "steps": trainer.global_step,
            "weights": [p.detach().clone() for p in pl_module.parameters()],
        }
        torch.save(report, self.folder / f"rank{trainer.global_rank}.pt")


def test_ddp_takes_the_smallest_micro_batch_over_ranks_and_counts_both_ranks_in_the_global_batch(tmp_path):
    adjust = RankMemory(32, memory_fraction=0.5, optimizer_states_per_parameter=0)
    trainer = _trainer(tmp_path, adjust, Report(tmp_path), devices=2, strategy="ddp_spawn", max_epochs=1)
    trainer.fit(Net(), datamodule=Data(batch_size=4))
    reports = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=False) for rank in (0, 1)]
    for report in reports:
        # rank 1 fits 4 of the 500-byte budget, rank 0 fits 8: both run 4, x 4 steps x 2 ranks = 32
        assert report["plan"] == BatchPlan(global_batch_size=32, micro_batch_size=4, accumulation=4, world_size=2,
                                           micro_batch_limit=4)  # fmt: skip
        assert report["probed"] == [2, 4] and report["batch_size"] == 4 and report["accumulation"] == 4
        assert report["steps"] == SAMPLES // 2 // 4 // 4
    for mine, theirs in zip(reports[0]["weights"], reports[1]["weights"], strict=True):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=0)  # the probe did not break DDP's gradient sync


def test_resume_on_other_ranks_under_fsdp_measures_once_and_keeps_this_runs_line(tmp_path):
    """ModelParallelStrategy restores after on_fit_start, which has measured these ranks already: the resume plans
    from that measurement (the probe ran twice), keeps its memory line (not the checkpoint's), and the instance's
    own global batch comes back for its next fit."""
    from lightning.pytorch.strategies import ModelParallelStrategy

    class Sharded(Net):
        def configure_model(self):
            from torch.distributed.fsdp import fully_shard

            fully_shard(self.net, mesh=self.device_mesh["data_parallel"])

    def strategy():
        return ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=1, save_distributed_checkpoint=False)

    torch.manual_seed(0)
    first = _trainer(tmp_path, ScriptedMemory(32, memory_fraction=0.5, optimizer_states_per_parameter=0),
                     max_epochs=1, strategy=strategy())  # fmt: skip
    first.fit(Sharded(), datamodule=Data(batch_size=16))
    path = tmp_path / "eight_ranks.ckpt"
    first.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=False)
    state = checkpoint["callbacks"]["DynamicBatchAdjustment"]
    state.update(world_size=8, micro_batch_size=4, accumulation=1, micro_batch_limit=4, memory_line=[1.0, 2.0])
    torch.save(checkpoint, path)

    resumed = ScriptedMemory(64, memory_fraction=0.5, optimizer_states_per_parameter=0)
    trainer = _trainer(tmp_path, resumed, max_epochs=2, strategy=strategy())
    with pytest.warns(UserWarning, match=r"planned for 8 data-parallel rank\(s\), this run has 1"):
        trainer.fit(Sharded(), datamodule=Data(batch_size=16), ckpt_path=path)
    assert resumed.probed == [8, 16]
    assert (resumed.plan.global_batch_size, resumed.plan.micro_batch_size, resumed.plan.accumulation) == (32, 8, 4)
    assert resumed.state_dict()["memory_line"] == [100.0, 50.0]
    _trainer(tmp_path / "again", resumed, max_epochs=1).fit(Net(), datamodule=Data(batch_size=16))
    assert resumed.plan.global_batch_size == 64
