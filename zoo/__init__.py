"""zoo: a PyTorch Lightning component zoo for multimodal models.

Parts live where their names say: ``zoo.encoders``, ``zoo.fusion``, ``zoo.layers``, ``zoo.quant``, ``zoo.callbacks``;
tasks in ``lit_models``, data in ``datamodules``, runnable configs in ``cli_configs``. The contracts they share are
in :mod:`zoo.contracts`.
"""

from zoo.contracts import FFN, Encoder, Fused, Fusion, Tokens

__version__ = "0.1.0"
__all__ = ["FFN", "Encoder", "Fused", "Fusion", "Tokens", "__version__"]
