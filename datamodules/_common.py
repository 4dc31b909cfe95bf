"""What the datamodules share: resumable training orders that shard themselves across ranks, image normalization,
batching, argument checks and the choice of classes of the user's own classification data.

Batches follow ``docs/ARCHITECTURE.md``: ``{"image": float [B, 3, H, W], "text": list[str], "label": long [B],
"group": long [B]}``, with ``"audio"`` in place of (or beside) ``"image"`` and ``"text"`` for sound.
"""

from __future__ import annotations

import logging
import math
import os
import warnings
from collections.abc import Iterator, Mapping, Sized
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from lightning.pytorch.utilities.warnings import PossibleUserWarning
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from zoo.contracts import IGNORE_INDEX  # noqa: F401  (re-exported: the datamodules' label contract)
from zoo.errors import ConfigError, DataError

log = logging.getLogger(__name__)


class RankShardedSampler(DistributedSampler):
    """A training order that shards itself across ranks and resumes mid-epoch, on one process or several.

    Subclasses give :meth:`global_indices`: the whole sequence of an epoch over all ranks, a pure function of
    ``(seed, epoch)``, ``num_samples * num_replicas`` long. Rank ``r`` of ``R`` takes positions ``r, r + R, ...`` of it,
    so the ranks together see what one process would. Lightning calls :meth:`set_epoch` before every training epoch.
    The class subclasses ``DistributedSampler`` only so that Lightning does not wrap it in its
    ``DistributedSamplerWrapper``, which shards the sampler's list of indices as a whole and so cannot start an epoch
    part-way: it shards itself.

    :meth:`state_dict` records ``(seed, epoch, position, num_replicas)``, where ``position`` counts the indices of the
    current epoch this rank has handed out (or ``consumed``, if the caller knows better: a DataLoader fetches ahead).
    Every rank hands out as many, so rank 0's count, the one a checkpoint holds, is every rank's. After
    :meth:`load_state_dict` the next iteration of that epoch resumes at that position; later epochs start from 0.

    Args:
        total_samples: indices of an epoch over all ranks, before rounding up to a multiple of the ranks.
        seed: a non-negative integer.
        num_replicas: number of ranks; the process group's world size (1 without one) by default.
        rank: this process's rank; the process group's by default.
    """

    def __init__(
        self, total_samples: int, *, seed: int = 0, num_replicas: int | None = None, rank: int | None = None
    ) -> None:
        name = type(self).__name__
        _check_seed(f"{name}: seed", seed)
        if num_replicas is not None and num_replicas < 1:
            raise ConfigError(f"{name}: num_replicas={num_replicas} must be >= 1")
        if rank is not None and not 0 <= rank < (num_replicas or 1):
            raise ConfigError(f"{name}: rank={rank} must be in [0, num_replicas={num_replicas})")
        self.total_samples = int(total_samples)
        self.seed = int(seed)
        self._replicas, self._rank = num_replicas, rank
        self.epoch = 0
        self.position = 0  # indices of this epoch already handed out by this rank
        self._resume_at = 0  # where the next iteration starts, after load_state_dict of a mid-epoch state
        self.shuffle, self.drop_last, self.dataset = True, False, None  # DistributedSampler's attributes

    # -- ranks --------------------------------------------------------------------------------------------------
    @property
    def num_replicas(self) -> int:
        if self._replicas is not None:
            return self._replicas
        return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1

    @num_replicas.setter
    def num_replicas(self, value: int) -> None:
        self._replicas = value

    @property
    def rank(self) -> int:
        if self._rank is not None:
            return self._rank
        return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0

    @rank.setter
    def rank(self, value: int) -> None:
        self._rank = value

    @property
    def num_samples(self) -> int:
        """Indices this rank hands out per epoch."""
        return math.ceil(self.total_samples / self.num_replicas)

    # -- order --------------------------------------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        """Select the order of epoch ``epoch`` (a non-negative integer); a position loaded by :meth:`load_state_dict`
        survives only if the epoch is the loaded one."""
        if epoch < 0:
            raise ConfigError(f"{type(self).__name__}: epoch={epoch} must be >= 0")
        if int(epoch) != self.epoch:
            self.position = self._resume_at = 0
        self.epoch = int(epoch)

    def global_indices(self, epoch: int | None = None) -> np.ndarray:
        """The whole order of ``epoch`` (this one by default) over all ranks: int64 ``[num_samples * num_replicas]``."""
        raise NotImplementedError

    def indices(self, epoch: int | None = None) -> np.ndarray:
        """This rank's indices of ``epoch``: int64 ``[num_samples]``."""
        return self.global_indices(epoch)[self.rank :: self.num_replicas]

    def __iter__(self) -> Iterator[int]:
        start, self._resume_at = self._resume_at, 0
        self.position = start
        for index in self.indices()[start:].tolist():
            self.position += 1
            yield index

    def __len__(self) -> int:
        return self.num_samples

    # -- resume -------------------------------------------------------------------------------------------------
    def state_dict(self, consumed: int | None = None) -> dict[str, int]:
        """``{"seed", "epoch", "position", "num_replicas"}``; ``consumed`` overrides the position (indices this rank
        has used)."""
        position = self.position if consumed is None else int(consumed)
        return {"seed": self.seed, "epoch": self.epoch, "position": position, "num_replicas": self.num_replicas}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resume: the next iteration of epoch ``state["epoch"]`` starts at ``state["position"]``. A state without
        ``num_replicas`` (written before it was recorded) was saved on one process."""
        name = type(self).__name__
        _check_seed(f"{name}: seed", state["seed"])
        replicas = int(state.get("num_replicas", 1))
        position = int(state.get("position", 0))
        if replicas != self.num_replicas and position:
            # The order of an epoch is the same on any number of ranks, its shards are not; and Lightning resumes with
            # the batches it counted done, of the old ranks' share and (DynamicBatchAdjustment plans again) size:
            # no position of the new shares agrees with both, and a guess would skip or repeat examples silently.
            if position < math.ceil(self.total_samples / replicas):
                raise ConfigError(
                    f"{name}: the checkpoint was saved mid-epoch on {replicas} data-parallel ranks and is resumed on "
                    f"{self.num_replicas}; resume it on {replicas}, or resume from a checkpoint written at the end "
                    "of an epoch"
                )
            position = self.num_samples  # the saved epoch was finished
        if not 0 <= position <= self.num_samples:
            raise ConfigError(f"{name}: position={position} outside [0, {self.num_samples}]")
        self.seed, self.epoch = int(state["seed"]), int(state["epoch"])
        self.position = self._resume_at = position


class SeededShuffleSampler(RankShardedSampler):
    """Shuffles ``range(len(data_source))`` in an order that is a pure function of ``(seed, epoch)``.

    A run resumed at epoch ``e``, at its start or part-way through, sees exactly the order an uninterrupted run saw.
    On ``R`` ranks each takes every ``R``-th index of the permutation, which is first extended cyclically to a
    multiple of ``R`` (as ``DistributedSampler`` pads); see :class:`RankShardedSampler`.

    Args:
        data_source: anything with a length (a dataset), or the length itself. A dataset with a ``set_epoch`` method
            (items that depend on the epoch, such as random symmetries) is told the sampler's epoch.
        seed: a non-negative integer.
        num_replicas: number of ranks; the process group's world size (1 without one) by default.
        rank: this process's rank; the process group's by default.
    """

    def __init__(
        self, data_source: Sized | int, seed: int = 0, *, num_replicas: int | None = None, rank: int | None = None
    ) -> None:
        length = data_source if isinstance(data_source, int) else len(data_source)
        if length < 0:
            raise ConfigError(f"SeededShuffleSampler: data_source length {length} must be >= 0")
        super().__init__(length, seed=seed, num_replicas=num_replicas, rank=rank)
        self._dataset_set_epoch = getattr(data_source, "set_epoch", None)

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        if self._dataset_set_epoch is not None:
            self._dataset_set_epoch(self.epoch)

    def permutation(self, epoch: int | None = None) -> np.ndarray:
        """The permutation of ``epoch`` (this one by default), before sharding: int64 ``[len(data_source)]``."""
        epoch = self.epoch if epoch is None else epoch
        return np.random.default_rng([self.seed, epoch]).permutation(self.total_samples)

    def global_indices(self, epoch: int | None = None) -> np.ndarray:
        return np.resize(self.permutation(epoch), self.num_samples * self.num_replicas)


def normalize_image(image: np.ndarray | Tensor) -> Tensor:
    """uint8 RGB ``[..., H, W, 3]`` (numpy or tensor) -> float32 ``[..., 3, H, W]`` in ``[-1, 1]``:
    ``(x / 255 - 0.5) / 0.5``, computed as ``x / 127.5 - 1``.

    The same fixed mean and standard deviation of 0.5 for every channel: our encoders train from scratch or from
    local weights, so the ImageNet statistics of pretrained backbones do not apply by default. Computed with numpy,
    single-threaded on purpose: in the main process torch's intra-op threads compete with the model's, which made
    the same conversion 40 times slower on a busy 2-core CPU.
    """
    pixels = image.numpy(force=True) if isinstance(image, Tensor) else np.asarray(image)
    if pixels.dtype != np.uint8 or pixels.ndim < 3 or pixels.shape[-1] != 3:
        raise ValueError(f"normalize_image: expected uint8 [..., H, W, 3], got {pixels.dtype} {list(pixels.shape)}")
    out = np.moveaxis(pixels, -1, -3).astype(np.float32, order="C")
    out /= 127.5
    out -= 1.0
    return torch.from_numpy(out)


def collate(items: list[dict[str, Any]] | dict[str, Any]) -> dict[str, Any]:
    """List of examples -> one batch: tensors stacked along a new first dim, ``text`` kept as ``list[str]``.

    A dict passes through unchanged: it is a batch already, made by a dataset's ``__getitems__`` (which the
    DataLoader calls, when present, with the indices of a whole batch).
    """
    if isinstance(items, dict):
        return items
    batch: dict[str, Any] = {}
    for key in items[0]:
        values = [item[key] for item in items]
        batch[key] = torch.stack(values) if isinstance(values[0], Tensor) else values
    return batch


def default_data_dir(name: str) -> Path:
    """``$ZOO_DATA_DIR/<name>``, or ``~/.cache/zoo/<name>`` when the variable is unset."""
    return Path(os.environ.get("ZOO_DATA_DIR") or "~/.cache/zoo").expanduser() / name


def data_parallel_shard(trainer: Any) -> dict[str, int]:
    """``{"num_replicas", "rank"}`` of this process among the ranks that read different batches, from Lightning's
    strategy (``trainer.distributed_sampler_kwargs``): every process under DDP and FSDP, the data-parallel group under
    ``ModelParallelStrategy``, whose tensor-parallel ranks share their batch; one replica without a parallel strategy.
    ``{}`` without a trainer: the samplers then take the process group's world size and rank."""
    if trainer is None:
        return {}
    kwargs = trainer.distributed_sampler_kwargs or {"num_replicas": 1, "rank": 0}
    return {"num_replicas": int(kwargs["num_replicas"]), "rank": int(kwargs["rank"])}


