"""Visual question answering from a folder on the user's disk, laid out as CLEVR or VQA v2 ship it.

CLEVR (``layout="clevr"``)::

    data_dir/questions/CLEVR_{split}_questions.json   {"questions": [{"image_filename", "question", "answer",
                                                                      "program"?, ...}]}
    data_dir/images/{split}/{image_filename}

VQA v2 (``layout="vqa_v2"``)::

    data_dir/v2_OpenEnded_mscoco_{split}2014_questions.json   {"questions": [{"image_id", "question", "question_id"}]}
    data_dir/v2_mscoco_{split}2014_annotations.json           {"annotations": [{"question_id", "multiple_choice_answer",
                                                                                "answer_type", ...}]}
    data_dir/{split}2014/COCO_{split}2014_{image_id:012d}.jpg

``split`` is ``train``, ``val`` and, when present with answers, ``test``; otherwise (the official CLEVR and VQA v2
test sets publish no answers) the validation split doubles as the test split.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from datamodules._common import IGNORE_INDEX, SplitLoaders, check_loader_args, normalize_image
from zoo.errors import ConfigError, DataError

LAYOUTS = ("auto", "clevr", "vqa_v2")
#: CLEVR question types, from the last function of each question's ``program``.
CLEVR_GROUP_NAMES = ("exist", "count", "compare_number", "query_attribute", "compare_attribute")
_CLEVR_FUNCTION_GROUP = {
    "exist": "exist",
    "count": "count",
    **dict.fromkeys(("equal_integer", "less_than", "greater_than"), "compare_number"),
    **{f"query_{a}": "query_attribute" for a in ("size", "color", "material", "shape")},
    **{f"equal_{a}": "compare_attribute" for a in ("size", "color", "material", "shape")},
}
#: VQA v2 ``answer_type`` values.
VQA_V2_GROUP_NAMES = ("yes/no", "number", "other")


@dataclass
class _Split:
    """The questions of one split; ``groups`` holds group names, or ``None`` where CLEVR gives no program."""

    source: Path
    image_files: list[str]
    questions: list[str]
    answers: list[str]
    groups: list[str | None]


def _clevr_questions_path(root: Path, split: str) -> Path:
    return root / "questions" / f"CLEVR_{split}_questions.json"


def _vqa_v2_paths(root: Path, split: str) -> tuple[Path, Path]:
    return (
        root / f"v2_OpenEnded_mscoco_{split}2014_questions.json",
        root / f"v2_mscoco_{split}2014_annotations.json",
    )


def _read_json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: malformed JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read ({e})") from None


def _records(path: Path, key: str) -> list[dict[str, Any]]:
    """The list under ``key`` of the JSON object in ``path``; each entry must be an object."""
    data = _read_json(path)
    records = data.get(key) if isinstance(data, dict) else None
    if not isinstance(records, list):
        raise DataError(f"{path}: expected a JSON object with a {key!r} list")
    for i, record in enumerate(records):
        if not isinstance(record, dict):
            raise DataError(f"{path}: {key}[{i}] is not a JSON object")
    return records


def _field(record: dict[str, Any], name: str, path: Path, where: str) -> Any:
    if name not in record:
        raise DataError(f"{path}: {where} has no {name!r}")
    return record[name]


def _text(record: dict[str, Any], name: str, path: Path, where: str, *, integers: bool = False) -> str:
    """Field ``name`` of ``record``, a string that is not blank; with ``integers``, a JSON integer too, as its decimal
    text (CLEVR's count answers)."""
    value = _field(record, name, path, where)
    if integers and isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str):
        shown = json.dumps(value)
        shown = shown if len(shown) <= 60 else shown[:57] + "..."
        raise DataError(f"{path}: {where}: {name!r} is {shown}, not a text{' or an integer' if integers else ''}")
    if not value.strip():
        raise DataError(f"{path}: {where}: empty {name.replace('_', ' ')}")
    return value


def _read_clevr(root: Path, split: str, *, require_answers: bool = True) -> _Split | None:
    """One CLEVR split; ``None`` when answers are optional and no question has one."""
    path = _clevr_questions_path(root, split)
    records = _records(path, "questions")
    if not require_answers and not any("answer" in q for q in records):
        return None
    image_dir = _image_dir(root / "images" / split, path)
    out = _Split(path, [], [], [], [])
    for i, q in enumerate(records):
        where = f"questions[{i}]"
        out.image_files.append(str(image_dir / _text(q, "image_filename", path, where)))
        out.questions.append(_text(q, "question", path, where))
        out.answers.append(_text(q, "answer", path, where, integers=True))
        out.groups.append(_clevr_group(q, path, where))
    return out


def _clevr_group(question: dict[str, Any], path: Path, where: str) -> str | None:
    program = question.get("program")
    if not program:
        return None
    last = program[-1] if isinstance(program, list) and isinstance(program[-1], dict) else {}
    function = last.get("function", last.get("type"))
    if function not in _CLEVR_FUNCTION_GROUP:
        raise DataError(f"{path}: {where} has a program ending in {function!r}, not a known CLEVR question type")
    return _CLEVR_FUNCTION_GROUP[function]


