"""MIE's modality mask: no cross-modal information in the early layers, and it flows once fusion opens."""

from __future__ import annotations

import math

import pytest
import torch

from zoo.contracts import Tokens
from zoo.fusion import MIE

DIM, DEPTH, FUSED = 32, 5, 2


def _inputs(seed: int, image_len: int = 7, text_len: int = 5) -> dict[str, Tokens]:
    g = torch.Generator().manual_seed(seed)
    text_mask = torch.ones(4, text_len, dtype=torch.bool)
    text_mask[1, 3:] = False  # one padded question
    return {
        "image": Tokens.dense(torch.randn(4, image_len, DIM, generator=g)),
        "text": Tokens(torch.randn(4, text_len, DIM, generator=g), text_mask),
    }


def _hidden_states(mie: MIE, inputs: dict[str, Tokens]) -> list[torch.Tensor]:
    states: list[torch.Tensor] = []
    hooks = [block.register_forward_hook(lambda m, a, out: states.append(out.detach())) for block in mie.blocks]
    try:
        mie(inputs)
    finally:
        for h in hooks:
            h.remove()
    return states


@pytest.mark.parametrize("schedule", ["linear", "learned", "open"])
def test_modality_mask_blocks_cross_modal_attention_in_early_layers(schedule):
    torch.manual_seed(0)
    mie = MIE(
        modalities=("image", "text"),
        dim=DIM,
        depth=DEPTH,
        num_heads=4,
        modality_fusion_layers=FUSED,
        fusion_schedule=schedule,
    ).eval()
    inputs = _inputs(0)
    perturbed = dict(
        inputs, image=Tokens.dense(inputs["image"].embeddings + torch.randn_like(inputs["image"].embeddings))
    )
    before, after = _hidden_states(mie, inputs), _hidden_states(mie, perturbed)
    text = mie.segments(inputs)["text"]
    for layer in range(DEPTH - FUSED):
        # exact: blocked keys get probability 0, so the text rows are computed from the same numbers
        assert torch.equal(before[layer][:, text], after[layer][:, text]), f"image leaked into text at layer {layer}"
        assert torch.equal(before[layer][:, 0], after[layer][:, 0]), f"[CLS] saw a modality at layer {layer}"
    for layer in range(DEPTH - FUSED, DEPTH):
        assert not torch.allclose(before[layer][:, text], after[layer][:, text]), f"no fusion at layer {layer}"
    # and the image's own early layers do move
    image = mie.segments(inputs)["image"]
    assert not torch.allclose(before[0][:, image], after[0][:, image])


def test_no_fusion_layers_keeps_modalities_apart_everywhere():
    torch.manual_seed(0)
    mie = MIE(dim=DIM, depth=3, num_heads=4, modality_fusion_layers=0).eval()
    inputs = _inputs(1)
    perturbed = dict(inputs, text=Tokens(inputs["text"].embeddings * 2 + 1, inputs["text"].mask))
    out_a, out_b = mie(inputs), mie(perturbed)
    image = slice(0, inputs["image"].embeddings.shape[1])
    assert torch.equal(out_a.tokens.embeddings[:, image], out_b.tokens.embeddings[:, image])


def test_linear_schedule_opens_fusion_progressively():
    mie = MIE(dim=DIM, depth=6, num_heads=2, modality_fusion_layers=4, fusion_schedule="linear")
    expected = torch.tensor([math.log(k / 4) for k in range(1, 5)])
    torch.testing.assert_close(mie.cross_modal_bias[:, 0], expected)
    assert (mie.cross_modal_bias.diff(dim=0) > 0).all(), "each fused layer is more open than the one before"
    assert mie.cross_modal_bias[-1].abs().max() == 0, "the last layer is fully open"


def test_one_fused_layer_linear_equals_open():
    """With one fused layer the linear schedule is log(1/1) = 0: identical to opening at once."""
    torch.manual_seed(0)
    linear = MIE(dim=DIM, depth=3, num_heads=4, modality_fusion_layers=1, fusion_schedule="linear").eval()
    opened = MIE(dim=DIM, depth=3, num_heads=4, modality_fusion_layers=1, fusion_schedule="open").eval()
    opened.load_state_dict(linear.state_dict())
    inputs = _inputs(2)
    torch.testing.assert_close(linear(inputs).pooled, opened(inputs).pooled)


def test_partial_bias_changes_the_output():
    torch.manual_seed(0)
    linear = MIE(dim=DIM, depth=3, num_heads=4, modality_fusion_layers=2, fusion_schedule="linear").eval()
    opened = MIE(dim=DIM, depth=3, num_heads=4, modality_fusion_layers=2, fusion_schedule="open").eval()
    opened.load_state_dict(linear.state_dict())
    inputs = _inputs(3)
    assert not torch.allclose(linear(inputs).pooled, opened(inputs).pooled)


def test_learned_schedule_is_trained():
    torch.manual_seed(0)
    mie = MIE(dim=DIM, depth=3, num_heads=4, modality_fusion_layers=2, fusion_schedule="learned")
    # not pooled.sum(): the sum of a LayerNorm's outputs does not depend on its input, so its gradient is rounding
    mie(_inputs(4)).pooled.square().sum().backward()
    # every bias gets a gradient above rounding (about 1e-9 here)
    assert mie.cross_modal_bias.grad is not None and (mie.cross_modal_bias.grad.abs() > 1e-7).all()


@pytest.mark.parametrize("fused", [-1, 7])
def test_fusion_layers_out_of_range_is_a_clear_error(fused):
    with pytest.raises(ValueError, match=f"modality_fusion_layers={fused} must be between 0 and depth=6"):
        MIE(depth=6, modality_fusion_layers=fused)


def test_bf16_autocast_runs():
    torch.manual_seed(0)
    mie = MIE(dim=DIM, depth=2, num_heads=4, modality_fusion_layers=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = mie(_inputs(5))
    assert torch.isfinite(out.pooled.float()).all()


def test_attention_masks_operator_passes_opcheck():
    """``zoo::mie_attention_masks`` (MIE's masks, written out once under torch.compile): its fake implementation,
    schema and dispatch agree with the real one."""
    from zoo.fusion.mie import attention_masks

    mask = torch.ones(3, 6, dtype=torch.bool)
    mask[1, 4:] = False
    group = torch.tensor([0, 1, 1, 1, 2, 2])
    for dtype in (torch.float32, torch.bfloat16):
        torch.library.opcheck(attention_masks, (mask, group, dtype))