def make_loader(
    dataset: Dataset,
    *,
    batch_size: int,
    num_workers: int,
    pin_memory: bool | None,
    shuffle_seed: int | None = None,
    shard: Mapping[str, int] | None = None,
) -> DataLoader:
    """A DataLoader over ``dataset`` with :func:`collate`; shuffled by :class:`SeededShuffleSampler` when
    ``shuffle_seed`` is given, in order otherwise. ``shard``: the sampler's ``num_replicas`` and ``rank``
    (:func:`data_parallel_shard`). ``pin_memory=None`` pins when CUDA is available."""
    sampler = None if shuffle_seed is None else SeededShuffleSampler(dataset, shuffle_seed, **(shard or {}))
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
        collate_fn=collate,
        # workers keep a copy of the dataset: an epoch-dependent dataset needs fresh workers each epoch
        persistent_workers=num_workers > 0 and not hasattr(dataset, "set_epoch"),
    )


def check_loader_args(owner: str, *, batch_size: int, num_workers: int, seed: int) -> None:
    """ConfigError naming the key when a loader argument cannot work."""
    if batch_size < 1:
        raise ConfigError(f"{owner}: batch_size={batch_size} must be >= 1")
    if num_workers < 0:
        raise ConfigError(f"{owner}: num_workers={num_workers} must be >= 0")
    _check_seed(f"{owner}: seed", seed)


