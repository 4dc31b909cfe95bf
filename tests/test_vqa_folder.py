"""VQA folders in CLEVR and VQA v2 layouts, written here: loading, vocabulary, groups, batches and user errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from datamodules._common import IGNORE_INDEX, SeededShuffleSampler
from datamodules.vqa_folder import CLEVR_GROUP_NAMES, VQA_V2_GROUP_NAMES, VQAFolderDataModule
from zoo.errors import ConfigError, DataError

SIZE = 16  # images are written at this size and read at image_size=SIZE, so pixels come back unchanged


def _write_image(path: Path, rng: np.random.Generator) -> np.ndarray:
    pixels = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return pixels


def _write_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1))


# CLEVR: answers with their question types (the last function of the program)
CLEVR_TRAIN = [("yes", "exist"), ("yes", "equal_color"), ("3", "count"), ("red", "query_color"), ("yes", "exist"),
               ("3", "count"), ("no", "less_than"), ("cube", "query_shape")]  # fmt: skip
CLEVR_VAL = [("no", "exist"), ("7", "count"), ("cube", "query_shape")]


def _clevr_questions(split: str, answers, *, num_images: int, program: bool = True, answer: bool = True):
    questions = []
    for i, (a, function) in enumerate(answers):
        q = {"image_filename": f"CLEVR_{split}_{i % num_images:06d}.png", "question": f"Question {i} about {split}?"}
        if answer:
            q["answer"] = a
        if program:
            q["program"] = [{"inputs": [], "function": "scene", "value_inputs": []},
                            {"inputs": [0], "function": function, "value_inputs": []}]  # fmt: skip
        q["question_family_index"] = i
        questions.append(q)
    return {"info": {"split": split}, "questions": questions}


def _write_clevr(root: Path, *, program: bool = True, test: str | None = None) -> dict[str, list[np.ndarray]]:
    rng = np.random.default_rng(0)
    images = {}
    splits = {"train": CLEVR_TRAIN, "val": CLEVR_VAL}
    if test is not None:
        splits["test"] = CLEVR_VAL
    for split, answers in splits.items():
        images[split] = [_write_image(root / "images" / split / f"CLEVR_{split}_{i:06d}.png", rng) for i in range(3)]
        data = _clevr_questions(
            split, answers, num_images=3, program=program, answer=split != "test" or test == "answered"
        )
        _write_json(root / "questions" / f"CLEVR_{split}_questions.json", data)
    return images


VQA_TRAIN = [("yes", "yes/no"), ("2", "number"), ("yes", "yes/no"), ("dog", "other"), ("no", "yes/no")]
VQA_VAL = [("no", "yes/no"), ("cat", "other"), ("2", "number")]


def _write_vqa_v2(root: Path) -> None:
    rng = np.random.default_rng(1)
    for split, answers in (("train", VQA_TRAIN), ("val", VQA_VAL)):
        image_ids = [9, 123456]
        for image_id in image_ids:
            _write_image(root / f"{split}2014" / f"COCO_{split}2014_{image_id:012d}.jpg", rng)
        questions, annotations = [], []
        for i, (answer, answer_type) in enumerate(answers):
            qid, image_id = 1000 * i + 7, image_ids[i % 2]
            questions.append({"image_id": image_id, "question": f"What {i} in {split}?", "question_id": qid})
            annotations.append({"question_id": qid, "image_id": image_id, "multiple_choice_answer": answer,
                                "answer_type": answer_type, "question_type": "what", "answers": []})  # fmt: skip
        _write_json(root / f"v2_OpenEnded_mscoco_{split}2014_questions.json", {"questions": questions})
        _write_json(root / f"v2_mscoco_{split}2014_annotations.json", {"annotations": annotations})


def _batch_checks(dm: VQAFolderDataModule, batch_size: int) -> None:
    dm.setup("fit")
    for loader in (dm.train_dataloader(), dm.val_dataloader(), dm.test_dataloader()):
        batch = next(iter(loader))
        n = min(batch_size, len(loader.dataset))
        assert set(batch) == {"image", "text", "label", "group"}
        assert batch["image"].dtype == torch.float32 and batch["image"].shape == (n, 3, SIZE, SIZE)
        assert isinstance(batch["text"], list) and all(isinstance(t, str) for t in batch["text"])
        assert batch["label"].dtype == torch.long and batch["label"].shape == (n,)
        assert batch["group"].dtype == torch.long and batch["group"].shape == (n,)
    assert isinstance(dm.train_dataloader().sampler, SeededShuffleSampler)


def test_clevr_layout_loads_vocabulary_groups_and_batches(tmp_path):
    images = _write_clevr(tmp_path)
    dm = VQAFolderDataModule(data_dir=str(tmp_path), image_size=SIZE, batch_size=4)
    assert dm.layout == "clevr" and dm.test_split == "val"  # no test file: val doubles as test
    # most frequent first, ties alphabetical
    assert dm.answers == ["yes", "3", "cube", "no", "red"] and dm.num_classes == 5
    assert dm.group_names == list(CLEVR_GROUP_NAMES)
    _batch_checks(dm, batch_size=4)

    train = dm.train_dataset
    assert len(train) == len(CLEVR_TRAIN)
    assert [dm.answers[i] for i in train.labels.tolist()] == [a for a, _ in CLEVR_TRAIN]
    expected_groups = ["exist", "compare_attribute", "count", "query_attribute", "exist", "count", "compare_number",
                       "query_attribute"]  # fmt: skip
    assert [dm.group_names[g] for g in train.groups.tolist()] == expected_groups
    item = train[4]
    assert item["text"] == "Question 4 about train?"
    expected = torch.from_numpy(images["train"][4 % 3]).permute(2, 0, 1).float() / 127.5 - 1
    torch.testing.assert_close(item["image"], expected, rtol=0, atol=1e-6)  # float rounding only
    # "7" never occurs in training: outside the vocabulary, ignored
    assert dm.val_dataset.labels.tolist() == [dm.answers.index("no"), IGNORE_INDEX, dm.answers.index("cube")]
    assert dm.test_dataset.questions == dm.val_dataset.questions


def test_clevr_max_answers_keeps_most_frequent_and_ignores_the_rest(tmp_path):
    _write_clevr(tmp_path)
    dm = VQAFolderDataModule(data_dir=str(tmp_path), layout="clevr", image_size=SIZE, max_answers=2)
    assert dm.answers == ["yes", "3"] and dm.num_classes == 2
    dm.setup("fit")
    labels = dm.train_dataset.labels.tolist()
    assert labels == [0, 0, 1, IGNORE_INDEX, 0, 1, IGNORE_INDEX, IGNORE_INDEX]


def test_clevr_without_programs_has_one_group(tmp_path):
    _write_clevr(tmp_path, program=False)
    dm = VQAFolderDataModule(data_dir=str(tmp_path), image_size=SIZE)
    assert dm.group_names == ["all"]
    _batch_checks(dm, batch_size=64)
    assert set(dm.train_dataset.groups.tolist()) == {0}


def test_clevr_test_split_is_used_only_with_answers(tmp_path):
    _write_clevr(tmp_path / "answered", test="answered")
    _write_clevr(tmp_path / "unanswered", test="unanswered")
    answered = VQAFolderDataModule(data_dir=str(tmp_path / "answered"), image_size=SIZE)
    unanswered = VQAFolderDataModule(data_dir=str(tmp_path / "unanswered"), image_size=SIZE)
    assert answered.test_split == "test" and unanswered.test_split == "val"
    answered.setup("test")
    assert answered.test_dataset.questions[0] == "Question 0 about test?"
    assert answered.test_dataset.image_files[0].endswith("images/test/CLEVR_test_000000.png")


def test_vqa_v2_layout_loads_vocabulary_groups_and_batches(tmp_path):
    _write_vqa_v2(tmp_path)
    dm = VQAFolderDataModule(data_dir=str(tmp_path), image_size=SIZE, batch_size=2)
    assert dm.layout == "vqa_v2" and dm.test_split == "val"
    assert dm.answers == ["yes", "2", "dog", "no"] and dm.num_classes == 4
    assert dm.group_names == list(VQA_V2_GROUP_NAMES)
    _batch_checks(dm, batch_size=2)
    val = dm.val_dataset
    assert [dm.group_names[g] for g in val.groups.tolist()] == [t for _, t in VQA_VAL]
    assert val.labels.tolist() == [dm.answers.index("no"), IGNORE_INDEX, dm.answers.index("2")]
    assert val.image_files[1].endswith("val2014/COCO_val2014_000000123456.jpg")
    assert val[1]["image"].shape == (3, SIZE, SIZE)


def test_images_are_resized_to_image_size(tmp_path):
    _write_vqa_v2(tmp_path)
    dm = VQAFolderDataModule(data_dir=str(tmp_path), layout="vqa_v2", image_size=24)
    dm.setup("fit")
    image = dm.train_dataset[0]["image"]
    assert image.shape == (3, 24, 24) and -1 <= image.min() and image.max() <= 1


def test_missing_data_dir_raises_data_error_naming_it(tmp_path):
    with pytest.raises(DataError, match="nowhere.*folder not found"):
        VQAFolderDataModule(data_dir=str(tmp_path / "nowhere"))


def test_missing_questions_file_raises_data_error_naming_it(tmp_path):
    with pytest.raises(DataError, match=r"CLEVR_train_questions\.json: file not found"):
        VQAFolderDataModule(data_dir=str(tmp_path), layout="clevr")
    with pytest.raises(DataError, match=r"v2_OpenEnded_mscoco_train2014_questions\.json: file not found"):
        VQAFolderDataModule(data_dir=str(tmp_path), layout="vqa_v2")
    with pytest.raises(DataError, match="neither a CLEVR layout.*nor a VQA v2 layout"):
        VQAFolderDataModule(data_dir=str(tmp_path))


def test_clevr_question_without_answer_names_file_and_index(tmp_path):
    _write_clevr(tmp_path)
    path = tmp_path / "questions" / "CLEVR_val_questions.json"
    data = json.loads(path.read_text())
    del data["questions"][2]["answer"]
    _write_json(path, data)
    with pytest.raises(DataError, match=r"CLEVR_val_questions\.json: questions\[2\] has no 'answer'"):
        VQAFolderDataModule(data_dir=str(tmp_path))


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("question", "", "empty question"),
        ("question", " \t\n", "empty question"),
        ("question", None, "'question' is null, not a text"),
        ("answer", None, "'answer' is null, not a text or an integer"),
        ("answer", "  ", "empty answer"),
        ("answer", ["yes"], r"'answer' is \[\"yes\"\], not a text or an integer"),
    ],
)
def test_clevr_empty_or_null_question_or_answer_names_file_and_index(tmp_path, field, value, message):
    _write_clevr(tmp_path)
    path = tmp_path / "questions" / "CLEVR_train_questions.json"
    data = json.loads(path.read_text())
    data["questions"][2][field] = value
    _write_json(path, data)
    with pytest.raises(DataError, match=rf"CLEVR_train_questions\.json: questions\[2\]: {message}"):
        VQAFolderDataModule(data_dir=str(tmp_path))


def test_clevr_numeric_answers_are_their_decimal_text(tmp_path):
    _write_clevr(tmp_path)
    path = tmp_path / "questions" / "CLEVR_train_questions.json"
    data = json.loads(path.read_text())
    data["questions"][2]["answer"] = 3  # the count answer "3" of CLEVR_TRAIN, written as a number
    _write_json(path, data)
    dm = VQAFolderDataModule(data_dir=str(tmp_path))
    assert dm.answers == ["yes", "3", "cube", "no", "red"]


def test_vqa_v2_empty_or_null_question_or_answer_names_file_and_question_id(tmp_path):
    _write_vqa_v2(tmp_path)
    questions = tmp_path / "v2_OpenEnded_mscoco_val2014_questions.json"
    data = json.loads(questions.read_text())
    data["questions"][1]["question"] = "   "
    _write_json(questions, data)
    with pytest.raises(
        DataError, match=r"val2014_questions\.json: questions\[1\] \(question_id=1007\): empty question"
    ):
        VQAFolderDataModule(data_dir=str(tmp_path))
    data["questions"][1]["question"] = "What 1 in val?"
    _write_json(questions, data)
    annotations = tmp_path / "v2_mscoco_train2014_annotations.json"
    data = json.loads(annotations.read_text())
    data["annotations"][3]["multiple_choice_answer"] = None
    _write_json(annotations, data)
    with pytest.raises(
        DataError,
        match=r"train2014_annotations\.json: annotations\[3\] \(question_id=3007\): 'multiple_choice_answer' is null",
    ):
        VQAFolderDataModule(data_dir=str(tmp_path))


def test_vqa_v2_missing_answers_name_file_and_question_id(tmp_path):
    _write_vqa_v2(tmp_path)
    path = tmp_path / "v2_mscoco_train2014_annotations.json"
    data = json.loads(path.read_text())
    del data["annotations"][1]  # question_id 1007 loses its annotation
    del data["annotations"][2]["multiple_choice_answer"]  # so does question_id 3007's answer
    _write_json(path, data)
    with pytest.raises(DataError, match=r"annotations\.json: annotations\[2\] \(question_id=3007\) has no "):
        VQAFolderDataModule(data_dir=str(tmp_path))
    data["annotations"][2]["multiple_choice_answer"] = "dog"
    _write_json(path, data)
    with pytest.raises(DataError, match=r"v2_mscoco_train2014_annotations\.json: no answer for question_id=1007"):
        VQAFolderDataModule(data_dir=str(tmp_path))


def test_malformed_json_names_file_and_line(tmp_path):
    _write_clevr(tmp_path)
    path = tmp_path / "questions" / "CLEVR_train_questions.json"
    lines = path.read_text().splitlines()
    lines[3] = lines[3] + " !!"
    path.write_text("\n".join(lines))
    with pytest.raises(DataError, match=r"CLEVR_train_questions\.json: malformed JSON at line 4"):
        VQAFolderDataModule(data_dir=str(tmp_path))


def test_corrupt_image_raises_data_error_naming_the_file(tmp_path):
    _write_clevr(tmp_path)
    corrupt = tmp_path / "images" / "train" / "CLEVR_train_000001.png"
    corrupt.write_bytes(np.random.default_rng(2).integers(0, 256, 300, dtype=np.uint8).tobytes())
    dm = VQAFolderDataModule(data_dir=str(tmp_path), image_size=SIZE)
    dm.setup("fit")
    dm.train_dataset[0]  # the other images still load
    with pytest.raises(DataError, match=r"CLEVR_train_000001\.png: cannot read image"):
        dm.train_dataset[1]


def test_missing_image_raises_data_error_naming_the_file(tmp_path):
    _write_vqa_v2(tmp_path)
    (tmp_path / "val2014" / "COCO_val2014_000000000009.jpg").unlink()
    dm = VQAFolderDataModule(data_dir=str(tmp_path), image_size=SIZE)
    dm.setup("validate")
    with pytest.raises(DataError, match=r"COCO_val2014_000000000009\.jpg: image file not found"):
        next(iter(dm.val_dataloader()))


def test_missing_image_folder_raises_data_error_naming_it(tmp_path):
    _write_clevr(tmp_path)
    for f in (tmp_path / "images" / "val").iterdir():
        f.unlink()
    (tmp_path / "images" / "val").rmdir()
    with pytest.raises(DataError, match=r"images/val: image folder not found"):
        VQAFolderDataModule(data_dir=str(tmp_path))


@pytest.mark.parametrize(
    "kwargs, key",
    [
        ({"layout": "coco"}, "layout"),
        ({"image_size": 0}, "image_size"),
        ({"max_answers": 0}, "max_answers"),
        ({"batch_size": 0}, "batch_size"),
        ({"seed": -3}, "seed"),
    ],
)
def test_bad_arguments_raise_config_error_naming_the_key(tmp_path, kwargs, key):
    _write_clevr(tmp_path)
    with pytest.raises(ConfigError, match=rf"\b{key}="):
        VQAFolderDataModule(data_dir=str(tmp_path), **kwargs)
