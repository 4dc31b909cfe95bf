"""Every encoder meets the Encoder contract and works with every fusion module, with no code changed elsewhere."""

from __future__ import annotations

import pytest
import torch

from zoo.contracts import Encoder, Fused, Fusion, Tokens
from zoo.encoders import (
    ConvImageEncoder,
    MiniLMTextEncoder,
    SpectrogramAudioEncoder,
    TimmImageEncoder,
    TransformerTextEncoder,
)
from zoo.fusion import MIE, TwoTower
from zoo.model import MultimodalModel

DIM = 32
TEXTS = ["what shape is the red object?", "is the blue square left of the grey circle in the picture?", "how many"]


def _image(seed: int) -> torch.Tensor:
    return torch.randn(3, 3, 40, 40, generator=torch.Generator().manual_seed(seed))


def _audio(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"waveform": torch.randn(3, 8000, generator=g), "lengths": torch.tensor([8000, 4000, 6000])}


ENCODERS = {
    "conv_image": (lambda: ConvImageEncoder(channels=(8, 16), dim=DIM), _image),
    "timm_image": (lambda: TimmImageEncoder("resnet18", feature_index=2), _image),
    "transformer_text": (lambda: TransformerTextEncoder(dim=DIM, depth=1), lambda seed: list(TEXTS)),
    "minilm_text": (lambda: MiniLMTextEncoder(freeze=True), lambda seed: list(TEXTS)),
    "audio": (lambda: SpectrogramAudioEncoder(dim=DIM, depth=1, n_mels=32), _audio),
}
FUSIONS = {
    "mie": lambda mods: MIE(modalities=mods, dim=DIM, depth=3, num_heads=2, modality_fusion_layers=2),
    "two_tower": lambda mods: TwoTower(modalities=mods, dim=DIM, depth=2, num_heads=2),
}


@pytest.fixture(scope="module")
def minilm():
    return MiniLMTextEncoder(freeze=True)


@pytest.mark.parametrize("encoder_name", sorted(ENCODERS))
def test_encoder_returns_tokens_of_its_width(encoder_name, minilm):
    torch.manual_seed(0)
    build, make_input = ENCODERS[encoder_name]
    encoder = minilm if encoder_name == "minilm_text" else build()
    assert isinstance(encoder, Encoder)
    tokens = encoder(make_input(0))
    assert isinstance(tokens, Tokens)
    B, T, D = tokens.embeddings.shape
    assert B == 3 and T >= 1 and D == encoder.out_dim
    assert tokens.mask.dtype == torch.bool and tokens.mask.shape == (B, T)
    assert tokens.mask.any(1).all(), "every example keeps at least one real token"
    assert torch.isfinite(tokens.embeddings).all()


@pytest.mark.parametrize("fusion_name", sorted(FUSIONS))
@pytest.mark.parametrize("encoder_name", sorted(ENCODERS))
def test_every_encoder_plugs_into_every_fusion(encoder_name, fusion_name, minilm):
    torch.manual_seed(0)
    build, make_input = ENCODERS[encoder_name]
    encoder = minilm if encoder_name == "minilm_text" else build()
    partner = TransformerTextEncoder(dim=DIM, depth=1)
    fusion = FUSIONS[fusion_name](("x", "question"))
    assert isinstance(fusion, Fusion)
    model = MultimodalModel({"x": encoder, "question": partner}, fusion)
    batch = {"x": make_input(0), "question": list(reversed(TEXTS))}
    out = model(batch)
    assert isinstance(out, Fused)
    assert out.pooled.shape == (3, DIM)
    x_tokens = encoder(batch["x"]).embeddings.shape[1]
    q_tokens = partner(batch["question"]).embeddings.shape[1]
    assert out.tokens.embeddings.shape == (3, x_tokens + q_tokens, DIM)
    out.pooled.square().sum().backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert trainable
    # every trainable parameter that feeds the pooled vector gets a gradient
    missing = [n for n, p in trainable if p.grad is None and "fusion.blocks" not in n and "towers" not in n]
    assert not missing, missing


@pytest.mark.parametrize("fusion_name", sorted(FUSIONS))
def test_padding_does_not_change_the_result(fusion_name):
    """A question padded to the length of a longer one in its batch gives the same pooled vector as alone."""
    torch.manual_seed(0)
    text = TransformerTextEncoder(dim=DIM, depth=1)
    image = ConvImageEncoder(channels=(8,), dim=DIM)
    model = MultimodalModel({"image": image, "text": text}, FUSIONS[fusion_name](("image", "text"))).eval()
    images = _image(1)[:2]
    short, long = "what shape?", "what is the shape of the object furthest from the green object in this image?"
    together = model({"image": images, "text": [short, long]}).pooled
    alone = model({"image": images[:1], "text": [short]}).pooled
    # fp32, same operations on the real tokens; only summation order may differ
    torch.testing.assert_close(together[:1], alone, rtol=1e-4, atol=1e-5)


def test_fusion_rejects_mismatched_modalities():
    with pytest.raises(ValueError, match="encoders given"):
        MultimodalModel({"image": ConvImageEncoder(dim=DIM)}, MIE(modalities=("image", "text"), dim=DIM))


def test_text_encoders_reject_empty_strings():
    with pytest.raises(ValueError, match="text 1 is empty"):
        TransformerTextEncoder(dim=DIM, depth=1)(["fine", "  "])


def test_timm_encoder_names_a_bad_backbone_and_missing_weights(tmp_path):
    with pytest.raises(ValueError, match="not_a_model"):
        TimmImageEncoder("not_a_model")
    with pytest.raises(FileNotFoundError, match="weights.pt"):
        TimmImageEncoder("resnet18", weights_path=str(tmp_path / "weights.pt"))


def test_timm_encoder_loads_local_weights(tmp_path):
    torch.manual_seed(0)
    source = TimmImageEncoder("resnet18", feature_index=1)
    path = tmp_path / "weights.pt"
    torch.save(source.backbone.state_dict(), path)
    torch.manual_seed(1)
    loaded = TimmImageEncoder("resnet18", feature_index=1, weights_path=str(path))
    for (name, a), b in zip(source.backbone.state_dict().items(), loaded.backbone.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_a_batch_without_an_encoders_field_names_it():
    from zoo.errors import ConfigError

    model = MultimodalModel({"text": TransformerTextEncoder(dim=DIM, depth=1)}, FUSIONS["mie"](["text"]))
    with pytest.raises(ConfigError, match=r"no 'text' field for encoders\['text'\]; its fields are \['image'\]"):
        model({"image": _image(0)})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_text_encoder_on_cuda_gives_the_cpu_tokens():
    """On a GPU the tokenizer copies ids and mask from pinned memory without blocking: the same tokens as on the
    CPU, and the same encoding."""
    encoder = TransformerTextEncoder(dim=DIM, depth=1).eval()
    ids, mask = encoder.tokenizer(TEXTS, torch.device("cpu"))
    ids_gpu, mask_gpu = encoder.tokenizer(TEXTS, torch.device("cuda"))
    assert ids_gpu.is_cuda and torch.equal(ids_gpu.cpu(), ids) and torch.equal(mask_gpu.cpu(), mask)
    expected = encoder(list(TEXTS))
    out = encoder.cuda()(list(TEXTS))
    torch.testing.assert_close(out.embeddings.cpu(), expected.embeddings, rtol=1e-4, atol=1e-4)
    assert torch.equal(out.mask.cpu(), expected.mask)
