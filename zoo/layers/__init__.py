"""Layers shared by encoders and fusion modules."""

from zoo.layers.attention import ScaledDotProduct, SelfAttention
from zoo.layers.ffn import FeedForward
from zoo.layers.transformer import TransformerBlock, padding_attn_mask

__all__ = ["FeedForward", "ScaledDotProduct", "SelfAttention", "TransformerBlock", "padding_attn_mask"]
