"""The dense position-wise feed-forward layer."""

from __future__ import annotations

from torch import Tensor, nn

from zoo.contracts import FFN


class FeedForward(FFN):
    """Dense FFN ``fc2(dropout(gelu(fc1(x))))``: ``[..., dim] -> [..., dim]`` through ``hidden_dim`` units.

    Names follow timm's ``Mlp`` (``fc1``, ``act``, ``fc2``) so that quantization patterns such as ``*.ffn.fc1`` and
    tensor-parallel plans address it by name.
    """

    def __init__(self, dim: int, hidden_dim: int, *, dropout: float = 0.0) -> None:
        super().__init__(dim, hidden_dim)
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.drop = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.drop(self.act(self.fc1(x))))
