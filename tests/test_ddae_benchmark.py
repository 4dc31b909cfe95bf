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


def test_contextual_fit_refuses_steps_that_time_nothing(monkeypatch, capsys):
    import contextual_fit

    monkeypatch.setattr(sys, "argv", ["contextual_fit.py", "--steps", "25", "5"])
    with pytest.raises(SystemExit):
        contextual_fit.main()
    assert "--steps 25 5" in capsys.readouterr().err
