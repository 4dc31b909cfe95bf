"""benchmarks/ddae.py: a variant's runs take the seeds from ``--first-seed``; the issue's targets are judged from
:data:`ddae.TARGETS`; arguments that would fail deep inside torch are refused when parsed, with the flag named."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import ddae  # noqa: E402


def test_seeds_start_at_first_seed():
    assert ddae.parse_args([]).first_seed == 0
    args = ddae.parse_args(["--seeds", "10", "--first-seed", "3"])
    assert (args.first_seed, args.seeds) == (3, 10)


def test_a_variant_runs_the_seeds_from_first_seed(monkeypatch):
    seeds = []

    def trained(args, *, seed, eval_x, **kwargs):  # a model that is right on every example
        seeds.append(seed)
        return {split: labels.copy() for split in eval_x}

    monkeypatch.setattr(ddae, "train_and_test", trained)
    labels = np.array([0, 0, 0, 1, 1, 2])
    data = {
        "aug": None,
        "train_y": labels,
        "pool_x": torch.zeros(len(labels), 4),
        "pool_y": labels,
        "eval_x": {"val": None, "test": None},
        "eval_y": {"val": labels, "test": labels},
        "class_groups": np.array([0, 1, 2]),
        "num_classes": 3,
    }
    run = ddae.run_variant(ddae.parse_args(["--seeds", "3", "--first-seed", "5"]), data, "a")
    assert seeds == [5, 6, 7]
    assert len(run["per_seed"]) == 3 and run["mean"]["macro_f1"] == pytest.approx(100.0)


def test_targets_are_judged_on_the_means_of_d_against_a():
    def run(macro, tail, head):
        return {"mean": {"macro_f1": macro, "tail_f1": tail, "head_acc": head, "acc": 0.0}}

    verdict = ddae.targets({"a": run(50, 40, 70), "d": run(53, 44.9, 69)})
    assert verdict["d_vs_a"] == pytest.approx({"macro_f1": 3.0, "tail_f1": 4.9, "head_acc": -1.0})
    assert verdict["met"] == {"macro_f1": True, "tail_f1": False, "head_acc": True}
    assert ddae.targets({"a": run(50, 40, 70), "d": run(53, 45, 68.9)})["met"]["head_acc"] is False


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["--steps", "20"], "--steps 20"),
        (["--seeds", "0"], "--seeds 0"),
        (["--first-seed", "-1"], "--first-seed -1"),
        (["--operations", "synonym,backtranslate"], "--operations synonym,backtranslate"),
        (["--contextual-steps", "0"], "--contextual-steps 0"),
    ],
)
def test_bad_arguments_are_refused_by_name(argv, flag, capsys):
    with pytest.raises(SystemExit):
        ddae.parse_args(argv)
    assert flag in capsys.readouterr().err


def test_operations_are_parsed_into_the_augmenters_list():
    assert ddae.parse_args([]).operations == list(ddae.DEFAULT_OPERATIONS)
    assert ddae.parse_args(["--operations", "synonym, hypernym"]).operations == ["synonym", "hypernym"]


def test_per_operation_counts_copies_median_f1_and_rejections():
    aug = ddae.ScoredAugmentations(
        texts=["a", "b", "c", "d"],
        source=[0, 0, 1, 1],
        operation=["synonym", "hypernym", "hypernym", "synonym"],
        f1=np.array([0.9, 0.5, 0.7, 0.8]),
        augment_seconds=0.0,
        score_seconds=0.0,
    )
    stats = ddae.per_operation(aug, threshold=0.6)
    assert list(stats) == ["synonym", "hypernym"]
    assert stats["synonym"] == pytest.approx({"copies": 2, "median_f1": 0.85, "rejected_fraction": 0.0})
    assert stats["hypernym"] == pytest.approx({"copies": 2, "median_f1": 0.6, "rejected_fraction": 0.5})


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["--contextual-layers", "7"], "--contextual-layers 7"),
        (["--contextual-steps", "0"], "--contextual-steps 0"),
        (["--operations", "synonym,paraphrase"], "--operations synonym,paraphrase"),
    ],
)
def test_augment_time_refuses_bad_arguments_when_parsed(argv, flag, capsys):
    import ddae_augment_time

    with pytest.raises(SystemExit):
        ddae_augment_time.main(argv)
    assert flag in capsys.readouterr().err


def test_augment_time_times_a_first_run_and_reads_it_back(tmp_path):
    import ddae_augment_time

    texts = ["a large building where people worship together", "move quickly on foot over a long distance"] * 3
    texts += ["a heavy rain storm from dark clouds", "the act of giving money to a charity"]
    labels = [0, 1] * 3 + [2, 2]
    result = ddae_augment_time.time_augmentation(
        texts, labels, 3, operations=["contextual_label"], strength=1.0, max_copies=2, contextual_steps=2,
        contextual_layers=1, device="cpu", work_dir=tmp_path,
    )  # fmt: skip
    assert result["copies"] > 0 and (result["contextual_steps"], result["contextual_layers"]) == (2, 1)
    assert 0 < result["fit_seconds"] < result["total_seconds"]
    assert result["total_seconds"] >= result["fit_seconds"] + result["copies_seconds"] + result["score_seconds"]
    assert len(list(tmp_path.glob("mlm_*.pt"))) == 1  # fitted once: the augmenter read the timed fit
    assert len(list(tmp_path.glob("ddae_*.json"))) == 1 and result["second_run_seconds"] < result["total_seconds"]