def _check_seed(name: str, seed: int) -> None:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ConfigError(f"{name}={seed!r} must be a non-negative integer")


#: the evaluation groups of classification data: thirds of the classes by training frequency.
GROUP_NAMES = ("head", "medium", "tail")
RARE_CLASS_RULES = ("error", "drop", "keep")


def frequency_groups(counts: np.ndarray) -> np.ndarray:
    """Group of each class, int64 ``[C]``: 0 (head), 1 (medium), 2 (tail): thirds of the classes ranked by training
    count, largest first (ties by class index); with ``C`` not a multiple of 3 the head and medium get the extra."""
    order = np.argsort(-np.asarray(counts), kind="stable")
    groups = np.zeros(len(counts), dtype=np.int64)
    for g, members in enumerate(np.array_split(order, len(GROUP_NAMES))):
        groups[members] = g
    return groups


def check_class_rules(owner: str, *, min_examples_per_class: int, rare_classes: str) -> None:
    """ConfigError naming the key when ``min_examples_per_class`` or ``rare_classes`` cannot work."""
    if rare_classes not in RARE_CLASS_RULES:
        raise ConfigError(f"{owner}: rare_classes={rare_classes!r} must be 'error', 'drop' or 'keep'")
    if min_examples_per_class < 1:
        raise ConfigError(f"{owner}: min_examples_per_class={min_examples_per_class} must be >= 1")


