"""DSA: the gradient compensation, sparse == dense on one selection, the active fraction, threshold errors, the
monitoring callback and exact resumption. Random inputs with fixed seeds throughout."""

from __future__ import annotations

import copy
import functools
import io
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import Logger
from torch import nn
from torch.optim.swa_utils import AveragedModel
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.flop_counter import FlopCounterMode

from zoo.callbacks import DSAMonitor
from zoo.kernels import block_sparse_ffn_torch
from zoo.layers.dsa import DSAFeedForward, active_blocks, compensation_loss, density_stats, set_gate_threshold
from zoo.layers.transformer import TransformerBlock

ROOT = Path(__file__).resolve().parents[1]


def dense_reference(x, alpha, idx, w1, b1, w2, b2, num_blocks):
    """The block-sparse FFN written densely: every block computed, unselected ones multiplied by zero."""
    T = x.shape[0]
    h = F.gelu(x @ w1.t() + b1).view(T, num_blocks, -1)
    weight = torch.zeros(T, num_blocks, dtype=x.dtype).scatter(1, idx, alpha)
    return (h * weight[..., None]).reshape(T, -1) @ w2.t() + b2


def capture_alpha(ffn: DSAFeedForward) -> list:
    """Keep every output of the gate (alpha) in the next forward, with its .grad retained: the loss path's, and in
    training with compensation the detached-input evaluation that carries the compensation term."""
    seen = []

    def hook(module, inputs, output):
        output.retain_grad()
        seen.append(output)

    ffn.gate.register_forward_hook(hook)
    return seen


