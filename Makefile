# One command sets up and runs the main job (`make train`), one runs the tests (`make test`).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
SHARED ?= ../shared
# Where real pretrained encoders are installed by $(SHARED)/tools/fetch-pretrained.
PRETRAINED_DIR ?= $(HOME)/.cache/pretrained
export PRETRAINED_DIR
# Default data for `make train` and the real check: the shared IMDB archive where this checkout sits
# beside one (override with IMDB_LORA_DATA). Without it nothing is set, and imdb-lora downloads the
# official archive once (progress bar, sha256 checked) into ~/.cache/imdb-lora.
SHARED_DATA := $(abspath $(SHARED))/data/aclImdb-labeled.tar.xz
ifneq ($(wildcard $(SHARED_DATA)),)
IMDB_LORA_DATA ?= $(SHARED_DATA)
endif
ifneq ($(IMDB_LORA_DATA),)
export IMDB_LORA_DATA
endif
FETCH_PRETRAINED := $(SHARED)/tools/fetch-pretrained
MINILM_WEIGHTS := $(PRETRAINED_DIR)/all-MiniLM-L6-v2/model.safetensors
# torch's own wheel index: the CPU build by default (see setup)
TORCH_VERSION ?= 2.13.0
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
# Optional pip constraints file for the venv (test-gpu-versions sets it).
CONSTRAINTS ?=
MODEL ?= roberta-base
RUN ?= runs/$(notdir $(MODEL))-lora

.PHONY: setup test test-fast test-gpu-versions train lint format clean

# torch first, pinned, with torch's own index beside PyPI: PyPI's Linux wheel is a multi-GB CUDA build,
# and the CPU index's 2.13.0+cpu sorts above it (--no-deps: only torch itself comes from that index; its
# dependencies come from PyPI with the project's). A CUDA machine picks its CUDA build instead, e.g.
# `make setup TORCH_INDEX=https://download.pytorch.org/whl/cu128` (README: "Set-up").
$(BIN)/imdb-lora: pyproject.toml $(CONSTRAINTS)
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q --no-deps torch==$(TORCH_VERSION) --extra-index-url $(TORCH_INDEX)
	$(BIN)/pip install -q -e ".[dev]" $(if $(CONSTRAINTS),-c $(CONSTRAINTS))
	touch $@

setup: $(BIN)/imdb-lora

# The tests are independent (each writes its own temporary folders and binds free ports), so the fast
# suite is spread over WORKERS processes by pytest-xdist (WORKERS=0: one process); the slow real checks
# (MiniLM training, torchrun, Ray) run after it, one at a time, so they never share the cores.
WORKERS ?= 2
# worksteal: each worker starts on one contiguous half of the tests (a test file's module fixtures mostly
# built once) and an idle worker takes half of the other's queue, so the last minutes stay balanced. Not
# in pyproject's addopts: a pytest without pytest-xdist (the GPU machine's may lack it) would refuse it.
FAST_SUITE := -q -m "not slow" -n $(WORKERS) --dist=worksteal

# The real check needs MiniLM's real weights (fetch-pretrained installs them once, idempotent and
# checksummed, where $(SHARED) has it) and IMDB data; without them the fast suite runs and says so.
test: setup
	@if [ -x "$(FETCH_PRETRAINED)" ]; then $(FETCH_PRETRAINED) minilm >/dev/null; fi
	@if [ -f "$(MINILM_WEIGHTS)" ] && [ -n "$$IMDB_LORA_DATA" ]; then \
		echo "$(BIN)/pytest $(FAST_SUITE)" && $(BIN)/pytest $(FAST_SUITE) && \
		echo "$(BIN)/pytest -q -m slow" && $(BIN)/pytest -q -m slow; \
	else \
		echo "make test: the real check (tests/test_real.py) needs $(MINILM_WEIGHTS) and IMDB_LORA_DATA;" \
			"running the fast suite only"; \
		echo "$(BIN)/pytest $(FAST_SUITE)"; $(BIN)/pytest $(FAST_SUITE); \
	fi

test-fast: setup
	$(BIN)/pytest $(FAST_SUITE)

# The fast suite against the libraries of the GPU machine (requirements/gpu-machine.txt: torch,
# transformers and peft as pinned there), in a venv of its own: the GPU machine has no package registry
# and runs the code from source, so an API those versions lack must fail here, not there. torch comes
# first at the file's version (TORCH_VERSION), so setup never installs the default one to replace it.
# The venv uses Python 3.12, the GPU machine's, where python3.12 runs here, else $(PY).
GPU_VENV ?= .venv-gpu-versions
GPU_CONSTRAINTS := requirements/gpu-machine.txt
GPU_TORCH_VERSION := $(shell sed -n 's/^torch==//p' $(GPU_CONSTRAINTS))
GPU_PY ?= $(shell python3.12 -c "" >/dev/null 2>&1 && echo python3.12 || echo $(PY))
test-gpu-versions:
	$(if $(filter python3.12,$(GPU_PY)),,@echo "test-gpu-versions: no python3.12 here; testing with $(GPU_PY), not the GPU machine's Python 3.12" >&2)
	$(MAKE) test-fast VENV=$(GPU_VENV) PY=$(GPU_PY) CONSTRAINTS=$(GPU_CONSTRAINTS) TORCH_VERSION=$(GPU_TORCH_VERSION)
	$(GPU_VENV)/bin/python -c "import sys, torch, transformers, peft; print('tested with Python', sys.version.split()[0], 'torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)"

train: setup
	$(BIN)/imdb-lora train --model $(MODEL) --output-dir $(RUN) $(ARGS)

lint: setup
	$(BIN)/ruff check src tests && $(BIN)/ruff format --check src tests
	$(BIN)/lint-imports  # the architecture's import contracts (pyproject.toml [tool.importlinter])
	for s in scripts/gpu-checks.sh scripts/gpu-stage.sh scripts/gpu-rehearse.sh; do bash -n $$s || exit 1; done  # syntax only: they need the GPU or ../shared

format: setup
	$(BIN)/ruff format src tests && $(BIN)/ruff check --fix src tests

clean:
	rm -rf $(VENV) $(GPU_VENV) .pytest_cache .ruff_cache src/*.egg-info
