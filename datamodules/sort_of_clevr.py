"""Sort-of-CLEVR (Santoro et al. 2017, "A simple neural network module for relational reasoning"), generated here.

Each image is 75x75 RGB on a white background with 6 objects, one in each colour (red, green, blue, orange, gray,
yellow), each a square or a circle of half-size 5 px (11 px across), drawn without anti-aliasing so that colours are
exact. Object ``k`` always has colour ``k``. Every image carries 10 non-relational and 10 relational questions, each
about one colour, with subtypes as in the reference generator (github.com/kimhc6028/relational-networks):

- non-relational: the object's shape (square/circle); whether it is on the left or right of the image, or on the top
  or bottom (its centre against the image centre);
- relational: the shape of the object closest to it, of the object furthest from it (Euclidean distance between
  centres), and how many objects share its shape (counting itself, 1..6).

Two deliberate differences from the reference make every answer unambiguous: centres never lie on the middle row or
column (37), and a scene in which some object has two equally close or two equally far objects is drawn again.
Object boxes are also kept at least 1 px apart, so that no object covers another.

The data set is a pure function of ``(num_images, seed)``: one ``numpy`` generator draws image after image, so the
first ``k`` images are the same for any ``num_images >= k``. It is generated once and cached as ``.npz``.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from datamodules._common import SplitLoaders, check_loader_args, default_data_dir, normalize_image
from zoo.errors import ConfigError, DataError

IMAGE_SIZE = 75
HALF_SIZE = 5
COLOURS = ("red", "green", "blue", "orange", "gray", "yellow")
#: RGB of each colour, uint8 ``[6, 3]``.
COLOUR_RGB = np.array(
    [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 156, 0), (128, 128, 128), (255, 255, 0)], dtype=np.uint8
)
SHAPES = ("square", "circle")
ANSWERS = ("square", "circle", "left", "right", "top", "bottom", "1", "2", "3", "4", "5", "6")
GROUP_NAMES = ("non_relational", "relational")
QUESTIONS_PER_GROUP = 10
QUESTIONS_PER_IMAGE = QUESTIONS_PER_GROUP * len(GROUP_NAMES)
#: question templates, indexed ``[group][subtype]``.
TEMPLATES = (
    (
        "What is the shape of the {colour} object?",
        "Is the {colour} object on the left or right of the image?",
        "Is the {colour} object on the top or bottom of the image?",
    ),
    (
        "What is the shape of the object closest to the {colour} object?",
        "What is the shape of the object furthest from the {colour} object?",
        "How many objects have the same shape as the {colour} object?",
    ),
)
#: bumped whenever the generator's output changes, so that old caches are not reused.
FORMAT_VERSION = 1

_NUM_OBJECTS = len(COLOURS)
_MIDDLE = IMAGE_SIZE // 2  # the middle pixel row/column, 37: neither left nor right
_COORDS = np.array([v for v in range(HALF_SIZE, IMAGE_SIZE - HALF_SIZE) if v != _MIDDLE], dtype=np.int64)
_MIN_GAP = 2 * HALF_SIZE + 2  # Chebyshev distance between centres: 11 px boxes with at least 1 px between them
_DISK = np.add.outer(np.arange(-HALF_SIZE, HALF_SIZE + 1) ** 2, np.arange(-HALF_SIZE, HALF_SIZE + 1) ** 2) <= (
    HALF_SIZE**2
)
_TEXT = [[[t.format(colour=c) for c in COLOURS] for t in group] for group in TEMPLATES]


def question_text(group: int, subtype: int, colour: int) -> str:
    """The natural-language question of ``group`` (0 non-relational, 1 relational), ``subtype`` (0..2), ``colour``."""
    return _TEXT[group][subtype][colour]


@dataclass(frozen=True)
class SortOfCLEVRScenes:
    """Generated images, their scene description and their questions; ``N`` images, ``Q = 20`` questions each.

    Attributes:
        images: uint8 ``[N, 75, 75, 3]`` RGB.
        centres: int16 ``[N, 6, 2]``: ``(x, y)`` pixel of each object's centre (``x`` column, ``y`` row from the top);
            object ``k`` has colour ``COLOURS[k]``.
        shapes: uint8 ``[N, 6]``: index into ``SHAPES`` (0 square, 1 circle).
        question_colour: uint8 ``[N, Q]``: which object each question is about.
        question_group: uint8 ``[N, Q]``: index into ``GROUP_NAMES``; the first 10 questions are non-relational.
        question_subtype: uint8 ``[N, Q]``: index into ``TEMPLATES[group]``.
        answers: int64 ``[N, Q]``: index into ``ANSWERS``.
    """

    images: np.ndarray
    centres: np.ndarray
    shapes: np.ndarray
    question_colour: np.ndarray
    question_group: np.ndarray
    question_subtype: np.ndarray
    answers: np.ndarray

    def __len__(self) -> int:
        return len(self.images)


def generate_sort_of_clevr(num_images: int, *, seed: int = 0) -> SortOfCLEVRScenes:
    """Draw ``num_images`` scenes with their questions; a pure function of ``(num_images, seed)``."""
    rng = np.random.default_rng(seed)
    images = np.full((num_images, IMAGE_SIZE, IMAGE_SIZE, 3), 255, dtype=np.uint8)
    centres = np.empty((num_images, _NUM_OBJECTS, 2), dtype=np.int16)
    shapes = np.empty((num_images, _NUM_OBJECTS), dtype=np.uint8)
    colour = np.empty((num_images, QUESTIONS_PER_IMAGE), dtype=np.uint8)
    subtype = np.empty((num_images, QUESTIONS_PER_IMAGE), dtype=np.uint8)
    for n in range(num_images):
        centres[n] = _place_objects(rng)
        shapes[n] = rng.integers(0, 2, _NUM_OBJECTS)
        colour[n] = rng.integers(0, _NUM_OBJECTS, QUESTIONS_PER_IMAGE)
        subtype[n] = rng.integers(0, 3, QUESTIONS_PER_IMAGE)
        _draw(images[n], centres[n], shapes[n])
    group = np.repeat(np.arange(len(GROUP_NAMES), dtype=np.uint8), QUESTIONS_PER_GROUP)
    group = np.broadcast_to(group, colour.shape).copy()
    answers = _answers(centres, shapes, colour, group, subtype)
    return SortOfCLEVRScenes(images, centres, shapes, colour, group, subtype, answers)


def _place_objects(rng: np.random.Generator) -> np.ndarray:
    """Centres ``[6, 2]``, placed one after another uniformly among positions clear of the objects already placed
    (rejection sampling, batched 32 candidates at a time); a scene with an ambiguous closest/furthest is redrawn."""
    while True:
        candidates = _COORDS[rng.integers(0, len(_COORDS), (32, 2))]
        gap = np.abs(candidates[:, None, :] - candidates[None, :, :]).max(-1)
        chosen: list[int] = []
        for i in range(len(candidates)):
            if all(gap[i, j] >= _MIN_GAP for j in chosen):
                chosen.append(i)
                if len(chosen) == _NUM_OBJECTS:
                    break
        if len(chosen) < _NUM_OBJECTS:
            continue
        centres = candidates[chosen]
        if not _has_ties(centres):
            return centres


def _has_ties(centres: np.ndarray) -> bool:
    d2 = ((centres[:, None, :] - centres[None, :, :]) ** 2).sum(-1)
    others = np.sort(d2, axis=1)[:, 1:]  # column 0 is each object's distance 0 to itself
    return bool((others[:, 0] == others[:, 1]).any() or (others[:, -1] == others[:, -2]).any())


def _draw(image: np.ndarray, centres: np.ndarray, shapes: np.ndarray) -> None:
    for k, ((x, y), shape) in enumerate(zip(centres.tolist(), shapes.tolist(), strict=True)):
        box = image[y - HALF_SIZE : y + HALF_SIZE + 1, x - HALF_SIZE : x + HALF_SIZE + 1]
        if shape == 0:
            box[:] = COLOUR_RGB[k]
        else:
            box[_DISK] = COLOUR_RGB[k]


def _answers(
    centres: np.ndarray, shapes: np.ndarray, colour: np.ndarray, group: np.ndarray, subtype: np.ndarray
) -> np.ndarray:
    """Answer index ``[N, Q]`` of every question, from the scene geometry."""
    n = np.arange(len(centres))[:, None]
    xy = centres.astype(np.int64)
    d2 = ((xy[:, :, None, :] - xy[:, None, :, :]) ** 2).sum(-1)[n, colour]  # [N, Q, 6]: to the queried object
    own_shape = shapes[n, colour].astype(np.int64)
    own_x, own_y = xy[n, colour, 0], xy[n, colour, 1]
    closest = np.where(d2 == 0, np.iinfo(np.int64).max, d2).argmin(-1)
    furthest = d2.argmax(-1)
    same_shape = (shapes[:, None, :] == own_shape[..., None]).sum(-1)
    by_kind = np.stack(
        [
            own_shape,  # square 0 / circle 1
            np.where(own_x < IMAGE_SIZE / 2, 2, 3),  # left / right
            np.where(own_y < IMAGE_SIZE / 2, 4, 5),  # top / bottom
            shapes[n, closest].astype(np.int64),
            shapes[n, furthest].astype(np.int64),
            5 + same_shape,  # "1" is answer 6
        ]
    )
    kind = group.astype(np.int64) * 3 + subtype
    return np.take_along_axis(by_kind, kind[None], axis=0)[0]


def save_scenes(scenes: SortOfCLEVRScenes, path: Path) -> None:
    """Write ``scenes`` to ``path`` (``.npz``) atomically: a temporary file in the same folder, then a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez_compressed(f, format_version=FORMAT_VERSION, **scenes.__dict__)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_scenes(path: Path) -> SortOfCLEVRScenes:
    """Read scenes written by :func:`save_scenes`; DataError naming the file when it is unreadable or stale."""
    try:
        with np.load(path) as data:
            arrays = {key: data[key] for key in data.files}
    except FileNotFoundError:
        raise DataError(f"{path}: Sort-of-CLEVR cache not found (call prepare_data() first)") from None
    except Exception as e:
        raise DataError(f"{path}: unreadable Sort-of-CLEVR cache ({e}); delete it to regenerate") from None
    version = arrays.pop("format_version", None)
    if version is None or int(version) != FORMAT_VERSION or set(arrays) != set(SortOfCLEVRScenes.__dataclass_fields__):
        raise DataError(f"{path}: not a Sort-of-CLEVR cache of format {FORMAT_VERSION}; delete it to regenerate")
    return SortOfCLEVRScenes(**arrays)


