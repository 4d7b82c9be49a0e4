# One command sets up and runs the main job (`make train`), one runs the tests (`make test`).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
SHARED ?= ../shared
# Where real pretrained encoders are installed by $(SHARED)/tools/fetch-pretrained.
PRETRAINED_DIR ?= $(HOME)/.cache/pretrained
export PRETRAINED_DIR
# Default data for `make train` and the real check: the shared IMDB archive (override with IMDB_LORA_DATA).
IMDB_LORA_DATA ?= $(abspath $(SHARED))/data/aclImdb-labeled.tar.xz
export IMDB_LORA_DATA
MODEL ?= roberta-base
RUN ?= runs/$(notdir $(MODEL))-lora

.PHONY: setup test test-fast train lint format clean

$(BIN)/imdb-lora: pyproject.toml
	$(PY) -m venv $(VENV)
	# The CPU build of torch first, pinned, so pip never resolves a multi-GB CUDA build.
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

setup: $(BIN)/imdb-lora

# The real check needs MiniLM's real weights: fetch-pretrained installs them once (idempotent, checksummed).
test: setup
	$(SHARED)/tools/fetch-pretrained minilm >/dev/null
	$(BIN)/pytest -q

test-fast: setup
	$(BIN)/pytest -q -m "not slow"

train: setup
	$(BIN)/imdb-lora train --model $(MODEL) --output-dir $(RUN) $(ARGS)

lint: setup
	$(BIN)/ruff check src tests && $(BIN)/ruff format --check src tests
	$(BIN)/lint-imports  # the architecture's import contracts (pyproject.toml [tool.importlinter])
	bash -n scripts/gpu-checks.sh  # syntax only: the script itself runs on the GPU machine

format: setup
	$(BIN)/ruff format src tests && $(BIN)/ruff check --fix src tests

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache src/*.egg-info
