# Two commands set up a fresh machine: `make demo` and `make test` (each creates .venv and installs first).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test lint clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test]"
	touch $@

demo: $(VENV)/.installed
	$(PY) -m zoo fit --config vqa.yaml

test: $(VENV)/.installed
	$(PY) -m pytest -q

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check zoo datamodules lit_models tests benchmarks

clean:
	rm -rf $(VENV) lightning_logs .pytest_cache