def _loss(ffn: DSAFeedForward, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """A training loss as ZooTask forms it: the task's loss plus the layers' compensation."""
    loss = F.mse_loss(ffn(x), target)
    compensation = compensation_loss(ffn)
    return loss if compensation is None else loss + compensation


@pytest.mark.parametrize("compensation", [0.3, 0.0, -0.5])
def test_gradient_reaching_the_gate_equals_compensation_formula(compensation):
    """The gate's weights receive ``(dL/dalpha + lambda/n (1 - alpha)/alpha) * alpha (1 - alpha)`` per token and block,
    times the token (float64, against an independent computation of ``dL/dalpha`` with ``alpha`` as a leaf)."""
    torch.manual_seed(0)
    ffn = DSAFeedForward(16, 64, num_blocks=8, gate_threshold=0.25, compensation=compensation).double()
    x = torch.randn(3, 5, 16, dtype=torch.float64)
    target = torch.randn(3, 5, 16, dtype=torch.float64)
    seen = capture_alpha(ffn)
    _loss(ffn, x, target).backward()
    assert ffn.compensation_term is None, "compensation_loss takes the term"
    alpha = seen[0].detach()
    idx = ffn.select(alpha)

    leaf = alpha.clone().requires_grad_(True)
    weight = torch.zeros_like(leaf).scatter(-1, idx, 1.0) * leaf
    h = F.gelu(ffn.fc1(x)).unflatten(-1, (8, 8)) * weight.unsqueeze(-1)
    F.mse_loss(ffn.fc2(h.flatten(-2)), target).backward()
    n_tokens = 15
    g = leaf.grad + compensation / n_tokens * (1 - alpha) / alpha
    logit_grad = g * alpha * (1 - alpha)
    torch.testing.assert_close(ffn.gate.proj.weight.grad, torch.einsum("btn,btd->nd", logit_grad, x))
    torch.testing.assert_close(ffn.gate.proj.bias.grad, logit_grad.sum((0, 1)))
    unselected = torch.ones_like(alpha).scatter(-1, idx, 0.0).bool()
    assert torch.all(leaf.grad[unselected] == 0), "the loss alone gives unselected gates no gradient"
    if compensation:
        assert torch.all(g[unselected] != 0), "compensation gives them one"


def test_compensation_trains_the_gate_only_not_the_layers_below():
    """The term must not reach x: pulling every token towards lower gates collapsed a whole VQA model (dsa.py)."""
    torch.manual_seed(0)
    x = torch.randn(3, 5, 16)
    target = torch.randn(3, 5, 16)
    grads = {}
    for compensation in (0.0, 0.3):
        torch.manual_seed(1)
        ffn = DSAFeedForward(16, 64, num_blocks=8, gate_threshold=0.25, compensation=compensation)
        leaf = x.clone().requires_grad_(True)
        _loss(ffn, leaf, target).backward()
        grads[compensation] = (leaf.grad, ffn.gate.proj.weight.grad)
    torch.testing.assert_close(grads[0.3][0], grads[0.0][0], rtol=0, atol=0)
    assert not torch.allclose(grads[0.3][1], grads[0.0][1]), "the gate's own weights do get the term"


@pytest.mark.parametrize("scale", [1.0, 1024.0])
def test_compensation_follows_gradient_accumulation_and_loss_scaling(scale):
    """Two micro-batches whose losses are halved, as Lightning accumulates, and a loss scale, as fp16's GradScaler
    multiplies and later divides, leave the gate's gradient that of one batch of both: the compensation is part of
    the loss. (Added to the gradient in backward, it had doubled with two micro-batches and shrunk by the scale.)"""
    torch.manual_seed(0)
    ffn = DSAFeedForward(16, 64, num_blocks=8, gate_threshold=0.25, compensation=0.3).double()
    x = torch.randn(4, 5, 16, dtype=torch.float64)
    target = torch.randn(4, 5, 16, dtype=torch.float64)
    _loss(ffn, x, target).backward()
    whole = ffn.gate.proj.weight.grad.clone()
    ffn.zero_grad()
    for part in (slice(0, 2), slice(2, 4)):
        (_loss(ffn, x[part], target[part]) / 2 * scale).backward()
    torch.testing.assert_close(ffn.gate.proj.weight.grad / scale, whole)


def test_compensation_terms_of_several_calls_add_up_until_the_weights_change():
    torch.manual_seed(0)
    ffn = DSAFeedForward(16, 64, num_blocks=8, gate_threshold=0.25, compensation=0.3)
    a, b = torch.randn(2, 5, 16), torch.randn(3, 5, 16)
    terms = []
    for x in (a, b):
        ffn(x)
        terms.append(compensation_loss(ffn))
    ffn(a), ffn(b)  # a layer shared by two inputs in one step: both terms count
    torch.testing.assert_close(compensation_loss(ffn), terms[0] + terms[1])
    ffn(a)
    with torch.no_grad():
        ffn.gate.proj.weight.add_(0.0)  # the weights changed: the uncollected term is stale
    ffn(b)
    torch.testing.assert_close(compensation_loss(ffn), terms[1])
    ffn(a)
    optimizer = torch.optim.AdamW(ffn.parameters(), fused=True)  # leaves the version counters as they were
    optimizer.step()
    ffn(b)
    torch.testing.assert_close(compensation_loss(ffn), terms[1])
    ffn.eval()
    ffn(a)  # eval with gradients on: the dense path, no term
    assert compensation_loss(ffn) is None


def test_activation_checkpointing_records_the_term_once():
    """Non-reentrant checkpointing recomputes the forward in backward; the term is recorded by the first run only
    (the recompute's would linger, holding its graph, or count twice)."""
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(0)
    ffn = DSAFeedForward(16, 64, num_blocks=8, gate_threshold=0.25, compensation=0.3)
    x = torch.randn(2, 5, 16, requires_grad=True)
    ffn(x)
    plain = compensation_loss(ffn)
    out = checkpoint(ffn, x, use_reentrant=False)
    term = compensation_loss(ffn)
    torch.testing.assert_close(term, plain)
    (out.sum() + term).backward()
    assert ffn.compensation_term is None, "the recompute in backward left no term"


def _torch_save_and_load(module: nn.Module) -> nn.Module:
    buffer = io.BytesIO()
    torch.save(module, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


@pytest.mark.parametrize(
    "make_copy",
    [
        copy.deepcopy,
        lambda m: pickle.loads(pickle.dumps(m)),
        _torch_save_and_load,
        lambda m: AveragedModel(m).module,  # an EMA of the weights, which deep-copies the model
    ],
    ids=["deepcopy", "pickle", "torch.save", "ema"],
)
def test_a_copy_taken_with_a_compensation_term_pending_starts_without_it(make_copy):
    """Copying a model between its training forward and its loss (an EMA callback, QAT preparation,
    ``torch.save(model)``) works, leaves the original its term for the loss, and gives the copy none: deepcopy of
    the term (not a leaf: in the autograd graph) raised, and pickling carried its value, cut from the graph, into the
    copy. The state dict is the same either way."""
    torch.manual_seed(0)
    block = TransformerBlock(16, 2, ffn=lambda d, h: DSAFeedForward(d, 64, num_blocks=8, gate_threshold=0.25))
    x = torch.randn(2, 5, 16)
    out = block(x)
    pending = block.ffn.compensation_term
    assert pending is not None and pending.grad_fn is not None

    clone = make_copy(block)

    assert clone.ffn.compensation_term is None, "the copy does not carry the original's term"
    assert block.ffn.compensation_term is pending, "the original keeps its term for the loss"
    reference, copied = block.state_dict(), clone.state_dict()
    assert reference.keys() == copied.keys()
    for key, value in reference.items():
        if isinstance(value, torch.Tensor):
            torch.testing.assert_close(copied[key], value, rtol=0, atol=0)
        else:
            assert copied[key] == value, key
    clone(x)  # the copy's own training forward gives the same term as the original's first, nothing added to it
    torch.testing.assert_close(compensation_loss(clone), pending, rtol=0, atol=0)
    (out.sum() + compensation_loss(block)).backward()
    assert block.ffn.gate.proj.weight.grad is not None
    assert block.ffn.compensation_term is None


def test_compensation_is_recorded_in_a_compiled_region_without_a_graph_break():
    torch.manual_seed(0)
    block = TransformerBlock(32, 4, ffn=lambda d, h: DSAFeedForward(d, 128, num_blocks=4, gate_threshold=0.5))
    x = torch.randn(2, 5, 32)
    block(x)
    eager = compensation_loss(block)
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    term = compensation_loss(block)
    torch.testing.assert_close(term, eager)
    (out.sum() + term).backward()
    assert block.ffn.gate.proj.weight.grad is not None


def test_task_adds_the_compensation_to_its_training_loss():
    from types import SimpleNamespace

    from lit_models._task import ZooTask

    class Task(ZooTask):
        def __init__(self):
            super().__init__()
            self.ffn = DSAFeedForward(8, 16, num_blocks=4, gate_threshold=0.5, compensation=0.3)

        def forward(self, batch):
            return self.ffn(batch["x"]).mean(1)

    torch.manual_seed(0)
    task = Task()
    task._trainer = SimpleNamespace(progress_bar_callback=None)
    task.log_dict = lambda *args, **kwargs: None
    batch = {"x": torch.randn(2, 3, 8), "label": torch.tensor([1, 5])}
    total = task.training_step(batch, 0)
    plain = task._loss(task(batch), batch["label"])
    expected = plain + compensation_loss(task)
    torch.testing.assert_close(total, expected)
    assert not torch.equal(total, plain)
    task.on_train_start()  # the layers found once; the steps collect from them
    assert task._dsa_layers == [task.ffn]
    torch.testing.assert_close(task.training_step(batch, 0), total)
    assert task.ffn.compensation_term is None


@pytest.mark.parametrize("fraction", [1.0, 0.5, 0.4, 0.25])
def test_sparse_path_equals_dense_path_on_the_same_selection(fraction):
    torch.manual_seed(1)
    ffn = DSAFeedForward(32, 256, num_blocks=8, gate_threshold=fraction).eval()
    nn.init.normal_(ffn.gate.proj.bias)  # unequal block loads
    x = torch.randn(4, 37, 32)
    with torch.no_grad():
        sparse = ffn(x)
        ffn.inference_path = "dense"
        dense = ffn(x)
    # fp32 both ways; only the summation order over hidden units differs.
    torch.testing.assert_close(sparse, dense, rtol=1e-5, atol=1e-5)


def test_torch_kernel_matches_dense_reference_with_uneven_and_empty_blocks():
    torch.manual_seed(2)
    T, D, H, N, k = 40, 24, 96, 6, 2
    x, w1, b1 = torch.randn(T, D), torch.randn(H, D), torch.randn(H)
    w2, b2 = torch.randn(D, H), torch.randn(D)
    alpha = torch.rand(T, k)
    idx = torch.stack([torch.tensor([0, 1 + i % 3]) for i in range(T)])  # blocks 4 and 5 never chosen
    out = block_sparse_ffn_torch(x, alpha, idx, w1, b1, w2, b2, num_blocks=N)
    ref = dense_reference(x, alpha, idx, w1, b1, w2, b2, N)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-4)


def test_triton_kernels_match_dense_reference_under_the_interpreter(subprocess_env):
    """The fused kernels' routing, gather, tiling, scatter and combine, run by Triton's CPU interpreter (fp32)."""
    script = textwrap.dedent(
        """
        import torch, torch.nn.functional as F
        from zoo.kernels._block_ffn_triton import block_sparse_ffn_triton, gate_topk_triton, route_triton
        from zoo.kernels import route
        torch.manual_seed(3)
        def ref(x, alpha, idx, w1, b1, w2, b2, N):
            h = F.gelu(x @ w1.t() + b1).view(x.shape[0], N, -1)
            w = torch.zeros(x.shape[0], N).scatter(1, idx, alpha)
            return (h * w[..., None]).reshape(x.shape[0], -1) @ w2.t() + b2
        for T, D, H, N, k, skew in [(50, 32, 128, 4, 2, 0), (37, 16, 64, 4, 1, 3), (20, 32, 64, 2, 2, 0),
                                    (45, 16, 128, 8, 3, 4)]:
            x, w1, b1 = torch.randn(T, D), torch.randn(H, D) / D**.5, torch.randn(H)
            w2, b2 = torch.randn(D, H) / H**.5, torch.randn(D)
            logits = torch.randn(T, N); logits[:, :N // 2] += skew  # skew: some blocks empty, others over a tile
            alpha = logits.sigmoid(); sel, idx = alpha.topk(k, dim=1)
            r = ref(x, sel, idx, w1, b1, w2, b2, N)
            for tma in (False, True):
                for sorted_out in (False, True):
                    y = block_sparse_ffn_triton(x, sel, idx, w1, b1, w2, b2, num_blocks=N, use_tma=tma,
                                                sorted_out=sorted_out)
                    err = ((y - r).norm() / r.norm()).item()
                    assert err < 1e-5, (T, D, H, N, k, tma, sorted_out, err)
            routing = route(idx, N, block_m=16)
            assert int(routing.tiles[:, 2].sum()) == T * k
            fused = route_triton(idx, N, block_m=16)  # the counting sort is stable: the same order as torch.sort
            for name in ("order", "slot", "tiles"):
                assert torch.equal(getattr(fused, name), getattr(routing, name)), name
            wg, bg = torch.randn(N, D) / D**.5, torch.randn(N)
            a, i = gate_topk_triton(x, wg, bg, k)
            a_ref, i_ref = (x @ wg.t() + bg).sigmoid().topk(k, dim=1)
            assert torch.equal(i, i_ref) and torch.allclose(a, a_ref, atol=1e-6), "fused gate + top-k"
        from zoo.layers.dsa import DSAFeedForward
        ffn = DSAFeedForward(32, 128, num_blocks=4, gate_threshold=0.5, inference_path="triton").eval()
        x = torch.randn(3, 11, 32)
        with torch.no_grad():
            y = ffn(x)
            ffn.inference_path = "dense"
            r = ffn(x)
        assert ((y - r).norm() / r.norm()).item() < 1e-5, "layer: fused path == dense path"
        print("ok")
        """
    )
    env = subprocess_env | {"TRITON_INTERPRET": "1"}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]


