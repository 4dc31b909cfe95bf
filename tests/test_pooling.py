"""Pooling of tokens into one vector: the attention pool ignores padding, learns, and plugs into the classifier."""

from __future__ import annotations

import pytest
import torch

from lit_models.classification import TextClassifier
from zoo.contracts import Tokens
from zoo.encoders import TransformerTextEncoder
from zoo.errors import ConfigError
from zoo.layers.pooling import AttentionPool, MeanPool, build_pool


def _padded(real: torch.Tensor, pad: int, fill: float) -> Tokens:
    """``real`` ``[B, T, D]`` followed by ``pad`` positions of ``fill``, masked out."""
    junk = torch.full((real.shape[0], pad, real.shape[2]), fill)
    mask = torch.cat(
        [torch.ones(real.shape[:2], dtype=torch.bool), torch.zeros(real.shape[0], pad, dtype=torch.bool)], 1
    )
    return Tokens(torch.cat([real, junk], 1), mask)


def test_attention_pool_reads_only_the_real_tokens():
    torch.manual_seed(0)
    pool = AttentionPool(16, num_heads=4).eval()
    real = torch.randn(3, 5, 16)
    expected = pool(Tokens.dense(real))
    for fill in (0.0, 100.0):
        assert torch.allclose(pool(_padded(real, 4, fill)), expected, atol=1e-5)
    # and the real tokens do matter: it is not a constant
    assert not torch.allclose(pool(Tokens.dense(real.flip(0))), expected)


def test_attention_pool_weights_tokens_unlike_the_mean():
    torch.manual_seed(0)
    pool = AttentionPool(8, num_heads=2)
    tokens = Tokens.dense(torch.randn(4, 6, 8))
    optimizer = torch.optim.SGD(pool.parameters(), lr=0.5)
    target = tokens.embeddings[:, 2]  # learn to pick the third token
    for _ in range(300):
        loss = (pool(tokens) - target).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    mean_loss = (MeanPool()(tokens) - target).pow(2).mean()
    assert loss < 0.25 * mean_loss


def test_attention_pool_of_an_example_without_real_tokens_is_zero():
    pool = AttentionPool(8, num_heads=2)
    tokens = Tokens(torch.randn(2, 3, 8), torch.tensor([[True, True, False], [False, False, False]]))
    out = pool(tokens)
    assert torch.isfinite(out).all() and out[0].abs().sum() > 0 and not out[1].any()


def test_attention_pool_under_bf16_autocast():
    pool = AttentionPool(16, num_heads=4)
    tokens = _padded(torch.randn(2, 3, 16), 2, 0.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = pool(tokens)
    assert out.shape == (2, 16) and torch.isfinite(out.float()).all()
    assert torch.allclose(out.float(), pool(tokens), atol=0.1)


def test_bad_pool_settings_name_the_argument():
    with pytest.raises(ConfigError, match="num_heads=3"):
        AttentionPool(16, num_heads=3)
    with pytest.raises(ConfigError, match="Classifier: pool='max'"):
        TextClassifier(TransformerTextEncoder(dim=16, depth=1, num_heads=2), num_classes=3, pool="max")
    with pytest.raises(ConfigError, match="attention"):
        build_pool("cls", 16)


def test_classifier_with_attention_pool_learns_the_pool_and_mean_pool_adds_no_state():
    encoder = lambda: TransformerTextEncoder(dim=16, depth=1, num_heads=2, max_length=8)  # noqa: E731
    torch.manual_seed(0)
    mean = TextClassifier(encoder(), num_classes=3)
    assert not [k for k in mean.state_dict() if k.startswith("pool.")]  # checkpoints from before load unchanged
    model = TextClassifier(encoder(), num_classes=3, pool="attention", pool_heads=4)
    logits = model({"text": ["rain and wind", "a goal in the match", "snow"]})
    assert logits.shape == (3, 3) and torch.isfinite(logits).all()
    torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1, 2])).backward()
    latent = model.pool.attention.latent
    assert latent.grad is not None and latent.grad.abs().sum() > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_attention_pool_on_cuda_gives_the_cpu_result_and_zeros_for_an_empty_example():
    torch.manual_seed(0)
    pool = AttentionPool(64, num_heads=4)
    mask = torch.ones(3, 7, dtype=torch.bool)
    mask[0, 4:] = False
    mask[2] = False
    tokens = Tokens(torch.randn(3, 7, 64), mask)
    expected = pool(tokens)
    on_cuda = pool.cuda()(Tokens(tokens.embeddings.cuda(), mask.cuda()))
    assert torch.allclose(on_cuda.cpu(), expected, atol=1e-4) and not on_cuda[2].any()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        mixed = pool(Tokens(tokens.embeddings.cuda(), mask.cuda()))
    assert torch.allclose(mixed.float().cpu(), expected, atol=5e-2) and not mixed[2].any()
