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


def test_fusion_and_tensor_encoders_are_compiled_whole_text_encoders_only_through_their_blocks():
    names = compile_regions(_vqa(), backend="eager")
    assert names == ["model.encoders.image", "model.encoders.text.blocks.0", "model.fusion"]
    names = compile_regions(_vqa(), whole_fusion=False, backend="eager")
    assert names == [
        "model.encoders.image",
        "model.encoders.text.blocks.0",
        "model.fusion.blocks.0",
        "model.fusion.blocks.1",
    ]


def test_a_fusion_module_given_itself_is_one_region():
    fusion = MIE(dim=32, depth=2, modality_fusion_layers=1)
    assert compile_regions(fusion, backend="eager") == [""]
    assert not any(hasattr(block, "_compiled_call_impl") and block._compiled_call_impl for block in fusion.blocks)
    blocks = compile_regions(MIE(dim=32, depth=2, modality_fusion_layers=1), whole_fusion=False, backend="eager")
    assert blocks == ["blocks.0", "blocks.1"]


@pytest.mark.parametrize("whole_fusion", [True, False])
def test_compiled_model_keeps_its_state_dict_keys_and_outputs(whole_fusion):
    eager, compiled = _vqa(), _vqa()
    keys = list(compiled.state_dict())
    compile_regions(compiled, whole_fusion=whole_fusion, backend="eager")
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
    assert len(task.compiled_regions) == 3
    assert _vqa().compiled_regions == [] and _vqa().compile_options is False


class _Mesh(dict):
    """A stand-in for the trainer's 2-D device mesh: only the sizes that ``configure_model`` reads."""

    def __init__(self, dp: int, tp: int) -> None:
        super().__init__(data_parallel=_Size(dp), tensor_parallel=_Size(tp))


class _Size:
    def __init__(self, n: int) -> None:
        self.n = n

    def size(self) -> int:
        return self.n


def test_under_fsdp_the_fusion_blocks_are_compiled_one_by_one_unless_whole_fusion_is_set(monkeypatch):
    import zoo.parallel.parallelize as parallelize

    monkeypatch.setattr(parallelize, "apply_fsdp", lambda module, mesh, **kwargs: None)
    task = _vqa(compile={"backend": "eager"})
    task._device_mesh = _Mesh(dp=2, tp=1)
    task.configure_model()
    assert "model.fusion.blocks.0" in task.compiled_regions and "model.fusion" not in task.compiled_regions
    task = _vqa(compile={"backend": "eager", "whole_fusion": True})  # asked for: trains correctly (test_parallel.py)
    task._device_mesh = _Mesh(dp=2, tp=1)
    task.configure_model()
    assert "model.fusion" in task.compiled_regions


def test_whole_fusion_compiles_with_inductor_and_matches_eager():
    """MIE's mask arithmetic (boolean masks, -inf fills, per-head fusion biases) and blocks in one inductor graph."""
    eager, compiled = _vqa().eval(), _vqa().eval()
    compile_regions(compiled.model.fusion, dynamic=False)
    batch = _batch()
    with torch.no_grad():
        torch.testing.assert_close(compiled(batch), eager(batch), rtol=1e-4, atol=1e-4)


def test_cuda_graph_modes_fail_with_a_clear_error():
    with pytest.raises(ConfigError, match="compile: mode='reduce-overhead'"):
        compile_regions(_vqa(), mode="reduce-overhead")