class SortOfCLEVRDataset(Dataset):
    """The questions about a subset of the images: item ``i`` is question ``i % 20`` of image
    ``image_indices[i // 20]``, as ``{"image": float [3, 75, 75], "text": str, "label": long [], "group": long []}``.

    Images stay uint8 in memory (one array shared by all splits) and are normalized when fetched. The DataLoader
    fetches a whole batch with one call of :meth:`__getitems__`, about ten times faster than item by item.
    """

    def __init__(
        self, scenes: SortOfCLEVRScenes, image_indices: np.ndarray, *, symmetries: bool = False, seed: int = 0
    ) -> None:
        self.symmetries, self.seed, self.epoch = symmetries, seed, 0
        self.centres = scenes.centres
        self.images = scenes.images
        self.labels = scenes.answers.astype(np.int64)
        self.groups = scenes.question_group.astype(np.int64)
        self.colour = scenes.question_colour
        self.subtype = scenes.question_subtype
        self.image_indices = np.asarray(image_indices, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.image_indices) * QUESTIONS_PER_IMAGE

    def set_epoch(self, epoch: int) -> None:
        """Select the symmetries drawn in epoch ``epoch`` (the training sampler calls this)."""
        self.epoch = int(epoch)

    def symmetry_of(self, index: np.ndarray) -> np.ndarray:
        """The symmetry applied to each item, ``[n]`` in ``0..7``: bit 0 mirrors left-right, bit 1 top-bottom,
        bit 2 transposes; a pure function of ``(seed, epoch, index)``, so a resumed run sees the same ones."""
        if not self.symmetries:
            return np.zeros(len(index), dtype=np.int64)
        with np.errstate(over="ignore"):  # a splitmix64-style hash: wrap-around is the point
            h = index.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
            h ^= np.uint64(self.epoch * 0xBF58476D + self.seed * 0x94D049BB + 1)
            h ^= h >> np.uint64(31)
            h *= np.uint64(0xBF58476D1CE4E5B9)
            h ^= h >> np.uint64(29)
        return (h % np.uint64(8)).astype(np.int64)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} questions")
        batch = self.__getitems__([index])
        return {
            "image": batch["image"][0],
            "text": batch["text"][0],
            "label": batch["label"][0],
            "group": batch["group"][0],
        }

    def __getitems__(self, indices: list[int]) -> dict[str, Any]:
        """The batch of ``indices`` at once: equal to :func:`~datamodules._common.collate` of their items."""
        index = np.asarray(indices, dtype=np.int64)
        if len(index) and not (0 <= index.min() and index.max() < len(self)):
            raise IndexError(f"indices {indices} out of range for {len(self)} questions")
        image, q = self.image_indices[index // QUESTIONS_PER_IMAGE], index % QUESTIONS_PER_IMAGE
        group, subtype, colour = self.groups[image, q], self.subtype[image, q], self.colour[image, q]
        pixels, labels = self.images[image], self.labels[image, q]
        symmetry = self.symmetry_of(index)
        if symmetry.any():
            pixels, labels = _apply_symmetries(pixels, labels, self.centres[image, colour], group, subtype, symmetry)
        return {
            "image": normalize_image(pixels),
            "text": [_TEXT[g][s][c] for g, s, c in zip(group.tolist(), subtype.tolist(), colour.tolist(), strict=True)],
            "label": torch.from_numpy(np.ascontiguousarray(labels)),
            "group": torch.from_numpy(group),
        }


def _apply_symmetries(
    images: np.ndarray,
    labels: np.ndarray,
    centres: np.ndarray,
    group: np.ndarray,
    subtype: np.ndarray,
    symmetry: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Mirror and transpose each image ``[n, 75, 75, 3]`` by its ``symmetry`` and re-derive the answers that change.

    The symmetries of the square preserve distances and the shapes (squares and circles are symmetric), so the
    relational answers and the shape answers stay; left/right and top/bottom are recomputed from the moved centre
    ``centres`` ``[n, 2]`` of the object each question is about. No centre lies on the middle row or column, so
    every answer stays unambiguous.
    """
    images, labels = images.copy(), labels.copy()
    x, y = centres[:, 0].astype(np.int64), centres[:, 1].astype(np.int64)
    last = IMAGE_SIZE - 1
    for i in np.flatnonzero(symmetry):
        s = int(symmetry[i])
        img = images[i]
        if s & 4:
            img, x[i], y[i] = img.transpose(1, 0, 2), y[i], x[i]
        if s & 1:
            img, x[i] = img[:, ::-1], last - x[i]
        if s & 2:
            img, y[i] = img[::-1, :], last - y[i]
        images[i] = img
    non_relational = group == 0
    labels = np.where(non_relational & (subtype == 1), np.where(x < IMAGE_SIZE / 2, 2, 3), labels)
    labels = np.where(non_relational & (subtype == 2), np.where(y < IMAGE_SIZE / 2, 4, 5), labels)
    return images, labels


class SortOfCLEVRDataModule(SplitLoaders):
    """Sort-of-CLEVR questions in batches ``{"image": [B, 3, 75, 75], "text": list[str], "label": [B], "group": [B]}``.

    Splits are by image: the first ``test_images`` images are the test split, the next ``val_images`` validation, the
    rest training; since image ``k`` does not depend on ``num_images``, the test set stays the same when
    ``num_images`` grows. The training loader shuffles with a :class:`~datamodules._common.SeededShuffleSampler`
    seeded with ``seed``, so the order depends only on ``(seed, epoch)`` and survives a resume.

    Args:
        data_dir: folder of the cache file; default ``$ZOO_DATA_DIR/sort_of_clevr`` or ``~/.cache/zoo/sort_of_clevr``.
        num_images: images to generate (20 questions each); must exceed ``val_images + test_images``.
        seed: seed of the generator and of the training order.
        val_images: images whose questions form the validation split.
        test_images: images whose questions form the test split.
        batch_size: questions per batch.
        num_workers: DataLoader worker processes.
        pin_memory: pin batches in page-locked memory; ``None`` pins when CUDA is available.
        symmetries: augment training images with a random symmetry of the square (mirrors and transposition, 8 in
            all), drawn per question from ``(seed, epoch, index)``, with the left/right and top/bottom answers
            re-derived; the other answers are invariant. Validation and test images are never transformed.

    Attributes:
        num_classes: 12, the size of ``ANSWERS``.
        group_names: ``["non_relational", "relational"]``.
        answers: ``ANSWERS`` as a list: the answer string of each label.
        cache_path: the ``.npz`` file holding the generated data.
    """

    def __init__(
        self,
        *,
        data_dir: str | None = None,
        num_images: int = 10_000,
        seed: int = 0,
        val_images: int = 200,
        test_images: int = 200,
        batch_size: int = 64,
        num_workers: int = 0,
        pin_memory: bool | None = None,
        symmetries: bool = False,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        self.symmetries = symmetries
        for key, value in (("val_images", val_images), ("test_images", test_images)):
            if value < 0:
                raise ConfigError(f"{name}: {key}={value} must be >= 0")
        if num_images <= val_images + test_images:
            raise ConfigError(
                f"{name}: num_images={num_images} must exceed val_images + test_images = {val_images + test_images}"
            )
        check_loader_args(name, batch_size=batch_size, num_workers=num_workers, seed=seed)
        self.save_hyperparameters()
        self.num_images, self.seed = num_images, seed
        self.val_images, self.test_images = val_images, test_images
        self.batch_size, self.num_workers, self.pin_memory = batch_size, num_workers, pin_memory
        self.data_dir = Path(data_dir).expanduser() if data_dir is not None else default_data_dir("sort_of_clevr")
        self.cache_path = self.data_dir / f"sort_of_clevr_v{FORMAT_VERSION}_n{num_images}_seed{seed}.npz"
        self.num_classes = len(ANSWERS)
        self.group_names = list(GROUP_NAMES)
        self.answers = list(ANSWERS)
        self.scenes: SortOfCLEVRScenes | None = None

    def prepare_data(self) -> None:
        """Generate the data and write the cache, unless the cache file already exists."""
        if not self.cache_path.is_file():
            save_scenes(generate_sort_of_clevr(self.num_images, seed=self.seed), self.cache_path)

    def setup(self, stage: str | None = None) -> None:
        """Load the cache (generating it first when ``prepare_data`` has not run) and build the three splits."""
        if self.scenes is not None:
            return
        self.prepare_data()
        scenes = load_scenes(self.cache_path)
        if len(scenes) != self.num_images:
            raise DataError(f"{self.cache_path}: holds {len(scenes)} images, expected {self.num_images}")
        self.scenes = scenes
        test_end = self.test_images
        val_end = test_end + self.val_images
        self.test_dataset = SortOfCLEVRDataset(scenes, np.arange(0, test_end))
        self.val_dataset = SortOfCLEVRDataset(scenes, np.arange(test_end, val_end))
        self.train_dataset = SortOfCLEVRDataset(
            scenes, np.arange(val_end, self.num_images), symmetries=self.symmetries, seed=self.seed
        )
