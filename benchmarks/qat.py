"""Quantization of the VQA model (MIE, ``cli_configs/vqa.yaml``): accuracy, size on disk and latency of float,
post-training-quantized and quantization-aware-trained variants, each integer model against the float one in the
same run.

``--mode latency`` (any machine, a fresh model or ``--ckpt``): converted integer models against the float model,
timed side by side (rounds interleaved, medians and the median of per-round ratios), on the CPU against fp32 and on
a GPU against bf16 autocast, eager and ``torch.compile``d (on the CPU with inductor freezing, so that compiled
integer layers keep oneDNN's GEMM); on the CPU also the integer model on ``torch._int_mm`` (the kernel before the
oneDNN packing), the per-tensor model without the FFN fusion and with its convolutions in float (their shares), and
the float model in bf16, eager and compiled, for reference; sizes on disk; the layer-level 768 -> 3072 -> 768
FFN on 2048 tokens; and the whole VQA forward at several batch sizes (``--sweep-batches``, default 16 64 256).
Every integer policy quantizes the image encoder's convolutions too (``conv_bit`` 8). Writes
``benchmarks/results/qat_latency_<device>_<date>.json``::

    python benchmarks/qat.py --mode latency                       # CPU here (about 4 minutes on 2 quiet cores)
    python benchmarks/qat.py --mode latency --device cuda         # H200: bf16 baseline
    python benchmarks/qat.py --mode latency --sweep-only --sweep-batches 64 256   # the whole VQA forward alone
    python benchmarks/qat.py --mode latency --attention-only      # the attention product alone (CPU)

``--mode profile`` (CPU by default): where the time of one VQA forward goes, fp32 against the converted int8 model
(and, on the CPU, the compiled int8 model with bf16 float operations against the float model compiled in bf16),
from ``torch.profiler`` (self time per operator, per forward); the share of the GEMMs and the bound it puts on any
speed-up from integer GEMMs alone (Amdahl: total / (total - GEMM time)). Writes ``qat_profile_<device>_<date>.json``::

    python benchmarks/qat.py --mode profile

``--mode accuracy`` (GPU): trains each variant through the zoo CLI (``ZooCLI`` on vqa.yaml / vqa_qat.yaml, one
subprocess per run, in parallel with ``--parallel``), tests the final model fake-quantized and converted, and times
float against integer inference on the test batches (on the run's device: the GPU against bf16, or the CPU against
fp32). Variants: ``float``; ``ptq_mixed``/``ptq_w4`` (the float run quantized after training: mixed W8 attention/W4
FFN-A8, and W4A8 everywhere); ``qat_fixed4`` (W4A8 everywhere, schedule [4]); ``qat_progressive`` (W4A8
everywhere, 8 -> 6 -> 4); ``qat_mixed`` (W8 attention/W4 FFN-A8, 8 -> 6 -> 4, the shipped vqa_qat.yaml policy);
``qat_mixed_per_tensor`` and ``ptq_mixed_per_tensor`` (the mixed policy with static per-tensor input scales, the
fastest integer path on x86 CPUs; PTQ observes them on 16 training batches). ``--ptq`` picks the post-training
variants (default: all but the low-bit ones). Run only when named: ``qat_w3ffn``/``ptq_w3ffn``, ``qat_w2ffn``/
``ptq_w2ffn`` and ``qat_a4``/``ptq_a4``, the shipped policy (``*_mixed_per_tensor_attention``) with FFN weights at 3
or 2 bits, or every input at 4 bits (``LOW_BITS``): where PTQ is expected to lose what QAT can recover;
``ptq_a4_mse`` calibrates the 4-bit input ranges with the MSE observer (``activation_observer="mse"``).

By default each QAT run trains from scratch as vqa_qat.yaml does (float for the first half, then the stages). With
``--finetune-epochs N`` the float run goes first and every QAT run starts from its final weights
(``initial_checkpoint``; vqa_qat_finetune.yaml, fake-quantized from the first step) for N epochs at
``--finetune-lr``, beside ``float_finetune``, the float run continued alike without quantization: the usual QAT
recipe, and the fair comparison with PTQ, which quantizes the very same float weights. Writes
``qat_accuracy_<device>_<date>.json``::

    python benchmarks/qat.py --mode accuracy --epochs 16 --parallel                        # H200, bf16-mixed
    python benchmarks/qat.py --mode accuracy --epochs 14 --finetune-epochs 1 --batch-size 256 --parallel  # H200
    python benchmarks/qat.py --mode accuracy --epochs 1 --limit-train-batches 30           # CPU smoke run
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

import torch  # noqa: E402
import torch._inductor.config  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from _common import (  # noqa: E402
    ValidationHistory,
    cpu_model,
    finished_runs,
    launch,
    table,
    training_overrides,
    write_result,
)
from torch import Tensor, nn  # noqa: E402

from zoo.contracts import Tokens  # noqa: E402
from zoo.fusion import MIE  # noqa: E402
from zoo.kernels.int8_attention import available as int8_attention_available  # noqa: E402
from zoo.kernels.int8_attention import int8_attention  # noqa: E402
from zoo.quant import (  # noqa: E402
    DEFAULT_OVERRIDES,
    QuantizedLinear,
    QuantizedScaledDotProduct,
    calibrate,
    calibrating,
    convert_,
    converted_layers,
    load_converted,
    quantize_,
    save_converted,
    state_dict_bytes,
)
from zoo.quant.attention import integer_attention_kernel  # noqa: E402
from zoo.quant.convert import onednn_int8_mm, onednn_prepack  # noqa: E402

#: the integer variants, as quantize_ arguments: "mixed" is vqa_qat.yaml's policy (attention 8, FFN 4, the rest 8);
#: inputs are quantized per token (dynamic) unless the name ends in "_per_tensor" (static scales, observed)
POLICIES = {
    "int8": {"weight_bit": 8, "activation_bit": 8, "overrides": {}, "conv_bit": 8},
    "mixed": {"weight_bit": 8, "activation_bit": 8, "overrides": dict(DEFAULT_OVERRIDES), "conv_bit": 8},
    "w4": {"weight_bit": 4, "activation_bit": 8, "overrides": {}, "conv_bit": 8},
}
POLICIES |= {
    f"{name}_per_tensor": {**policy, "activation_granularity": "per_tensor"} for name, policy in POLICIES.items()
}
#: attention's products on 8-bit codes as well (zoo.quant.attention; torchao's AMX kernel when compiled on the CPU)
POLICIES |= {
    f"{name}_attention": {**POLICIES[name], "attention_bit": 8} for name in ("int8_per_tensor", "mixed_per_tensor")
}
#: the convolutions (the image encoder's stem, 8-bit in every policy above, as in the QAT configs) left in float:
#: their share
POLICIES["int8_per_tensor_float_convs"] = {**POLICIES["int8_per_tensor"], "conv_bit": None}
#: below the issue's bits, where post-training quantization is expected to lose what QAT can recover: the shipped
#: policy (mixed_per_tensor_attention) with FFN weights at 3 or 2 bits (ranges fitted by the MSE observer, PTQ and QAT
#: alike: at these bits a min-max range rounds most weights to zero), or with every linear's and convolution's input
#: at 4 bits (attention's operands stay at 8)
LOW_BITS = {
    **{
        f"w{b}ffn": {
            **POLICIES["mixed_per_tensor_attention"],
            "overrides": {**DEFAULT_OVERRIDES, "*.ffn.fc1": b, "*.ffn.fc2": b},
            "observer": "mse",
        }
        for b in (3, 2)
    },
    "a4": {**POLICIES["mixed_per_tensor_attention"], "activation_bit": 4},
}
#: the same with each input's range clipped where its squared error is least (PTQ's calibrator for 4-bit inputs)
LOW_BITS["a4_mse"] = {**LOW_BITS["a4"], "activation_observer": "mse"}
POLICIES |= LOW_BITS
#: accuracy variants: config, QAT schedule and quantize_ arguments (None: a float run), PTQ policies of the float runs.
#: float_finetune (with --finetune-epochs only) continues the float run as the QAT fine-tunes do, without
#: quantization: what the extra epochs alone give, and the weights of a second PTQ baseline (ptq_*_ft).
TRAINED = {
    "float": ("vqa.yaml", None, None),
    "float_finetune": ("vqa.yaml", None, None),
    "qat_fixed4": ("vqa_qat.yaml", [4], POLICIES["w4"]),
    "qat_progressive": ("vqa_qat.yaml", [8, 6, 4], POLICIES["w4"]),
    "qat_mixed": ("vqa_qat.yaml", [8, 6, 4], POLICIES["mixed"]),
    "qat_mixed_per_tensor": ("vqa_qat.yaml", [8, 6, 4], POLICIES["mixed_per_tensor"]),
    "qat_mixed_per_tensor_attention": ("vqa_qat.yaml", [8, 6, 4], POLICIES["mixed_per_tensor_attention"]),
    "qat_w3ffn": ("vqa_qat.yaml", [8, 6, 3], LOW_BITS["w3ffn"]),
    "qat_w2ffn": ("vqa_qat.yaml", [8, 4, 2], LOW_BITS["w2ffn"]),
    "qat_a4": ("vqa_qat.yaml", [8, 6, 4], LOW_BITS["a4"]),
}
PTQ = {
    "ptq_mixed": POLICIES["mixed"],
    "ptq_w4": POLICIES["w4"],
    "ptq_mixed_per_tensor": POLICIES["mixed_per_tensor"],
    "ptq_mixed_per_tensor_attention": POLICIES["mixed_per_tensor_attention"],
    **{f"ptq_{name}": policy for name, policy in LOW_BITS.items()},
}
#: training batches the per-tensor input scales of a PTQ variant are observed on
CALIBRATION_BATCHES = 16


# -- timing ------------------------------------------------------------------------------------------------------------
def side_by_side(
    fns: dict[str, Callable[[], Any]], *, reps: int, device: str, base: str, inference: bool = True
) -> dict[str, dict]:
    """Time every function in interleaved rounds (so that load from other processes hits all alike): per function the
    median milliseconds, the ratio of medians against ``base`` and the median of the per-round ratios. ``inference``:
    under ``torch.inference_mode`` (false for training steps)."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    times: dict[str, list[float]] = {name: [] for name in fns}
    with torch.inference_mode(inference):
        for fn in fns.values():  # warm-up (and compilation)
            fn(), fn()
        sync()
        for _ in range(reps):
            for name, fn in fns.items():
                sync()
                start = time.perf_counter()
                fn()
                sync()
                times[name].append(time.perf_counter() - start)
    out = {}
    for name, ts in times.items():
        ratios = [b / t for b, t in zip(times[base], ts, strict=True)]
        out[name] = {
            "median_ms": round(1e3 * statistics.median(ts), 3),
            "speedup_vs_" + base: round(statistics.median(times[base]) / statistics.median(ts), 3),
            "median_round_speedup": round(statistics.median(ratios), 3),
        }
    return out


