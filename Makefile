# Two entry points on a fresh machine with Python 3.11:
#   make run   - create .venv, install, run the pipeline (`dvc repro`) on the offline digits data
#   make test  - create .venv, install with test extras, lint and run the test suite
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(abspath $(VENV))/bin
# DVC stages call `python -m pipeline`: put the venv first so they use it.
export PATH := $(BIN):$(PATH)
export DVC_NO_ANALYTICS := 1

.PHONY: run test lint

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed-run: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e ".[test,jax]"
	touch $@ $(VENV)/.installed-run

run: $(VENV)/.installed-run
	dvc repro

lint: $(VENV)/.installed-test
	ruff check pipeline tests
	ruff format --check pipeline tests

test: lint
	python -m pytest