@pytest.mark.parametrize("num_blocks", [8, 10])
@pytest.mark.parametrize("fraction", [1.0, 0.5, 0.4, 0.25, 0.05])
def test_active_fraction_matches_gate_threshold(num_blocks, fraction):
    torch.manual_seed(4)
    ffn = DSAFeedForward(16, 8 * num_blocks, num_blocks=num_blocks, gate_threshold=fraction)
    ffn(torch.randn(6, 9, 16))
    stats = ffn.pop_density()
    k = active_blocks(fraction, num_blocks)
    assert stats["density"] == pytest.approx(k / num_blocks) and stats["density_std"] == pytest.approx(0, abs=1e-6)
    # round(fraction * N) blocks, at least one: within half a block of the threshold, exact when it is a multiple.
    assert abs(k / num_blocks - fraction) <= 0.5 / num_blocks or k == 1
    if float(fraction * num_blocks).is_integer():
        assert k / num_blocks == fraction


def test_sparse_path_really_skips_the_unselected_blocks():
    """Count the matrix-multiply FLOPs: at 25% the sparse path does a quarter of the dense FFN's, plus the gate."""
    torch.manual_seed(5)
    T, D, H = 256, 64, 256
    ffn = DSAFeedForward(D, H, num_blocks=8, gate_threshold=0.25).eval()
    x = torch.randn(T, D)
    flops = {}
    for path in ("torch", "dense"):
        ffn.inference_path = path
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            ffn(x)
        flops[path] = counter.get_total_flops()
    gate = 2 * T * D * 8
    ffn_dense = 4 * T * D * H
    assert flops["dense"] == gate + ffn_dense
    assert flops["torch"] == gate + ffn_dense // 4


