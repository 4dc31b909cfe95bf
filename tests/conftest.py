"""Fixtures several test files share."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _one_test_one_process_group():
    """A test that runs a Lightning strategy in this process (ModelParallelStrategy on one CPU process) leaves the
    default process group and the MASTER_* variables Lightning set: later tests could not initialise theirs, and
    their child processes inherited a port this process still listens on. Both are undone after every test."""
    environ = dict(os.environ)
    yield
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    os.environ.clear()
    os.environ.update(environ)


@pytest.fixture()
def elsewhere(tmp_path, monkeypatch):
    """Run from an unrelated directory, with the data cache under it."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ZOO_DATA_DIR", str(tmp_path / "data"))
    return tmp_path


@pytest.fixture()
def subprocess_env():
    """The environment of a child ``python``: this one, the repository first on ``PYTHONPATH`` and the caller's own
    entries after it (where a machine keeps extra packages)."""
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))


@pytest.fixture()
def cli_error(capsys):
    """``cli_error(args)``: what ``python -m zoo ARGS``, run in this process, writes to stderr; it must stop with exit
    status 2, the status of a user error."""
    from zoo.cli import main

    def run(args: list[str]) -> str:
        with pytest.raises(SystemExit) as exit_info:
            main(args)
        assert exit_info.value.code == 2
        return capsys.readouterr().err

    return run