def _read_vqa_v2(root: Path, split: str, *, require_answers: bool = True) -> _Split | None:
    """One VQA v2 split; ``None`` when answers are optional and the annotations file is absent."""
    questions_path, annotations_path = _vqa_v2_paths(root, split)
    if not require_answers and not annotations_path.is_file():
        return None
    records = _records(questions_path, "questions")
    annotations: dict[Any, tuple[str, str]] = {}
    for i, a in enumerate(_records(annotations_path, "annotations")):
        qid = _field(a, "question_id", annotations_path, f"annotations[{i}]")
        where = f"annotations[{i}] (question_id={qid})"
        answer = _text(a, "multiple_choice_answer", annotations_path, where, integers=True)
        answer_type = _field(a, "answer_type", annotations_path, where)
        if answer_type not in VQA_V2_GROUP_NAMES:
            raise DataError(
                f"{annotations_path}: {where} has answer_type={answer_type!r}, not one of {VQA_V2_GROUP_NAMES}"
            )
        annotations[qid] = (answer, answer_type)
    image_dir = _image_dir(root / f"{split}2014", questions_path)
    out = _Split(questions_path, [], [], [], [])
    for i, q in enumerate(records):
        qid = _field(q, "question_id", questions_path, f"questions[{i}]")
        where = f"questions[{i}] (question_id={qid})"
        image_id = _field(q, "image_id", questions_path, where)
        if qid not in annotations:
            raise DataError(f"{annotations_path}: no answer for question_id={qid} ({questions_path.name} {where})")
        try:
            image_name = f"COCO_{split}2014_{int(image_id):012d}.jpg"
        except (TypeError, ValueError):
            raise DataError(f"{questions_path}: {where} has image_id={image_id!r}, not an integer") from None
        out.image_files.append(str(image_dir / image_name))
        out.questions.append(_text(q, "question", questions_path, where))
        answer, answer_type = annotations[qid]
        out.answers.append(answer)
        out.groups.append(answer_type)
    return out


def _image_dir(path: Path, questions_path: Path) -> Path:
    if not path.is_dir():
        raise DataError(f"{path}: image folder not found (needed by {questions_path.name})")
    return path


def load_image(path: str | Path, size: int) -> np.ndarray:
    """The image file at ``path`` as uint8 RGB ``[size, size, 3]`` (resized bilinearly, aspect ratio not kept);
    DataError naming the file when it is missing or cannot be decoded."""
    try:
        with Image.open(path) as image:
            return np.array(image.convert("RGB").resize((size, size), Image.Resampling.BILINEAR))
    except FileNotFoundError:
        raise DataError(f"{path}: image file not found") from None
    except Exception as e:  # PIL reports corrupt files as OSError, SyntaxError, ValueError, ...
        raise DataError(f"{path}: cannot read image ({type(e).__name__}: {e})") from None


class VQAFolderDataset(Dataset):
    """Questions about images on disk: item ``i`` is ``{"image": float [3, S, S], "text": str, "label": long [],
    "group": long []}``; images are read and resized when the item is asked for.

    Args:
        image_files: path of each question's image.
        questions: question text.
        labels: answer label of each question (``-100``: answer outside the vocabulary).
        groups: group index of each question.
        image_size: ``S``, the side of the square the images are resized to.
    """

    def __init__(
        self, *, image_files: list[str], questions: list[str], labels: np.ndarray, groups: np.ndarray, image_size: int
    ) -> None:
        if not len(image_files) == len(questions) == len(labels) == len(groups):
            raise ValueError("VQAFolderDataset: image_files, questions, labels and groups differ in length")
        self.image_files, self.questions, self.image_size = image_files, questions, image_size
        self.labels = torch.as_tensor(labels, dtype=torch.long)
        self.groups = torch.as_tensor(groups, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.questions)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {
            "image": normalize_image(load_image(self.image_files[index], self.image_size)),
            "text": self.questions[index],
            "label": self.labels[index],
            "group": self.groups[index],
        }