@pytest.mark.parametrize("bad", [0, 0.0, -0.1, 1.5, float("nan"), True, "0.4"])
def test_set_gate_threshold_rejects_values_outside_unit_interval(bad):
    model = nn.Sequential(TransformerBlock(16, 2, ffn=DSAFeedForward), TransformerBlock(16, 2, ffn=DSAFeedForward))
    with pytest.raises(ValueError, match=rf"gate_threshold={bad!r}".replace("(", r"\(").replace(".", r"\.")):
        set_gate_threshold(model, bad)
    assert all(b.ffn.gate_threshold == 0.5 for b in model), "nothing changed"
    with pytest.raises(ValueError, match="gate_threshold"):
        DSAFeedForward(16, 64, gate_threshold=bad)


def test_set_gate_threshold_walks_any_module_and_counts_layers():
    model = nn.ModuleDict(
        {
            "a": TransformerBlock(16, 2, ffn=functools.partial(DSAFeedForward, num_blocks=4)),
            "b": TransformerBlock(16, 2),  # dense FFN: untouched
            "c": nn.Sequential(TransformerBlock(16, 2, ffn=DSAFeedForward)),
        }
    )
    assert set_gate_threshold(model, 0.25) == 2
    assert model["a"].ffn.active_blocks == 1 and model["c"][0].ffn.active_blocks == 2
    assert set_gate_threshold(nn.Linear(2, 2), 0.3) == 0


