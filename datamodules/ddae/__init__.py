"""DDAE, the Dynamic Data Augmentation Engine for long-tailed text classification.

* :mod:`~datamodules.ddae.sampler`: class-aware resampling, ``p(x) = w_y f(x) / sum``, DDP-sharded and resumable;
* :mod:`~datamodules.ddae.augment`: nlpaug augmentation (WordNet synonyms offline), more for rarer classes;
* :mod:`~datamodules.ddae.filter`: the BERTScore F1 filter (packaged MiniLM), batched and cached on disk;
* :mod:`~datamodules.ddae.datamodule`: the base datamodule that puts them together.
"""

from datamodules.ddae.augment import TextAugmenter, copies_per_class, wordnet_synonyms
from datamodules.ddae.datamodule import GROUP_NAMES, LongTailTextDataModule, TextSplits, frequency_groups
from datamodules.ddae.filter import BERTScoreFilter, score_augmentations
from datamodules.ddae.sampler import ClassAwareSampler, class_weights, copy_quality

__all__ = [
    "GROUP_NAMES",
    "BERTScoreFilter",
    "ClassAwareSampler",
    "LongTailTextDataModule",
    "TextAugmenter",
    "TextSplits",
    "class_weights",
    "copies_per_class",
    "copy_quality",
    "frequency_groups",
    "score_augmentations",
    "wordnet_synonyms",
]