def _compiled(model: nn.Module, *, whole_fusion: bool = True) -> nn.Module:
    """A copy of ``model`` compiled as a task's ``compile: true`` compiles it (``zoo.compile.compile_regions``: MIE
    as one graph, the image encoder, the text encoder's block; the tokenizer stays eager), with static shapes: the
    text encoder's and MIE's blocks see different lengths, and automatic dynamic shapes after that recompile made the
    fp32 blocks several times slower on the CPU. ``whole_fusion=False``: MIE's blocks one by one. A module with none
    of those regions (the FFN layer) is compiled whole."""
    from zoo.compile import compile_regions

    # the blocks compiled one by one share one code object; each model, mask kind and thread count adds a graph to
    # its cache
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 128)
    torch._dynamo.config.accumulated_recompile_limit = max(torch._dynamo.config.accumulated_recompile_limit, 1024)
    model = copy.deepcopy(model)
    if not compile_regions(model, whole_fusion=whole_fusion, dynamic=False):
        return torch.compile(model, dynamic=False)
    return model


# -- latency mode ------------------------------------------------------------------------------------------------------
def _vqa_model(args) -> nn.Module:
    if args.ckpt:
        from zoo.quant.convert import instantiate_from_hparams
        from zoo.quant.qat import restore_qat_layers

        checkpoint = torch.load(args.ckpt, map_location="cpu", weights_only=True)
        model = instantiate_from_hparams(checkpoint.get("hyper_parameters"), source=args.ckpt)
        if restore_qat_layers(model, checkpoint["state_dict"]):
            raise SystemExit("--ckpt: give a float checkpoint (the benchmark quantizes it with each policy)")
        model.load_state_dict(checkpoint["state_dict"])
        return model.eval()
    from zoo.cli import ZooCLI, resolve_config_args

    cli = ZooCLI(args=resolve_config_args(["--config", args.config, "--trainer.logger=false"]), run=False)
    return cli.model.eval()


