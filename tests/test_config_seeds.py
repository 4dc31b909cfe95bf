"""benchmarks/config_seeds.py: the mean and spread over seeds of config_run JSONs, and the group F1 it derives."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import config_seeds  # noqa: E402


def _run(path: Path, macro: float, f1: dict[str, float]) -> None:
    final = {"test/macro_f1": macro, "test/acc": 0.5, **{f"test/f1/{c}": v for c, v in f1.items()}}
    machine = {"date": "2026-11-30T00:00:00", "gpu": None}
    path.write_text(json.dumps({"machine": machine, "config": "x.yaml", "flags": [], "seconds": 1.0, "steps": 10,
                                "final": final}))  # fmt: skip


def test_means_differences_and_group_f1(tmp_path, monkeypatch):
    groups = {"a": "head", "b": "tail", "c": "tail"}
    monkeypatch.setattr(config_seeds, "wordnet_groups", lambda: groups)
    _run(tmp_path / "p0.json", 0.50, {"a": 0.9, "b": 0.2, "c": 0.4})
    _run(tmp_path / "p1.json", 0.60, {"a": 0.7, "b": 0.4, "c": 0.6})
    _run(tmp_path / "d0.json", 0.70, {"a": 0.8, "b": 0.5, "c": 0.7})
    out = tmp_path / "summary.json"
    summary = config_seeds.main(
        [f"plain={tmp_path / 'p*.json'}", f"ddae={tmp_path / 'd*.json'}", "--wordnet-groups", f"--out={out}"]
    )
    plain, ddae = summary["plain"], summary["ddae"]
    assert plain["mean"]["test/macro_f1"] == pytest.approx(55.0) and plain["std"]["test/macro_f1"] == pytest.approx(5.0)
    assert plain["mean"]["f1_tail"] == pytest.approx(40.0) and plain["mean"]["f1_head"] == pytest.approx(80.0)
    assert ddae["minus_first"]["test/macro_f1"] == pytest.approx(15.0)
    assert ddae["minus_first"]["f1_tail"] == pytest.approx(20.0)
    assert np.isclose(json.loads(out.read_text())["groups"]["ddae"]["mean"]["f1_head"], 80.0)


def test_classes_other_than_the_groups_are_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(config_seeds, "wordnet_groups", lambda: {"a": "head"})
    _run(tmp_path / "p0.json", 0.5, {"z": 0.1})
    with pytest.raises(SystemExit, match="not the WordNet supersenses"):
        config_seeds.main([f"plain={tmp_path / 'p0.json'}", "--wordnet-groups", f"--out={tmp_path / 's.json'}"])


def test_a_glob_that_matches_nothing_is_named(tmp_path):
    with pytest.raises(SystemExit, match="LABEL=GLOB"):
        config_seeds.main([f"plain={tmp_path / 'none*.json'}", f"--out={tmp_path / 's.json'}"])
