"""zoo.quant: fake-quantization error bounds, the per-layer policy, integer conversion and its saved form."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from zoo.contracts import Tokens
from zoo.errors import ConfigError
from zoo.fusion import MIE
from zoo.layers import TransformerBlock
from zoo.quant import (
    FakeQuantizer,
    QATEmbedding,
    QATLinear,
    QuantizedEmbedding,
    QuantizedLinear,
    calibrating,
    convert_,
    converted_layers,
    fuse_feedforward_,
    load_converted,
    pack_int4,
    quant_range,
    quantize_,
    save_converted,
    set_schedule_bits,
    state_dict_bytes,
    unpack_int4,
)
from zoo.quant.convert import onednn_prepack

#: oneDNN's int8 GEMM on prepacked weights: x86 CPUs (elsewhere QuantizedLinear runs torch._int_mm)
ONEDNN = onednn_prepack(torch.zeros(8, 8, dtype=torch.int8)) is not None


def _rows_with_varied_ranges(rows: int, cols: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    magnitudes = torch.logspace(-3, 2, rows)[:, None]  # per-row ranges from 1e-3 to 1e2
    return torch.randn(rows, cols, generator=g) * magnitudes + 0.3 * magnitudes * torch.rand(rows, 1, generator=g)


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("method", ["symmetric", "asymmetric"])
@pytest.mark.parametrize("granularity", ["per_channel", "per_token", "per_tensor"])
def test_quantize_dequantize_error_within_half_a_step_of_float64(bits, method, granularity):
    x = _rows_with_varied_ranges(16, 97, seed=bits)
    quantizer = FakeQuantizer(bits=bits, symmetric=method == "symmetric", granularity=granularity, channels=16)
    y = quantizer(x).double()
    # float64 reference: the range of each row (or of the tensor) mapped onto the codes
    x64 = x.double()
    qmin, qmax = quant_range(bits, method == "symmetric")
    if granularity == "per_tensor":
        lo, hi = x64.min().clamp(max=0).expand(16, 1), x64.max().clamp(min=0).expand(16, 1)
    else:
        lo, hi = x64.amin(1, keepdim=True).clamp(max=0), x64.amax(1, keepdim=True).clamp(min=0)
    if method == "symmetric":
        scale64, zero64 = torch.maximum(-lo, hi) / qmax, torch.zeros_like(lo)
    else:
        scale64 = (hi - lo) / (qmax - qmin)
        zero64 = qmin - torch.round(lo / scale64)
    ref = (torch.clamp(torch.round(x64 / scale64) + zero64, qmin, qmax) - zero64) * scale64
    # Every element within half a step of its float64 value, per channel (slack: float32 rounding of x / s).
    err = (y - x64).abs()
    assert (err <= scale64 / 2 * (1 + 1e-5) + 1e-7 * x64.abs()).all(), (err / scale64).max()
    # The same codes as the float64 reference except at exact ties, where float32 may round the other way: those
    # differ by one step, and are rare.
    steps = ((y - ref).abs() / scale64).round()
    assert steps.max() <= 1 and (steps > 0).float().mean() < 1e-3


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("method", ["symmetric", "asymmetric"])
@pytest.mark.parametrize("shape", [(16, 97), (1024, 1024)])  # on the CPU: all 21 ratios at once, one at a time
def test_mse_observer_picks_each_rows_best_clipping_ratio_of_the_grid(bits, method, shape):
    from zoo.quant.fake_quant import _MSE_GRID, fake_quantize, qparams_from_range

    w = torch.randn(*shape, generator=torch.Generator().manual_seed(bits)) * torch.logspace(-2, 1, shape[0])[:, None]
    quantizer = FakeQuantizer(bits=bits, symmetric=method == "symmetric", granularity="per_channel",
                              channels=shape[0], observer="mse")  # fmt: skip
    quantizer.observe(w)
    qmin, qmax = quant_range(bits, method == "symmetric")

    def row_errors(lo, hi):
        scale, zero_point = qparams_from_range(lo, hi, bits, method == "symmetric")
        return (fake_quantize(w, scale, zero_point, qmin, qmax) - w).pow(2).sum(1)

    lo, hi = w.amin(1, keepdim=True), w.amax(1, keepdim=True)
    grid = torch.stack([row_errors(lo * r, hi * r) for r in _MSE_GRID])  # [ratios, rows], one ratio at a time
    chosen = row_errors(quantizer.min_val, quantizer.max_val)
    torch.testing.assert_close(chosen, grid.min(0).values, rtol=1e-5, atol=0)
    assert (chosen <= row_errors(lo, hi) * (1 + 1e-5)).all()  # never worse than the min-max range (ratio 1.0)
    if bits == 2:  # at 2 bits the min-max range rounds most weights to zero: clipping must win on most rows
        assert (chosen < 0.9 * row_errors(lo, hi)).float().mean() > 0.9


def test_mse_observer_clips_a_heavy_tailed_batch_where_its_4_bit_error_is_least():
    from zoo.quant.fake_quant import _MSE_GRID, fake_quantize, qparams_from_range

    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 117, 128, generator=g) ** 3  # heavy tails: a min-max range wastes most of 16 codes
    quantizers = {name: FakeQuantizer(bits=4, symmetric=False, observer=name) for name in ("minmax", "mse")}
    for quantizer in quantizers.values():
        quantizer.observe(x)

    def error(lo, hi):
        scale, zero_point = qparams_from_range(lo, hi, 4, False)
        return (fake_quantize(x, scale, zero_point, -8, 7) - x).pow(2).sum()

    grid = min(error(x.min() * r, x.max() * r) for r in _MSE_GRID)
    mse, minmax = (error(q.min_val, q.max_val) for q in (quantizers["mse"], quantizers["minmax"]))
    torch.testing.assert_close(mse, grid, rtol=1e-5, atol=0)
    assert mse < 0.8 * minmax, (mse, minmax)


def test_activation_observer_reaches_every_static_input_and_survives_the_state_dict():
    from zoo.quant import restore_qat_layers

    model = _mie()
    qat = quantize_(copy.deepcopy(model), activation_granularity="per_tensor", attention_bit=8,
                    activation_observer="mse")  # fmt: skip
    observers = {
        name: q.observer
        for name, q in qat.named_modules()
        if isinstance(q, FakeQuantizer) and q.granularity != "per_token"
    }
    inputs = {n for n in observers if ".act_quant" in n}
    assert inputs and all(observers[n] == "mse" for n in inputs)
    assert all(o == "minmax" for n, o in observers.items() if n not in inputs)  # weights: ``observer``
    with torch.no_grad(), calibrating(qat):
        qat(_tokens())
    state = qat.state_dict()
    fresh = copy.deepcopy(model)
    restore_qat_layers(fresh, state)
    fresh.load_state_dict(state)
    assert fresh.blocks[0].attn.qkv.act_quant.observer == fresh.blocks[1].attn.sdpa.act_quant["q"].observer == "mse"


def test_error_halves_with_each_added_bit():
    x = _rows_with_varied_ranges(32, 256, seed=0)
    errors = []
    for bits in range(2, 9):
        y = FakeQuantizer(bits=bits, granularity="per_channel", channels=32)(x)
        errors.append(((y - x).abs() / x.abs().amax(1, keepdim=True)).mean().item())
    ratios = [a / b for a, b in zip(errors, errors[1:], strict=False)]
    assert all(1.6 < r < 3.0 for r in ratios[1:]), ratios  # 2 -> 3 bits is more than 2x: 2 bits is {-1, 0, 1}


def test_straight_through_gradient_passes_inside_the_range_and_stops_outside():
    quantizer = FakeQuantizer(bits=4, granularity="per_tensor")
    quantizer.observe(torch.tensor([-1.0, 1.0]))
    quantizer.freeze_observer()
    x = torch.tensor([-3.0, -0.4, 0.2, 0.9, 2.5], requires_grad=True)
    quantizer(x).sum().backward()
    assert torch.equal(x.grad, torch.tensor([0.0, 1.0, 1.0, 1.0, 0.0]))


def test_learned_scale_gets_the_lsq_gradient_and_keeps_its_range_when_bits_change():
    torch.manual_seed(0)
    quantizer = FakeQuantizer(bits=8, granularity="per_channel", channels=4, learnable=True)
    w = torch.randn(4, 64)
    quantizer(w).pow(2).sum().backward()
    assert quantizer.scale.grad is not None and quantizer.scale.grad.abs().sum() > 0
    lo, hi = quantizer._learned_range()
    quantizer.set_bits(4)
    lo4, hi4 = quantizer._learned_range()
    # the step grows 127/7 times, so that the 4-bit codes cover the range the 8-bit ones did
    torch.testing.assert_close(hi4, hi, rtol=1e-6, atol=0)
    torch.testing.assert_close(lo4, lo, rtol=1e-6, atol=0)


def _mie(depth: int = 2, dim: int = 32) -> MIE:
    return MIE(dim=dim, depth=depth, num_heads=4, modality_fusion_layers=1).eval()


def _tokens(batch: int = 4, dim: int = 32, seed: int = 0) -> dict[str, Tokens]:
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, 7, dtype=torch.bool)
    mask[0, 5:] = False
    return {
        "image": Tokens.dense(torch.randn(batch, 9, dim, generator=g)),
        "text": Tokens(torch.randn(batch, 7, dim, generator=g), mask),
    }


def test_default_policy_is_attention_8_bit_ffn_4_bit_and_keeps_the_parameters():
    torch.manual_seed(0)
    model = nn.ModuleDict({"fusion": _mie(), "head": nn.Linear(32, 5), "embed": nn.Embedding(50, 32)})
    weight = model["fusion"].blocks[0].attn.qkv.weight
    quantize_(model, weight_bit=6, activation_bit=8)
    block = model["fusion"].blocks[1]
    assert isinstance(block.attn.qkv, QATLinear) and block.attn.qkv.weight_quant.bits == 8
    assert block.attn.proj.weight_quant.bits == 8
    assert block.ffn.fc1.weight_quant.bits == 4 and block.ffn.fc2.weight_quant.bits == 4
    assert model["head"].weight_quant.bits == 6, "layers no pattern names get weight_bit"
    assert isinstance(model["embed"], QATEmbedding) and model["embed"].weight_quant.bits == 8
    assert model["fusion"].blocks[0].attn.qkv.weight is weight, "the same Parameter object, for the optimizer"
    assert all(layer.act_quant.bits == 8 for layer in model.modules() if isinstance(layer, QATLinear))


def test_overrides_by_pattern_last_match_wins_and_none_keeps_float():
    model = nn.ModuleDict({"fusion": _mie(), "head": nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 5))})
    quantize_(
        model,
        weight_bit=4,
        overrides={"fusion.*": 8, "*.ffn.fc2": {"weight_bit": 3, "activation_bit": 6}, "head": None},
        embedding_bit=None,
    )
    block = model["fusion"].blocks[0]
    assert block.ffn.fc1.weight_quant.bits == 8
    assert (block.ffn.fc2.weight_quant.bits, block.ffn.fc2.act_quant.bits) == (3, 6)
    assert type(model["head"][0]) is nn.Linear, "'head' covers the layers inside it"


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"weight_bit": 0}, "weight_bit=0"),
        ({"weight_bit": 9}, "weight_bit=9"),
        ({"activation_bit": 9}, "activation_bit=9"),
        ({"activation_bit": 0}, "activation_bit=0"),
        ({"quant_method": "log2"}, "quant_method='log2'"),
        ({"overrides": {"*.attn.qkvz": 8}}, r"overrides\['\*.attn.qkvz'\] matches no"),
        ({"overrides": {"*.ffn.fc1": 9}}, r"overrides\['\*.ffn.fc1'\].weight_bit=9"),
        ({"overrides": {"*.ffn.fc1": {"bits": 4}}}, r"overrides\['\*.ffn.fc1'\].bits is not"),
        ({"overrides": {"*.ffn.fc1": {"quant_method": "x"}}}, r"overrides\['\*.ffn.fc1'\].quant_method='x'"),
        ({"embedding_bit": 1}, "embedding_bit=1"),
        ({"activation_granularity": "per_row"}, "activation_granularity='per_row'"),
        ({"observer": "kl"}, "observer='kl'"),
        ({"activation_observer": "percentile"}, "activation_observer='percentile'"),
    ],
)
def test_invalid_config_fails_naming_the_key(kwargs, key):
    with pytest.raises(ConfigError, match=key):
        quantize_(_mie(), **kwargs)


def test_default_patterns_that_match_nothing_are_not_an_error():
    quantize_(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)), weight_bit=4)


@pytest.mark.parametrize(
    ("weight_bit", "activation_bit", "method", "granularity"),
    [
        (8, 8, "symmetric", "per_token"),
        (4, 8, "symmetric", "per_token"),
        (4, 8, "asymmetric", "per_token"),
        (3, 6, "asymmetric", "per_tensor"),
        (8, 8, "symmetric", "per_tensor"),
    ],
)
def test_converted_linear_matches_fake_quant_layer(weight_bit, activation_bit, method, granularity):
    torch.manual_seed(0)
    layer = QATLinear(
        100,
        37,
        weight_bit=weight_bit,
        activation_bit=activation_bit,
        quant_method=method,
        activation_granularity=granularity,
        learnable_scales=granularity == "per_tensor",
    )
    x = torch.randn(3, 50, 100) * 2 + 0.5
    layer(x)  # the per-tensor input quantizer observes its first batch
    layer.eval()
    with torch.no_grad():
        expected = layer(x)
        got = QuantizedLinear.from_qat(layer)(x)
    # Same codes on both sides; only the float32 rounding of the dot product differs (fake quant sums 100 float
    # products, the integer GEMM sums exactly and rescales once): a few ulps of the output magnitude.
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5 * expected.abs().max().item())


def test_converted_model_matches_fake_quant_model():
    torch.manual_seed(0)
    qat = quantize_(_mie(depth=3, dim=64))
    x = _tokens(batch=8, dim=64)
    float_out = _mie(depth=3, dim=64)
    float_out.load_state_dict(qat.state_dict(), strict=False)
    with torch.no_grad():
        expected = qat(x).pooled
        got = convert_(copy.deepcopy(qat))(x).pooled
        unquantized = float_out(x).pooled
    # Tolerance: quantization is discontinuous. Float32 rounding differences (1e-7 relative) between the fake-quant
    # and the integer arithmetic move a few inputs across a rounding boundary, each by one step of its scale (1/127
    # of the token's range at 8 bits), and later layers carry that on: the fake-quant model moves by the same amount
    # between float32 and float64 arithmetic. So: small against the quantization error itself, and on average tiny.
    diff = (got - expected).abs()
    quant_error = (unquantized - expected).abs()
    assert diff.max() < 0.25 * quant_error.max(), (diff.max(), quant_error.max())
    assert diff.mean() < 0.05 * quant_error.mean() + 1e-4, (diff.mean(), quant_error.mean())


def test_conversion_before_the_last_stage_warns_and_converted_layers_reports_the_bits_run():
    model = quantize_(_mie(depth=2, dim=32), attention_bit=8)  # attention projections 8, FFN 4 (DEFAULT_OVERRIDES)
    with torch.no_grad(), calibrating(model):
        model(_tokens())
    set_schedule_bits(model, 6)  # a checkpoint of the 6-bit stage: the FFN layers still run above their 4-bit target
    with pytest.warns(UserWarning, match=r"4 layers run above their target weight bits.*ffn\.fc1 \(6 > 4\)"):
        early = convert_(copy.deepcopy(model))
    assert converted_layers(early) == {"linear W8A8": 4, "linear W6A8": 4, "attention A8": 2}
    set_schedule_bits(model, None)
    assert converted_layers(convert_(model)) == {"linear W8A8": 4, "linear W4A8": 4, "attention A8": 2}


def test_int4_codes_pack_two_per_byte_and_unpack_exactly():
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(-8, 8, (5, 13), generator=g, dtype=torch.int8)
    packed = pack_int4(codes)
    assert packed.dtype == torch.uint8 and packed.shape == (5, 7)
    assert torch.equal(unpack_int4(packed, 13), codes)


def test_converted_weights_are_packed_and_under_30_percent_of_float():
    torch.manual_seed(0)
    model = _mie(depth=2, dim=128)
    converted = convert_(quantize_(copy.deepcopy(model)))
    fc1 = converted.blocks[0].ffn.fc1
    assert fc1.qweight.dtype == torch.uint8 and fc1.qweight.shape == (512, 64)
    assert converted.blocks[0].attn.qkv.qweight.dtype == torch.int8
    ratio = state_dict_bytes(converted) / state_dict_bytes(model)
    assert ratio < 0.30, ratio


def test_converted_model_saves_and_loads_with_weights_only(tmp_path):
    torch.manual_seed(0)
    model = nn.ModuleDict({"embed": nn.Embedding(40, 64), "fusion": _mie(dim=64)})
    qat = quantize_(copy.deepcopy(model), overrides={"*.ffn.*": {"weight_bit": 4, "quant_method": "asymmetric"}})
    converted = convert_(qat)
    path = tmp_path / "int.pt"
    save_converted(converted, path, metadata={"note": "test", "version": torch.__version__})
    artefact = torch.load(path, weights_only=True)
    assert set(artefact) == {"format", "metadata", "state_dict"}
    assert all(torch.is_tensor(v) or isinstance(v, dict) for v in artefact["state_dict"].values())
    loaded = load_converted(path, copy.deepcopy(model))
    assert isinstance(loaded["fusion"].blocks[0].ffn.fc1, QuantizedLinear)
    assert isinstance(loaded["embed"], QuantizedEmbedding)
    ids = torch.randint(0, 40, (3, 6))
    x = _tokens(batch=3, dim=64)
    with torch.no_grad():
        assert torch.equal(loaded["embed"](ids), converted["embed"](ids))
        assert torch.equal(loaded["fusion"](x).pooled, converted["fusion"](x).pooled)


def test_quantized_embedding_equals_fake_quant_embedding():
    torch.manual_seed(0)
    for bits, method in [(8, "symmetric"), (4, "asymmetric")]:
        qat = QATEmbedding.from_embedding(nn.Embedding(30, 10, padding_idx=0), weight_bit=bits, quant_method=method)
        ids = torch.randint(0, 30, (4, 5))
        with torch.no_grad():
            assert torch.equal(QuantizedEmbedding.from_qat(qat)(ids), qat(ids))


def test_schedule_bits_never_go_below_a_layer_target():
    model = quantize_(nn.ModuleDict({"block": TransformerBlock(16, 2)}))
    assert set_schedule_bits(model, 6) == {
        "block.attn.qkv": 8,
        "block.attn.proj": 8,
        "block.ffn.fc1": 6,
        "block.ffn.fc2": 6,
    }
    assert set_schedule_bits(model, None)["block.ffn.fc1"] == 4


def test_quantizing_a_converted_model_is_refused():
    converted = convert_(quantize_(_mie()))
    with pytest.raises(ConfigError, match="already converted"):
        quantize_(converted)


def _int_mm_twin(model: nn.Module) -> nn.Module:
    twin = copy.deepcopy(model)
    for layer in twin.modules():
        if isinstance(layer, QuantizedLinear):
            layer._packed = None  # the torch._int_mm path
    return twin


@pytest.mark.skipif(not ONEDNN, reason="oneDNN's int8 GEMM runs on x86 CPUs")
@pytest.mark.parametrize(("weight_bit", "method"), [(8, "symmetric"), (4, "symmetric"), (4, "asymmetric")])
def test_onednn_prepacked_gemm_equals_int_mm(weight_bit, method):
    torch.manual_seed(0)
    layer = QATLinear(100, 37, weight_bit=weight_bit, quant_method=method).eval()  # 100, 37: no multiple of 8
    converted = QuantizedLinear.from_qat(layer)
    assert (converted._packed is not None) == (method == "symmetric")  # zero points take the _int_mm path
    copied = copy.deepcopy(converted.float())  # the opaque packed weight survives copies and dtype/device moves
    assert (copied._packed is not None) == (method == "symmetric")
    assert not any("_packed" in key for key in converted.state_dict())  # derived at load, not saved
    x = torch.randn(70, 100) * 3
    with torch.no_grad():
        got, reference = copied(x), _int_mm_twin(converted)(x)
    # the same integer dot products; the per-channel and per-token scales multiply in another order
    torch.testing.assert_close(got, reference, rtol=0, atol=1e-6 * reference.abs().max().item())
    with torch.no_grad():  # a model cast to bf16 (e.g. by precision="bf16-true") keeps running, in bf16
        cast = copy.deepcopy(converted).to(torch.bfloat16)(x.bfloat16())
    assert cast.dtype == torch.bfloat16
    torch.testing.assert_close(cast.float(), reference, rtol=0.02, atol=0.02 * reference.abs().max().item())


@pytest.mark.skipif(not ONEDNN, reason="oneDNN's int8 GEMM runs on x86 CPUs")
@pytest.mark.parametrize("freezing", [True, False])
@pytest.mark.parametrize("granularity", ["per_token", "per_tensor"])
def test_compiled_converted_model_runs_onednn_when_frozen_and_int_mm_otherwise(granularity, freezing):
    from torch.profiler import profile

    torch.manual_seed(0)
    if granularity == "per_tensor":  # the fused FFN: GELU in fc1's epilogue, fc1 writing fc2's codes
        converted = convert_(_per_tensor_ffn())
    else:
        model = nn.Sequential(nn.Linear(64, 96), nn.GELU(), nn.Linear(96, 24))
        converted = convert_(quantize_(model, weight_bit=8, overrides={})).eval()
    x = torch.randn(40, 64)
    torch._dynamo.reset()
    with torch.no_grad(), torch._inductor.config.patch(freezing=freezing):
        compiled = torch.compile(copy.deepcopy(converted), dynamic=False)
        compiled(x)
        with profile() as prof:
            got = compiled(x)
        expected = converted(x)
    ops = {event.key for event in prof.key_averages()}
    assert ("onednn::qlinear_pointwise" in ops) == freezing, ops
    assert ("aten::_int_mm" in ops) != freezing, ops
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5 * expected.abs().max().item())


def _per_tensor_ffn(seed: int = 0, act: nn.Module | None = None) -> nn.Module:
    """A quantization-aware FFN with per-tensor static inputs whose ranges were observed on a few batches."""
    from zoo.layers.ffn import FeedForward

    torch.manual_seed(seed)
    ffn = FeedForward(64, 96)
    if act is not None:
        ffn.act = act
    qat = quantize_(ffn, weight_bit=8, overrides={}, activation_granularity="per_tensor").train()
    with torch.no_grad():
        for _ in range(3):
            qat(torch.randn(50, 64) * 2)
    return qat.eval()


def test_calibrating_observes_per_tensor_inputs_and_leaves_the_model_alone():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.BatchNorm1d(32), nn.Dropout(0.5), nn.Linear(32, 8)).eval()
    running_mean = model[1].running_mean.clone()
    qat = quantize_(model, weight_bit=8, overrides={}, activation_granularity="per_tensor")
    with pytest.raises(ConfigError, match=r"observed no data, e\.g\. '0'.*calibrating"):
        convert_(copy.deepcopy(qat))  # uncalibrated per-tensor scales would silently wreck the integer model
    x = torch.randn(64, 16) * 3
    with torch.no_grad(), calibrating(qat):
        qat(x)
        qat(2 * x)
    assert not any(m.training for m in qat.modules())  # the quantizers are back in eval mode
    assert torch.equal(qat[1].running_mean, running_mean)  # batch norm did not see the calibration batches
    observed = qat[0].act_quant.max_val.item()
    assert x.max().item() < observed < 2 * x.max().item()  # the first batch's range, moved towards the second
    with torch.no_grad():
        qat(3 * x)  # outside the block: eval mode, no observing
    assert qat[0].act_quant.max_val.item() == observed
    with torch.no_grad():
        expected, got = qat(x), convert_(copy.deepcopy(qat))(x)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5 * expected.abs().max().item())


@pytest.mark.parametrize("act", [nn.GELU(), nn.GELU(approximate="tanh"), nn.ReLU()], ids=["gelu", "tanh", "relu"])
@pytest.mark.parametrize("granularity", ["per_tensor", "per_token"])
def test_ffn_activation_folds_into_fc1_without_changing_outputs(act, granularity, tmp_path):
    from zoo.layers.ffn import FeedForward

    torch.manual_seed(0)
    ffn = FeedForward(64, 96)
    ffn.act = act
    qat = quantize_(ffn, weight_bit=8, overrides={}, activation_granularity=granularity).train()
    x = torch.randn(50, 64) * 2
    qat(x)
    qat.eval()
    fused, unfused = convert_(copy.deepcopy(qat)), convert_(copy.deepcopy(qat), fuse=False)
    assert isinstance(fused.act, nn.Identity) and fused.fc1.activation is not None
    assert type(unfused.act) is type(act) and unfused.fc1.activation is None
    assert fuse_feedforward_(fused) == 0  # folded once
    with torch.no_grad():
        got, expected = fused(x), unfused(x)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6 * expected.abs().max().item())
    # the fold is derived from the model, not saved: loading rebuilds it
    path = tmp_path / "ffn.pt"
    save_converted(fused, path)
    float_ffn = FeedForward(64, 96)
    float_ffn.act = copy.deepcopy(act)
    loaded = load_converted(path, float_ffn)
    assert isinstance(loaded.act, nn.Identity) and loaded.fc1.activation == fused.fc1.activation
    with torch.no_grad():
        assert torch.equal(loaded(x), got)


def test_activations_oneDNN_cannot_apply_stay_separate():
    fused = convert_(_per_tensor_ffn(act=nn.SiLU()))
    assert isinstance(fused.act, nn.SiLU) and fused.fc1.activation is None
    assert not fused.fc1._codes_for  # fc2's input is SiLU's float output


@pytest.mark.skipif(not ONEDNN, reason="oneDNN's int8 GEMM runs on x86 CPUs")
def test_per_tensor_layer_runs_whole_in_onednn_and_equals_int_mm():
    from torch.profiler import profile

    converted = convert_(_per_tensor_ffn())
    assert converted.fc1._packed is not None and converted.fc1.activation == "gelu"
    x = torch.randn(70, 64) * 2
    with torch.no_grad():
        with profile() as prof:
            got = converted(x)
        reference = _int_mm_twin(converted)(x)
    counts = {event.key: event.count for event in prof.key_averages()}
    # scale, bias and GELU in oneDNN's epilogue: no separate pass over the GEMM's output; and fc1 writes fc2's
    # input codes, so only fc1's input is quantized (one round_, one add_ of the uint8 offset)
    assert converted.fc1._codes_for == (converted.fc2,)
    assert counts["onednn::qlinear_pointwise"] == 2 and counts["aten::round_"] == counts["aten::add_"] == 1, counts
    assert not set(counts) & {"aten::gelu", "aten::mul_"}, counts
    torch.testing.assert_close(got, reference, rtol=0, atol=1e-6 * reference.abs().max().item())
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = converted(x.bfloat16())
    with torch.no_grad():
        cast = copy.deepcopy(converted).to(torch.bfloat16)(x.bfloat16())
    # a model cast to bf16 computes in bf16; under autocast fc1 takes bf16 and writes fc2's codes, and fc2
    # writes the model's float32
    assert cast.dtype == torch.bfloat16 and autocast.dtype == torch.float32
    for out in (autocast, cast):
        torch.testing.assert_close(out.float(), reference, rtol=0.02, atol=0.02 * reference.abs().max().item())


@pytest.mark.skipif(not ONEDNN, reason="oneDNN's int8 GEMM runs on x86 CPUs")
@pytest.mark.parametrize("granularity", ["per_token", "per_tensor"])
def test_onednn_gemm_runs_an_optimized_kernel_not_the_reference_one(granularity, capfd):
    # oneDNN names the implementation of every primitive it runs in its verbose log. With signed input codes a CPU
    # with VNNI but no AMX (AMD Zen 4, Intel before Sapphire Rapids) ran "ref_int8:any", about a thousand times slower
    # than the VNNI kernel: the converted VQA model took 24 s a forward where fp32 took 60 ms
    from zoo.layers.ffn import FeedForward

    qat = _per_tensor_ffn() if granularity == "per_tensor" else quantize_(FeedForward(64, 96), weight_bit=8)
    converted = convert_(qat.eval())
    x = torch.randn(70, 64)
    capfd.readouterr()
    with torch.no_grad(), torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON):
        converted(x)
    matmuls = [line for line in capfd.readouterr().out.splitlines() if ",exec,cpu,matmul," in line]
    assert len(matmuls) == 2, matmuls
    implementations = {line.split(",")[6] for line in matmuls}
    assert not any(name.startswith("ref") for name in implementations), implementations


def test_fc1_writes_fc2_codes_only_for_an_8_bit_per_tensor_fc2():
    from zoo.layers.ffn import FeedForward

    def converted(**fc2_config):
        torch.manual_seed(0)
        qat = quantize_(
            FeedForward(32, 64), weight_bit=8, overrides={"fc2": fc2_config}, activation_granularity="per_tensor"
        )
        qat(torch.randn(20, 32))
        return convert_(qat)

    chained = converted(weight_bit=8)
    assert chained.fc1._codes_for == (chained.fc2,)
    copied = copy.deepcopy(chained)  # the chain follows the copy
    assert copied.fc1._codes_for[0] is copied.fc2
    assert not converted(weight_bit=8, activation_bit=6).fc1._codes_for  # 6-bit codes: oneDNN clamps to int8 only
    per_token = convert_(quantize_(FeedForward(32, 64), weight_bit=8, overrides={}))
    assert not per_token.fc1._codes_for
    with pytest.raises(TypeError, match="input codes need a per-tensor input scale"):
        per_token.fc2(torch.zeros(3, 64, dtype=torch.uint8))
    # fc2 reads its input codes as fc1 writes them (uint8, plus 128) or as int8, on either path
    codes = torch.randint(-127, 128, (5, 64), dtype=torch.int8)
    shifted = (codes.to(torch.int16) + 128).to(torch.uint8)
    for fc2 in (chained.fc2, _int_mm_twin(chained).fc2):
        with torch.no_grad():
            torch.testing.assert_close(fc2(codes), fc2(shifted), rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(chained.fc2(codes), _int_mm_twin(chained).fc2(codes), rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not ONEDNN, reason="oneDNN's int8 GEMM runs on x86 CPUs")
def test_per_tensor_input_zero_point_runs_in_onednn():
    # symmetric weights with an asymmetric per-tensor input (a layer built directly: quantize_ uses one method for
    # both): oneDNN takes the input's zero point, where the _int_mm path corrects for it in int32
    torch.manual_seed(0)
    layer = QuantizedLinear(48, 20, activation_symmetric=False, activation_granularity="per_tensor")
    layer.load_state_dict(
        layer.state_dict()
        | {
            "qweight": torch.randint(-127, 128, (20, 48), dtype=torch.int8),
            "weight_scale": torch.rand(20) / 50,
            "bias": torch.randn(20),
            "act_scale": torch.tensor([0.03]),
            "act_zero_point": torch.tensor([-17.0]),
        }
    )
    assert layer._packed is not None
    x = torch.randn(30, 48) * 2 + 1
    with torch.no_grad():
        got, reference = layer(x), _int_mm_twin(layer)(x)
    torch.testing.assert_close(got, reference, rtol=0, atol=1e-5 * reference.abs().max().item())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("rows", [5, 64])  # _int_mm on CUDA needs more than 16 rows: 5 exercises the padding
def test_converted_linear_on_cuda_matches_cpu(rows):
    torch.manual_seed(0)
    layer = QATLinear(100, 12, weight_bit=4, activation_bit=8).eval()  # 100 and 12: not multiples of 8
    converted = QuantizedLinear.from_qat(layer)
    x = torch.randn(rows, 100)
    with torch.no_grad():
        cpu = converted(x)
        gpu = copy.deepcopy(converted).cuda()(x.cuda()).cpu()
        gpu_bf16 = copy.deepcopy(converted).cuda()(x.cuda().bfloat16()).float().cpu()
    torch.testing.assert_close(gpu, cpu, rtol=0, atol=1e-5 * cpu.abs().max().item())
    torch.testing.assert_close(gpu_bf16, cpu, rtol=0.02, atol=0.02)  # bf16 input: its own rounding, 8 bits


def test_dsa_ffn_quantizes_with_the_dense_ffn_patterns():
    dsa = pytest.importorskip("zoo.layers.dsa")
    torch.manual_seed(0)
    ffn = dsa.DSAFeedForward(32, 128, num_blocks=4, gate_threshold=0.5)
    block = TransformerBlock(32, 4, ffn=lambda d, h: ffn)
    qat = quantize_(nn.ModuleDict({"block": block}), weight_bit=8)
    assert qat["block"].ffn.fc1.weight_quant.bits == 4 and qat["block"].ffn.fc2.weight_quant.bits == 4
    assert qat["block"].ffn.gate.proj.weight_quant.bits == 8, "the gate is not an FFN layer"
    x = torch.randn(2, 10, 32)
    qat.eval()
    with torch.no_grad():
        expected = qat["block"](x)
        got = convert_(copy.deepcopy(qat))["block"](x)
    # the converted DSA FFN runs its dense path; a near-tie of the gate may pick another block for a token, so the
    # typical difference is what counts
    assert (got - expected).abs().median() < 1e-4
