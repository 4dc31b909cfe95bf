"""zoo.parallel: the adaptive choice of strategy, and tensor parallelism and FSDP2 against one process (CPU, gloo)."""

from __future__ import annotations

import copy
import os
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy
from torch import nn

from zoo.cli import ZooCLI, _devices_per_node, resolve_config_args
from zoo.contracts import Tokens
from zoo.errors import ConfigError
from zoo.fusion import MIE
from zoo.parallel.plan import select_parallelism

GIB = 2**30


# -- select_parallelism ------------------------------------------------------------------------------------------
def test_one_device_trains_alone():
    plan = select_parallelism(10_000_000, 1, device_memory=80 * GIB)
    assert (plan.kind, plan.data_parallel_size, plan.tensor_parallel_size) == ("single", 1, 1)
    assert plan.strategy() == "auto"


def test_a_model_whose_state_fits_each_device_is_replicated():
    # 1B parameters x 16 bytes = 14.9 GiB <= half of 141 GiB
    plan = select_parallelism(1_000_000_000, 8, device_memory=141 * GIB)
    assert plan.kind == "ddp" and plan.data_parallel_size == 8
    assert isinstance(plan.strategy(), DDPStrategy)


def test_a_model_too_large_to_replicate_is_sharded():
    # 7B x 16 = 104 GiB > 70.5 GiB budget; / 8 devices = 13 GiB plus what FSDP gathers: with a count, a root unit, its
    # gradients and three blocks of 0.2B parameters each, in fp32 (4 GB)
    plan = select_parallelism(7_000_000_000, 8, device_memory=141 * GIB, largest_layer=200_000_000)
    assert (plan.kind, plan.data_parallel_size, plan.tensor_parallel_size) == ("fsdp", 8, 1)
    assert plan.state_bytes_per_device == pytest.approx(7e9 * 16 / 8 + 5 * 4 * 2e8)
    strategy = plan.strategy()
    assert isinstance(strategy, ModelParallelStrategy)
    assert (strategy._data_parallel_size, strategy._tensor_parallel_size) == (8, 1)


def test_a_layer_too_large_to_gather_is_split_within_a_node():
    # 1B parameters over 16 devices: 0.93 GiB sharded, but five 1B-parameter units gathered in fp32 (the root, its
    # gradients and three blocks) are 18.6 GiB against a 6 GiB budget; split over 2 they are 9.3 GiB, plus the shard:
    # still over; over 4 (4.7 GiB) it fits
    plan = select_parallelism(
        1_000_000_000, 16, device_memory=12 * GIB, largest_layer=1_000_000_000, devices_per_node=8, head_count=8
    )
    assert (plan.kind, plan.data_parallel_size, plan.tensor_parallel_size) == ("fsdp_tp", 4, 4)
    assert plan.data_parallel_size * plan.tensor_parallel_size == 16


def test_the_tensor_parallel_size_divides_the_heads():
    kwargs = dict(device_memory=12 * GIB, largest_layer=1_000_000_000, devices_per_node=8)
    # split over 2 a gathered layer does not fit (the previous test); over 4 it does, and 8 or 12 heads allow it
    assert select_parallelism(1_000_000_000, 16, head_count=8, **kwargs).tensor_parallel_size == 4
    assert select_parallelism(1_000_000_000, 16, head_count=12, **kwargs).tensor_parallel_size == 4
    assert select_parallelism(1_000_000_000, 16, head_count=40, **kwargs).tensor_parallel_size == 4
    with pytest.raises(ConfigError, match="needs .* GiB of training state per device"):
        select_parallelism(1_000_000_000, 16, head_count=6, **kwargs)  # only 2 divides 6, and 2 does not fit


def test_a_model_that_fits_nowhere_is_refused_with_the_figures():
    with pytest.raises(ConfigError, match=r"70,000,000,000 parameters needs .* over the 40.00 GiB budget"):
        select_parallelism(70_000_000_000, 8, device_memory=80 * GIB, largest_layer=10**9, head_count=8)


