"""Regional compilation: ``torch.compile`` each fusion module, each tensor-input encoder and each other transformer
block in place.

The regions are the model's parts rather than the whole model: Python-side code between them (tokenizers, Lightning's
hooks) runs eagerly, and ``state_dict`` keys do not change (``nn.Module.compile`` wraps the module's call, not the
module). A fusion module is one region by default: its attention masks, every block and the final norm become one
graph, so the masks are never written out between blocks and one guard check serves the stack (against the blocks
compiled one by one: the converted integer VQA model up to 1.2x faster on the 2-core CPU and 1.23x on an H200; an H200
training step 0.89-1.16x the speed of eager over five calls, where the blocks one by one ran 0.80-0.97x; README).
``whole_fusion=False`` compiles its blocks one by one instead, as torchtitan does: one compilation serves every block
of the same shape (parameters are graph inputs), so deep stacks compile faster, and under FSDP2 each block is a unit
whose parameter gathering runs in hooks between the graphs. Whether compiling pays at all depends on the model and
the device (``benchmarks/train_step.py``); measure before turning it on.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from zoo.contracts import Encoder, Fusion
from zoo.errors import ConfigError
from zoo.layers.transformer import TransformerBlock


def compile_regions(module: nn.Module, *, whole_fusion: bool = True, **options: Any) -> list[str]:
    """Compile, in place, every fusion module (whole), every encoder whose ``compilable`` is true (text encoders
    tokenize Python strings, so only their blocks are compiled) and every :class:`TransformerBlock` outside those.

    Args:
        module: any model; searched recursively.
        whole_fusion: compile each :class:`~zoo.contracts.Fusion` as one region; ``False`` compiles its transformer
            blocks one by one (faster compilation of deep stacks; a task's default under FSDP2).
        options: keyword arguments of ``torch.compile`` (``mode``, ``dynamic``, ``fullgraph``, ...).

    Returns:
        The qualified names of the compiled modules.
    """
    if options.get("mode") in ("reduce-overhead", "max-autotune"):
        # Seen on an H200: with MIE's blocks compiled one by one (benchmarks/train_step.py, vqa_sort_of_clevr.py,
        # 2026-11-28) training steps ran 1.29x faster, but validation failed with "accessing tensor output of
        # CUDAGraphs that has been overwritten by a subsequent run" (one block graph, replayed once per block, reuses
        # its output memory while it is needed); with MIE compiled whole (vqa_gpu.yaml, 2026-11-29) the same error
        # came from the backward of DynamicBatchAdjustment's memory probe, which runs the graphs several times; and
        # without that callback (vqa.yaml, 2026-11-29), and in inference alone, the image encoder's graph output was
        # overwritten before MIE's graph, which reads it, was recorded.
        raise ConfigError(
            f"compile: mode={options['mode']!r} records CUDA graphs, whose outputs the next replay overwrites while "
            "Lightning's loop still needs them; use the default mode or 'max-autotune-no-cudagraphs'"
        )
    compiled: list[str] = []
    for name, child in module.named_modules():
        if any(done == "" or name.startswith(f"{done}.") for done in compiled):
            continue  # inside a region already compiled ("" is ``module`` itself)
        if (
            isinstance(child, TransformerBlock)
            or (isinstance(child, Encoder) and child.compilable)
            or (isinstance(child, Fusion) and whole_fusion)
        ):
            child.compile(**options)
            compiled.append(name)
    return compiled