def _questions(batch: int) -> list[str]:
    from datamodules.sort_of_clevr import question_text

    return [question_text(i % 2, (i // 2) % 3, (i // 6) % 6) for i in range(batch)]


def _integer(model: nn.Module, policy: str, inputs: Any, *, fuse: bool = True) -> nn.Module:
    """``model`` quantized with ``POLICIES[policy]`` after training (per-tensor input scales observed on ``inputs``)
    and converted (``fuse``: with its FFNs fused, ``zoo.quant.fuse_feedforward_``)."""
    qat = quantize_(copy.deepcopy(model).eval(), **POLICIES[policy])
    with torch.no_grad(), calibrating(qat):
        qat(inputs)
    return convert_(qat, fuse=fuse)


def _integer_models(model: nn.Module, out_dir: Path, inputs: Any) -> tuple[dict[str, nn.Module], dict[str, dict]]:
    models, sizes = {}, {}
    float_bytes = state_dict_bytes(model)
    sizes["float"] = {"bytes": float_bytes, "fraction_of_float": 1.0}
    for name in ("int8", "mixed", "int8_per_tensor", "int8_per_tensor_attention"):
        converted = _integer(model, name, inputs)
        path = out_dir / f"qat_bench_{name}.pt"
        size = save_converted(converted, path)
        path.unlink()
        sizes[name] = {"bytes": size, "fraction_of_float": round(size / float_bytes, 4)}
        models[name] = converted
    return models, sizes


def _linear_weight_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes of the Linear layers' weights alone (float32), the part quantization shrinks most."""
    return {"linear_weights_fp32": sum(4 * m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))}


def _ffn_layer(device: str, reps: int, compile_: bool) -> dict:
    """The layer-level claim: a 768 -> 3072 -> 768 FFN on 2048 tokens, float against int8 (W8A8, inputs per token or
    per tensor)."""
    torch.manual_seed(0)
    ffn = nn.Sequential(nn.Linear(768, 3072), nn.GELU(), nn.Linear(3072, 768)).to(device).eval()
    x = torch.randn(2048, 768, device=device)
    int8, int8_per_tensor = (_integer(ffn, policy, x) for policy in ("int8", "int8_per_tensor"))
    a, h = (torch.randint(-127, 128, shape, dtype=torch.int8, device=device) for shape in ((2048, 768), (2048, 3072)))
    w1, w2 = (torch.randint(-127, 128, shape, dtype=torch.int8, device=device) for shape in ((768, 3072), (3072, 768)))
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    base = "bf16" if device == "cuda" else "fp32"
    af, hf, w1f, w2f = (t.to(dtype) for t in (a, h, w1, w2))
    modules = {base: ffn, "int8": int8, "int8_per_tensor": int8_per_tensor}
    if compile_:
        modules |= {
            f"{base}_compiled": _compiled(ffn),
            "int8_compiled": _compiled(int8),
            "int8_per_tensor_compiled": _compiled(int8_per_tensor),
        }
    fns = {name: _call(m, x, dtype if device == "cuda" else None, device) for name, m in modules.items()}
    fns |= {
        f"{base} GEMMs alone": lambda: (af @ w1f, hf @ w2f),
        "int8 GEMMs alone (torch._int_mm)": lambda: (torch._int_mm(a, w1), torch._int_mm(h, w2)),
    }
    if device == "cpu":  # the kernel QuantizedLinear runs on x86: oneDNN's GEMM on weights prepacked once
        p1, p2 = (onednn_prepack(w.t().contiguous()) for w in (w1, w2))
        s1, s2 = torch.ones(3072), torch.ones(768)
        z1, z2 = torch.zeros(3072, dtype=torch.int64), torch.zeros(768, dtype=torch.int64)
        fns["int8 GEMMs alone (oneDNN, prepacked)"] = lambda: (
            onednn_int8_mm(a, p1, s1, z1),
            onednn_int8_mm(h, p2, s2, z2),
        )
    return {"shape": "768 -> 3072 -> 768 FFN, 2048 tokens", **side_by_side(fns, reps=reps, device=device, base=base)}


def _attention_layer(reps: int) -> dict:
    """The attention product alone at MIE's shape (64 x 117 tokens, 4 heads of 32), on the CPU, the modality mask of
    MIE's early layers (``-inf`` blocks): fp32 SDPA against the converted product eager (float SDPA on the codes) and
    compiled. With zoo's VNNI kernel: the product on it eager and compiled, and the kernel alone on codes. With
    torchao's AMX kernel: the compiled product (quantizing its float inputs, the kernel, dequantizing
    the output) and the kernel alone on codes already quantized. Without it: the compiled product on the codes
    (``codes_product``) and with ``float_sdpa``; the product compiled with MIE's mask building in the same graph,
    the masks built by ``zoo::mie_attention_masks`` against the same operations inlined (as MIE built them before
    the operator; both on ``codes_product``); and the two GEMMs of ``codes_product`` alone, in float32 and in
    bfloat16, on codes."""
    from zoo.fusion.mie import attention_masks
    from zoo.quant import QATScaledDotProduct

    torch.manual_seed(0)
    batch, heads, length, head_dim = 64, 4, 117, 32
    # [B, T, heads, 3, head_dim] split as SelfAttention's qkv projection leaves it
    q, k, v = torch.randn(batch, length, heads, 3, head_dim).permute(3, 0, 2, 1, 4).unbind(0)
    mask = torch.zeros(batch, 1, length, length)
    mask[:, :, :100, 100:] = mask[:, :, 100:, :100] = float("-inf")
    qat = QATScaledDotProduct().eval()
    with torch.no_grad(), calibrating(qat):
        qat(q, k, v, mask)
    product = QuantizedScaledDotProduct.from_qat(qat).eval()
    sdpa_on_codes = _attention_with(product, _has_vnni=False)
    fns = {
        "fp32": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask),
        "int8, eager (float SDPA on the codes)": lambda: sdpa_on_codes(q, k, v, mask),
    }
    if int8_attention_available():
        # zoo's kernel: quantizing its float inputs, eager and compiled, and alone on codes already quantized
        int8_codes = [torch.randint(-127, 128, t.shape, dtype=torch.int8) for t in (q, k, v)]
        zoo_eager = _attention_with(product, _has_kernel=False)
        zoo_compiled = torch.compile(zoo_eager, dynamic=False)
        fns |= {
            "int8, zoo's VNNI kernel, eager": lambda: zoo_eager(q, k, v, mask),
            "int8, zoo's VNNI kernel, compiled": lambda: zoo_compiled(q, k, v, mask),
            "zoo's VNNI kernel alone, on codes": lambda: int8_attention(*int8_codes, mask, 1e-4, 1e-4, 255),
        }
    torch._dynamo.reset()
    compiled = torch.compile(product, dynamic=False)
    if integer_attention_kernel() is not None:
        codes = [torch.randint(0, 256, t.shape, dtype=torch.uint8).transpose(1, 2).contiguous().transpose(1, 2)
                 for t in (q, k, v)]  # fmt: skip
        kernel = torch.compile(product.integer_product, dynamic=False)
        fns |= {
            "int8 compiled (quantize, kernel, dequantize)": lambda: compiled(q, k, v, mask),
            "int8 kernel alone, on codes": lambda: kernel(*codes, mask),
        }
    else:
        sdpa = torch.compile(_attention_with(product, float_sdpa=True), dynamic=False)
        compiled = torch.compile(_attention_with(product, _has_vnni=False), dynamic=False)
        codes = [torch.randint(-127, 128, t.shape).float() for t in (q, k, v)]
        logits = codes[0] @ codes[1].transpose(-2, -1)
        probs = torch.randint(0, 256, logits.shape).float()
        qk, pv = (codes[0], codes[1].transpose(-2, -1)), (probs, codes[2])
        bf16 = {name: [t.bfloat16() for t in pair] for name, pair in (("qk", qk), ("pv", pv))}
        # MIE's token mask and modality groups at this shape: [CLS], 100 image tokens, 16 text tokens (4 padded)
        tokens = torch.ones(batch, length, dtype=torch.bool)
        tokens[:, length - 4 :] = False
        group = torch.cat([torch.zeros(1), torch.ones(100), torch.full((length - 101,), 2.0)]).long()

        def inline_masks(tokens: Tensor, group: Tensor) -> Tensor:  # zoo.fusion.mie.attention_masks' early mask
            eye = torch.eye(length, dtype=torch.bool)
            blocked = (~tokens[:, None, None, :] & ~eye) | (group[:, None] != group[None, :])
            return torch.zeros(batch, 1, length, length).masked_fill(blocked, float("-inf"))

        def product_with_masks(inline: bool) -> Callable[[], Tensor]:
            def run(q, k, v, tokens, group):
                masks = inline_masks(tokens, group) if inline else attention_masks(tokens, group, torch.float32)[0]
                return sdpa_on_codes(q, k, v, masks)  # compiled: codes_product

            fn = torch.compile(run, dynamic=False)
            return lambda: fn(q, k, v, tokens, group)

        fns |= {
            "int8 compiled, on the codes (codes_product, zoo's kernel off)": lambda: compiled(q, k, v, mask),
            "int8 compiled with MIE's masks, by zoo::mie_attention_masks": product_with_masks(inline=False),
            "int8 compiled with MIE's masks, inlined": product_with_masks(inline=True),
            "int8 compiled, float SDPA on the codes": lambda: sdpa(q, k, v, mask),
            "GEMM q k^T of codes, float32": lambda: torch.matmul(*qk),
            "GEMM q k^T of codes, bfloat16": lambda: torch.matmul(*bf16["qk"]),
            "GEMM p v of codes, float32": lambda: torch.matmul(*pv),
            "GEMM p v of codes, bfloat16": lambda: torch.matmul(*bf16["pv"]),
        }
    shape = f"attention product, {batch} x {length} tokens, {heads} heads of {head_dim}"
    return {"shape": shape, **side_by_side(fns, reps=reps, device="cpu", base="fp32")}


def _without_onednn_packing(model: nn.Module) -> nn.Module:
    """A copy of a converted model whose integer layers run ``torch._int_mm`` rather than oneDNN's prepacked GEMM
    (what they ran before the packing): the kernel's share of the speed-up, in the same run."""
    model = copy.deepcopy(model)
    for layer in model.modules():
        if isinstance(layer, QuantizedLinear):
            layer._packed = None
    return model


def _attention_with(model: nn.Module, **choice: bool) -> nn.Module:
    """A copy of a converted model whose integer attention layers take the runtime ``choice`` where torchao's kernel
    does not run: ``exact=True``, the trained arithmetic (probabilities rounded to codes, the ``[B, H, T, T]`` logits
    written out, eager or compiled); ``float_sdpa=True``, float SDPA on the dequantized codes compiled on a CPU too
    (the compiled path until ``zoo.quant.attention.codes_product``, 2026-11-30). See ``QuantizedScaledDotProduct``."""
    model = copy.deepcopy(model)
    for layer in model.modules():
        if isinstance(layer, QuantizedScaledDotProduct):
            for name, value in choice.items():
                if not hasattr(layer, name):  # a misspelt choice would time the default path under its label
                    raise ValueError(f"_attention_with: QuantizedScaledDotProduct has no runtime choice {name!r}")
                setattr(layer, name, value)
    return model


def _call(module: nn.Module, inputs: Any, autocast_dtype: torch.dtype | None, device: str) -> Callable[[], Any]:
    def call():
        with torch.autocast(device, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
            return module(inputs)

    return call


def _wide_variants(tokens: dict, batch: int, base: str, device: str, compile_: bool) -> tuple[dict, dict]:
    """The same fusion transformer at a ViT-B width (768, FFN 3072; two blocks, fresh weights), float and integer, on
    tokens of ``tokens``' lengths: how the integer speed-up grows when the GEMMs, not the float operations around
    them, dominate. Returns the variants by name and their input tokens."""
    torch.manual_seed(0)
    wide = MIE(modalities=("image", "text"), dim=768, depth=2, num_heads=12, modality_fusion_layers=1).to(device).eval()
    wide_tokens = {
        m: Tokens.dense(torch.randn(batch, t.embeddings.shape[1], 768, device=device)) for m, t in tokens.items()
    }
    wide_int8, wide_per_tensor, wide_attention = (
        _integer(wide, policy, wide_tokens) for policy in ("int8", "int8_per_tensor", "int8_per_tensor_attention")
    )
    wide_variants = {base: wide, "int8": wide_int8, "int8_per_tensor": wide_per_tensor}
    if device == "cpu":
        wide_variants["int8, torch._int_mm (no oneDNN packing)"] = _without_onednn_packing(wide_int8)
    if compile_:
        wide_variants |= {
            f"{base}_compiled": _compiled(wide),
            "int8_compiled": _compiled(wide_int8),
            "int8_per_tensor_compiled": _compiled(wide_per_tensor),
            "int8_per_tensor_attention_compiled": _compiled(wide_attention),
        }
    return wide_variants, wide_tokens


def latency_mode(args) -> None:
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no GPU here")
    base = "bf16" if device == "cuda" else "fp32"
    float_dtype = torch.bfloat16 if device == "cuda" else None  # the GPU baseline runs under bf16 autocast
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.attention_only:
        if device != "cpu":
            raise SystemExit("--attention-only: the attention product is timed on the CPU")
        torch._inductor.config.freezing = True  # as the compiled rows of the whole model
        layer = _attention_layer(args.reps)
        payload = {
            "mode": "latency",
            "device": device,
            "cpu_model": cpu_model(),
            "batch_size": 64,
            "scopes": {"attention_layer": "the attention product alone at MIE's shape (see _attention_layer)"},
            "sizes": {},
            "latency": {f"threads={torch.get_num_threads()}": {"attention_layer": layer}},
            "method": "rounds interleaved across variants; median ms, ratio of medians, median of per-round ratios",
            "load_average_at_end": os.getloadavg(),
        }
        _print_latency(payload)
        print(f"wrote {write_result('qat_attention', payload, out_dir)}")
        return
    model = _vqa_model(args)
    batch = args.batch_size or (256 if device == "cuda" else 64)
    g = torch.Generator().manual_seed(0)
    inputs = {"image": torch.randn(batch, 3, 75, 75, generator=g), "text": _questions(batch)}
    int_models, sizes = _integer_models(model, out_dir, inputs)
    sizes |= _linear_weight_bytes(model)
    inputs["image"] = inputs["image"].to(device)
    model = model.to(device)
    int_models = {k: m.to(device) for k, m in int_models.items()}
    with torch.inference_mode():  # the fusion transformer alone is timed on the tokens the encoders give
        tokens = model.model.encode(inputs)
    # name -> (task module, autocast dtype or None); the "mie" scope runs its .model.fusion
    variants: dict[str, tuple[nn.Module, torch.dtype | None]] = {
        base: (model, float_dtype),
        "int8": (int_models["int8"], float_dtype),
        "mixed": (int_models["mixed"], float_dtype),
        "int8_per_tensor": (int_models["int8_per_tensor"], float_dtype),
        # eager, attention runs float SDPA on its codes (the integer kernel is generated by inductor); "exact": the
        # trained arithmetic
        "int8_per_tensor_attention": (int_models["int8_per_tensor_attention"], float_dtype),
        "int8_per_tensor_attention, exact arithmetic": (
            _attention_with(int_models["int8_per_tensor_attention"], exact=True),
            float_dtype,
        ),
    }
    if device == "cpu":
        variants["bf16 autocast, float model (reference)"] = (model, torch.bfloat16)
        variants["int8, torch._int_mm (no oneDNN packing)"] = (_without_onednn_packing(int_models["int8"]), None)
        # the FFN fusion's share: GELU folded into fc1, fc1 writing fc2's input codes (zoo.quant.fuse_feedforward_)
        variants["int8_per_tensor, FFN not fused"] = (_integer(model, "int8_per_tensor", inputs, fuse=False), None)
    if args.compile:
        if device == "cpu":
            # CPU inference compiles with freezing (weights as constants): inductor then prepacks the float linears
            # for oneDNN and lowers the integer layers' oneDNN GEMM (zoo.quant.kernels.inductor_freezing)
            torch._inductor.config.freezing = True
        compiled_int8 = _compiled(int_models["int8"])
        compiled_per_tensor = _compiled(int_models["int8_per_tensor"])
        variants |= {
            f"{base}_compiled": (_compiled(model), float_dtype),
            "int8_compiled": (compiled_int8, float_dtype),
            "int8_per_tensor_compiled": (compiled_per_tensor, float_dtype),
            "int8_per_tensor_attention_compiled": (_compiled(int_models["int8_per_tensor_attention"]), float_dtype),
            "int8_per_tensor_attention_compiled, exact arithmetic": (
                _compiled(_attention_with(int_models["int8_per_tensor_attention"], exact=True)),
                float_dtype,
            ),
            "int8_per_tensor_attention_compiled, float SDPA on the codes": (
                _compiled(_attention_with(int_models["int8_per_tensor_attention"], float_sdpa=True)),
                float_dtype,
            ),
        }
        if device == "cpu" and integer_attention_kernel() is not None and int8_attention_available():
            # where torchao's AMX kernel runs, zoo's VNNI kernel that CPUs without AMX run, side by side with it
            variants["int8_per_tensor_attention_compiled, zoo's VNNI kernel (torchao's off)"] = (
                _compiled(_attention_with(int_models["int8_per_tensor_attention"], _has_kernel=False)),
                float_dtype,
            )
        if device == "cpu" and (integer_attention_kernel() is not None or int8_attention_available()):
            # the product on the codes with float GEMMs: what a CPU without either kernel runs
            variants["int8_per_tensor_attention_compiled, on the codes (kernels off)"] = (
                _compiled(_attention_with(int_models["int8_per_tensor_attention"], _has_kernel=False, _has_vnni=False)),
                float_dtype,
            )
        # compile_regions(whole_fusion=False), the default until 2026-11-29: MIE's blocks one by one, its masks built
        # eagerly between them
        variants |= {
            f"{base}_compiled, blocks one by one": (_compiled(model, whole_fusion=False), float_dtype),
            "int8_per_tensor_attention_compiled, blocks one by one": (
                _compiled(int_models["int8_per_tensor_attention"], whole_fusion=False),
                float_dtype,
            ),
        }
        if device == "cpu":
            variants["int8_compiled, float ops in bf16 autocast"] = (compiled_int8, torch.bfloat16)
            variants["int8_per_tensor_compiled, float ops in bf16 autocast"] = (compiled_per_tensor, torch.bfloat16)
            variants["int8_per_tensor_compiled, FFN not fused"] = (
                _compiled(variants["int8_per_tensor, FFN not fused"][0]),
                None,
            )
            variants["int8_per_tensor_compiled, convolutions in float"] = (
                _compiled(_integer(model, "int8_per_tensor_float_convs", inputs)),
                None,
            )
            variants["bf16 autocast, float model compiled (reference)"] = (_compiled(model), torch.bfloat16)
    wide_batch = max(1, batch // 4)
    wide = None if args.sweep_only else _wide_variants(tokens, wide_batch, base, device, args.compile)
    results: dict[str, Any] = {}
    for threads in args.threads or [torch.get_num_threads()]:
        torch.set_num_threads(threads)
        key = f"threads={threads}"
        results[key] = {}
        for scope in () if args.sweep_only else ("vqa", "mie"):
            fns = {
                name: _call(
                    m.model.fusion if scope == "mie" else m, tokens if scope == "mie" else inputs, dtype, device
                )
                for name, (m, dtype) in variants.items()
            }
            print(f"timing {scope} with {threads} threads: {list(fns)}", file=sys.stderr)
            results[key][scope] = side_by_side(fns, reps=args.reps, device=device, base=base)
        if wide is not None:
            wide_variants, wide_tokens = wide
            fns = {name: _call(m, wide_tokens, float_dtype, device) for name, m in wide_variants.items()}
            results[key]["mie_d768"] = side_by_side(fns, reps=args.reps, device=device, base=base)
            results[key]["ffn_layer"] = _ffn_layer(device, args.reps, args.compile)
        if device == "cpu" and not args.sweep_only:
            results[key]["attention_layer"] = _attention_layer(args.reps)
        if args.sweep_batches:
            results[key]["vqa_by_batch"] = _batch_sweep(model, variants, args, device, base)
    payload = {
        "mode": "latency",
        "device": device,
        "cpu_model": cpu_model(),
        "batch_size": batch,
        "tokens_per_example": sum(t.embeddings.shape[1] for t in tokens.values()) + 1,
        "scopes": {
            "vqa": "the whole VQA task forward (tokenizer, conv image encoder, text encoder, MIE, head)",
            "mie": "MIE alone (dim 128, 6 blocks) on the encoders' tokens",
            "mie_d768": f"MIE at dim 768 (FFN 3072, 12 heads, 2 blocks, fresh weights), batch {wide_batch}",
            "ffn_layer": "768 -> 3072 -> 768 FFN on 2048 tokens",
            "attention_layer": "the attention product alone at MIE's shape (see _attention_layer)",
            "vqa_by_batch": "the whole VQA forward at each --sweep-batches size, the main variants, the integer"
            " models calibrated on the main batch",
        },
        "model": args.ckpt or f"{args.config} (freshly initialised)",
        "policies": {
            k: v
            for k, v in POLICIES.items()
            if k in ("int8", "mixed", "int8_per_tensor", "int8_per_tensor_attention", "int8_per_tensor_float_convs")
        },
        "calibration": "per-tensor input scales observed on the timed batch (zoo.quant.calibrating)",
        "compile": "zoo.compile.compile_regions(dynamic=False): MIE whole, the image encoder, the text encoder's block"
        " (see _compiled); 'blocks one by one': whole_fusion=False"
        + ("; inductor freezing on" if device == "cpu" and args.compile else ""),
        "sizes": sizes,
        "latency": results,
        "method": "rounds interleaved across variants; median ms, ratio of medians, median of per-round ratios",
        "load_average_at_end": os.getloadavg(),
    }
    path = write_result("qat_latency", payload, out_dir)
    _print_latency(payload)
    print(f"wrote {path}")


#: the variants the batch sweep times (the float model in bf16 is the reference a float-only user would reach for)
SWEEP_VARIANTS = (
    "int8_per_tensor",
    "int8_per_tensor_compiled",
    "int8_per_tensor_attention_compiled",
    "int8_per_tensor_attention_compiled, exact arithmetic",
    "int8_per_tensor_attention_compiled, float SDPA on the codes",
    "int8_per_tensor_attention_compiled, zoo's VNNI kernel (torchao's off)",
    "int8_per_tensor_attention_compiled, on the codes (kernels off)",
    "int8_per_tensor_attention",
    "int8_per_tensor_attention_compiled, blocks one by one",
    "bf16 autocast, float model compiled (reference)",
)


def _batch_sweep(model: nn.Module, variants: dict, args, device: str, base: str) -> dict[str, dict]:
    """The whole VQA forward at each ``--sweep-batches`` size: the float model against the per-tensor integer model,
    eager and compiled (one graph per batch size: ``dynamic=False``), rounds interleaved within each size."""
    out = {}
    for batch in args.sweep_batches:
        g = torch.Generator().manual_seed(0)
        image = torch.randn(batch, 3, 75, 75, generator=g).to(device)
        inputs = {"image": image, "text": _questions(batch)}
        chosen = {name: variants[name] for name in (base, *(args.sweep_variants or SWEEP_VARIANTS)) if name in variants}
        fns = {name: _call(m, inputs, dtype, device) for name, (m, dtype) in chosen.items()}
        print(f"timing vqa at batch {batch}: {list(fns)}", file=sys.stderr)
        out[f"batch={batch}"] = side_by_side(fns, reps=args.reps, device=device, base=base)
        # each size as soon as it is timed: a run cut short by a time limit keeps the sizes it finished
        print(f"vqa at batch {batch}: {json.dumps(out[f'batch={batch}'])}", file=sys.stderr, flush=True)
    return out


#: operators that are the GEMMs of a linear layer (self time; ``aten::linear`` only dispatches to them)
GEMMS = (
    "aten::addmm",
    "aten::mm",
    "aten::bmm",
    "aten::_int_mm",
    "onednn::qlinear_pointwise",  # QuantizedLinear on x86
    "mkldnn::_linear_pointwise",  # float linears compiled with freezing
)


def profile_mode(args) -> None:
    from torch.profiler import ProfilerActivity, profile

    device = args.device
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    model = _vqa_model(args)
    batch = args.batch_size or (256 if device == "cuda" else 64)
    g = torch.Generator().manual_seed(0)
    inputs = {"image": torch.randn(batch, 3, 75, 75, generator=g), "text": _questions(batch)}
    int8, per_tensor, attention = (
        _integer(model, policy, inputs) for policy in ("int8", "int8_per_tensor", "int8_per_tensor_attention")
    )
    inputs["image"] = inputs["image"].to(device)
    base = "bf16" if device == "cuda" else "fp32"
    float_dtype = torch.bfloat16 if device == "cuda" else None
    variants = {base: (model, float_dtype), "int8": (int8, float_dtype)}
    if device == "cpu" and args.compile:  # where a compiled model's time goes, with the latency mode's settings
        torch._inductor.config.freezing = True
        torch._inductor.config.cpp.enable_kernel_profile = True  # each generated kernel a profiler event of its own
        variants |= {
            "int8_compiled, float ops in bf16 autocast": (_compiled(int8), torch.bfloat16),
            "int8_per_tensor_compiled": (_compiled(per_tensor), None),
            "int8_per_tensor_attention_compiled": (_compiled(attention), None),
            "bf16 autocast, float model compiled": (_compiled(model), torch.bfloat16),
        }
    rows, payload = [], {"mode": "profile", "device": device, "cpu_model": cpu_model(), "batch_size": batch}
    for name, (m, dtype) in variants.items():
        call = _call(m.to(device), inputs, dtype, device)
        with torch.inference_mode():
            for _ in range(3):
                call()
            with profile(activities=activities) as prof:
                for _ in range(args.reps):
                    call()
        attr = "self_device_time_total" if device == "cuda" else "self_cpu_time_total"
        ops = sorted(prof.key_averages(), key=lambda e: getattr(e, attr), reverse=True)
        per_forward = {e.key: getattr(e, attr) / 1e3 / args.reps for e in ops}  # ms
        total = sum(per_forward.values())
        gemm = sum(v for k, v in per_forward.items() if k in GEMMS)
        payload[name] = {
            "ms_per_forward": round(total, 2),
            "gemm_ms": round(gemm, 2),
            "gemm_share": round(gemm / total, 3),
            "bound_from_faster_gemms": round(total / (total - gemm), 2) if total > gemm else None,
            "top_ops_ms": {k: round(v, 2) for k, v in list(per_forward.items())[:15]},
        }
        if any(_KERNEL.match(k) for k in per_forward):
            payload[name]["inductor_kernels_ms"] = _inductor_kernels(per_forward)
        rows.append({"model": name, **{k: v for k, v in payload[name].items() if k != "top_ops_ms"}})
        print(f"\n{name}: top operators, ms per forward (self time)")
        print(table([{"op": k, "ms": v} for k, v in payload[name]["top_ops_ms"].items()], ["op", "ms"]))
        if "inductor_kernels_ms" in payload[name]:
            kernels = payload[name]["inductor_kernels_ms"]
            print(f"{name}: inductor's generated kernels by kind, ms per forward")
            print(table([{"kind": k, "ms": v} for k, v in kernels.items()], ["kind", "ms"]))
    print()
    print(table(rows, ["model", "ms_per_forward", "gemm_ms", "gemm_share", "bound_from_faster_gemms"]))
    payload["method"] = (
        f"torch.profiler, {args.reps} forwards after 3 warm-up ones, inference_mode, {torch.get_num_threads()} threads;"
        " self time per operator; the profiler's own overhead inflates small operators alike in both models"
    )
    path = write_result("qat_profile", payload, Path(args.out_dir))
    print(f"wrote {path}")


#: the runtime choices of every QuantizedScaledDotProduct for each path that --mode attention-paths tests
ATTENTION_PATHS = {
    "trained arithmetic (exact)": {"exact": True},
    "zoo's VNNI kernel": {},
    "float SDPA on the codes": {"_has_vnni": False},
}


def attention_paths_mode(args) -> None:
    """One converted model (``--converted``, written by ``python -m zoo convert``) tested on the CPU on each
    attention path of :data:`ATTENTION_PATHS`, eager: test accuracy, and how many test predictions agree with the
    trained arithmetic's."""
    from zoo.cli import ZooCLI, resolve_config_args

    if not args.converted:
        raise SystemExit("--mode attention-paths needs --converted MODEL.pt (python -m zoo convert writes it)")
    if not int8_attention_available():
        raise SystemExit("--mode attention-paths: zoo's VNNI kernel does not run here (AVX-512 VNNI and cc)")
    cli = ZooCLI(args=resolve_config_args(["--config", args.config, "--trainer.accelerator=cpu"]), run=False)
    data, trainer = cli.datamodule, cli.trainer
    data.prepare_data()
    data.setup("test")
    model = load_converted(args.converted, cli.model)  # the config gives the architecture the file was converted from
    rows, predictions = [], {}
    for name, choice in ATTENTION_PATHS.items():
        variant = _attention_with(model, **choice)
        # the split runs twice per path: this loop for the answers and its time, Trainer.test for the task's metrics
        # by question type (it returns no predictions)
        start = time.perf_counter()
        with torch.inference_mode():
            predictions[name] = torch.cat([variant(batch).argmax(-1) for batch in data.test_dataloader()])
        seconds = time.perf_counter() - start
        accuracy = _test(trainer, variant, data)
        reference = predictions["trained arithmetic (exact)"]
        agree = (predictions[name] == reference).float().mean().item()
        rows.append(
            {"path": name, **accuracy, "predictions_as_exact": round(agree, 5), "test_seconds": round(seconds, 1)}
        )
    print(table(rows, list(rows[0])))
    payload = {
        "mode": "attention-paths",
        "cpu_model": cpu_model(),
        "converted": args.converted,
        "config": args.config,
        "test_examples": len(reference),
        "paths": rows,
        "method": "eager CPU inference of one converted model, each attention layer on the path named; test/acc from"
        " Trainer.test, agreement of the arg-max answers with the trained arithmetic's over the test split",
    }
    print(f"wrote {write_result('qat_attention_paths', payload, Path(args.out_dir))}")


#: the profiler's name of a kernel inductor generated (``cpp.enable_kernel_profile``): ``graph_<n>_kernel`` for a
#: template (here torchao's int8 attention), ``graph_<n>_cpp_fused_<ops>_<k>`` for the fused pointwise and norm loops
_KERNEL = re.compile(r"graph_\d+_(kernel|cpp_fused_.*)$")


def _inductor_kernels(per_forward: dict[str, float]) -> dict[str, float]:
    """The generated kernels' ms per forward, by kind: templates, and fused loops by what they compute."""
    kinds: dict[str, float] = {}
    for key, ms in per_forward.items():
        match = _KERNEL.match(key)
        if not match:
            continue
        ops = match.group(1)
        if ops == "kernel":
            kind = "template (int8 attention)"
        elif "eye" in ops or "masked_fill" in ops:
            kind = "attention masks (with what fused into them)"
        elif "native_layer_norm" in ops:
            kind = "layer norms (+ residual, input quantization)"
        elif "round" in ops:
            kind = "quantization / dequantization"
        else:
            kind = "other fused loops"
        kinds[kind] = kinds.get(kind, 0.0) + ms
    return {k: round(v, 2) for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])}


def _print_latency(payload: dict) -> None:
    base = "bf16" if payload["device"] == "cuda" else "fp32"
    columns = ["variant", "median_ms", f"speedup_vs_{base}", "median_round_speedup"]
    for threads, scopes in payload["latency"].items():
        for scope, rows in scopes.items():
            if scope == "vqa_by_batch":
                for batch, by_batch in rows.items():
                    print(f"\nvqa ({payload['device']}, {threads}, {batch}):")
                    print(table([{"variant": k, **v} for k, v in by_batch.items()], columns))
                continue
            print(f"\n{scope} ({payload['device']}, {threads}, batch {payload['batch_size']}):")
            print(table([{"variant": k, **v} for k, v in rows.items() if isinstance(v, dict)], columns))
    if payload["sizes"]:
        print("\nsizes on disk:")
        print(table([{"variant": k, **v} for k, v in payload["sizes"].items() if isinstance(v, dict)],
                    ["variant", "bytes", "fraction_of_float"]))  # fmt: skip


# -- accuracy mode -----------------------------------------------------------------------------------------------------
def _test(trainer, model: nn.Module, data) -> dict[str, float]:
    metrics = trainer.test(model, datamodule=data, verbose=False)[0]
    return {k: round(float(v), 5) for k, v in metrics.items() if k.startswith("test/acc")}


def _time_inference(float_model: nn.Module, int_model: nn.Module, data, reps: int) -> dict[str, Any]:
    """Float against integer inference on the first test batch: on the GPU (bf16 autocast) when there is one, else
    on the CPU (fp32). (A GPU machine's CPU is shared by the parallel runs: CPU figures come from --mode latency.)"""
    batch = next(iter(data.test_dataloader()))
    out = {}
    for device in ["cuda"] if torch.cuda.is_available() else ["cpu"]:
        dtype = torch.bfloat16 if device == "cuda" else torch.float32
        base = "bf16" if device == "cuda" else "fp32"
        moved = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
        models = {base: copy.deepcopy(float_model).to(device).eval(), "int": copy.deepcopy(int_model).to(device)}

        def call(m, moved=moved, device=device, dtype=dtype):
            with torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32):
                return m(moved)

        fns = {name: (lambda m=m: call(m)) for name, m in models.items()}
        out[device] = side_by_side(fns, reps=reps, device=device, base=base)
    return out


