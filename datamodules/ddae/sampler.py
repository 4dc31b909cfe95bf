"""Class-aware resampling: draw example ``x`` of class ``y`` with probability ``w_y f(x) / sum_x' w_y' f(x')``.

``w_y`` is a class weight computed from the class counts ``n_y`` of the sampled data set:

* ``"none"``: 1 (plain sampling with replacement; ``f`` alone shapes it);
* ``"inverse"``: ``1 / n_y``, so every class is drawn equally often (class-balanced sampling);
* ``"sqrt_inverse"``: ``1 / sqrt(n_y)``, class frequencies proportional to ``sqrt(n_y)`` (square-root sampling,
  Mahajan et al. 2018), a milder rebalancing that costs the head classes less;
* ``"effective_number"``: ``(1 - beta) / (1 - beta ** n_y)``, the inverse of the effective number of samples of Cui
  et al. 2019 ("Class-Balanced Loss Based on Effective Number of Samples"): ``beta=0`` is ``"none"``, ``beta -> 1``
  is ``"inverse"``;
* a list of ``num_classes`` non-negative floats given by the user.

``f(x)`` is a per-example quality score, non-negative. The default is 1 for every example; the DDAE datamodule passes
the BERTScore F1 of an augmented sentence against its original (1 for originals), so that within a class, real
examples are drawn most and the augmentations in proportion to how faithful they are. :func:`copy_quality` raises that
score to a power ``p`` (the datamodule's ``sample_quality_power``): a soft filter that draws the copies which drift
from their original far less often.

A class's total probability is ``w_y * sum_{x in y} f(x)``: with ``f = 1`` and ``"inverse"`` every class is equally
likely, whatever its size.

Deferred re-balancing (the deferred re-sampling of Cao et al. 2019, "Learning Imbalanced Datasets with Label-
Distribution-Aware Margin Loss"): with ``rebalance_from_epoch=k``, epochs before ``k`` are plain shuffles of the
first ``originals`` examples (the un-augmented ones, when augmented copies follow them), so that the representation
is learnt on the natural distribution, and the class-aware draws over every example begin at epoch ``k``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from datamodules._common import RankShardedSampler
from zoo.errors import ConfigError

WEIGHT_SCHEMES = ("none", "inverse", "sqrt_inverse", "effective_number")


def class_weights(
    counts: Sequence[int] | np.ndarray, scheme: str | Sequence[float] = "inverse", *, beta: float = 0.999
) -> np.ndarray:
    """``w_y`` for classes of sizes ``counts`` ``[C]``: float64 ``[C]``, 0 for empty classes.

    Args:
        counts: examples per class.
        scheme: one of :data:`WEIGHT_SCHEMES`, or ``C`` user-given non-negative weights.
        beta: of ``"effective_number"``, in ``[0, 1)``.
    """
    counts = np.asarray(counts, dtype=np.float64)
    if not isinstance(scheme, str):
        weights = np.asarray(list(scheme), dtype=np.float64)
        if weights.shape != counts.shape:
            raise ConfigError(f"class_weights: {len(weights)} weights given for {len(counts)} classes")
        if not np.all(np.isfinite(weights)) or np.any(weights < 0):
            raise ConfigError(f"class_weights: weights {weights.tolist()} must be finite and >= 0")
        return np.where(counts > 0, weights, 0.0)
    present = counts > 0
    safe = np.where(present, counts, 1.0)
    if scheme == "none":
        weights = np.ones_like(counts)
    elif scheme == "inverse":
        weights = 1.0 / safe
    elif scheme == "sqrt_inverse":
        weights = 1.0 / np.sqrt(safe)
    elif scheme == "effective_number":
        if not 0 <= beta < 1:
            raise ConfigError(f"class_weights: beta={beta} must be in [0, 1)")
        weights = (1.0 - beta) / (1.0 - np.power(beta, safe))
    else:
        raise ConfigError(f"class_weights: scheme={scheme!r} must be one of {WEIGHT_SCHEMES} or a list of weights")
    return np.where(present, weights, 0.0)


_class_weights = class_weights  # the sampler's argument of the same name shadows it


class ClassAwareSampler(RankShardedSampler):
    """Draws ``num_samples`` indices per epoch, with replacement, ``p(x) = w_y f(x) / sum``; sharded by rank.

    The epoch's global sequence is a pure function of ``(seed, epoch)``; rank ``r`` of ``R`` takes positions
    ``r, r + R, ...`` of it, and a run resumes mid-epoch exactly (:class:`~datamodules._common.RankShardedSampler`).

    Args:
        labels: class of each example, ``[N]`` ints in ``[0, num_classes)``.
        class_weights: ``w_y``: a scheme name of :func:`class_weights` or ``num_classes`` floats.
        quality: ``f(x)``, ``[N]`` non-negative floats; 1 for every example by default.
        num_classes: number of classes; ``max(labels) + 1`` by default.
        num_samples: indices drawn per epoch over all ranks; ``len(labels)`` by default.
        beta: of ``"effective_number"``.
        seed: a non-negative integer.
        num_replicas: number of ranks; the process group's world size (1 without one) by default.
        rank: this process's rank; the process group's by default.
        rebalance_from_epoch: the first epoch of class-aware draws; earlier epochs shuffle the first ``originals``
            examples (consecutive permutations, cut to ``num_samples``). 0: class-aware from the start.
        originals: how many leading examples the plain epochs draw from; all by default.
    """

    def __init__(
        self,
        labels: Sequence[int] | np.ndarray | torch.Tensor,
        *,
        class_weights: str | Sequence[float] = "inverse",
        quality: Sequence[float] | np.ndarray | torch.Tensor | None = None,
        num_classes: int | None = None,
        num_samples: int | None = None,
        beta: float = 0.999,
        seed: int = 0,
        num_replicas: int | None = None,
        rank: int | None = None,
        rebalance_from_epoch: int = 0,
        originals: int | None = None,
    ) -> None:
        labels = np.asarray(labels, dtype=np.int64).reshape(-1)
        if len(labels) == 0:
            raise ConfigError("ClassAwareSampler: labels is empty")
        num_classes = int(labels.max()) + 1 if num_classes is None else num_classes
        if labels.min() < 0 or labels.max() >= num_classes:
            raise ConfigError(
                f"ClassAwareSampler: labels must lie in [0, {num_classes}), got {labels.min()}..{labels.max()}"
            )
        quality = np.ones(len(labels)) if quality is None else np.asarray(quality, dtype=np.float64).reshape(-1)
        if quality.shape != labels.shape:
            raise ConfigError(f"ClassAwareSampler: quality has {len(quality)} scores for {len(labels)} labels")
        if not np.all(np.isfinite(quality)) or np.any(quality < 0):
            raise ConfigError("ClassAwareSampler: quality scores f(x) must be finite and >= 0")
        self.labels = labels
        self.counts = np.bincount(labels, minlength=num_classes)
        #: ``w_y``, float64 ``[num_classes]``.
        self.weights = _class_weights(self.counts, class_weights, beta=beta)
        self.quality = quality
        mass = self.weights[labels] * quality
        if mass.sum() <= 0:
            raise ConfigError("ClassAwareSampler: every example has probability 0 (w_y * f(x) sums to 0)")
        #: ``p(x)``, float64 ``[N]``: the probability of drawing each example.
        self.probabilities = mass / mass.sum()
        total_samples = len(labels) if num_samples is None else int(num_samples)
        if total_samples < 1:
            raise ConfigError(f"ClassAwareSampler: num_samples={num_samples} must be >= 1")
        super().__init__(total_samples, seed=seed, num_replicas=num_replicas, rank=rank)
        start = rebalance_from_epoch
        if isinstance(start, bool) or not isinstance(start, (int, np.integer)) or start < 0:
            raise ConfigError(f"ClassAwareSampler: rebalance_from_epoch={start!r} must be an integer >= 0")
        self.rebalance_from_epoch = int(rebalance_from_epoch)
        self.originals = len(labels) if originals is None else int(originals)
        if not 1 <= self.originals <= len(labels):
            raise ConfigError(f"ClassAwareSampler: originals={originals} must be in [1, {len(labels)}]")

    def global_indices(self, epoch: int | None = None) -> np.ndarray:
        """The whole draw of ``epoch`` (this one by default) over all ranks: int64 ``[num_samples * num_replicas]``;
        before ``rebalance_from_epoch``, consecutive permutations of the originals."""
        epoch = self.epoch if epoch is None else epoch
        rng = np.random.default_rng([self.seed, epoch])
        total = self.num_samples * self.num_replicas
        if epoch < self.rebalance_from_epoch:  # deferred: the natural distribution of the originals
            passes = -(-total // self.originals)
            return np.concatenate([rng.permutation(self.originals) for _ in range(passes)])[:total]
        cumulative = np.cumsum(self.probabilities)
        draws = np.searchsorted(cumulative, rng.random(total) * cumulative[-1], side="right")
        return np.minimum(draws, len(self.probabilities) - 1)


def copy_quality(f1: np.ndarray, power: float = 1.0) -> np.ndarray:
    """``f(x)`` of augmented copies from their BERTScore F1 against their originals: ``clip(F1, 0, 1) ** power``."""
    return np.asarray(f1).clip(0.0, 1.0) ** power


__all__ = ["WEIGHT_SCHEMES", "ClassAwareSampler", "class_weights", "copy_quality"]
