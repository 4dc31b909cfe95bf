"""benchmarks/ddae.py: arguments that would fail deep inside torch are refused when parsed, with the flag named."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import ddae  # noqa: E402


def test_seeds_start_at_first_seed():
    assert ddae.parse_args([]).first_seed == 0
    args = ddae.parse_args(["--seeds", "10", "--first-seed", "3"])
    assert (args.first_seed, args.seeds) == (3, 10)


@pytest.mark.parametrize(
    ("argv", "flag"),
    [(["--steps", "20"], "--steps 20"), (["--seeds", "0"], "--seeds 0"), (["--first-seed", "-1"], "--first-seed -1")],
)
def test_bad_arguments_are_refused_by_name(argv, flag, capsys):
    with pytest.raises(SystemExit):
        ddae.parse_args(argv)
    assert flag in capsys.readouterr().err