def run_one(
    name: str, overrides: list[str], out: Path, reps: int, *, finetune: bool = False, ptq: list[str] | None = None
) -> None:
    """Fit one trained variant in this process, test it (and its integer conversions), write figures to ``out``.
    A float run also saves its final weights as ``<name>_final.pt`` beside ``out`` (the start of fine-tunes);
    ``finetune``: a QAT run uses vqa_qat_finetune.yaml (fake quantization from the first step, no float phase);
    ``ptq``: the post-training variants of a float run (default: all of ``PTQ``)."""
    from zoo.callbacks import QATScheduleCallback
    from zoo.cli import ZooCLI, resolve_config_args

    config, schedule, quant = TRAINED[name]
    if finetune and schedule is not None:
        config = "vqa_qat_finetune.yaml"  # the same callback, start: null; lr and initial checkpoint come as flags
    cli = ZooCLI(args=resolve_config_args(["--config", config, *overrides]), run=False)
    model, data, trainer = cli.model, cli.datamodule, cli.trainer
    history = ValidationHistory()
    trainer.callbacks.append(history)
    if schedule is not None:
        (callback,) = [c for c in trainer.callbacks if isinstance(c, QATScheduleCallback)]
        callback.schedule, callback.quant = list(schedule), dict(quant)
    start = time.perf_counter()
    trainer.fit(model, datamodule=data)
    result: dict[str, Any] = {"variant": name, "config": config, "schedule": schedule, "quant": quant,
                              "overrides": overrides, "fit_seconds": round(time.perf_counter() - start, 1),
                              "epochs_run": trainer.current_epoch, "global_steps": trainer.global_step,
                              "val_history": history.history}  # fmt: skip
    # the final weights (the last stage of a schedule), tested as trained: fake-quantized for QAT runs
    model.eval()
    if schedule is None:  # written whole before it appears: the fine-tunes start as soon as it does
        final = out.parent / f"{name}_final.pt"
        torch.save(model.state_dict(), final.with_suffix(".tmp"))
        final.with_suffix(".tmp").replace(final)
    result["test_trained"] = _test(trainer, model, data)
    # Lightning's teardown leaves the model on the CPU: calibrate the PTQ variants where it trained (on the CPU an
    # MSE-calibrated variant took minutes)
    model.to(trainer.strategy.root_device)
    if schedule is None:
        suffix = "" if name == "float" else "_ft"
        float_model, runs = (
            model,
            {p + suffix: _calibrated(quantize_(copy.deepcopy(model), **PTQ[p]), data) for p in ptq or PTQ},
        )
    else:  # a float model of the same architecture: the size and latency baseline
        float_model, runs = _float_twin(model), {name: model}
    result["float_bytes"] = state_dict_bytes(float_model)
    work = out.parent
    result["integer"] = {}
    for variant, qmodel in runs.items():
        converted = convert_(copy.deepcopy(qmodel).cpu())
        size = save_converted(converted, work / f"{variant}.pt")
        converted = converted.to(model.device)
        entry = {"bytes": size, "fraction_of_float": round(size / result["float_bytes"], 4),
                 "layers": converted_layers(converted)}  # fmt: skip
        if schedule is None:  # post-training quantized: the fake-quant model is a separate one
            entry["test_fake_quant"] = _test(trainer, qmodel, data)
        entry["test_converted"] = _test(trainer, converted, data)
        if any(isinstance(m, QuantizedScaledDotProduct) for m in converted.modules()):
            # where torchao's kernel does not run (here: eager), attention runs float SDPA on the dequantized codes;
            # the trained arithmetic (probabilities rounded to codes) beside it
            entry["test_converted_exact_attention"] = _test(trainer, _attention_with(converted, exact=True), data)
        entry["latency"] = _time_inference(float_model, converted, data, reps)
        result["integer"][variant] = entry
    result["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    out.write_text(json.dumps(result, indent=2))


def _calibrated(qat: nn.Module, data) -> nn.Module:
    """``qat`` (a float model quantized after training) with its per-tensor input scales observed on
    ``CALIBRATION_BATCHES`` training batches."""
    calibrate(qat, data.train_dataloader(), CALIBRATION_BATCHES)
    return qat


def _qat_named(model: nn.Module):
    from zoo.quant import qat_layers

    return qat_layers(model)


def _float_twin(model: nn.Module) -> nn.Module:
    """A float copy of a QAT model: every fake-quantized layer back to ``nn.Linear`` / ``nn.Conv2d`` /
    ``nn.Embedding``, every fake-quantized attention product back to float SDPA."""
    from zoo.layers import ScaledDotProduct
    from zoo.quant import QATConv2d, QATEmbedding, QATScaledDotProduct
    from zoo.quant.qat import _replace

    twin = copy.deepcopy(model)
    for name, product in list(twin.named_modules()):
        if isinstance(product, QATScaledDotProduct):
            _replace(twin, name, ScaledDotProduct())
    for name, layer in list(_qat_named(twin)):
        if isinstance(layer, QATEmbedding):
            plain: nn.Module = nn.Embedding(layer.num_embeddings, layer.embedding_dim, padding_idx=layer.padding_idx)
        elif isinstance(layer, QATConv2d):
            plain = nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
                              layer.dilation, layer.groups, bias=layer.bias is not None)  # fmt: skip
            plain.bias = layer.bias
        else:
            plain = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
            plain.bias = layer.bias
        plain.weight = layer.weight
        _replace(twin, name, plain)
    return twin


