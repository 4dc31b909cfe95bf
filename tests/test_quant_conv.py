"""zoo.quant for convolutions: QATConv2d, batch-norm folding, the integer convolution and its saved form."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from zoo.encoders import ConvImageEncoder
from zoo.errors import ConfigError
from zoo.quant import (
    QATConv2d,
    QuantizedConv2d,
    calibrate,
    calibrating,
    convert_,
    load_converted,
    quant_range,
    quantize_,
    save_converted,
    set_schedule_bits,
    state_dict_bytes,
    weight_quant_error,
)
from zoo.quant.kernels import onednn_available

ONEDNN = onednn_available(torch.device("cpu"))


def _stem(seed: int = 0, *, negative_gamma: bool = True) -> nn.Module:
    """A float ConvImageEncoder whose batch norms hold trained-looking statistics (some scales negative)."""
    torch.manual_seed(seed)
    encoder = ConvImageEncoder(channels=(8, 16), dim=24).train()
    with torch.no_grad():
        for _ in range(3):
            encoder(torch.randn(8, 3, 21, 21))
        for bn in encoder.modules():
            if isinstance(bn, nn.BatchNorm2d):
                bn.weight.uniform_(-1.5 if negative_gamma else 0.5, 1.5)
                bn.bias.uniform_(-0.5, 0.5)
    return encoder.eval()


def _calibrated(model: nn.Module, **quant) -> nn.Module:
    qat = quantize_(copy.deepcopy(model), overrides={}, **({"conv_bit": 8} | quant))
    with torch.no_grad(), calibrating(qat):
        for seed in range(3):
            qat(torch.randn(8, 3, 21, 21, generator=torch.Generator().manual_seed(seed)))
    return qat


@pytest.mark.parametrize("bits", [2, 4, 6, 8])
def test_conv_weight_fake_quant_error_within_half_a_step_per_output_channel(bits):
    torch.manual_seed(bits)
    conv = nn.Conv2d(6, 5, 3, padding=1)
    with torch.no_grad():
        conv.weight.mul_(torch.logspace(-2, 1, 5)[:, None, None, None])  # per-channel ranges over three decades
    layer = QATConv2d.from_conv(conv, weight_bit=bits)
    w64 = conv.weight.detach().double()
    w_hat = layer.weight_quant(conv.weight.flatten(1)).double().view_as(w64)
    step = w64.abs().amax((1, 2, 3)) / quant_range(bits, True)[1]  # symmetric, per output channel
    error = (w_hat - w64).abs().amax((1, 2, 3))
    assert (error <= step / 2 + 1e-7).all(), (error, step)
    assert weight_quant_error(layer) > 0
    built = QATConv2d(6, 5, 3, padding=1, weight_bit=bits, dtype=torch.float64)  # nn.Conv2d's arguments, and the bits
    assert built(torch.randn(2, 6, 8, 8, dtype=torch.float64)).shape == (2, 5, 8, 8)
    assert built.weight_quant.bits == bits and built.padding == (1, 1)


def test_quantize_swaps_plain_zero_padded_convs_only():
    class SameConv(nn.Conv2d):  # like timm's Conv2dSame: pads in forward
        pass

    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.Conv2d(4, 4, 3, padding="same"),
        nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"),
        SameConv(4, 4, 3),
        nn.Flatten(),
        nn.Linear(4, 2),
    )
    quantize_(model, overrides={}, conv_bit=8)
    assert [type(m).__name__ for m in model][:4] == ["QATConv2d", "Conv2d", "Conv2d", "SameConv"]
    assert model[0].weight_quant.bits == 8 and model[0].act_quant.granularity == "per_tensor"
    floats = quantize_(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Linear(4, 2)), overrides={})
    assert type(floats[0]) is nn.Conv2d and type(floats[1]).__name__ == "QATLinear", "convolutions are opt-in"


def test_conv_overrides_and_invalid_conv_bit():
    model = _stem()
    quantize_(model, overrides={"stages.0": {"weight_bit": 6, "quant_method": "asymmetric"}}, conv_bit=4)
    first, second = model.stages[0], model.stages[3]
    assert first.target_weight_bit == 6 and not first.act_quant.symmetric
    assert first.weight_quant.symmetric, "conv weights stay symmetric, as oneDNN's int8 convolution takes them"
    assert second.target_weight_bit == 4 and model.proj.target_weight_bit == 4
    assert set_schedule_bits(model, 8)["stages.3"] == 8
    with pytest.raises(ConfigError, match="conv_bit"):
        quantize_(_stem(), conv_bit=9)


@pytest.mark.parametrize("method", ["symmetric", "asymmetric"])
@pytest.mark.parametrize("conv_bit", [8, 4])
@pytest.mark.parametrize("onednn", [True, False])
def test_converted_stem_with_folded_batch_norm_matches_fake_quant(method, conv_bit, onednn):
    if onednn and not ONEDNN:
        pytest.skip("oneDNN's int8 convolution runs on x86 CPUs")
    qat = _calibrated(_stem(), conv_bit=conv_bit, quant_method=method).eval()
    converted = convert_(copy.deepcopy(qat))
    stages = converted.stages
    assert [type(m).__name__ for m in stages] == ["QuantizedConv2d", "Identity", "Identity"] * 2
    assert stages[0].folded_batch_norm and stages[0].activation == "relu" and stages[0]._codes_for == (stages[3],)
    assert stages[3].activation == "relu" and not stages[3]._codes_for  # the projection sits outside the Sequential
    if not onednn:
        for m in converted.modules():
            if isinstance(m, QuantizedConv2d):
                m._packed = None
    x = torch.randn(5, 3, 21, 21)
    with torch.no_grad():
        expected, got = qat(x).embeddings, converted(x).embeddings
    # the integer path rounds the same codes; only float summation order and a rare code at a rounding tie differ
    torch.testing.assert_close(got, expected, rtol=0, atol=0.02 * expected.abs().max().item())
    assert (got - expected).norm() / expected.norm() < 2e-3


def test_int8_convolution_equals_its_float_reference():
    # the oneDNN path against the dequantized float convolution of the same codes, layer by layer (no chaining)
    if not ONEDNN:
        pytest.skip("oneDNN's int8 convolution runs on x86 CPUs")
    qat = _calibrated(_stem(), quant_method="asymmetric")
    converted = convert_(copy.deepcopy(qat), fuse=False)
    conv = converted.stages[3]
    x = torch.relu(torch.randn(4, 8, 11, 11))
    reference = copy.deepcopy(conv)
    reference._packed = None
    with torch.no_grad():
        torch.testing.assert_close(conv(x), reference(x), rtol=1e-5, atol=1e-4)


def test_converted_conv_weights_pack_four_bits():
    model = _stem()
    converted = convert_(_calibrated(model, conv_bit=4))
    conv = converted.stages[3]
    assert conv.qweight.dtype == torch.uint8 and conv.qweight.shape == (16, 8 * 9 // 2)
    assert conv.int_weight().shape == (16, 8, 3, 3)
    assert conv.qweight.nbytes * 8 == model.stages[3].weight.nbytes, "two 4-bit codes per byte"
    assert state_dict_bytes(converted) < state_dict_bytes(model)


def test_converted_stem_saves_and_loads_with_weights_only(tmp_path):
    model = _stem()
    converted = convert_(_calibrated(model, conv_bit=4, quant_method="asymmetric"))
    path = tmp_path / "stem.pt"
    save_converted(converted, path)
    artefact = torch.load(path, weights_only=True)
    assert not any(k.startswith("stages.1.") for k in artefact["state_dict"]), "the folded batch norm is not saved"
    loaded = load_converted(path, _stem(seed=1))  # a float model of the same architecture, other weights
    assert type(loaded.stages[1]) is nn.Identity and loaded.stages[0]._codes_for == (loaded.stages[3],)
    x = torch.randn(3, 3, 21, 21)
    with torch.no_grad():
        assert torch.equal(loaded(x).embeddings, converted(x).embeddings)


def test_deepcopy_keeps_the_chain_and_the_prepacked_weight():
    converted = convert_(_calibrated(_stem()))
    copied = copy.deepcopy(converted)
    assert copied.stages[0]._codes_for[0] is copied.stages[3]
    x = torch.randn(2, 3, 21, 21)
    with torch.no_grad():
        assert torch.equal(copied(x).embeddings, converted(x).embeddings)


def test_unobserved_conv_inputs_refuse_to_convert_and_calibrate_runs_for_per_token_models():
    qat = quantize_(_stem(), overrides={}, activation_granularity="per_token", conv_bit=8)
    with pytest.raises(ConfigError, match="observed no data"):
        convert_(copy.deepcopy(qat))

    class Task(nn.Module):
        def __init__(self, encoder):
            super().__init__()
            self.encoder = encoder

        def predict_step(self, batch, batch_idx):
            return self.encoder(batch)

    task = Task(qat)
    assert calibrate(task, [torch.randn(4, 3, 21, 21) for _ in range(5)], 2) == 2
    convert_(task)


def test_qat_conv_trains_and_restores_from_its_state_dict():
    from zoo.quant import restore_qat_layers

    qat = quantize_(_stem(), overrides={}, learnable_scales=True, conv_bit=8).train()
    qat(torch.randn(4, 3, 21, 21)).embeddings.sum().backward()
    conv = qat.stages[0]
    assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0
    assert conv.act_quant.scale.grad is not None
    fresh = _stem(seed=1)
    assert restore_qat_layers(fresh, qat.state_dict()) == 3
    fresh.load_state_dict(qat.state_dict())
    assert isinstance(fresh.stages[3], QATConv2d) and fresh.stages[3].act_quant.learnable


@pytest.mark.skipif(not ONEDNN, reason="oneDNN's int8 convolution runs on x86 CPUs")
def test_compiled_converted_stem_runs_onednn_convolutions_when_frozen():
    from torch.profiler import profile

    converted = convert_(_calibrated(_stem()))
    x = torch.randn(4, 3, 21, 21)
    torch._dynamo.reset()
    with torch.no_grad(), torch._inductor.config.patch(freezing=True):
        compiled = torch.compile(copy.deepcopy(converted), dynamic=False)
        compiled(x)
        with profile() as prof:
            got = compiled(x).embeddings
        expected = converted(x).embeddings
    assert "onednn::qconv2d_pointwise" in {event.key for event in prof.key_averages()}
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4 * expected.abs().max().item())


def test_converted_layers_name_the_expected_input_shape():
    from zoo.quant import QuantizedLinear

    converted = convert_(_calibrated(_stem()))
    with pytest.raises(ValueError, match=r"expected input \[B, 3, H, W\], got \[2, 4, 21, 21\]"):
        converted(torch.randn(2, 4, 21, 21))
    linear = convert_(quantize_(nn.Linear(6, 4), overrides={}))
    assert isinstance(linear, QuantizedLinear)
    with pytest.raises(ValueError, match=r"expected input \[\.\.\., 6\], got \[3, 5\]"):
        linear(torch.randn(3, 5))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_converted_stem_on_cuda_matches_cpu():
    # on CUDA the convolutions run in floating point on the dequantized codes (no int8 convolution there)
    converted = convert_(_calibrated(_stem(), conv_bit=4))
    x = torch.randn(3, 3, 21, 21)
    with torch.no_grad():
        cpu = converted(x).embeddings
        gpu = copy.deepcopy(converted).cuda()
        got = gpu(x.cuda()).embeddings.cpu()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            got_bf16 = gpu(x.cuda()).embeddings.float().cpu()
    assert all(m._packed is None for m in gpu.modules() if isinstance(m, QuantizedConv2d))
    # cuDNN's float convolution (TF32 by default) may round an intermediate code the other way at a tie
    torch.testing.assert_close(got, cpu, rtol=0, atol=0.02 * cpu.abs().max().item())
    assert (got - cpu).norm() / cpu.norm() < 5e-3
    assert (got_bf16 - cpu).norm() / cpu.norm() < 0.05  # bf16 convolutions: their own rounding


def _conv1d_stack(seed: int = 0) -> nn.Module:
    """Conv1d -> BatchNorm1d -> ReLU -> Conv1d -> ReLU, with trained-looking batch-norm statistics."""
    torch.manual_seed(seed)
    stack = nn.Sequential(
        nn.Conv1d(6, 12, 3, stride=2, padding=1, bias=False),
        nn.BatchNorm1d(12),
        nn.ReLU(),
        nn.Conv1d(12, 10, 5, padding=2, dilation=1),
        nn.ReLU(),
    ).train()
    with torch.no_grad():
        for _ in range(3):
            stack(torch.randn(8, 6, 30))
        stack[1].weight.uniform_(-1.5, 1.5)
    return stack.eval()


@pytest.mark.parametrize("conv_bit", [8, 4])
def test_conv1d_stack_converts_with_folded_batch_norm_and_saves(conv_bit, tmp_path):
    from zoo.quant import QATConv1d, QuantizedConv1d

    qat = quantize_(_conv1d_stack(), overrides={}, conv_bit=conv_bit, quant_method="asymmetric")
    assert isinstance(qat[0], QATConv1d) and qat[0].target_weight_bit == conv_bit
    with torch.no_grad(), calibrating(qat):
        for _ in range(3):
            qat(torch.randn(8, 6, 30))
    converted = convert_(copy.deepcopy(qat))
    assert isinstance(converted[0], QuantizedConv1d) and type(converted[1]) is nn.Identity
    assert converted[0]._codes_for == (converted[3],) and converted[3].activation == "relu"
    x = torch.randn(4, 6, 30)
    with torch.no_grad():
        expected, got = qat(x), converted(x)
    assert got.shape == expected.shape == (4, 10, 15)
    torch.testing.assert_close(got, expected, rtol=0, atol=0.02 * expected.abs().max().item())
    assert (got - expected).norm() / expected.norm() < 2e-3
    path = tmp_path / "stack.pt"
    save_converted(converted, path)
    loaded = load_converted(path, _conv1d_stack(seed=1))
    with torch.no_grad():
        assert torch.equal(loaded(x), got)
    with pytest.raises(ValueError, match=r"expected input \[B, 6, L\]"):
        converted(torch.randn(4, 6, 5, 5))


def test_audio_encoder_quantizes_its_conv1d_stem():
    from zoo.encoders import SpectrogramAudioEncoder
    from zoo.quant import QuantizedConv1d

    torch.manual_seed(0)
    encoder = SpectrogramAudioEncoder(n_mels=16, dim=32, depth=1, num_heads=4).eval()
    inputs = {"waveform": torch.randn(3, 8000), "lengths": torch.tensor([8000, 6000, 3000])}
    qat = quantize_(copy.deepcopy(encoder), weight_bit=8, overrides={}, conv_bit=8)
    with torch.no_grad(), calibrating(qat):
        qat(inputs)
    converted = convert_(copy.deepcopy(qat))
    assert [type(m) for m in converted.stem][::2] == [QuantizedConv1d, QuantizedConv1d]
    assert converted.stem[0].activation is None, "GELU stays separate: oneDNN's int8 convolution has no GELU post-op"
    with torch.no_grad():
        expected, got = qat(inputs), converted(inputs)
    assert torch.equal(got.mask, expected.mask)
    assert (got.embeddings - expected.embeddings).norm() / expected.embeddings.norm() < 1e-2


def test_grouped_dilated_and_strided_convolutions_convert_exactly():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=8, bias=False),  # depthwise, dilated
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 16, (1, 3), stride=(1, 2), padding=(0, 1), groups=2),  # grouped, rectangular, strided
        nn.ReLU(),
    ).eval()
    with torch.no_grad():
        model[1].running_mean.uniform_(-1, 1)
        model[1].running_var.uniform_(0.5, 2)
        model[1].weight.uniform_(-1, 1)
    qat = quantize_(copy.deepcopy(model), overrides={}, conv_bit=8)
    with torch.no_grad(), calibrating(qat):
        for _ in range(3):
            qat(torch.randn(4, 8, 12, 12))
    converted = convert_(copy.deepcopy(qat))
    assert converted[0]._codes_for == (converted[3],)
    x = torch.randn(4, 8, 12, 12)
    with torch.no_grad():
        expected, got = qat(x), converted(x)
    assert got.shape == (4, 16, 12, 6)
    torch.testing.assert_close(got, expected, rtol=0, atol=0.02 * expected.abs().max().item())
    assert (got - expected).norm() / expected.norm() < 2e-3
