# Two commands on a fresh machine: `make demo` (local swarm) and `make test` (the test suite).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: setup demo test test-deploy lint bench bench-shaped clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -c constraints.txt -e ".[dev,energy]"
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(BIN)/p2pfm swarm --peers 3 --out runs/demo-$$(date +%Y%m%d-%H%M%S)

test: setup
	$(BIN)/python -m pytest

test-deploy: setup
	$(BIN)/python -m pytest -m deploy tests/deploy

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy p2pfm/core

bench: setup
	$(BIN)/p2pfm bench codecs

bench-shaped: setup
	$(BIN)/python tests/deploy/bench_shaped.py

clean:
	rm -rf $(VENV) runs