def accuracy_mode(args, extra: list[str]) -> None:
    args.batch_size = args.batch_size or 256
    common = training_overrides(args, "--test_after_fit=false") + list(extra)
    work = Path(args.work_dir) if args.work_dir else Path(args.out_dir) / "qat_runs"
    work.mkdir(parents=True, exist_ok=True)
    procs = {}

    def launch_run(name: str, flags: list[str]) -> None:
        out = work / f"{name}.json"
        cmd = [sys.executable, __file__, "--run-one", name, str(out), "--reps", str(args.reps),
               "--ptq", *(args.ptq or [p for p in PTQ if not _low_bits(p)]), *flags,
               f"--trainer.default_root_dir={work / name}"]  # fmt: skip
        procs[name] = (launch(cmd, work / f"{name}.log", len(procs)), out)
        if not args.parallel:
            procs[name][0].wait()

    if args.variants is None:
        args.variants = [v for v in TRAINED if (args.finetune_epochs or v != "float_finetune") and not _low_bits(v)]
    if "float_finetune" in args.variants and not args.finetune_epochs:
        raise SystemExit("--variants float_finetune: only with --finetune-epochs")
    qat_runs = [name for name in args.variants if name != "float"]
    if args.finetune_epochs:  # the float run first; every QAT run starts from its final weights
        if "float" not in args.variants:
            raise SystemExit("--finetune-epochs: the float variant is needed (QAT runs start from its weights)")
        (work / "float_final.pt").unlink(missing_ok=True)  # a previous run's, in a work folder used again
        launch_run("float", common)
        # the fine-tunes start from the float run's final weights, while that run still tests them and its PTQ
        # variants: minutes of a device call saved, every fine-tune sharing the device with those tests alike
        while not (work / "float_final.pt").is_file() and procs["float"][0].poll() is None:
            time.sleep(2)
        if not (work / "float_final.pt").is_file():
            raise SystemExit(f"the float run failed ({procs['float'][0].returncode}); log: {work / 'float.log'}")
        finetune = copy.copy(args)
        finetune.epochs, finetune.lr = args.finetune_epochs, args.finetune_lr or float(f"{args.lr / 10:.3g}")
        finetune.max_time = args.finetune_max_time
        flags = training_overrides(finetune, "--test_after_fit=false") + list(extra)
        flags += ["--finetune", f"--model.init_args.initial_checkpoint={work / 'float_final.pt'}"]
        common = {"float": common, "qat": flags}
        for name in qat_runs:
            launch_run(name, flags)
    else:
        for name in args.variants:
            launch_run(name, common)
    # the summary is rewritten as each run ends, so that a time limit keeps the runs that finished
    results = {}
    for name, result, pending in finished_runs(procs, work):
        if result is not None:
            results[name] = result
        rows = _accuracy_rows(results)
        columns = ["variant", "bits", "weight bits run", "test acc", "fake-quant acc", "exact attention",
                   "relational", "non-relational", "vs float", "vs float ft", "size", "of float", "GPU vs bf16",
                   "CPU vs fp32"]  # fmt: skip
        print(table(rows, columns) + (f"\nstill running: {', '.join(pending)}" if pending else ""), flush=True)
        payload = {"settings": vars(args) | {"common": common}, "runs": results, "rows": rows, "pending": pending}
        path = write_result("qat_accuracy", payload, Path(args.out_dir))
    print(f"wrote {path}")


