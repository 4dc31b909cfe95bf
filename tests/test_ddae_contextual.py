"""Contextual substitution: the packaged MiniLM gets a masked-LM head fitted to the texts (cached), and the augmenter
replaces content words only, reproducibly."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from datamodules.ddae import augment, contextual
from datamodules.ddae.augment import STOPWORDS, TextAugmenter
from datamodules.ddae.contextual import ContextualSubstituteAug, MaskedWordModel, fit_masked_lm
from datamodules.text_folder import TextFolderDataModule
from zoo.errors import ConfigError

TEXTS = [
    "a large building where people worship together",
    "move quickly on foot over a long distance",
    "a domestic animal kept for companionship or for hunting",
    "the act of giving money or goods to a charity",
]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return fit_masked_lm(TEXTS, steps=2, batch_size=4, device="cpu", cache_dir=tmp_path_factory.mktemp("mlm"))


def test_the_fitted_head_is_cached_and_read_back(tmp_path):
    first = fit_masked_lm(TEXTS, steps=2, batch_size=4, device="cpu", cache_dir=tmp_path)
    assert len(list(tmp_path.glob("mlm_*.pt"))) == 1
    again = fit_masked_lm(TEXTS, steps=2, batch_size=4, device="cpu", cache_dir=tmp_path)
    for (name, a), b in zip(first.state_dict().items(), again.state_dict().values(), strict=True):
        torch.testing.assert_close(a.to(torch.bfloat16).float(), b, msg=name)  # stored in bf16
    with pytest.raises(ConfigError, match="no texts"):
        fit_masked_lm([], steps=2)
    with pytest.raises(ConfigError, match="steps=0"):
        fit_masked_lm(TEXTS, steps=0)


def test_substitution_changes_content_words_only_and_is_reproducible(model):
    aug = ContextualSubstituteAug(model, stopwords=STOPWORDS, aug_p=0.5)
    outs = []
    for _ in range(2):
        random.seed(3)
        outs.append([aug.augment(t)[0] for t in TEXTS])
    assert outs[0] == outs[1] and outs[0] != TEXTS
    for text, out in zip(TEXTS, outs[0], strict=True):
        before, after = text.split(), out.split()
        assert len(before) == len(after)
        assert all(b == a for b, a in zip(before, after, strict=True) if b in STOPWORDS)


def test_without_a_model_the_augmenter_says_so():
    with pytest.raises(ConfigError, match="fit"):
        ContextualSubstituteAug(stopwords=STOPWORDS).substitute("a large building")


def test_text_augmenter_fits_the_head_to_the_texts_it_augments(model, monkeypatch, tmp_path):
    seen = []

    def fitted(texts, labels=None, **kwargs):
        seen.append((list(texts), labels, kwargs))
        return model

    monkeypatch.setattr(contextual, "fit_masked_lm", fitted)
    augmenter = TextAugmenter(
        strength=1.0, max_copies=2, operations=["contextual"], seed=0, cache_dir=tmp_path, device="cpu"
    )
    made = augmenter(TEXTS, [0, 0, 0, 1])
    fit = {"steps": augment.CONTEXTUAL_STEPS, "layers": augment.CONTEXTUAL_LAYERS}
    fit |= {"cache_dir": tmp_path, "device": "cpu"}
    assert seen == [(TEXTS, None, fit)]
    assert made.texts and set(made.operation) == {"contextual"}
    assert "contextual" in augment.OPERATIONS


def test_the_datamodule_fits_the_head_in_its_cache_on_the_filter_device(model, monkeypatch, tmp_path):
    seen = []

    def fitted(texts, labels=None, **kwargs):
        seen.append(kwargs)
        return model

    monkeypatch.setattr(contextual, "fit_masked_lm", fitted)
    train = tmp_path / "train.csv"
    rows = [(t, "common") for t in TEXTS * 3] + [("a heavy rain storm from dark clouds", "rare")] * 2
    train.write_text("text,label\n" + "".join(f'"{t}",{y}\n' for t, y in rows), encoding="utf8")
    dm = TextFolderDataModule(
        train_file=str(train),
        augmentation_strength=0.5,
        max_copies=4,
        augmentation_ops=["contextual"],
        cache_dir=str(tmp_path / "cache"),
        filter_device="cpu",
        contextual_steps=7,
        contextual_layers=1,
    )
    dm.setup("fit")
    assert seen == [{"steps": 7, "layers": 1, "cache_dir": tmp_path / "cache", "device": "cpu"}]
    assert dm.ddae_stats["augmented"] > 0 and set(dm.augmentations.operation) == {"contextual"}


def test_the_label_conditional_model_fills_in_words_of_the_class(tmp_path):
    # the masked colour can be told only from the label: an unconditional model cannot, a conditional one must
    texts, labels = ["the colour of the flag is red", "the colour of the flag is blue"] * 32, [0, 1] * 32
    torch.manual_seed(1)  # the caller's generators do not matter: the fit seeds its own dropout
    fitted = fit_masked_lm(texts, labels, steps=40, batch_size=64, lr=5e-4, device="cpu", cache_dir=tmp_path)
    plain = fit_masked_lm(texts, steps=2, batch_size=16, device="cpu", cache_dir=tmp_path)
    assert len(list(tmp_path.glob("mlm_*.pt"))) == 2  # the labels are part of the cache key
    tokenizer = fitted.tokenizer
    batch = tokenizer(["the colour of the flag is [MASK]"] * 2, return_tensors="pt")
    where = batch["input_ids"] == tokenizer.mask_token_id
    with torch.no_grad():
        logits = fitted(batch["input_ids"], batch["attention_mask"], where, torch.tensor([0, 1]))
    red, blue = tokenizer.convert_tokens_to_ids(["red", "blue"])
    assert logits[0, red] > logits[0, blue] + 2 and logits[1, blue] > logits[1, red] + 2  # seeds 0-2: 3.2 to 7.3
    with pytest.raises(ConfigError, match="without labels"):
        fitted(batch["input_ids"], batch["attention_mask"], where)
    with pytest.raises(ConfigError, match="with labels"):
        plain(batch["input_ids"], batch["attention_mask"], where, torch.tensor([0, 1]))

    aug = ContextualSubstituteAug(fitted, conditional=True, aug_p=0.5)
    with pytest.raises(ConfigError, match="label"):
        aug.substitute("the colour of the flag is red")
    aug.label = 1
    random.seed(0)
    assert aug.substitute("the colour of the flag is red") != "the colour of the flag is red"
    with pytest.raises(ConfigError, match="labels"):
        fit_masked_lm(texts, labels[:3], steps=2, device="cpu")
    with pytest.raises(ConfigError, match="labels"):
        ContextualSubstituteAug(conditional=True).fit(texts)


def test_text_augmenter_passes_labels_to_the_conditional_operation(model, monkeypatch, tmp_path):
    seen, conditioned = [], []

    def fitted(texts, labels=None, **kwargs):
        seen.append(labels)
        return model

    def substitute(self, data):
        conditioned.append((data, self.label))
        return data + " again"

    monkeypatch.setattr(contextual, "fit_masked_lm", fitted)
    monkeypatch.setattr(ContextualSubstituteAug, "substitute", substitute)
    augmenter = TextAugmenter(strength=1.0, max_copies=2, operations=["contextual_label"], cache_dir=tmp_path)
    made = augmenter(TEXTS, [0, 0, 1, 2])
    assert seen == [[0, 0, 1, 2]]
    assert set(made.operation) == {"contextual_label"} and set(made.source) == {2, 3}  # class 0 is the largest
    assert {label for _, label in conditioned} == {1, 2}
    assert all(label == [0, 0, 1, 2][TEXTS.index(text)] for text, label in conditioned)


def test_a_fit_is_a_function_of_its_seed_and_leaves_the_callers_draws_alone():
    first, second = [], []
    for out in (first, second):
        torch.manual_seed(len(out) + len(first))  # another global state each time
        model = fit_masked_lm(TEXTS, [0, 1, 0, 1], steps=2, batch_size=4, device="cpu", seed=3)
        out.append(model.label_embedding.weight.detach().clone())
    torch.testing.assert_close(first[0], second[0])
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    fit_masked_lm(TEXTS, steps=1, batch_size=4, device="cpu")
    torch.testing.assert_close(torch.rand(3), expected)


def test_a_fit_keeps_minilm_s_first_layers_and_names_them_in_its_cache_key(tmp_path):
    for layers in (1, 2):
        fitted = fit_masked_lm(TEXTS, steps=1, batch_size=4, layers=layers, device="cpu", cache_dir=tmp_path)
        assert len(fitted.encoder.encoder.layer) == layers == fitted.encoder.config.num_hidden_layers
    assert len(list(tmp_path.glob("mlm_*.pt"))) == 2
    assert len(fit_masked_lm(TEXTS, steps=1, batch_size=4, layers=None, device="cpu").encoder.encoder.layer) == 6
    for layers in (0, 7, True):
        with pytest.raises(ConfigError, match=f"layers={layers}"):
            MaskedWordModel(layers=layers)
        with pytest.raises(ConfigError, match=f"contextual_layers={layers}"):  # refused before any fit
            TextAugmenter(strength=0.5, operations=["contextual_label"], contextual_layers=layers)


def test_fit_batches_group_texts_of_similar_length_and_cover_every_text_once_a_pass():
    rng = np.random.default_rng(0)
    lengths = rng.integers(4, 64, size=4000)
    batches = contextual._length_grouped_batches(lengths, 128, np.random.default_rng(1))
    one_pass = [next(batches) for _ in range(-(-4000 // 128) + contextual.POOL)]  # a pass, give or take a pool
    seen = np.concatenate(one_pass)
    first = seen[:4000]
    assert sorted(first.tolist()) == list(range(4000))  # the first pass: every text once
    # padding: a batch pads to its longest text; grouped, about 8% of the padded tokens are padding, at random 46%
    grouped = np.mean([1 - lengths[b].mean() / lengths[b].max() for b in one_pass])
    random = np.mean([1 - lengths[b].mean() / lengths[b].max() for b in np.array_split(rng.permutation(4000), 31)])
    assert grouped < 0.2 < 0.4 < random