def select_classes(
    counts: Mapping[str, int],
    *,
    owner: str,
    source: str,
    classes: list[str] | None,
    min_examples_per_class: int,
    rare_classes: str,
) -> tuple[list[str], set[str]]:
    """The class names in label order and the rare classes to drop, from the training examples of each class.

    A class with fewer than ``min_examples_per_class`` training examples is rare; ``rare_classes`` says what then
    happens: ``"error"`` raises DataError naming ``source`` (the training data) with the classes and their counts,
    ``"drop"`` returns them to be removed from every split (with a warning), ``"keep"`` trains on them as they are.
    The classes are ``classes`` less the dropped ones when given (a training label outside them is an error), the
    sorted training labels otherwise.

    Args:
        counts: training examples of each class name (a class may have 0: a class folder without files).
        owner: the datamodule, for messages.
        source: the training file or folder, for messages.
        classes: the class names in label order, or ``None``.
        min_examples_per_class: see above (checked by :func:`check_class_rules`).
        rare_classes: see above.
    """
    rare = {label: n for label, n in sorted(counts.items()) if n < min_examples_per_class}
    if rare and rare_classes == "error":
        raise DataError(
            f"{source}: {len(rare)} class(es) have fewer than min_examples_per_class={min_examples_per_class} "
            f"training examples: {dict(list(rare.items())[:10])}; add examples, set rare_classes='drop' to remove "
            "them or rare_classes='keep' to train on them as they are"
        )
    dropped = set(rare) if rare_classes == "drop" else set()
    if dropped:
        log.warning("%s: dropping %d rare class(es): %s", owner, len(dropped), sorted(dropped))
    if classes is None:
        return sorted(label for label in counts if label not in dropped), dropped
    if len(set(classes)) != len(classes):
        raise ConfigError(f"{owner}: classes={classes} holds duplicates")
    classes = [str(c) for c in classes if str(c) not in dropped]
    unknown = sorted({label for label, n in counts.items() if n > 0} - set(classes) - dropped)
    if unknown:
        raise DataError(f"{source}: labels {unknown[:10]} are not in classes={classes}")
    return classes, dropped


def consumed_examples(trainer: Any, sampler: Any, batch_size: int) -> int:
    """How many of this epoch's indices the trainer has consumed from ``sampler`` (a training sampler with
    ``num_samples``): the batches Lightning's fit loop processed times ``batch_size``, for a checkpoint's sampler state.
    Under DDP that is this rank's count, and every rank's: :class:`RankShardedSampler` gives each the same number.

    0 for a sampler Lightning wraps for several processes (anything but a ``DistributedSampler``: its
    ``DistributedSamplerWrapper`` shards the sampler's list of indices as a whole and cannot start part-way): a run
    resumed there starts its epoch again. The zoo's samplers shard themselves and are not wrapped.
    """
    if trainer is None:
        return 0
    if trainer.world_size > 1 and not isinstance(sampler, torch.utils.data.DistributedSampler):
        return 0
    processed = trainer.fit_loop.epoch_loop.batch_progress.current.processed
    if processed >= getattr(trainer, "num_training_batches", math.inf):  # an epoch that limit_train_batches cut
        return sampler.num_samples
    return min(processed * batch_size, sampler.num_samples)