def _low_bits(variant: str) -> bool:
    """Whether ``variant`` is one of the LOW_BITS runs (only when named: --variants, --ptq)."""
    return variant.removeprefix("qat_").removeprefix("ptq_").removesuffix("_ft") in LOW_BITS


def _accuracy_rows(results: dict[str, dict]) -> list[dict]:
    def pct(metrics: dict, key: str = "test/acc") -> str:
        return f"{100 * metrics[key]:.2f}%" if key in metrics else ""

    float_acc = results.get("float", {}).get("test_trained", {}).get("test/acc")
    ft_acc = results.get("float_finetune", {}).get("test_trained", {}).get("test/acc")
    mixed, w4 = "W8 attn/W4 FFN-A8", "W4A8"
    bits = {"float": "fp32/bf16", "float_finetune": "fp32/bf16", "ptq_mixed": mixed, "ptq_w4": w4,
            "ptq_mixed_ft": mixed, "ptq_w4_ft": w4, "qat_fixed4": f"{w4} [4]", "qat_progressive": f"{w4} [8,6,4]",
            "qat_mixed": f"{mixed} [8,6,4]", "ptq_mixed_per_tensor": f"{mixed}, per-tensor A",
            "ptq_mixed_per_tensor_ft": f"{mixed}, per-tensor A",
            "qat_mixed_per_tensor": f"{mixed} [8,6,4], per-tensor A"}  # fmt: skip
    labels = {"w3ffn": "W8 attn/W3 FFN-A8", "w2ffn": "W8 attn/W2 FFN-A8", "a4": f"{mixed[:-2]}A4",
              "a4_mse": f"{mixed[:-2]}A4, MSE ranges"}  # fmt: skip
    for name, label in labels.items():
        bits |= {f"ptq_{name}": label, f"ptq_{name}_ft": label}
        if f"qat_{name}" in TRAINED:
            bits[f"qat_{name}"] = f"{label} [{','.join(map(str, TRAINED[f'qat_{name}'][1]))}]"
    rows = []
    for name, result in results.items():
        is_float = TRAINED[name][1] is None
        entries = {name: result["test_trained"]} if is_float else {}
        for variant, entry in result.get("integer", {}).items():
            entries[variant] = entry["test_converted"]
        for variant, metrics in entries.items():
            entry = result.get("integer", {}).get(variant, {})
            latency = entry.get("latency", {})
            acc = metrics.get("test/acc")
            fake = entry.get("test_fake_quant") or (result["test_trained"] if variant == name and not is_float else {})
            rows.append({
                "variant": variant + (" (converted)" if variant != name or not is_float else ""),
                "bits": bits.get(variant, ""),
                "weight bits run": _linear_bits(entry),
                "test acc": pct(metrics),
                "fake-quant acc": pct(fake),
                "exact attention": pct(entry.get("test_converted_exact_attention", {})),
                "relational": pct(metrics, "test/acc_relational"),
                "non-relational": pct(metrics, "test/acc_non_relational"),
                "vs float": f"{100 * (acc - float_acc):+.2f}" if acc is not None and float_acc is not None else "",
                "vs float ft": f"{100 * (acc - ft_acc):+.2f}" if acc is not None and ft_acc is not None else "",
                "size": f"{entry.get('bytes', result.get('float_bytes', 0)) / 1e6:.2f} MB",
                "of float": f"{entry.get('fraction_of_float', 1.0):.1%}",
                "GPU vs bf16": _speed(latency.get("cuda"), "bf16"),
                "CPU vs fp32": _speed(latency.get("cpu"), "fp32"),
            })  # fmt: skip
    return rows


