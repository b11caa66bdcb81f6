# `make run` and `make test` do all the set-up on a fresh machine with Python 3.11.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
CONSTRAINTS := constraints-cpu.txt
CONFIG ?= configs/tiny.yaml

.PHONY: run test lint install install-dev bench notebooks clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml $(CONSTRAINTS)
	$(BIN)/pip install --quiet -c $(CONSTRAINTS) torch
	$(BIN)/pip install --quiet -c $(CONSTRAINTS) -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(BIN)/pip install --quiet -c $(CONSTRAINTS) -e '.[dev]'
	touch $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

run: install
	$(BIN)/curriculum run $(CONFIG)

lint: install-dev
	$(BIN)/ruff check .
	$(BIN)/lint-imports

# Two test processes, each with its own 2-CPU Ray cluster (a test file stays in one process, so
# its module fixtures are built once). Most of the suite's CPU goes to starting processes (Ray
# workers, model actors importing torch and transformers, CLI subprocesses), which keeps 2 cores busy.
test: lint
	$(BIN)/python -m pytest -q -n 2 --dist loadfile --durations=30 tests

bench: install-dev
	$(BIN)/python benchmarks/run_all.py

# Re-run every notebook and store its outputs, so the committed outputs never go stale.
notebooks: install-dev
	$(BIN)/python notebooks/execute.py

clean:
	rm -rf $(VENV) runs .pytest_cache
