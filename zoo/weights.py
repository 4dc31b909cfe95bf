"""Initialise a model from the weights of a checkpoint: the start of a fine-tuning run, quantization-aware or not.

Unlike resuming (``trainer.fit(ckpt_path=...)``), only the weights are taken: optimizer, schedule, epoch and callback
state start afresh. Quantizer state (fake-quant observers, learnable scales, bits) is left out of the match, so a
float checkpoint initialises a model that a QAT callback has already quantized.
"""

from __future__ import annotations

import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from zoo.contracts import upgrade_state_dict
from zoo.errors import ConfigError, DataError
from zoo.quant.qat import is_quantizer_state


def read_checkpoint(path: str | Path, *, what: str = "checkpoint") -> Any:
    """What ``torch.load(path, weights_only=True)`` reads onto the CPU; a missing file or one that is no PyTorch
    checkpoint is a :class:`DataError` naming ``what`` (the setting that gave the path) and the file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{what}: no file {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    # KeyError: a file of another kind, read as the legacy (non-zip) format, has no valid magic number
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, KeyError) as err:
        raise DataError(f"{what}: {path} is not a readable PyTorch checkpoint ({type(err).__name__}: {err})") from None


def check_lightning_checkpoint(path: str | Path, *, what: str = "--ckpt_path") -> None:
    """Raise a :class:`DataError` naming ``what`` and the file unless ``path`` is a Lightning checkpoint that
    ``torch.load`` can read: the zip archive ``torch.save`` writes, whose pickle holds Lightning's version key.

    Only the archive's directory and its pickle (the structure, not the tensors) are read, and nothing is unpickled:
    a cheap look before Lightning loads the whole file and fails deep inside on a truncated copy, a file of another
    kind or a plain state dict. A path that is not a local file is left to Lightning."""
    path = Path(path)
    if not path.is_file():
        return
    try:
        with zipfile.ZipFile(path) as archive:
            pickles = [name for name in archive.namelist() if name.rsplit("/", 1)[-1] == "data.pkl"]
            structure = archive.read(pickles[0]) if pickles else b""
    except (zipfile.BadZipFile, OSError, EOFError) as err:
        raise DataError(
            f"{what}: {path} is not a readable PyTorch checkpoint (not the zip archive torch.save writes: a truncated "
            f"copy or a file of another kind; {err})"
        ) from None
    if not pickles:
        raise DataError(f"{what}: {path} is a zip archive but not a PyTorch checkpoint")
    if b"pytorch-lightning_version" not in structure:
        raise DataError(
            f"{what}: {path} is a PyTorch file but not a Lightning checkpoint (to start from its weights alone, "
            "give it as the task's initial_checkpoint)"
        )


def read_state_dict(path: str | Path, *, what: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The state dict in ``path``: a Lightning checkpoint's ``state_dict`` or a plain state dict, read with
    :func:`read_checkpoint`. The wrappers' prefixes are dropped, as timm's ``clean_state_dict`` does: ``module.`` of
    ``DistributedDataParallel`` and ``_orig_mod.`` of ``torch.compile``. ``what`` names the setting in error
    messages."""
    checkpoint = read_checkpoint(path, what=what)
    state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, Mapping) else None
    if not isinstance(state, Mapping) or not state or not all(isinstance(k, str) for k in state):
        raise DataError(f"{what}: {path} holds no state dict (a Lightning checkpoint or a {{name: tensor}} mapping)")
    state = {k.replace("_orig_mod.", ""): v for k, v in state.items()}
    if all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def load_weights(module: nn.Module, path: str | Path, *, what: str = "initial_checkpoint") -> int:
    """Copy the weights saved in ``path`` into ``module``; returns how many tensors were loaded.

    Every parameter and buffer of ``module`` outside its fake quantizers must be in the checkpoint with the same
    shape, and the checkpoint may hold nothing else (besides quantizer state): a checkpoint of another architecture
    fails with a :class:`ConfigError` that lists the differences instead of half-loading. Quantizer state is loaded
    where both sides have it (a QAT checkpoint into a QAT model) and skipped otherwise.
    """
    # older layouts converted first (zoo.contracts.upgrade_state_dict), as load_state_dict's hooks would
    state = upgrade_state_dict(module, read_state_dict(path, what=what))
    target = module.state_dict()
    weights = {k for k in target if not is_quantizer_state(k)}
    given = {k for k in state if not is_quantizer_state(k)}
    missing, unexpected = sorted(weights - given), sorted(given - weights)
    mismatched = sorted(
        f"{k}: {tuple(state[k].shape)} in the file, {tuple(target[k].shape)} in the model"
        for k in weights & given
        if torch.is_tensor(state[k]) and state[k].shape != target[k].shape
    )
    if missing or unexpected or mismatched:
        problems = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("of another shape", mismatched)):
            if keys:
                problems.append(f"{len(keys)} {label} ({', '.join(keys[:4])}{', ...' if len(keys) > 4 else ''})")
        raise ConfigError(
            f"{what}: {path} does not fit {type(module).__name__}: " + "; ".join(problems)
            + ". It must come from a model with the same layers (the same config up to trainer and quantization)."
        )  # fmt: skip
    loadable = {k: v for k, v in state.items() if k in weights or k in target}
    module.load_state_dict(loadable, strict=False)
    return len(loadable)
