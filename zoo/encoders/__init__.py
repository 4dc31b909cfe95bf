"""Encoders: raw input of one modality -> ``Tokens`` (``[B, T, D]`` plus a padding mask)."""

from zoo.encoders.audio import SpectrogramAudioEncoder
from zoo.encoders.image import ConvImageEncoder, TimmImageEncoder
from zoo.encoders.text import MiniLMTextEncoder, TextTokenizer, TransformerTextEncoder, minilm_path

__all__ = [
    "ConvImageEncoder",
    "MiniLMTextEncoder",
    "SpectrogramAudioEncoder",
    "TextTokenizer",
    "TimmImageEncoder",
    "TransformerTextEncoder",
    "minilm_path",
]