def test_num_blocks_must_divide_hidden_dim():
    with pytest.raises(ValueError, match="num_blocks=3 must be positive and divide hidden_dim=64"):
        DSAFeedForward(16, 64, num_blocks=3)


def test_gate_threshold_travels_in_the_state_dict():
    torch.manual_seed(6)
    a = DSAFeedForward(16, 64, gate_threshold=0.5)
    a.set_gate_threshold(0.25)
    b = DSAFeedForward(16, 64, gate_threshold=1.0)
    b.load_state_dict(a.state_dict())
    assert b.gate_threshold == 0.25
    x = torch.randn(2, 3, 16)
    torch.testing.assert_close(a.eval()(x), b.eval()(x), rtol=0, atol=0)


def test_annealing_schedule():
    linear = DSAMonitor(anneal_from=1.0, anneal_to=0.4, anneal_start=0.2, anneal_end=0.6)
    assert [linear.threshold_at(p) for p in (0.0, 0.2, 0.4, 0.6, 1.0)] == pytest.approx([1.0, 1.0, 0.7, 0.4, 0.4])
    cosine = DSAMonitor(anneal_from=1.0, anneal_to=0.4, anneal_start=0.0, anneal_end=1.0, schedule="cosine")
    assert cosine.threshold_at(0.5) == pytest.approx(0.7) and cosine.threshold_at(0.25) > 0.7
    with pytest.raises(ValueError, match="anneal_to=0"):
        DSAMonitor(anneal_to=0)
    with pytest.raises(ValueError, match="anneal_start=0.7 and anneal_end=0.5"):
        DSAMonitor(anneal_to=0.5, anneal_start=0.7, anneal_end=0.5)