def test_sizes_are_read_from_a_model():
    fusion = MIE(dim=32, depth=3, num_heads=4, modality_fusion_layers=2)
    block = sum(p.numel() for p in fusion.blocks[0].parameters())
    total = sum(p.numel() for p in fusion.parameters())
    root = total - 3 * block  # the cls token, modality embeddings, final norm
    tight = 16 * total / 2 + 4 * (2 * root + 3 * block)  # exactly the fsdp plan's need on 2 devices
    plan = select_parallelism(fusion, 2, device_memory=int(tight / 0.5) + 2)
    assert plan.kind == "fsdp" and plan.state_bytes_per_device == int(tight)
    # a byte less and the blocks must be split: 4 heads allow tensor parallelism over 2
    plan = select_parallelism(fusion, 2, device_memory=int(tight / 0.5) - 2)
    assert (plan.kind, plan.tensor_parallel_size) == ("fsdp_tp", 2)


def test_fsdp_keeps_the_root_unit_gathered_through_forward_and_backward(tmp_path):
    """What ``gathered_bytes`` counts on: under ``apply_fsdp`` the root unit (embeddings, head) is gathered at every
    block's forward and backward, beside the running block, and the head's unsharded gradients are alive in every
    block's backward; the last block stays gathered from its forward into its backward; all is resharded after the
    step."""
    from torch.distributed.device_mesh import init_device_mesh

    from zoo.layers import TransformerBlock
    from zoo.parallel.parallelize import apply_fsdp

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.head = nn.Embedding(50, 16), nn.Linear(16, 3)
            self.blocks = nn.ModuleList(TransformerBlock(16, 2) for _ in range(3))

        def forward(self, x):
            h = self.embed(x)
            for block in self.blocks:
                h = block(h)
            return self.head(h.mean(1))

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        model = Model()
        apply_fsdp(model, init_device_mesh("cpu", (1,)))
        units = {"root": model, **{f"block{i}": block for i, block in enumerate(model.blocks)}}
        seen = []

        def record(where):
            def hook(*_):
                group = {n for n, u in units.items() if u._get_fsdp_state()._fsdp_param_group.is_unsharded}
                root_params = model._get_fsdp_state()._fsdp_param_group.fsdp_params
                if any(p.unsharded_param.grad is not None for p in root_params):
                    group.add("root gradients")
                seen.append((where, group))

            return hook

        for i, block in enumerate(model.blocks):
            block.register_forward_hook(record(f"forward {i}"))
            block.register_full_backward_hook(record(f"backward {i}"))
        for _ in range(2):  # the second step as the first
            seen.clear()
            model(torch.randint(0, 50, (2, 5))).sum().backward()
        assert all("root" in group for _, group in seen), seen
        backward = {where: group for where, group in seen if where.startswith("backward")}
        assert all({f"block{where[-1]}", "root gradients"} <= group for where, group in backward.items()), seen
        assert "block2" in dict(seen)["forward 2"] and "block1" not in dict(seen)["forward 1"], seen
        assert not any(u._get_fsdp_state()._fsdp_param_group.is_unsharded for u in units.values())
    finally:
        dist.destroy_process_group()