class VQAFolderDataModule(SplitLoaders):
    """A CLEVR or VQA v2 folder in batches ``{"image": [B, 3, S, S], "text": list[str], "label": [B], "group": [B]}``.

    The question and annotation files are read in ``__init__`` (``num_classes`` and ``group_names`` depend on them),
    so a missing folder or file, malformed JSON, or a question or answer that is missing, empty or null fails there,
    naming the file and the question (an integer answer, such as CLEVR's counts, is its decimal text). Images are
    read lazily; a missing or corrupt image raises DataError naming the file when it is loaded.

    The answer vocabulary is the ``max_answers`` most frequent training answers (ties in alphabetical order); a
    question whose answer is outside it, in any split, gets label ``-100``, which ``F.cross_entropy`` ignores by
    default. Evaluation metrics should count such questions as wrong, or set ``ignore_index=-100`` and report that
    they did.

    Groups: VQA v2 uses the ``answer_type`` (``yes/no``, ``number``, ``other``). CLEVR uses the last function of each
    question's ``program`` (``exist``, ``count``, ``compare_number``, ``query_attribute``, ``compare_attribute``) when
    every question has one, otherwise one group ``all``.

    Args:
        data_dir: the folder holding the layout.
        layout: ``"clevr"``, ``"vqa_v2"``, or ``"auto"`` to detect it from the training questions file.
        image_size: side in pixels of the square images are resized to.
        max_answers: largest answer vocabulary.
        batch_size: questions per batch.
        num_workers: DataLoader worker processes.
        pin_memory: pin batches in page-locked memory; ``None`` pins when CUDA is available.
        seed: seed of the training order (see :class:`~datamodules._common.SeededShuffleSampler`).

    Attributes:
        num_classes: size of the answer vocabulary.
        group_names: names of the question groups.
        answers: the answer string of each label.
        layout: the layout in use (``"clevr"`` or ``"vqa_v2"``).
        test_split: ``"test"``, or ``"val"`` when there is no test split with answers.
    """

    def __init__(
        self,
        *,
        data_dir: str,
        layout: str = "auto",
        image_size: int = 224,
        max_answers: int = 1000,
        batch_size: int = 64,
        num_workers: int = 0,
        pin_memory: bool | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        if layout not in LAYOUTS:
            raise ConfigError(f"{name}: layout={layout!r} must be one of {LAYOUTS}")
        if image_size < 1:
            raise ConfigError(f"{name}: image_size={image_size} must be >= 1")
        if max_answers < 1:
            raise ConfigError(f"{name}: max_answers={max_answers} must be >= 1")
        check_loader_args(name, batch_size=batch_size, num_workers=num_workers, seed=seed)
        self.save_hyperparameters()
        self.data_dir = Path(data_dir).expanduser()
        self.image_size, self.max_answers = image_size, max_answers
        self.batch_size, self.num_workers, self.pin_memory, self.seed = batch_size, num_workers, pin_memory, seed
        if not self.data_dir.is_dir():
            raise DataError(f"{name}: data_dir={str(self.data_dir)!r}: folder not found")
        self.layout = self._detect_layout() if layout == "auto" else layout

        read = _read_clevr if self.layout == "clevr" else _read_vqa_v2
        splits = {"train": read(self.data_dir, "train"), "val": read(self.data_dir, "val")}
        test = self._read_optional_test(read)
        if test is not None:
            splits["test"] = test
        self.test_split = "test" if test is not None else "val"
        if not splits["train"].questions:
            raise DataError(f"{splits['train'].source}: no questions")

        counts = Counter(splits["train"].answers)
        self.answers = [a for a, _ in sorted(counts.items(), key=lambda item: (-item[1], item[0]))[:max_answers]]
        self.num_classes = len(self.answers)
        if self.layout == "vqa_v2":
            self.group_names = list(VQA_V2_GROUP_NAMES)
        elif all(g is not None for s in splits.values() for g in s.groups):
            self.group_names = list(CLEVR_GROUP_NAMES)
        else:
            self.group_names = ["all"]
        self._splits = splits

    def _detect_layout(self) -> str:
        clevr, vqa_v2 = _clevr_questions_path(self.data_dir, "train"), _vqa_v2_paths(self.data_dir, "train")[0]
        if clevr.is_file():
            return "clevr"
        if vqa_v2.is_file():
            return "vqa_v2"
        raise DataError(
            f"{self.data_dir}: neither a CLEVR layout ({clevr.relative_to(self.data_dir)}) nor a VQA v2 layout "
            f"({vqa_v2.name}) found; set layout to say which is meant"
        )

    def _read_optional_test(self, read: Any) -> _Split | None:
        present = (
            _clevr_questions_path(self.data_dir, "test").is_file()
            if self.layout == "clevr"
            else all(p.is_file() for p in _vqa_v2_paths(self.data_dir, "test"))
        )
        return read(self.data_dir, "test", require_answers=False) if present else None

    def dataset(self, split: str) -> VQAFolderDataset:
        """The questions of ``split`` (``"train"``, ``"val"`` or ``"test"``; ``"test"`` is ``"val"`` when
        :attr:`test_split` says so)."""
        if split == "test":
            split = self.test_split
        if split not in self._splits:
            raise ConfigError(f"{type(self).__name__}: split={split!r} must be one of {sorted(self._splits)}")
        s = self._splits[split]
        vocab = {a: i for i, a in enumerate(self.answers)}
        labels = np.array([vocab.get(a, IGNORE_INDEX) for a in s.answers], dtype=np.int64)
        if self.group_names == ["all"]:
            groups = np.zeros(len(s.groups), dtype=np.int64)
        else:
            index = {g: i for i, g in enumerate(self.group_names)}
            groups = np.array([index[g] for g in s.groups], dtype=np.int64)
        return VQAFolderDataset(
            image_files=s.image_files, questions=s.questions, labels=labels, groups=groups, image_size=self.image_size
        )

    def setup(self, stage: str | None = None) -> None:
        """Build the datasets of the three splits from the question files read in ``__init__``."""
        if getattr(self, "train_dataset", None) is None:
            self.train_dataset = self.dataset("train")
            self.val_dataset = self.dataset("val")
            self.test_dataset = self.dataset("test")
