# Quickstart: `make run` (set-up + default DRPO run) and `make test` (set-up + tests).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip

.PHONY: run test setup setup-all geometry compare bench clean

$(VENV)/.base: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first, pinned: a bare `torch` requirement may pull a multi-GB CUDA build.
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[dev]'
	touch $@

$(VENV)/.all: $(VENV)/.base
	$(PIP) install -q -e '.[dev,verl,trl]'
	touch $@

setup: $(VENV)/.base
setup-all: $(VENV)/.all

run: setup
	$(VENV)/bin/drpo train

test: setup-all
	$(VENV)/bin/python -m pytest -q

geometry: setup
	$(VENV)/bin/drpo geometry --out docs/figures

compare: setup
	$(VENV)/bin/drpo compare --workers 2 --out runs/compare --report docs/compare

bench: setup-all
	$(PY) benchmarks/logprob_bench.py
	$(PY) benchmarks/objectives_bench.py

clean:
	rm -rf $(VENV) runs