def fitting(trainer: Any) -> bool:
    """Whether a datamodule's state is restored for ``fit`` (or without a trainer): ``validate``, ``test`` and
    ``predict`` with a ``ckpt_path`` restore it too, and a training position kept from them would cut a later fit."""
    return getattr(getattr(trainer, "state", None), "fn", TrainerFn.FITTING) == TrainerFn.FITTING


def drop_built_train_loader(trainer: Any) -> None:
    """Make Lightning build the training loader again, as its ``BatchSizeFinder`` does: strategies that restore a
    checkpoint after setup (``ModelParallelStrategy``) restore the datamodule once the schedule has built the loader
    (``estimated_stepping_batches``), whose iterator, with workers, has already drawn the epoch's first indices."""
    if trainer is not None and getattr(trainer, "fit_loop", None) is not None:
        trainer.fit_loop._combined_loader = None


class ResumableTrainingOrder(L.LightningDataModule):
    """A datamodule whose training order resumes mid-epoch: its ``train_dataloader`` hands each training sampler
    (a :class:`RankShardedSampler`) to :meth:`_track_train_sampler`; the checkpoint holds that sampler's state, its
    position the examples the trainer has consumed, and a resumed run goes on with the batches the interrupted one
    had not trained on. Needs ``batch_size``."""

    batch_size: int
    _train_sampler: Any = None
    _pending_sampler_state: dict | None = None  # restored, for the next training sampler

    def _track_train_sampler(self, sampler: Any) -> Any:
        """Keep ``sampler`` as the training order (the state of a restored checkpoint goes to it); returns it."""
        self._train_sampler = sampler
        if self._pending_sampler_state is not None:
            sampler.load_state_dict(self._pending_sampler_state)
            self._pending_sampler_state = None
        return sampler

    def state_dict(self) -> dict[str, Any]:
        """``{"sampler": state}`` of the training order; ``{}`` before a training loader was built."""
        sampler = self._train_sampler
        if sampler is None or not hasattr(sampler, "state_dict"):
            return {}
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return {"sampler": sampler.state_dict()}
        return {"sampler": sampler.state_dict(consumed_examples(trainer, sampler, self.batch_size))}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Keep the checkpoint's training order for the next training sampler (``fit`` only). A mid-epoch position
        replaces Lightning's warning that the resumed epoch's loader "is not resumable" (it looks for a stateful
        DataLoader; here the datamodule is the stateful part), for the rest of the process, by a log line that says
        where the epoch goes on."""
        if "sampler" in state_dict and fitting(getattr(self, "trainer", None)):
            self._pending_sampler_state = dict(state_dict["sampler"])
            if self._pending_sampler_state.get("position", 0):
                warnings.filterwarnings(
                    "ignore",
                    message="You're resuming from a checkpoint that ended before the epoch ended",
                    category=PossibleUserWarning,
                )
                state = self._pending_sampler_state
                rank_zero_info(
                    f"{type(self).__name__}: epoch {state['epoch']} resumes after the {state['position']} training "
                    "examples per rank it had used"
                )
            if self._train_sampler is not None:
                drop_built_train_loader(getattr(self, "trainer", None))


class SplitLoaders(ResumableTrainingOrder):
    """The loaders of a datamodule whose ``setup`` builds ``train_dataset``, ``val_dataset`` and ``test_dataset`` and
    which sets ``batch_size``, ``num_workers``, ``pin_memory`` and ``seed``: the training loader shuffles with
    :class:`SeededShuffleSampler`, the others keep order; predict runs on the test split."""

    batch_size: int
    num_workers: int
    pin_memory: bool | None
    seed: int

    def _loader(self, dataset: Dataset, *, shuffle: bool) -> DataLoader:
        return make_loader(
            dataset,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            shuffle_seed=self.seed if shuffle else None,
            shard=data_parallel_shard(getattr(self, "trainer", None)),
        )

    def train_dataloader(self) -> DataLoader:
        loader = self._loader(self.train_dataset, shuffle=True)
        self._track_train_sampler(loader.sampler)
        return loader

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_dataset, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_dataset, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.test_dataset, shuffle=False)