def _linear_bits(entry: dict) -> str:
    """The weight bits the converted linears run at, e.g. "8/4" (from ``converted_layers``): a run stopped before
    its schedule's last stage shows bits above its targets here."""
    bits = {int(kind.split()[1][1:].split("A")[0]) for kind in entry.get("layers", {}) if kind.startswith("linear ")}
    return "/".join(map(str, sorted(bits, reverse=True)))


def _speed(timing: dict | None, base: str) -> str:
    if not timing or "int" not in timing:
        return ""
    return f"{timing['int']['speedup_vs_' + base]:.2f}x"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=["latency", "accuracy", "profile", "attention-paths"], default="latency")
    parser.add_argument("--out-dir", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--reps", type=int, default=15, help="timed rounds per variant")
    # latency mode
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--config", default="vqa.yaml", help="model of a fresh run (latency); data (attention-paths)")
    parser.add_argument("--converted", default=None, help="attention-paths: a model `python -m zoo convert` wrote")
    parser.add_argument("--ckpt", default=None, help="a float checkpoint instead of a fresh model (latency mode)")
    parser.add_argument("--batch-size", type=int, default=None, help="latency: 64 CPU, 256 GPU; accuracy: 256")
    parser.add_argument("--sweep-batches", type=int, nargs="*", default=[16, 64, 256],
                        help="latency: batch sizes of the whole-VQA sweep (none: no sweep)")  # fmt: skip
    parser.add_argument("--sweep-variants", nargs="*", choices=SWEEP_VARIANTS, default=None, metavar="VARIANT",
                        help="latency: the sweep's variants besides the float model (default: all)")  # fmt: skip
    parser.add_argument("--no-compile", dest="compile", action="store_false", help="skip the torch.compile rows")
    parser.add_argument("--attention-only", action="store_true",
                        help="latency: the attention product alone at MIE's shape (CPU)")  # fmt: skip
    parser.add_argument("--sweep-only", action="store_true",
                        help="latency: the --sweep-batches rows alone (minutes, not an hour)")  # fmt: skip
    parser.add_argument("--threads", type=int, nargs="*", default=None,
                        help="latency: thread counts to time with, e.g. 1 2 (default: torch's)")  # fmt: skip
    # accuracy mode
    parser.add_argument("--variants", nargs="*", default=None,
                        help=f"of {list(TRAINED)} (default: all; float_finetune with --finetune-epochs)")  # fmt: skip
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--precision", default=None, help="default: bf16-mixed on a GPU, 32-true on the CPU")
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--limit-train-batches", default="1.0")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--max-time", default=None, help="accuracy: trainer.max_time guard per run, e.g. 00:00:09:00")
    parser.add_argument("--parallel", action="store_true", help="accuracy: all runs at once, one process each")
    parser.add_argument("--work-dir", default=None, help="accuracy: checkpoints, logs (default: <out-dir>/qat_runs)")
    parser.add_argument("--finetune-epochs", type=int, default=None,
                        help="accuracy: QAT runs fine-tune the float run's weights for this many epochs")  # fmt: skip
    parser.add_argument("--finetune-lr", type=float, default=None, help="accuracy: default --lr / 10")
    parser.add_argument("--finetune-max-time", default=None, help="accuracy: trainer.max_time of each fine-tune")
    parser.add_argument("--ptq", nargs="*", choices=list(PTQ), default=None,
                        help="accuracy: post-training variants of the float runs (default: all)")  # fmt: skip
    parser.add_argument("--run-one", nargs=2, metavar=("VARIANT", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("--finetune", action="store_true", help=argparse.SUPPRESS)
    args, extra = parser.parse_known_args()
    if args.run_one:
        run_one(args.run_one[0], extra, Path(args.run_one[1]), args.reps, finetune=args.finetune, ptq=args.ptq)
    elif args.mode in ("latency", "profile", "attention-paths"):
        if extra:
            parser.error(f"unknown arguments {extra}")
        {"latency": latency_mode, "profile": profile_mode, "attention-paths": attention_paths_mode}[args.mode](args)
    else:
        accuracy_mode(args, extra)


if __name__ == "__main__":
    main()
