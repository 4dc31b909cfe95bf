"""Regional compilation: ``torch.compile`` each transformer block and each tensor-input encoder in place.

As torchtitan does, the repeated blocks are compiled one by one rather than the whole model: the graphs stay small
(one compilation serves every block of the same shape, since parameters are graph inputs), Python-side code between
them (tokenizers, mask building, Lightning's hooks) runs eagerly, and ``state_dict`` keys do not change
(``nn.Module.compile`` wraps the module's call, not the module). Small models on a GPU are bound by kernel-launch
overhead; fusing each block's norms, activations and residual adds into few kernels is where the speed comes from.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from zoo.contracts import Encoder
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
    compiled: list[str] = []
    for name, child in module.named_modules():
        if any(name.startswith(f"{done}.") for done in compiled):
            continue  # inside a region already compiled
        if isinstance(child, TransformerBlock) or (isinstance(child, Encoder) and child.compilable):
            child.compile(**options)
            compiled.append(name)
    return compiled
