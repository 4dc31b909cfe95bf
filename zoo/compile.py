"""Regional compilation: ``torch.compile`` each transformer block and each tensor-input encoder in place.

As torchtitan does, the repeated blocks are compiled one by one rather than the whole model: the graphs stay small
(one compilation serves every block of the same shape, since parameters are graph inputs), Python-side code between
them (tokenizers, mask building, Lightning's hooks) runs eagerly, and ``state_dict`` keys do not change
(``nn.Module.compile`` wraps the module's call, not the module). Whether it pays depends on the model: on the
width-128 VQA model an H200 training step took 33.7 ms compiled against 30.1 ms eager (benchmarks/train_step.py,
benchmarks/results/train_step_vqa_h200_2026-11-28.json); measure before turning it on.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from zoo.contracts import Encoder
from zoo.errors import ConfigError
from zoo.layers.transformer import TransformerBlock


def compile_regions(module: nn.Module, **options: Any) -> list[str]:
    """Compile, in place, every :class:`TransformerBlock` of ``module`` and every encoder whose ``compilable`` is
    true (text encoders tokenize Python strings, so only their blocks are compiled).

    Args:
        module: any model; searched recursively.
        options: keyword arguments of ``torch.compile`` (``mode``, ``dynamic``, ``fullgraph``, ...).

    Returns:
        The qualified names of the compiled modules.
    """
    if options.get("mode") in ("reduce-overhead", "max-autotune"):
        # Seen on an H200 (benchmarks/train_step.py, vqa_sort_of_clevr.py, 2026-11-28): training steps ran 1.29x faster,
        # but validation then failed with "accessing tensor output of CUDAGraphs that has been overwritten by a
        # subsequent run": one block graph, replayed once per block, reuses its output memory while it is needed.
        raise ConfigError(
            f"compile: mode={options['mode']!r} records CUDA graphs per region, which fail on the zoo's per-block "
            "graphs; use the default mode or 'max-autotune-no-cudagraphs'"
        )
    compiled: list[str] = []
    for name, child in module.named_modules():
        if any(name.startswith(f"{done}.") for done in compiled):
            continue  # inside a region already compiled
        if isinstance(child, TransformerBlock) or (isinstance(child, Encoder) and child.compilable):
            child.compile(**options)
            compiled.append(name)
    return compiled
