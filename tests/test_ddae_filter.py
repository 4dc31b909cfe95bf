"""The BERTScore filter keeps paraphrases, rejects destroyed sentences, and caches its work keyed by configuration."""

from __future__ import annotations

import numpy as np
import pytest

from datamodules.ddae.augment import Augmentations, TextAugmenter
from datamodules.ddae.filter import BERTScoreFilter, score_augmentations
from zoo.errors import DataError


@pytest.fixture(scope="module")
def scorer() -> BERTScoreFilter:
    return BERTScoreFilter(progress=False)


def test_filter_keeps_a_paraphrase_and_rejects_a_sentence_whose_meaning_was_destroyed(scorer):
    original = "a domestic animal kept for companionship or for hunting"
    paraphrase = "a tame animal kept for company or for hunting"
    destroyed = "purple seventeen galaxy pencil thunder under lemon keyboard"  # every word replaced
    scores = scorer.score([paraphrase, destroyed], [original, original])
    assert scorer.keep(scores).tolist() == [True, False], scores
    # the threshold sits well inside the gap, not on its edge
    assert scores[0] - scorer.threshold > 0.05 and scorer.threshold - scores[1] > 0.2


def test_filter_rejects_empty_candidates(scorer):
    with pytest.raises(DataError, match="candidate 0"):
        scorer.score([" "], ["a sentence"])


def test_second_run_reads_the_cache_instead_of_recomputing(tmp_path, scorer, monkeypatch):
    texts = ["move quickly on foot", "a large building where people worship", "an official record of events"]
    labels = [0, 0, 1]
    augmenter = TextAugmenter(strength=0.5, max_copies=2, seed=0)
    first = score_augmentations(texts, labels, augmenter=augmenter, scorer=scorer, cache_dir=tmp_path)
    assert not first.from_cache and len(first.texts) > 0
    assert len(list(tmp_path.glob("ddae_*.json"))) == 1

    def fail(*args, **kwargs):
        raise AssertionError("recomputed")

    monkeypatch.setattr(BERTScoreFilter, "score", fail)
    monkeypatch.setattr(TextAugmenter, "__call__", fail)
    second = score_augmentations(texts, labels, augmenter=augmenter, scorer=scorer, cache_dir=tmp_path)
    assert second.from_cache and second.texts == first.texts
    assert np.allclose(second.f1, first.f1, atol=1e-5)
    monkeypatch.undo()
    # another configuration is another cache entry
    other = TextAugmenter(strength=0.5, max_copies=2, seed=1)
    score_augmentations(texts, labels, augmenter=other, scorer=scorer, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("ddae_*.json"))) == 2


def test_the_masked_lm_fit_length_keys_contextual_copies_only(tmp_path, scorer, monkeypatch):
    texts, labels = ["move quickly on foot", "a large building where people worship"], [0, 1]
    made = []

    def augment(self, texts, labels, num_classes=None):
        made.append(self.contextual_steps)
        return Augmentations(["move fast on foot"], [0], [self.operations[0]])

    monkeypatch.setattr(TextAugmenter, "__call__", augment)
    for ops in (["contextual_label"], ["synonym"]):
        for steps in (2000, 100, 2000):
            augmenter = TextAugmenter(strength=0.5, max_copies=2, operations=ops, contextual_steps=steps)
            score_augmentations(texts, labels, augmenter=augmenter, scorer=scorer, cache_dir=tmp_path)
    # contextual: a fit of 100 steps is another entry, 2000 again is read back; synonym: one entry for all three
    assert made == [2000, 100, 2000] and len(list(tmp_path.glob("ddae_*.json"))) == 3
    # so does the fit's depth
    augmenter = TextAugmenter(strength=0.5, max_copies=2, operations=["contextual_label"], contextual_layers=1)
    score_augmentations(texts, labels, augmenter=augmenter, scorer=scorer, cache_dir=tmp_path)
    assert len(made) == 4 and len(list(tmp_path.glob("ddae_*.json"))) == 4


@pytest.mark.parametrize(
    ("edit", "reason"),
    [
        (lambda c: c.update(f1=c["f1"][:-1]), "differ in length"),
        (lambda c: c.update(source=[99] * len(c["source"])), "source index outside the 3 training texts"),
        (lambda c: c.update(f1=[None] * len(c["f1"])), "not a number"),  # every copy silently rejected, before
        (lambda c: c.update(f1="high"), "could not convert"),
    ],
)
def test_a_cache_file_edited_by_hand_is_named(tmp_path, scorer, edit, reason):
    import json

    texts, labels = ["move quickly on foot", "a large building", "an official record of events"], [0, 0, 1]
    augmenter = TextAugmenter(strength=0.5, max_copies=2, seed=0)
    score_augmentations(texts, labels, augmenter=augmenter, scorer=scorer, cache_dir=tmp_path)
    (path,) = tmp_path.glob("ddae_*.json")
    cached = json.loads(path.read_text())
    edit(cached)
    path.write_text(json.dumps(cached))
    with pytest.raises(DataError, match=rf"{path.name}: unreadable DDAE cache \(.*{reason}"):
        score_augmentations(texts, labels, augmenter=augmenter, scorer=scorer, cache_dir=tmp_path)


def test_the_scorer_fingerprint_tells_two_copies_of_a_model_apart(tmp_path):
    from zoo.encoders.text import model_fingerprint

    def copy(name: str, weights: bytes):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "config.json").write_text('{"hidden_size": 384}')
        (folder / "model.safetensors").write_bytes(weights)
        return folder

    fp32, again, bf16 = copy("fp32", b"\0" * 8), copy("again", b"\1" * 8), copy("bf16", b"\0" * 4)
    assert model_fingerprint(fp32) == model_fingerprint(again)  # the same files, other bytes: names and sizes alike
    assert model_fingerprint(fp32) != model_fingerprint(bf16)
    assert BERTScoreFilter(model_path=str(fp32)).fingerprint != BERTScoreFilter(model_path=str(bf16)).fingerprint
