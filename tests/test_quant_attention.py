"""zoo.quant.attention: the attention product on 8-bit codes, fake-quantized in training, integer after conversion."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from zoo.contracts import Tokens
from zoo.errors import ConfigError
from zoo.fusion import MIE
from zoo.kernels import int8_attention as vnni
from zoo.layers import ScaledDotProduct
from zoo.quant import (
    QATScaledDotProduct,
    QuantizedScaledDotProduct,
    calibrating,
    convert_,
    enable_fake_quant,
    load_converted,
    quantize_,
    restore_qat_layers,
    save_converted,
)
from zoo.quant.attention import codes_product, integer_attention_kernel

needs_vnni = pytest.mark.skipif(
    not vnni.available(), reason="zoo's int8 attention needs x86-64 with AVX-512 VNNI and cc"
)


def _qkv(batch=4, heads=2, length=37, head_dim=32, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    # [B, T, H, Dh] transposed, as SelfAttention's projection leaves them (not contiguous)
    return [
        (torch.randn(batch, length, heads, head_dim, generator=g) * s).transpose(1, 2).to(dtype)
        for s in (1.5, 1.5, 1.0)
    ]


def _masks(batch=4, length=37):
    allowed = torch.ones(batch, 1, length, length, dtype=torch.bool)
    allowed[:, :, :20, 20:] = False  # two modalities that do not see each other, as MIE's early layers
    allowed[:, :, 20:, :20] = False
    allowed[1, :, :, 30:] = False  # padding keys of one example
    allowed |= torch.eye(length, dtype=torch.bool)
    additive = torch.zeros(allowed.shape).masked_fill(~allowed, float("-inf"))
    return {"bool": allowed, "float": additive}


def _calibrated(q, k, v, mask, **config) -> QATScaledDotProduct:
    product = QATScaledDotProduct(**config).eval()
    with torch.no_grad(), calibrating(product):
        product(q, k, v, mask)
    return product


def _mie(depth=2, dim=64):
    return MIE(modalities=["image", "text"], dim=dim, depth=depth, num_heads=2, modality_fusion_layers=1)


def _tokens(batch=3, dim=64):
    g = torch.Generator().manual_seed(1)
    mask = torch.ones(batch, 7, dtype=torch.bool)
    mask[0, 5:] = False
    return {
        "image": Tokens(torch.randn(batch, 9, dim, generator=g), torch.ones(batch, 9, dtype=torch.bool)),
        "text": Tokens(torch.randn(batch, 7, dim, generator=g), mask),
    }


@pytest.mark.parametrize("mask_kind", ["bool", "float", None])
def test_product_with_fake_quant_off_is_float_sdpa(mask_kind):
    q, k, v = _qkv()
    mask = None if mask_kind is None else _masks()[mask_kind]
    product = _calibrated(q, k, v, mask)
    enable_fake_quant(product, False)
    with torch.no_grad():
        expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        torch.testing.assert_close(product(q, k, v, mask), expected)
        torch.testing.assert_close(ScaledDotProduct()(q, k, v, mask), expected)


def test_quantized_product_error_shrinks_with_bits_and_is_small_at_8():
    q, k, v = _qkv(length=64)
    mask = _masks(length=64)["bool"]
    expected = F.scaled_dot_product_attention(*(t.double() for t in (q, k, v)), attn_mask=mask)
    errors = {}
    for bits in (4, 6, 8):
        product = _calibrated(q, k, v, mask, bits=bits)
        with torch.no_grad():
            errors[bits] = ((product(q, k, v, mask).double() - expected).abs().mean() / expected.std()).item()
    assert errors[4] > errors[6] > errors[8], errors
    # at 8 bits: the output's own rounding (half a step of 1/127 of its range) plus the probabilities' (1/255)
    assert errors[8] < 0.03, errors


def test_probabilities_round_to_fixed_unsigned_steps_and_gradients_pass():
    q, k, v = (t.requires_grad_() for t in _qkv())
    product = QATScaledDotProduct(bits=8).train()
    product(q, k, v).sum().backward()
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in (q, k, v))
    assert all(quantizer.initialized for quantizer in product.act_quant.values())
    quant = product.act_quant
    with torch.no_grad():  # the probabilities on the 256 codes of scale 1/255, from the quantized operands
        logits = (quant["q"](q) @ quant["k"](k).transpose(-2, -1)) * 32**-0.5
        probs = torch.round(logits.softmax(-1) / torch.tensor(1 / 255)) * torch.tensor(1 / 255)
        expected = quant["out"](probs @ quant["v"](v))
        torch.testing.assert_close(product.eval()(q, k, v), expected, rtol=0, atol=1e-6)


def test_quantize_swaps_the_product_only_with_attention_bit():
    model = _mie()
    assert not any(isinstance(m, QATScaledDotProduct) for m in quantize_(copy.deepcopy(model)).modules())
    quantized = quantize_(copy.deepcopy(model), attention_bit=8)
    names = [n for n, m in quantized.named_modules() if isinstance(m, QATScaledDotProduct)]
    assert names == ["blocks.0.attn.sdpa", "blocks.1.attn.sdpa"]
    kept = quantize_(copy.deepcopy(model), attention_bit=8, overrides={"blocks.0": None})
    assert type(kept.blocks[0].attn.sdpa) is ScaledDotProduct
    assert isinstance(kept.blocks[1].attn.sdpa, QATScaledDotProduct)
    # a pattern that names attention products only is a pattern that matches
    kept = quantize_(copy.deepcopy(model), attention_bit=8, overrides={"blocks.1.attn.sdpa": None})
    assert isinstance(kept.blocks[0].attn.sdpa, QATScaledDotProduct)
    assert type(kept.blocks[1].attn.sdpa) is ScaledDotProduct


@pytest.mark.parametrize("bits", [0, 9, True, "8"])
def test_invalid_attention_bit_fails_naming_the_key(bits):
    with pytest.raises(ConfigError, match="attention_bit"):
        quantize_(_mie(), attention_bit=bits)


def test_qat_attention_restores_from_its_state_dict():
    torch.manual_seed(0)
    model = _mie()
    qat = quantize_(copy.deepcopy(model), attention_bit=8, activation_granularity="per_tensor").train()
    x = _tokens()
    qat(x)  # observes
    state = qat.eval().state_dict()
    fresh = copy.deepcopy(model)
    assert restore_qat_layers(fresh, state) > 0
    fresh.load_state_dict(state)
    assert isinstance(fresh.blocks[1].attn.sdpa, QATScaledDotProduct)
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x).pooled, qat(x).pooled)


def test_converted_product_equals_fake_quant_and_saves_with_weights_only(tmp_path):
    q, k, v = _qkv()
    mask = _masks()["float"]
    product = _calibrated(q, k, v, mask)
    converted = QuantizedScaledDotProduct.from_qat(product)
    converted.exact = True
    with torch.no_grad():
        assert torch.equal(converted(q, k, v, mask), product(q, k, v, mask))

    torch.manual_seed(0)
    model = _mie()
    qat = quantize_(copy.deepcopy(model), attention_bit=8, activation_granularity="per_tensor").eval()
    x = _tokens()
    with torch.no_grad(), calibrating(qat):
        qat(x)
    integer = convert_(copy.deepcopy(qat))
    assert isinstance(integer.blocks[0].attn.sdpa, QuantizedScaledDotProduct)
    path = tmp_path / "int.pt"
    save_converted(integer, path)
    loaded = load_converted(path, copy.deepcopy(model))
    assert isinstance(loaded.blocks[1].attn.sdpa, QuantizedScaledDotProduct)
    with torch.no_grad():
        assert torch.equal(loaded(x).pooled, integer(x).pooled)


@pytest.mark.parametrize("mask_kind", ["bool", "float", None])
def test_converted_product_without_the_kernel_runs_float_sdpa_on_the_codes(mask_kind):
    q, k, v = _qkv(length=64)
    mask = None if mask_kind is None else _masks(length=64)[mask_kind]
    converted = QuantizedScaledDotProduct.from_qat(_calibrated(q, k, v, mask))
    converted._has_vnni = False  # as on a CPU without AVX-512 VNNI or a C compiler
    exact = copy.deepcopy(converted)
    exact.exact = True
    with torch.no_grad(), torch.profiler.profile() as prof:
        got = converted(q, k, v, mask)
    ops = {event.key for event in prof.key_averages()}
    # one fused SDPA call, no [B, H, T, T] logits written out by two batched GEMMs
    assert any("scaled_dot_product" in op for op in ops) and not any("bmm" in op for op in ops), ops
    with torch.no_grad():
        double_mask = mask if mask is None or mask.dtype == torch.bool else mask.double()
        reference = F.scaled_dot_product_attention(*(t.double() for t in (q, k, v)), attn_mask=double_mask)
        error = (got.double() - reference).abs().mean().item()
        exact_error = (exact(q, k, v, mask).double() - reference).abs().mean().item()
    # what it drops is the probabilities' rounding to codes of 1/255, noise the model learnt to tolerate: without it
    # the output is closer to float attention than the trained arithmetic's
    assert error < exact_error, (error, exact_error)


@pytest.mark.parametrize("pv_dtype", [torch.float32, torch.bfloat16])
def test_compiled_product_on_a_cpu_without_the_kernel_runs_the_trained_arithmetic_on_the_codes(pv_dtype):
    q, k, v = _qkv()
    mask = _masks()["bool"]
    converted = QuantizedScaledDotProduct.from_qat(_calibrated(q, k, v, mask))
    converted._has_kernel = False  # as on a CPU without AMX, or without torchao
    converted._has_vnni = False  # and without AVX-512 VNNI or a C compiler
    converted._pv_dtype = pv_dtype  # bfloat16 where the CPU has AVX512-BF16
    exact = copy.deepcopy(converted)
    exact.exact = True
    torch._dynamo.reset()
    compiled = torch.compile(copy.deepcopy(converted), dynamic=False, fullgraph=True)
    with torch.no_grad(), torch.profiler.profile() as prof:
        got = compiled(q, k, v, mask)
    ops = {event.key for event in prof.key_averages()}
    assert any("bmm" in op for op in ops) and not any("scaled_dot_product" in op for op in ops), ops
    with torch.no_grad():
        expected, sdpa = exact(q, k, v, mask), converted(q, k, v, mask)  # eager: float SDPA on the codes
    out_scale = converted.scale[-1]
    steps = ((got - expected) / out_scale).round().abs()
    sdpa_steps = ((sdpa - expected) / out_scale).round().abs()
    if pv_dtype == torch.float32:  # every product of codes is exact: the trained arithmetic's codes
        assert steps.max() == 0, (steps > 0).float().mean()
    else:  # p v's sums rounded once to bfloat16: a code off by one here and there
        assert steps.max() <= 1 and (steps > 0).float().mean() < 0.06, (steps.max(), (steps > 0).float().mean())
    # float SDPA, which drops the probabilities' rounding, is further from the trained arithmetic
    assert (sdpa_steps > 0).float().mean() > 2 * (steps > 0).float().mean()


def test_compiled_product_on_the_codes_is_exact_under_cpu_autocast_and_leaves_gradients_to_float_sdpa():
    q, k, v = _qkv()
    mask = _masks()["bool"]
    converted = QuantizedScaledDotProduct.from_qat(_calibrated(q, k, v, mask))
    converted._has_kernel, converted._has_vnni, converted._pv_dtype = False, False, torch.float32
    exact = copy.deepcopy(converted)
    exact.exact = True
    torch._dynamo.reset()
    compiled = torch.compile(copy.deepcopy(converted), dynamic=False)
    with torch.no_grad():
        expected = exact(q, k, v, mask)
        with torch.autocast("cpu", dtype=torch.bfloat16):  # would round q k^T's sums to bfloat16
            got = compiled(q, k, v, mask)
    assert torch.equal(((got.float() - expected) / converted.scale[-1]).round(), torch.zeros_like(expected))
    # the codes' roundings pass no gradient: asked for one, the compiled product runs float SDPA on the codes
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    compiled(*leaves, mask).square().sum().backward()
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in leaves)


def test_compiled_product_with_float_sdpa_matches_eager():
    q, k, v = _qkv()
    mask = _masks()["bool"]
    converted = QuantizedScaledDotProduct.from_qat(_calibrated(q, k, v, mask))
    converted._has_kernel = False
    converted.float_sdpa = True
    torch._dynamo.reset()
    compiled = torch.compile(copy.deepcopy(converted), dynamic=False, fullgraph=True)
    with torch.no_grad():
        expected, got = converted(q, k, v, mask), compiled(q, k, v, mask)
    steps = ((got - expected) / converted.scale[-1]).round().abs()
    # one graph, and the same codes but where inductor's fused float arithmetic crosses a rounding boundary
    assert steps.max() <= 1 and (steps > 0).float().mean() < 0.01, (steps.max(), (steps > 0).float().mean())


def test_converted_product_below_8_bits_keeps_the_trained_arithmetic():
    q, k, v = _qkv()
    product = _calibrated(q, k, v, None, bits=6)
    converted = QuantizedScaledDotProduct.from_qat(product)
    with torch.no_grad():
        assert torch.equal(converted(q, k, v), product(q, k, v))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("exact", [False, True])
def test_converted_product_on_cuda_matches_cpu(exact):
    q, k, v = _qkv()
    mask = _masks()["bool"]
    converted = QuantizedScaledDotProduct.from_qat(_calibrated(q, k, v, mask))
    converted.exact = exact
    converted._has_vnni = False  # the CPU's path that CUDA shares: float SDPA on the codes, or the exact arithmetic
    with torch.no_grad():
        cpu = converted(q, k, v, mask)
        cuda = copy.deepcopy(converted).cuda()(q.cuda(), k.cuda(), v.cuda(), mask.cuda()).cpu()
    steps = ((cuda - cpu) / converted.scale[-1]).round().abs()
    # the same codes but where the kernels' float summation orders put a value across a rounding boundary
    assert steps.max() <= 1 and (steps > 0).float().mean() < 0.01, (steps.max(), (steps > 0).float().mean())


def test_unobserved_attention_refuses_to_convert():
    qat = quantize_(_mie(), attention_bit=8, activation_granularity="per_tensor").eval()
    with pytest.raises(ConfigError, match="blocks.0"):
        convert_(qat)


@pytest.mark.skipif(integer_attention_kernel() is None, reason="torchao's int8 attention needs torchao and AMX")
@pytest.mark.parametrize("heads", [2, 1])
def test_compiled_product_runs_the_integer_kernel_within_one_output_code(heads):
    from torch.profiler import profile

    q, k, v = _qkv(heads=heads)
    mask = _masks()["float"]
    converted = QuantizedScaledDotProduct.from_qat(_calibrated(q, k, v, mask)).eval()
    converted.exact = True  # the eager reference: the kernel's arithmetic, probabilities rounded to codes
    torch._dynamo.reset()
    compiled = torch.compile(copy.deepcopy(converted), dynamic=False)
    with torch.no_grad():
        compiled(q, k, v, mask)
        with profile() as prof:
            got = compiled(q, k, v, mask)
        expected = converted(q, k, v, mask)
    ops = {event.key for event in prof.key_averages()}
    # the reference arithmetic compiles to two batched GEMMs; the kernel computes both products itself. One head runs
    # the reference arithmetic (torchao's template cannot take the dequantization that inductor would fuse into it;
    # exact=True, copied with the module, keeps zoo's VNNI kernel off)
    assert any("bmm" in op for op in ops) == (heads == 1), ops
    out_scale = converted.scale[-1].item()
    steps = ((got - expected) / out_scale).round().abs()
    # same codes but for the softmax's float rounding, which moves a few probabilities across a rounding boundary
    assert steps.max() <= 1 and (steps > 0).float().mean() < 0.01, (steps.max(), (steps > 0).float().mean())


def _codes(shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-127, 128, shape, generator=g, dtype=torch.int8)


@needs_vnni
@pytest.mark.parametrize("length", [1, 16, 45])
@pytest.mark.parametrize("mask_kind", [None, "float", "per_head", "bool"])
def test_vnni_kernel_rounds_the_probabilities_as_the_trained_arithmetic(length, mask_kind):
    # v = the identity (codes 1) reads the probability codes P out of the output: out = P * v_scale
    batch, heads, head_dim = 2, 3, length if length % 4 == 0 else length + 3
    q, k = _codes((batch, heads, length, head_dim), 0), _codes((batch, heads, length, head_dim), 1)
    v = torch.eye(length, head_dim, dtype=torch.int8).expand(batch, heads, length, head_dim)
    mask = None
    if mask_kind is not None:
        g = torch.Generator().manual_seed(2)
        blocked = torch.rand(batch, heads if mask_kind == "per_head" else 1, length, length, generator=g) > 0.6
        blocked &= ~torch.eye(length, dtype=torch.bool)
        mask = ~blocked if mask_kind == "bool" else torch.zeros(blocked.shape).masked_fill(blocked, float("-inf"))
        if mask_kind == "per_head":
            mask = mask + torch.randn(mask.shape, generator=g)  # a finite bias per head, as MIE's learned schedule
    qk_scale, levels = 2e-3, 255
    got = vnni.int8_attention(q, k, v, mask, qk_scale, 1.0, levels)[..., :length]
    assert torch.equal(got, got.round())  # whole codes of 1 / levels
    logits = (q.double() @ k.double().transpose(-2, -1)) * qk_scale
    if mask is not None:
        logits = logits + (
            mask.double()
            if mask.dtype != torch.bool
            else torch.zeros(mask.shape).masked_fill(~mask, float("-inf")).double()
        )
    scaled = logits.softmax(-1) * levels
    expected = scaled.round()
    # the codes of a float64 softmax, but where float32's last bits put a value across a rounding boundary
    differ = got != expected
    assert (got - expected).abs().max() <= 1
    assert ((scaled[differ] - scaled[differ].floor() - 0.5).abs() < 1e-3).all()
    assert differ.float().mean() < 1e-3


@needs_vnni
@pytest.mark.parametrize("head_dim", [32, 24, 8])
@pytest.mark.parametrize("layout", ["contiguous", "split"])
def test_vnni_kernel_matches_the_product_on_the_codes(head_dim, layout):
    batch, heads, length = 4, 4, 117  # MIE's sequence in the VQA model: past several 16-wide blocks
    if layout == "contiguous":
        q, k, v = (_codes((batch, heads, length, head_dim), seed) for seed in range(3))
    else:  # views of one [B, T, H, 3, Dh] tensor, as the qkv projection's output is split
        q, k, v = _codes((batch, length, heads, 3, head_dim), 0).permute(3, 0, 2, 1, 4).unbind(0)
    mask = _masks(batch, length)["float"]
    scales = torch.tensor(0.011), torch.tensor(0.013), torch.tensor(0.02)
    got = vnni.int8_attention(q, k, v, mask, (0.011 * 0.013) * head_dim**-0.5, 0.02 / 255, 255)
    expected = codes_product((q.float(), k.float(), v.float()), scales, mask, prob_bits=8)  # exact p v in float32
    # float32's exp in the two differs in the last bits, which moves a probability code now and then: by one code
    one_code = 0.02 / 255 * 127
    differ = (got - expected).abs() > 1e-6
    assert (got - expected).abs().max() <= 2 * one_code and differ.float().mean() < 0.01


@needs_vnni
def test_vnni_kernel_gives_zeros_for_a_row_that_sees_nothing_and_refuses_bad_inputs():
    q, k, v = (_codes((1, 2, 5, 8), seed) for seed in range(3))
    mask = torch.zeros(5, 5)
    mask[2] = float("-inf")
    out = vnni.int8_attention(q, k, v, mask, 0.01, 0.01, 255)
    assert torch.equal(out[:, :, 2], torch.zeros(1, 2, 8)) and out[:, :, [0, 1, 3, 4]].abs().sum() > 0
    for empty in (slice(0, 0), slice(None)), (slice(None), slice(0, 0)):  # no examples; no tokens
        cut = (empty[0], slice(None), empty[1])
        out = vnni.int8_attention(q[cut], k[cut], v[cut], None, 0.01, 0.01, 255)
        assert out.shape == q[cut].shape and out.dtype == torch.float32
    with pytest.raises(ValueError, match="int8 CPU tensors"):
        vnni.int8_attention(q.float(), k, v, None, 0.01, 0.01, 255)
    with pytest.raises(ValueError, match="does not broadcast"):
        vnni.int8_attention(q, k, v, torch.zeros(4, 5), 0.01, 0.01, 255)
    with pytest.raises(ValueError, match=r"\[B, H, T, D\]"):
        vnni.int8_attention(q[0], k[0], v[0], None, 0.01, 0.01, 255)
    with pytest.raises(ValueError, match="D % 4"):
        vnni.int8_attention(q[..., :6], k[..., :6], v[..., :6], None, 0.01, 0.01, 255)


@needs_vnni
def test_converted_product_runs_the_vnni_kernel_eager_and_compiled_within_one_output_code():
    q, k, v = _qkv(length=45)
    mask = _masks(length=45)["float"]
    converted = QuantizedScaledDotProduct.from_qat(_calibrated(q, k, v, mask))
    converted._has_kernel = False  # torchao's AMX kernel, where there is one, is another test's
    exact = copy.deepcopy(converted)
    exact.exact = True
    torch._dynamo.reset()
    compiled = torch.compile(copy.deepcopy(converted), dynamic=False, fullgraph=True)
    out_scale = converted.scale[-1]
    with torch.no_grad():
        expected = exact(q, k, v, mask)
        for run in (converted, compiled):
            with torch.profiler.profile() as prof:
                got = run(q, k, v, mask)
            ops = {event.key for event in prof.key_averages()}
            assert "zoo::int8_attention" in ops and not any("bmm" in op or "scaled_dot" in op for op in ops), ops
            steps = ((got - expected) / out_scale).round().abs()
            # the trained arithmetic's codes but where exp's last bits move a probability across a rounding boundary
            assert steps.max() <= 1 and (steps > 0).float().mean() < 0.01, (steps.max(), (steps > 0).float().mean())
    # gradients, another bit width or asymmetric codes take the other paths
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    converted(*leaves, mask).sum().backward()
    assert all(t.grad is not None for t in leaves)
    asymmetric = QuantizedScaledDotProduct.from_qat(_calibrated(q, k, v, mask, quant_method="asymmetric"))
    assert not asymmetric._runs_vnni(q, k, v, 0.0)
    # cross-attention (keys of another length) takes the other paths too
    with torch.no_grad():
        memory = converted(q, k[:, :, :20], v[:, :, :20], None)
    assert memory.shape == q.shape


@needs_vnni
def test_converted_mie_on_the_vnni_kernel_matches_the_trained_arithmetic():
    torch.manual_seed(0)
    qat = quantize_(_mie(), attention_bit=8, activation_granularity="per_tensor").eval()
    x = _tokens()
    with torch.no_grad(), calibrating(qat):
        qat(x)
    integer = convert_(copy.deepcopy(qat))
    exact = copy.deepcopy(integer)
    for layer in exact.modules():
        if isinstance(layer, QuantizedScaledDotProduct):
            layer.exact = True
    with torch.no_grad(), torch.profiler.profile() as prof:
        got = integer(x).pooled
    assert "zoo::int8_attention" in {event.key for event in prof.key_averages()}
    with torch.no_grad():
        torch.testing.assert_close(got, exact(x).pooled, atol=0.02, rtol=0)
