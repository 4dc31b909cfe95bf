"""Text classification from the user's own files: CSV, TSV or JSON Lines, one example per row.

Each file has a text column and a label column, named by ``text_column`` and ``label_column``. Labels are class
names: strings, or integers (JSONL) which are used as their decimal string (``3`` and ``"3"`` are the same class);
any other JSON value (``null``, a float, a boolean, a list, an object) is an error that names the file and line, as are
a missing file, a missing column, an empty or non-string text and an empty label. The classes are the training file's
labels, sorted (or ``classes`` when given); a validation or test label outside them is an error.

A class with fewer than ``min_examples_per_class`` training examples (default 2: a class with one example) is handled
by ``rare_classes``: ``"error"`` (the default) stops with the class names and counts; ``"drop"`` removes those classes
from every split (with a warning); ``"keep"`` trains on them as they are (DDAE then augments them the most).
"""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

from datamodules._common import check_class_rules, select_classes
from datamodules.ddae.datamodule import LongTailTextDataModule, TextSplits
from zoo.contracts import IGNORE_INDEX
from zoo.errors import DataError

Rows = list[tuple[str, str]]  # (text, class name)


def read_text_file(
    path: str | Path, *, text_column: str = "text", label_column: str | None = "label", key: str = "file"
) -> Rows:
    """``(text, label)`` rows of a ``.csv``, ``.tsv`` or ``.jsonl``/``.json`` (one object per line) file; with
    ``label_column=None`` the texts alone, each label ``""``.

    Raises:
        DataError: the file is missing, unreadable or empty, lacks a column, or has an empty text, an empty label or
            a label that is neither a string nor an integer; the message names ``key`` (the argument), file and line.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"{key}={str(path)!r}: no such file")
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        rows = _read_csv(path, text_column, label_column, delimiter="\t" if suffix == ".tsv" else ",")
    elif suffix in (".jsonl", ".json", ".ndjson"):
        rows = _read_jsonl(path, text_column, label_column)
    else:
        raise DataError(f"{key}={str(path)!r}: unknown format {suffix!r}; use .csv, .tsv or .jsonl")
    if not rows:
        raise DataError(f"{path}: holds no examples")
    return rows


def _check_row(path: Path, line: int, text: object, label: object, text_column: str, label_column: str | None) -> tuple:
    if not isinstance(text, str):
        raise DataError(f"{path}:{line}: column {text_column!r} holds {type(text).__name__} {text!r}, not a text")
    if not text.strip():
        raise DataError(f"{path}:{line}: empty text in column {text_column!r}")
    if label_column is None:
        return text.strip(), ""
    if isinstance(label, bool) or not isinstance(label, (str, int)):
        raise DataError(
            f"{path}:{line}: label {label!r} in column {label_column!r} is a {type(label).__name__}; labels must be "
            "class names (strings) or integers"
        )
    label = str(label).strip()
    if not label:
        raise DataError(f"{path}:{line}: empty label in column {label_column!r}")
    return text.strip(), label


def _required(text_column: str, label_column: str | None) -> list[tuple[str, str]]:
    """The columns a file must have, with the argument naming each."""
    return [(text_column, "text_column")] + ([(label_column, "label_column")] if label_column else [])


def _read_csv(path: Path, text_column: str, label_column: str | None, *, delimiter: str) -> Rows:
    try:
        with path.open(encoding="utf-8-sig", newline="") as file:
            reader = csv.DictReader(file, delimiter=delimiter)
            columns = reader.fieldnames or []
            for column, key in _required(text_column, label_column):
                if column not in columns:
                    raise DataError(f"{path}: no column {column!r} ({key}); the columns are {columns}")
            rows = []
            for row in reader:
                text, label = row.get(text_column), row.get(label_column) if label_column else None
                rows.append(_check_row(path, reader.line_num, text or "", label or "", text_column, label_column))
            return rows
    except (UnicodeDecodeError, csv.Error) as err:
        raise DataError(f"{path}: not a readable {'TSV' if delimiter == chr(9) else 'CSV'} file ({err})") from err


def _read_jsonl(path: Path, text_column: str, label_column: str | None) -> Rows:
    rows = []
    try:
        with path.open(encoding="utf-8") as file:
            for line_num, line in enumerate(file, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except ValueError as err:
                    raise DataError(f"{path}:{line_num}: not a JSON object ({err})") from err
                if not isinstance(record, dict):
                    raise DataError(f"{path}:{line_num}: a JSON {type(record).__name__}, not an object")
                for column, key in _required(text_column, label_column):
                    if column not in record:
                        raise DataError(
                            f"{path}:{line_num}: no field {column!r} ({key}); the fields are {sorted(record)}"
                        )
                label = record[label_column] if label_column else None
                rows.append(_check_row(path, line_num, record[text_column], label, text_column, label_column))
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text ({err})") from err
    return rows


class TextFolderDataModule(LongTailTextDataModule):
    """Batches ``{"text": list[str], "label": [B], "group": [B]}`` from the user's CSV/TSV/JSONL files.

    The training file is read in ``__init__`` (so that ``num_classes`` is known when LightningCLI builds the model)
    and checked there; the rules and errors are in the module docstring. ``group`` is the class's frequency third in
    the training file (``head``/``medium``/``tail``).

    Args:
        train_file: training examples.
        val_file: validation examples (optional; no validation without it).
        test_file: test examples (optional).
        predict_file: texts that ``predict`` classifies instead of the test split (the text column alone is read; no
            labels needed). ``python -m zoo predict`` writes each text with its predicted class.
        text_column: name of the text column (CSV header or JSON field).
        label_column: name of the label column.
        classes: the class names in label order; the sorted training labels by default.
        min_examples_per_class: fewest training examples a class may have without ``rare_classes`` acting.
        rare_classes: ``"error"``, ``"drop"`` or ``"keep"`` for classes below ``min_examples_per_class``.
        **kwargs: loader, resampling and augmentation arguments of
            :class:`~datamodules.ddae.datamodule.LongTailTextDataModule`.
    """

    def __init__(
        self,
        *,
        train_file: str,
        val_file: str | None = None,
        test_file: str | None = None,
        predict_file: str | None = None,
        text_column: str = "text",
        label_column: str = "label",
        classes: list[str] | None = None,
        min_examples_per_class: int = 2,
        rare_classes: str = "error",
        **kwargs,
    ) -> None:
        name = type(self).__name__
        check_class_rules(name, min_examples_per_class=min_examples_per_class, rare_classes=rare_classes)
        columns = {"text_column": text_column, "label_column": label_column}
        train = read_text_file(train_file, **columns, key="train_file")
        classes, dropped = select_classes(
            Counter(label for _, label in train),
            owner=name,
            source=str(train_file),
            classes=classes,
            min_examples_per_class=min_examples_per_class,
            rare_classes=rare_classes,
        )
        train = [(t, y) for t, y in train if y not in dropped]
        self.files = {"train": train_file, "val": val_file, "test": test_file}
        self._rows = {"train": train}
        for split in ("val", "test"):
            path = self.files[split]
            if path is None:
                continue
            rows = [(t, y) for t, y in read_text_file(path, **columns, key=f"{split}_file") if y not in dropped]
            unknown = sorted({y for _, y in rows} - set(classes))
            if unknown:
                raise DataError(f"{path}: labels {unknown[:10]} do not occur in the training file {train_file}")
            self._rows[split] = rows
        if predict_file is not None:  # texts alone; their label "" is no class, so load_splits gives IGNORE_INDEX
            self._rows["predict"] = read_text_file(predict_file, text_column=text_column, label_column=None,
                                                   key="predict_file")  # fmt: skip
        self.text_column, self.label_column = text_column, label_column
        super().__init__(class_names=classes, **kwargs)

    def load_splits(self) -> TextSplits:
        index = {name: i for i, name in enumerate(self.class_names)}

        def unpack(split: str) -> tuple[list[str], list[int]] | None:
            rows = self._rows.get(split)
            return None if rows is None else ([t for t, _ in rows], [index.get(y, IGNORE_INDEX) for _, y in rows])

        return TextSplits(train=unpack("train"), val=unpack("val"), test=unpack("test"), predict=unpack("predict"))


__all__ = ["TextFolderDataModule", "read_text_file"]