# -- Lightning: logging through the trainer's logger, annealing, exact resumption --------------------------------
class _Recorder(Logger):
    def __init__(self):
        super().__init__()
        self.records: list[tuple[int, dict]] = []

    name = "recorder"
    version = 0

    def log_metrics(self, metrics, step=None):
        self.records.append((step, dict(metrics)))

    def log_hyperparams(self, params, *args, **kwargs):
        pass


class _TinyTask(pl.LightningModule):
    def __init__(self):
        super().__init__()
        ffn = functools.partial(DSAFeedForward, num_blocks=4, gate_threshold=1.0)
        self.blocks = nn.Sequential(TransformerBlock(16, 2, ffn=ffn), TransformerBlock(16, 2, ffn=ffn))
        self.head = nn.Linear(16, 3)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.head(self.blocks(x).mean(1)), y)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


def _fit(tmp_path, *, ckpt_path=None, logger=None, checkpoints=False):
    torch.manual_seed(7)
    data = TensorDataset(torch.randn(12, 5, 16), torch.randint(0, 3, (12,)))
    task = _TinyTask()
    callbacks = [DSAMonitor(log_every_n_steps=2, anneal_from=1.0, anneal_to=0.25, anneal_end=0.8)]
    if checkpoints:
        callbacks.append(ModelCheckpoint(dirpath=tmp_path, filename="{epoch}", save_top_k=-1, every_n_epochs=1))
    trainer = pl.Trainer(
        max_epochs=2,
        accelerator="cpu",
        logger=logger or False,
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=checkpoints,
        default_root_dir=tmp_path,
    )
    trainer.fit(task, DataLoader(data, batch_size=4), ckpt_path=ckpt_path)
    return task


def test_monitor_logs_density_per_layer_and_anneals_then_checkpoint_resumes_exactly(tmp_path):
    logger = _Recorder()
    straight = _fit(tmp_path, logger=logger, checkpoints=True)  # 6 steps, checkpoint after epoch 0 (step 3)
    logged = {step: m for step, m in logger.records if any(key.startswith("dsa/") for key in m)}
    assert sorted(logged) == [2, 4, 6]
    first = logged[2]
    assert set(first) >= {"dsa/blocks.0.ffn/density", "dsa/blocks.1.ffn/load_max", "dsa/density"}
    # annealed 1.0 -> 0.25 over the first 80% of 6 steps; thresholds 1, .84, .69, .53, .375, .25 at steps 0..5
    # run 4, 3, 3, 2, 2, 1 of 4 blocks; each log averages the two steps before it.
    densities = [logged[s]["dsa/density"] for s in (2, 4, 6)]
    assert densities == pytest.approx([7 / 8, 5 / 8, 3 / 8])
    assert logged[6]["dsa/blocks.1.ffn/gate_threshold"] == 0.25
    assert all(b.ffn.gate_threshold == 0.25 for b in straight.blocks)

    resumed = _fit(tmp_path / "resumed", ckpt_path=tmp_path / "epoch=0.ckpt")
    for (name, p), q in zip(straight.state_dict().items(), resumed.state_dict().values(), strict=True):
        if isinstance(p, torch.Tensor):
            torch.testing.assert_close(p, q, rtol=0, atol=0, msg=name)
        else:
            assert p == q, name


