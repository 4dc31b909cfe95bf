"""``initial_checkpoint``: a float checkpoint starts a QAT fine-tune with its weights, a resumed run does not need the
file, and a checkpoint of another model or a file that is no checkpoint fails with a clear error."""

from __future__ import annotations

import re

import pytest
import torch
from lightning.pytorch import Callback
from tiny_vqa import QUIET, TINY_MIE, TINY_SORT_OF_CLEVR
from torch import nn

from zoo.cli import ZooCLI, main, resolve_config_args
from zoo.errors import ConfigError, DataError
from zoo.quant import QATLinear, quantize_
from zoo.weights import check_lightning_checkpoint, load_weights

TINY = [
    *TINY_SORT_OF_CLEVR,
    "--data.init_args.batch_size=8",
    *TINY_MIE,
    "--trainer.max_epochs=1",
    "--trainer.limit_train_batches=2",
    "--trainer.limit_val_batches=1",
    "--trainer.val_check_interval=1.0",
    *QUIET,
    "--trainer.logger=false",
]


@pytest.fixture(autouse=True)
def data_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("ZOO_DATA_DIR", str(tmp_path / "data"))


class WeightsAtStart(Callback):
    """Keeps a CPU copy of the model's state dict as training starts (after setup, before the first step)."""

    def on_train_start(self, trainer, pl_module):
        self.state = {k: v.detach().cpu().clone() for k, v in pl_module.state_dict().items() if torch.is_tensor(v)}


def test_float_checkpoint_initialises_a_qat_fine_tune(tmp_path):
    float_cli = ZooCLI(args=resolve_config_args(["--config", "vqa.yaml", *TINY]), run=False)
    torch.nn.init.normal_(float_cli.model.head[1].weight)  # differs from any fresh initialisation
    expected = float_cli.model.state_dict()
    torch.save(expected, tmp_path / "float.pt")

    qat_args = ["--config", "vqa_qat.yaml", *TINY, f"--trainer.default_root_dir={tmp_path / 'qat'}"]
    qat_args.append(f"--model.init_args.initial_checkpoint={tmp_path / 'float.pt'}")
    qat = ZooCLI(args=resolve_config_args(qat_args), run=False)
    probe = WeightsAtStart()
    qat.trainer.callbacks.append(probe)
    qat.trainer.fit(qat.model, datamodule=qat.datamodule)
    assert isinstance(qat.model.head[1], QATLinear)  # quantized by the callback, then loaded
    for key, value in expected.items():
        assert torch.equal(probe.state[key], value), key


def test_initial_checkpoint_is_read_by_the_first_fit_only(tmp_path):
    source = ZooCLI(args=resolve_config_args(["--config", "vqa.yaml", *TINY]), run=False).model
    torch.save(source.state_dict(), tmp_path / "float.pt")
    init = f"--model.init_args.initial_checkpoint={tmp_path / 'float.pt'}"
    task = ZooCLI(args=resolve_config_args(["--config", "vqa.yaml", *TINY, init]), run=False).model
    task.setup("fit")
    assert torch.equal(task.head[1].weight, source.head[1].weight)
    with torch.no_grad():
        task.head[1].weight.add_(1.0)  # "trained"
    task.setup("fit")  # a second fit of the same task continues from its own weights
    assert torch.equal(task.head[1].weight, source.head[1].weight + 1.0)


def test_resumed_fit_does_not_read_the_initial_checkpoint(tmp_path):
    first = ["fit", "--config", "vqa.yaml", *TINY, f"--trainer.default_root_dir={tmp_path}"]
    ZooCLI(args=resolve_config_args(first))
    (last,) = tmp_path.rglob("last.ckpt")
    gone = tmp_path / "deleted.ckpt"
    resumed = ZooCLI(
        args=resolve_config_args(
            [*first, "--trainer.max_epochs=2", f"--model.init_args.initial_checkpoint={gone}", f"--ckpt_path={last}"]
        )
    )
    assert resumed.trainer.current_epoch == 2
    with pytest.raises(DataError, match="deleted.ckpt"):  # a new run does need it
        ZooCLI(args=resolve_config_args([*first, f"--model.init_args.initial_checkpoint={gone}"]))


def _mlp(hidden: int = 8) -> nn.Module:
    return nn.Sequential(nn.Linear(4, hidden), nn.GELU(), nn.Linear(hidden, 2))


def test_lightning_checkpoint_and_quantizer_state_load_both_ways(tmp_path):
    source = quantize_(_mlp(), weight_bit=4)  # a QAT model's checkpoint into a float model
    torch.save({"state_dict": source.state_dict(), "epoch": 3}, tmp_path / "qat.ckpt")
    target = _mlp()
    assert load_weights(target, tmp_path / "qat.ckpt") == 4
    assert torch.equal(target[0].weight, source[0].weight)


def test_wrapper_prefixes_of_ddp_and_torch_compile_are_dropped(tmp_path):
    source = _mlp()
    torch.save({f"module._orig_mod.{k}": v for k, v in source.state_dict().items()}, tmp_path / "wrapped.pt")
    target = _mlp()
    assert load_weights(target, tmp_path / "wrapped.pt") == 4
    assert torch.equal(target[2].weight, source[2].weight)


