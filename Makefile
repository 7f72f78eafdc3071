# Two commands matter: `make demo` and `make test`. Both install into .venv first when it is
# missing or older than pyproject.toml.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
STAMP := $(VENV)/.installed
# The venv's bin first on PATH: torch's extension builder runs whichever `ninja` it finds first,
# and switching between the system one and pip's forces a rebuild.
export PATH := $(BIN):$(PATH)
export RAY_AUTH_MODE ?= disabled
export RAY_USAGE_STATS_ENABLED ?= 0
export RAY_TRAIN_HEALTH_CHECK_INTERVAL_S ?= 0.1
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions

.PHONY: setup demo test lint bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first: the CPU wheel on disk. Anything else resolving `torch` pulls a CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	# Warm DeepSpeed's JIT op cache (TORCH_EXTENSIONS_DIR, project-local) once, here.
	$(BIN)/python -m clusterft.setup_check
	@touch $(STAMP)

demo: setup
	$(BIN)/clusterft demo

test: setup
	$(BIN)/python -m pytest -q -p no:cacheprovider --durations=40

lint: setup
	$(BIN)/ruff check clusterft tests bench
	$(BIN)/ruff format --check clusterft tests bench

# Each prints JSON; the figures in README.md come from these.
bench: setup
	$(BIN)/python bench/engine.py --json
	$(BIN)/python bench/train.py --json
	$(BIN)/python bench/serve_load.py --json

clean:
	rm -rf $(VENV) .cache build *.egg-info