def test_bf16_autocast_sparse_path_runs_on_cpu():
    torch.manual_seed(8)
    ffn = DSAFeedForward(32, 128, num_blocks=4, gate_threshold=0.5).eval()
    x = torch.randn(2, 7, 32)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        y = ffn(x)
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()
    with torch.no_grad():
        ref = ffn(x)
    assert ((y.float() - ref).norm() / ref.norm()).item() < 2e-2  # bf16 operands: ~1e-2 relative
    assert density_stats(ffn) == {}, "inference records no density"


@pytest.mark.parametrize("shape", [(0, 16), (0, 5, 16), (2, 0, 16)])
def test_sparse_path_takes_a_batch_without_tokens(shape):
    ffn = DSAFeedForward(16, 64, num_blocks=4, gate_threshold=0.5).eval()
    with torch.no_grad():
        assert ffn(torch.randn(shape)).shape == shape
    assert block_sparse_ffn_torch(
        torch.randn(0, 16), torch.rand(0, 2), torch.zeros(0, 2, dtype=torch.long), ffn.fc1.weight, ffn.fc1.bias,
        ffn.fc2.weight, ffn.fc2.bias, num_blocks=4,
    ).shape == (0, 16)  # fmt: skip


def test_gate_runs_in_fp32_under_bf16_autocast_so_its_choice_does_not_hang_on_ties():
    """bf16 gate values (spacing 2^-8 near 1) tie often for a sharp gate, and which of the tied blocks runs then
    depends on the kernel; in fp32 the choice is the one the fp32 model makes, in training and inference alike."""
    torch.manual_seed(0)
    ffn = DSAFeedForward(128, 512, num_blocks=8, gate_threshold=0.375)
    nn.init.normal_(ffn.gate.proj.weight, std=8 / 128**0.5)
    x = torch.randn(4096, 128)
    reference = ffn.select(ffn.gate(x)).sort(-1).values
    with torch.autocast("cpu", dtype=torch.bfloat16):
        alpha = ffn.gate(x)
    assert alpha.dtype == torch.float32
    assert torch.equal(ffn.select(alpha).sort(-1).values, reference)


def test_a_quantized_gate_keeps_the_dense_path_which_calls_it():
    ffn = DSAFeedForward(16, 64, num_blocks=4, gate_threshold=0.5).eval()

    class Wrapped(nn.Linear):  # stands for a fake-quantized projection: the fused kernel would read its raw weight
        pass

    proj = Wrapped(16, 4)
    proj.load_state_dict(ffn.gate.proj.state_dict())
    with torch.no_grad():
        assert ffn._use_sparse()
        ffn.gate.proj = proj
        assert not ffn._use_sparse()


def test_a_quantization_aware_gate_with_bf16_weights_runs():
    """FSDP's bf16 gathers give a QAT gate bf16 weights: the gate calls it on input of that dtype (fp32 input failed
    in F.linear), and returns fp32 gate values."""
    from zoo.quant import quantize_

    torch.manual_seed(0)
    model = quantize_(nn.ModuleDict({"ffn": DSAFeedForward(16, 64, num_blocks=4, gate_threshold=0.5)}), weight_bit=8)
    model = model.to(torch.bfloat16)
    x = torch.randn(2, 5, 16, dtype=torch.bfloat16)
    assert model["ffn"].gate(x).dtype == torch.float32
    assert model["ffn"](x).shape == x.shape