def test_checkpoint_of_another_model_names_the_differences(tmp_path):
    torch.save(_mlp(hidden=16).state_dict(), tmp_path / "wide.pt")
    shape = r"wide\.pt does not fit Sequential: 3 of another shape \(0\.bias: \(16,\) in the file, \(8,\) in the model"
    with pytest.raises(ConfigError, match=shape):
        load_weights(_mlp(), tmp_path / "wide.pt")
    torch.save({"0.weight": torch.zeros(8, 4)}, tmp_path / "part.pt")
    with pytest.raises(ConfigError, match=r"3 missing \(0\.bias, 2\.bias, 2\.weight\)"):
        load_weights(_mlp(), tmp_path / "part.pt")


def test_unreadable_files_are_named(tmp_path):
    # "junk": read as the legacy format, whose magic number pickle then looks up (a KeyError, before the fix)
    for text in ["not a checkpoint", "junk\n"]:
        (tmp_path / "notes.txt").write_text(text)
        with pytest.raises(DataError, match=r"initial_checkpoint: .*notes\.txt is not a readable PyTorch checkpoint"):
            load_weights(_mlp(), tmp_path / "notes.txt")
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(DataError, match="holds no state dict"):
        load_weights(_mlp(), tmp_path / "list.pt")
    with pytest.raises(DataError, match="no file"):
        load_weights(_mlp(), tmp_path / "absent.pt")


def test_checkpoint_from_before_the_layout_changes_initialises_the_same_model(tmp_path):
    """A checkpoint written before qkv was grouped by head and pos_scale became ``[1]`` (no grouping mark, the old
    row order, a 0-d pos_scale) passes load_weights' key and shape check, which runs the parts' upgrades first, and
    gives the model it was saved from."""
    from zoo.encoders import ConvImageEncoder
    from zoo.fusion import MIE

    def model() -> nn.ModuleDict:
        fusion = MIE(modalities=("image",), dim=16, depth=1, num_heads=4, modality_fusion_layers=1)
        return nn.ModuleDict({"image": ConvImageEncoder(channels=(8,), dim=16), "fusion": fusion})

    torch.manual_seed(0)
    source = model().eval()
    nn.init.normal_(source["image"].pos_scale, mean=2.0)  # differs from a fresh model's 1
    old = dict(source.state_dict())
    del old["fusion.blocks.0.attn.qkv_grouped_by_head"]
    for key in ("fusion.blocks.0.attn.qkv.weight", "fusion.blocks.0.attn.qkv.bias"):  # back to [3, heads, head_dim]
        rows = old[key]
        old[key] = rows.reshape(4, 3, 4, *rows.shape[1:]).transpose(0, 1).reshape(48, *rows.shape[1:])
    old["image.pos_scale"] = old["image.pos_scale"].reshape(())
    torch.save(old, tmp_path / "old.pt")

    target = model().eval()
    assert load_weights(target, tmp_path / "old.pt") == len(source.state_dict())
    images = torch.randn(2, 3, 16, 16)
    expected = source["fusion"]({"image": source["image"](images)}).pooled
    got = target["fusion"]({"image": target["image"](images)}).pooled
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_resume_checkpoint_is_checked_before_lightning_loads_it(tmp_path, capsys):
    """``--ckpt_path``: a truncated copy, a file of another kind and a plain state dict fail with the flag and the
    file named (Lightning failed deep inside: a zip reader's RuntimeError, pickle's KeyError, its own KeyError)."""
    checkpoint = {"pytorch-lightning_version": "2.6.0", "state_dict": _mlp().state_dict(), "epoch": 0}
    torch.save(checkpoint, tmp_path / "good.ckpt")
    check_lightning_checkpoint(tmp_path / "good.ckpt")  # passes
    data = (tmp_path / "good.ckpt").read_bytes()
    (tmp_path / "cut.ckpt").write_bytes(data[: len(data) // 2])
    (tmp_path / "junk.ckpt").write_text("junk\n")
    torch.save(_mlp().state_dict(), tmp_path / "weights.ckpt")
    for name, message in [
        ("cut.ckpt", "is not a readable PyTorch checkpoint (not the zip archive torch.save writes"),
        ("junk.ckpt", "is not a readable PyTorch checkpoint (not the zip archive torch.save writes"),
        ("weights.ckpt", "is a PyTorch file but not a Lightning checkpoint"),
    ]:
        with pytest.raises(DataError, match=rf"--ckpt_path: .*{name} {re.escape(message)}"):
            check_lightning_checkpoint(tmp_path / name)
    with pytest.raises(SystemExit):
        main(["fit", "--config", "vqa.yaml", *TINY, f"--ckpt_path={tmp_path / 'junk.ckpt'}"])
    assert capsys.readouterr().err.startswith(f"zoo: error: --ckpt_path: {tmp_path / 'junk.ckpt'} is not a readable")
