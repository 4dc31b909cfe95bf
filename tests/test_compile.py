"""Regional compilation: which modules are compiled, and that compiling changes neither names nor results."""

from __future__ import annotations

import pytest
import torch

from lit_models import VQA
from zoo.compile import compile_regions
from zoo.encoders import ConvImageEncoder, TransformerTextEncoder
from zoo.errors import ConfigError
from zoo.fusion import MIE


def _vqa(**kwargs) -> VQA:
    torch.manual_seed(0)
    return VQA(
        {"image": ConvImageEncoder(channels=(8, 16), dim=32), "text": TransformerTextEncoder(dim=32, depth=1)},
        MIE(dim=32, depth=2, modality_fusion_layers=1),
        num_classes=5,
        **kwargs,
    )


def _batch() -> dict:
    return {
        "image": torch.randn(3, 3, 32, 32),
        "text": ["what shape is the red object?", "how many squares are there?", "is it left?"],
        "label": torch.tensor([0, 1, 2]),
    }


def test_blocks_and_tensor_encoders_are_compiled_text_encoders_only_through_their_blocks():
    model = _vqa()
    names = compile_regions(model, backend="eager")
    assert names == [
        "model.encoders.image",
        "model.encoders.text.blocks.0",
        "model.fusion.blocks.0",
        "model.fusion.blocks.1",
    ]


def test_compiled_model_keeps_its_state_dict_keys_and_outputs():
    eager, compiled = _vqa(), _vqa()
    keys = list(compiled.state_dict())
    compile_regions(compiled, backend="eager")
    assert list(compiled.state_dict()) == keys, "checkpoints of compiled and eager runs are interchangeable"
    batch = _batch()
    expected, got = eager(batch), compiled(batch)
    torch.testing.assert_close(got, expected)
    got.sum().backward()
    assert all(p.grad is not None for p in compiled.model.fusion.parameters() if p.requires_grad)


def test_task_compiles_when_the_trainer_configures_it():
    task = _vqa(compile={"backend": "eager"})
    assert task.compiled_regions == []
    task.configure_model()
    task.configure_model()  # fit then test: compiled once
    assert len(task.compiled_regions) == 4
    assert _vqa().compiled_regions == [] and _vqa().compile_options is False


def test_cuda_graph_modes_fail_with_a_clear_error():
    with pytest.raises(ConfigError, match="compile: mode='reduce-overhead'"):
        compile_regions(_vqa(), mode="reduce-overhead")