def test_tensor_parallelism_is_not_offered_for_what_it_does_not_split():
    """A large embedding (the root unit) beside small blocks: on 2 devices tensor parallelism over 2 leaves no FSDP
    (data parallel 1), so the embedding and every unsplit layer stay whole on each device. The plan once counted the
    state as divided by 2 and the embedding's gathering as split, and chose it for a budget it exceeds by a third."""
    model = nn.ModuleDict({"embedding": nn.Embedding(30522, 64), "fusion": MIE(dim=64, depth=4, num_heads=4)})
    total = sum(p.numel() for p in model.parameters())
    split = sum(p.numel() for block in model["fusion"].blocks for name in ("attn.qkv", "attn.proj", "ffn.fc1",
                "ffn.fc2") for p in block.get_submodule(name).parameters())  # fmt: skip
    root = total - sum(p.numel() for block in model["fusion"].blocks for p in block.parameters())  # outside them
    block = sum(p.numel() for p in model["fusion"].blocks[0].parameters())
    old_estimate = 16 * total / 2 + 2 * 4 * root / 2
    tp_need, fsdp_need = 16 * (total - split / 2), 16 * total / 2 + 4 * (2 * root + 3 * block)
    assert old_estimate < 0.8 * min(tp_need, fsdp_need)
    with pytest.raises(ConfigError, match="needs .* GiB of training state per device"):
        select_parallelism(model, 2, device_memory=int(2 * old_estimate) + 2)
    plan = select_parallelism(model, 2, device_memory=int(2 * fsdp_need) + 2)
    assert (plan.kind, plan.state_bytes_per_device) == ("fsdp", int(fsdp_need))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"model_size": 10, "device_count": 0}, "device_count=0 must be an integer >= 1"),
        ({"model_size": 0, "device_count": 1}, "model_size=0 must be a parameter count"),
        ({"model_size": 10, "device_count": 2, "memory_fraction": 1.5}, r"memory_fraction=1.5 must be in \(0, 1\]"),
        ({"model_size": 10, "device_count": 6, "devices_per_node": 4}, "multiple of devices_per_node=4"),
        ({"model_size": 10, "device_count": 2, "devices_per_node": 0}, "devices_per_node=0 must be at least 1"),
        ({"model_size": 10, "device_count": 2, "device_memory": -1}, "device_memory=-1 must be at least 1"),
        ({"model_size": nn.Linear(2, 2), "device_count": 2, "largest_layer": 4}, "largest_layer goes with a"),
    ],
)
def test_invalid_arguments_name_the_argument(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        select_parallelism(**kwargs)


def test_devices_per_node_follows_lightning_arguments():
    assert _devices_per_node("cpu", "auto") == 1
    assert _devices_per_node("cpu", 2) == 2
    assert _devices_per_node("cpu", "2") == 2
    if not torch.cuda.is_available():
        assert _devices_per_node("auto", 3) == 3  # CPU processes


def test_adaptive_strategy_from_the_cli_on_one_cpu(tmp_path):
    args = ["--config", "vqa.yaml", "--trainer.strategy=adaptive", "--trainer.accelerator=cpu"]
    args += [f"--trainer.default_root_dir={tmp_path}", "--trainer.logger=false"]
    cli = ZooCLI(args=resolve_config_args(args), run=False)
    assert type(cli.trainer.strategy).__name__ == "SingleDeviceStrategy"


# -- tensor parallelism and FSDP2, several processes on the CPU ----------------------------------------------------
def _fusion() -> MIE:
    torch.manual_seed(0)
    return MIE(dim=32, depth=2, num_heads=4, modality_fusion_layers=1)


def _inputs(batch: int) -> dict[str, Tokens]:
    g = torch.Generator().manual_seed(1)
    image = Tokens.dense(torch.randn(batch, 6, 32, generator=g))
    mask = torch.ones(batch, 5, dtype=torch.bool)
    mask[0, 3:] = False  # padding reaches the blocks' masks
    return {"image": image, "text": Tokens(torch.randn(batch, 5, 32, generator=g), mask)}


def _loss(fusion: nn.Module, inputs: dict[str, Tokens]) -> torch.Tensor:
    out = fusion(inputs)
    return out.pooled.square().mean() + out.tokens.embeddings.sin().mean()


def _worker(rank: int, world: int, dp: int, tp: int, compiled: str, init_file: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor
    from torch.utils.flop_counter import FlopCounterMode

    from zoo.callbacks.throughput import RankFlopCounter, _tensor_parallel_size
    from zoo.parallel.optim import clip_grad_norm_, foreach_off_where_mixed
    from zoo.parallel.parallelize import apply_fsdp, apply_tensor_parallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        mesh = init_device_mesh("cpu", (dp, tp), mesh_dim_names=("data_parallel", "tensor_parallel"))
        reference, model = _fusion(), _fusion()
        if tp > 1:
            assert apply_tensor_parallel(model, mesh["tensor_parallel"]) == 2
        if compiled:  # as the task orders it: tensor parallelism, compilation, FSDP
            from zoo.compile import compile_regions

            whole = compiled == "whole"
            assert compile_regions(model, whole_fusion=whole) == ([""] if whole else ["blocks.0", "blocks.1"])
        if dp > 1:
            apply_fsdp(model, mesh["data_parallel"])
        inputs = _inputs(4)
        # the reference sees the whole batch; each data-parallel rank its share, the tensor-parallel ranks the same
        share = 4 // dp
        dp_rank = mesh["data_parallel"].get_local_rank()
        rows = slice(dp_rank * share, (dp_rank + 1) * share)
        local = {m: Tokens(t.embeddings[rows], t.mask[rows]) for m, t in inputs.items()}
        # SGD, whose update is linear in the gradient: Adam's normalised step would turn the rounding differences of
        # near-zero gradients into differences of order lr
        if dp == 1:
            # FlopCounterMode sees DTensor operations at their global shapes and the attention over a rank's heads at
            # its own; RankFlopCounter gives this rank's share of each. The math attention, which the counter sees
            # (the CPU's fused kernel has no FLOP formula and counts 0)
            from torch.nn.attention import SDPBackend, sdpa_kernel

            with sdpa_kernel(SDPBackend.MATH):
                with RankFlopCounter(tp) as sharded:
                    model(local)
                with FlopCounterMode(display=False) as whole:
                    reference(inputs)
                with FlopCounterMode(display=False) as unshared:
                    model(local)
            assert sharded.get_total_flops() * tp == whole.get_total_flops() > 0
            attention = whole.get_flop_counts()["Global"][torch.ops.aten.bmm]
            assert attention > 0 and unshared.get_total_flops() == whole.get_total_flops() - (
                attention - attention // tp
            ), "without the split, the heads' attention is counted at a rank's share, the rest whole"
            assert _tensor_parallel_size(SimpleNamespace(device_mesh=mesh)) == tp
        opt_ref = torch.optim.SGD(reference.parameters(), lr=0.5, momentum=0.9)
        # foreach, as on a GPU, where one list may not mix plain tensors and DTensors (tensor parallelism without
        # FSDP); it may mix meshes (FSDP over tensor parallelism)
        opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9, foreach=True)
        assert foreach_off_where_mixed(opt) == ({0: True} if dp == 1 and tp > 1 else {})
        for step in range(2):  # two steps: the second runs on weights the sharded optimizer updated
            ref_out = reference(inputs).tokens.embeddings[rows]
            out = model(local).tokens.embeddings
            # fp32 sums in another order (sharded GEMMs, all-reduce): 1e-5 relative
            torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
            _loss(reference, inputs).backward()
            _loss(model, local).backward()
            if step == 0:  # clipped to half the norm: the sharded norm must be the whole model's, on every rank
                max_norm = 0.5 * torch.nn.utils.get_total_norm([p.grad for p in reference.parameters()]).item()
            ref_norm = torch.nn.utils.clip_grad_norm_(reference.parameters(), max_norm, foreach=True)
            norm = clip_grad_norm_(model.parameters(), max_norm)
            assert not isinstance(norm, DTensor)
            # the gradients' rounding differences (inductor's fused kernels sum in their own order: 1.3e-5 on an
            # AMD Zen 4 CPU); a norm that missed the other ranks' shards is off by tens of percent
            torch.testing.assert_close(norm, ref_norm, rtol=1e-4, atol=0)
            for optimizer in (opt_ref, opt):
                optimizer.step()
                optimizer.zero_grad()
        for (name, p_ref), (_, p) in zip(reference.named_parameters(), model.named_parameters(), strict=True):
            full = p.full_tensor() if isinstance(p, DTensor) else p
            # the outputs' rounding differences, through two steps at lr 0.5: 1e-4 (a wrong gradient, e.g. one not
            # all-reduced or averaged over the data-parallel ranks, is off by 1e-2 or more)
            torch.testing.assert_close(full.detach(), p_ref.detach(), rtol=1e-4, atol=1e-4, msg=name)
        if compiled:  # inductor built the blocks' forward and backward (one graph serves both blocks), where a
            # fallback to eager would have passed the checks above
            from torch._dynamo.utils import counters

            inductor = counters["inductor"]["fxgraph_cache_miss"] + counters["inductor"]["fxgraph_cache_hit"]
            assert counters["stats"]["unique_graphs"] >= 1 and inductor >= 2, (dict(counters["stats"]), inductor)
    finally:
        dist.barrier()  # no rank tears gloo down while another still talks to it
        dist.destroy_process_group()
    # Every check passed. Leave without the interpreter's teardown: now and then (about one run in seven on this
    # 2-core machine) a thread of torch.distributed's was still joinable there and aborted the process ("terminate
    # called without an active exception") after the work was done.
    os._exit(0)


@pytest.mark.parametrize(
    ("dp", "tp", "compiled"),
    [(1, 2, ""), (2, 1, ""), (2, 2, ""), (2, 1, "blocks"), (2, 1, "whole")],
    ids=["tp2", "fsdp2", "fsdp2xtp2", "fsdp2_compiled_blocks", "fsdp2_compiled_whole"],
)
def test_sharded_training_matches_one_process(dp, tp, compiled, tmp_path):
    """Two SGD steps of MIE split by tensor parallelism, FSDP2 or both, gradients clipped by norm, equal the same steps
    in one process on the whole batch: outputs, gradient norms, and every parameter after the updates. ``compiled``:
    compiled by inductor before FSDP wraps the model, MIE's blocks one by one (what a task's ``compile: true`` does
    under FSDP) or MIE ``whole``."""
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    mp.spawn(_worker, args=(dp * tp, dp, tp, compiled, str(tmp_path / "init")), nprocs=dp * tp, join=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled_blocks"])
def test_fsdp_gathers_bf16_weights_and_computes_as_autocast_does(tmp_path, compiled):
    """What the task asks of FSDP2 under bf16-mixed on CUDA (``apply_fsdp(param_dtype=bf16)``), on a mesh of one
    process over NCCL: the blocks run on gathered bf16 weights, the last block stays gathered for the backward, the
    others are sharded again, and loss and fp32 gradients are autocast's on the plain model; ``compiled``: the blocks
    compiled by inductor one by one first, as the task does under FSDP."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor

    from zoo.parallel.parallelize import apply_fsdp

    torch.cuda.set_device(0)
    dist.init_process_group("nccl", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cuda", (1,), mesh_dim_names=("data_parallel",))
        reference, model = _fusion().cuda(), _fusion().cuda()
        if compiled:
            from zoo.compile import compile_regions

            assert compile_regions(model, whole_fusion=False) == ["blocks.0", "blocks.1"]
        apply_fsdp(model, mesh, param_dtype=torch.bfloat16)
        seen = []
        for block in model.blocks if not compiled else ():  # a hook inside a compiled graph runs when traced only
            block.attn.register_forward_pre_hook(lambda m, args: seen.append(m.qkv.weight.dtype))
        inputs = {m: Tokens(t.embeddings.cuda(), t.mask.cuda()) for m, t in _inputs(4).items()}
        with torch.autocast("cuda", dtype=torch.bfloat16):
            ref_loss, loss = _loss(reference, inputs), _loss(model, inputs)
        assert seen == ([] if compiled else [torch.bfloat16] * len(model.blocks))
        sharded = [isinstance(b.attn.qkv.weight, DTensor) for b in model.blocks]
        assert sharded == [True] * (len(sharded) - 1) + [False]
        ref_loss.backward()
        loss.backward()
        torch.testing.assert_close(loss, ref_loss, rtol=1e-2, atol=1e-3)
        for (name, p_ref), (_, p) in zip(reference.named_parameters(), model.named_parameters(), strict=True):
            assert p.grad.dtype == torch.float32, name
            # bf16 rounding of the layer norms' weights, which autocast keeps in fp32: 1e-2
            torch.testing.assert_close(p.grad.full_tensor(), p_ref.grad, rtol=1e-2, atol=1e-3, msg=name)
    finally:
        dist.destroy_process_group()


def test_mixed_parameter_groups_step_one_tensor_at_a_time_and_refuse_fused(tmp_path):
    """A group of plain tensors and DTensors gets ``foreach=False`` (the value it had is returned, for the checkpoint);
    a group of one kind is left alone; ``fused`` on a mixed group is a ConfigError naming it."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import distribute_tensor

    from zoo.parallel.optim import foreach_off_where_mixed

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        plain, sharded = nn.Parameter(torch.ones(4)), nn.Parameter(distribute_tensor(torch.ones(4), mesh))
        optimizer = torch.optim.AdamW([{"params": [plain, sharded]}, {"params": [nn.Parameter(torch.ones(2))]}])
        assert foreach_off_where_mixed(optimizer) == {0: None}
        assert [g["foreach"] for g in optimizer.param_groups] == [False, None]
        fused = torch.optim.AdamW([plain, sharded], fused=True)
        with pytest.raises(ConfigError, match="fused=True"):
            foreach_off_where_mixed(fused)
    finally:
        dist.destroy_process_group()


def test_tensor_parallelism_refuses_heads_it_cannot_split(tmp_path):
    fusion = MIE(dim=24, depth=1, num_heads=3, modality_fusion_layers=1)
    mesh = _FakeMesh(2)
    from zoo.parallel.parallelize import apply_tensor_parallel

    with pytest.raises(ConfigError, match="num_heads=3"):
        apply_tensor_parallel(fusion, mesh)
    learned = MIE(dim=32, depth=1, num_heads=4, modality_fusion_layers=1, fusion_schedule="learned")
    with pytest.raises(ConfigError, match="fusion_schedule='learned'"):
        apply_tensor_parallel(learned, mesh)
    quantized = copy.deepcopy(_fusion())
    from zoo.quant import quantize_

    quantize_(quantized)
    with pytest.raises(ConfigError, match="attn.qkv is a QATLinear"):
        apply_tensor_parallel(quantized, mesh)


class _FakeMesh:
    """Stands in for a device mesh where only its size is read (the checks run before any splitting)."""

    def __init__(self, size: int) -> None:
        self._size = size

    def size(self) -> int:
        return self._size


def test_image_encoders_load_checkpoints_from_before_pos_scale_had_a_dimension():
    """``pos_scale`` is ``[1]`` (FSDP2 shards no 0-d parameter); a checkpoint with the old scalar still loads."""
    from zoo.encoders import ConvImageEncoder

    encoder = ConvImageEncoder(channels=(8,), dim=16)
    state = encoder.state_dict()
    state["pos_scale"] = torch.tensor(0.25)
    encoder.load_state_dict(state)
    assert encoder.pos_scale.shape == (1,) and encoder.pos_scale.item() == 0.25


def _model_parallel(dp: int, tp: int) -> dict:
    """Lightning's ModelParallelStrategy as YAML, with one unsharded checkpoint file."""
    return {
        "class_path": "lightning.pytorch.strategies.ModelParallelStrategy",
        "init_args": {"data_parallel_size": dp, "tensor_parallel_size": tp, "save_distributed_checkpoint": False},
    }


def _last_checkpoint(folder) -> dict:
    return {
        "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
        "init_args": {"dirpath": str(folder), "save_last": True, "save_top_k": 0},
    }


def _cpu_trainer(folder, callbacks: list[dict], **settings) -> dict:
    """The CLI tests' trainer: two batches an epoch, no validation, gradients clipped by norm (over parameters on
    several meshes: ``zoo.parallel.optim``)."""
    return {
        "accelerator": "cpu",
        "max_epochs": 3,
        "limit_train_batches": 2,
        "limit_val_batches": 0,
        "num_sanity_val_steps": 0,
        "logger": False,
        "enable_progress_bar": False,
        "callbacks": callbacks,
        "default_root_dir": str(folder),
        "gradient_clip_val": 1.0,
        **settings,
    }


#: the CLI tests' small model and data, with foreach AdamW as on a GPU
SMALL_MP = [
    "--model.init_args.fusion.init_args.depth=2",
    "--model.init_args.fusion.init_args.modality_fusion_layers=1",
    "--data.init_args.num_images=600",
    "--data.init_args.batch_size=4",
    "--model.init_args.optimizer.init_args.foreach=true",
]


def test_cli_trains_with_fsdp_and_tensor_parallelism_on_cpu(tmp_path):
    """``python -m zoo fit`` under Lightning's ModelParallelStrategy (2 x 2 processes on gloo): the task applies the
    zoo's tensor-parallel plan and FSDP2 in ``configure_model``, trains (foreach AdamW, gradients clipped), and writes
    one checkpoint with the full shapes of an unsharded model; a second fit resumes from it, optimizer and batch plan
    included, and trains on. ``DynamicBatchAdjustment`` counts the data-parallel ranks only (the tensor-parallel pairs
    share a batch)."""
    import subprocess
    import sys

    import yaml

    config = tmp_path / "mp.yaml"
    strategy, checkpoint = _model_parallel(2, 2), _last_checkpoint(tmp_path / "ckpt")
    # 16 samples a step: micro-batches of 4 on each of the 2 data-parallel ranks, accumulated twice
    batch_adjustment = {"class_path": "zoo.parallel.DynamicBatchAdjustment", "init_args": {"global_batch_size": 16}}
    trainer = _cpu_trainer(tmp_path, [batch_adjustment, checkpoint], devices=4, strategy=strategy, max_steps=1)
    config.write_text(yaml.safe_dump({"trainer": trainer, "test_after_fit": False}))
    cmd = [sys.executable, "-m", "zoo", "fit", "--config", "vqa.yaml", "--config", str(config), *SMALL_MP]
    last = tmp_path / "ckpt" / "last.ckpt"
    for extra in ([], ["--ckpt_path", str(last), "--trainer.max_steps=2"]):
        run = subprocess.run([*cmd, *extra], capture_output=True, text=True, cwd=tmp_path, timeout=600)
        assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    assert "Restored all states from the checkpoint" in run.stdout + run.stderr
    checkpoint = torch.load(last, map_location="cpu", weights_only=True)
    assert checkpoint["global_step"] == 2, "the resumed fit trained its second step"
    plan = checkpoint["callbacks"]["DynamicBatchAdjustment"]
    assert (plan["micro_batch_size"], plan["accumulation"], plan["world_size"]) == (4, 2, 2)
    state = checkpoint["state_dict"]
    assert state["model.fusion.blocks.0.attn.qkv.weight"].shape == (3 * 128, 128)
    assert state["model.fusion.blocks.1.ffn.fc2.weight"].shape == (128, 512)
    moments = checkpoint["optimizer_states"][0]["state"]
    assert moments and all(v["exp_avg"].shape == v["exp_avg_sq"].shape for v in moments.values())


def test_cli_trains_with_tensor_parallelism_alone_and_resumes_on_one_device(tmp_path):
    """Tensor parallelism without FSDP (2 CPU processes) leaves the encoders' parameters plain beside the blocks'
    DTensors: with foreach AdamW and gradient clipping, as on a GPU, the task steps the mixed groups one tensor at a
    time and clips mesh by mesh. The checkpoint keeps the groups and options the user gave, so one device resumes it."""
    import subprocess
    import sys

    import yaml

    strategy, checkpoint = _model_parallel(1, 2), _last_checkpoint(tmp_path / "ckpt")
    trainer = _cpu_trainer(tmp_path, [checkpoint])
    last = tmp_path / "ckpt" / "last.ckpt"
    runs = [({"devices": 2, "strategy": strategy, "max_steps": 1}, []), ({"devices": 1, "max_steps": 2}, [last])]
    for i, (setting, resume) in enumerate(runs):
        config = tmp_path / f"run{i}.yaml"
        config.write_text(yaml.safe_dump({"trainer": trainer | setting, "test_after_fit": False}))
        cmd = [sys.executable, "-m", "zoo", "fit", "--config", "vqa.yaml", "--config", str(config), *SMALL_MP]
        cmd += [f"--ckpt_path={path}" for path in resume]
        run = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=600)
        assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
        state = torch.load(last, map_location="cpu", weights_only=True)
        assert state["global_step"] == i + 1
        groups = state["optimizer_states"][0]["param_groups"]
        assert [g["foreach"] for g in groups] == [True, True], "the user's option, not the run's"
    assert "Restored all states from the checkpoint" in run.stdout + run.stderr


def test_attention_regroups_the_qkv_of_checkpoints_from_before_it_was_grouped_by_head():
    """qkv's rows were ``[3, heads, head_dim]``; they are ``[heads, 3, head_dim]`` (tensor-parallel shards hold whole
    heads). Same keys and shapes: a checkpoint without the mark is regrouped on load and computes the same."""
    from zoo.layers.attention import SelfAttention

    torch.manual_seed(0)
    attention, x = SelfAttention(32, 4), torch.randn(2, 5, 32)
    state = attention.state_dict()
    del state["qkv_grouped_by_head"]
    for key in ("qkv.weight", "qkv.bias"):  # back to the old order
        value = state[key]
        state[key] = value.reshape(4, 3, 8, *value.shape[1:]).transpose(0, 1).reshape(96, *value.shape[1:])
    old = SelfAttention(32, 4)
    old.load_state_dict(state)
    torch.testing.assert_close(old(x), attention(x))
    new = SelfAttention(32, 4)
    new.load_state_dict(attention.state_dict())  # a marked checkpoint is taken as it is
    torch.testing.assert_close(new(x), attention(x))


def test_a_job_on_part_of_a_node_is_not_refused():
    # 4 GPUs of an 8-GPU node: devices_per_node is the node's, the job's devices all share it (it was refused: "a
    # multiple of devices_per_node"); tensor parallelism stays within the job's 4
    assert select_parallelism(10, 4, devices_per_node=8).kind == "ddp"
    plan = select_parallelism(
        1_000_000_000, 4, device_memory=28 * GIB, largest_layer=1_000_000_000, devices_per_node=8, head_count=8
    )
    assert (plan.kind, plan.data_parallel_size, plan.tensor_parallel_size) == ("fsdp_tp", 2, 2)
