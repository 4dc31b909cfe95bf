"""benchmarks/ddae_paired.py: seed-by-seed differences of ddae.py runs from a base run, their standard errors and
the targets they meet, against figures worked out by hand; runs that cannot be paired are refused by name."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import ddae_paired  # noqa: E402


def _result(path: Path, runs: dict[str, list[tuple[float, float, float]]], *, first_seed: int | None = 0) -> str:
    """A ddae.py JSON whose variants have per-seed (macro_f1, tail_f1, head_acc); acc = macro_f1."""
    arguments = {} if first_seed is None else {"first_seed": first_seed}
    body = {
        "date": "2026-11-30T00:00:00",
        "environment": {"gpu": "NVIDIA H200"},
        "arguments": arguments,
        "corpus": {"name": "wordnet", "train": 10},
        "runs": {
            key: {
                "per_seed": [{"macro_f1": m, "tail_f1": t, "head_acc": h, "acc": m} for m, t, h in seeds],
                "val_mean": {"macro_f1": 40.0},
            }
            for key, seeds in runs.items()
        },
    }
    path.write_text(json.dumps(body))
    return str(path)


def test_differences_are_paired_by_seed(tmp_path):
    base = _result(tmp_path / "a.json", {"a": [(50, 20, 70), (60, 30, 72)]})
    other = _result(tmp_path / "d.json", {"b": [(0, 0, 0), (0, 0, 0)], "d": [(53, 26, 70), (62, 35, 70)]})
    out = tmp_path / "paired.json"
    summary = ddae_paired.main([f"plain={base}", f"ddae={other}#d", f"--out={out}"])
    diff = summary["runs"]["ddae"]["minus_base"]
    # macro-F1 differences 3 and 2: mean 2.5, standard error std([3, 2], ddof=1) / sqrt(2) = 0.5
    assert diff["macro_f1"] == pytest.approx({"mean": 2.5, "se": 0.5, "min": 2.0})
    assert diff["tail_f1"]["mean"] == pytest.approx(5.5) and diff["head_acc"]["mean"] == pytest.approx(-1.0)
    assert summary["runs"]["ddae"]["targets_met"] == ["tail_f1", "head_acc"]
    assert summary["seeds"] == [0, 1]
    assert json.loads(out.read_text())["runs"]["ddae"]["minus_base"]["tail_f1"]["min"] == pytest.approx(5.0)


def test_a_json_written_before_first_seed_ran_seeds_from_zero(tmp_path):
    old = _result(tmp_path / "old.json", {"a": [(50, 20, 70)]}, first_seed=None)
    new = _result(tmp_path / "new.json", {"c": [(51, 20, 70)]}, first_seed=3)
    with pytest.raises(SystemExit, match=r"seeds \[3\], but the base plain ran \[0\]"):
        ddae_paired.main([f"plain={old}", f"c={new}", f"--out={tmp_path / 'p.json'}"])


@pytest.mark.parametrize(
    ("spec", "message"),
    [("d={two}", "holds variants \\['a', 'd'\\]: name one"), ("d={two}#e", "has no variant 'e'"), ("{two}", "LABEL=")],
)
def test_runs_that_cannot_be_named_are_refused(tmp_path, spec, message):
    base = _result(tmp_path / "a.json", {"a": [(50, 20, 70)]})
    two = _result(tmp_path / "two.json", {"a": [(50, 20, 70)], "d": [(51, 20, 70)]})
    with pytest.raises(SystemExit, match=message):
        ddae_paired.main([f"plain={base}", spec.format(two=two), f"--out={tmp_path / 'p.json'}"])
