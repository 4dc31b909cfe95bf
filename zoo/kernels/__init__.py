"""Compute kernels of the zoo's layers: fused Triton kernels and the plain-PyTorch versions they are tested against
(``block_ffn``), and the int8 attention for AVX-512 VNNI CPUs, a C kernel compiled at first use
(``zoo.kernels.int8_attention``, imported by its module path).

Layers call the dispatchers here; nothing in this package knows about layers, tasks or Lightning.
"""

from zoo.kernels.block_ffn import (
    Routing,
    block_sparse_ffn,
    block_sparse_ffn_torch,
    route,
    triton_available,
    triton_supports,
)

__all__ = [
    "Routing",
    "block_sparse_ffn",
    "block_sparse_ffn_torch",
    "route",
    "triton_available",
    "triton_supports",
]
