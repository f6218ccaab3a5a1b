# Two entry points on a fresh machine with Python 3.11:
#   make run   - create .venv, install, run the pipeline (`dvc repro`) on the offline digits data
#   make test  - create .venv, install with test extras, lint and run the test suite
#                (installs Debian's chromium and postgresql for the browser and server tests)
# The first Python >= 3.11.4 on PATH (tarfile's safe extraction filters arrived in 3.11.4).
PYTHON ?= $(shell for p in python3.11 python3.12 python3 python; do \
	command -v $$p >/dev/null && $$p -c 'import sys; sys.exit(sys.version_info < (3, 11, 4))' \
	2>/dev/null && { command -v $$p; break; }; done)
VENV := .venv
BIN := $(abspath $(VENV))/bin
# DVC stages call `python -m pipeline`: put the venv first so they use it.
export PATH := $(BIN):$(PATH)
export DVC_NO_ANALYTICS := 1

.PHONY: run test lint services lock
.DEFAULT_GOAL := run

$(BIN)/python:
	@test -n "$(PYTHON)" || { echo "error: no Python >= 3.11.4 on PATH (set PYTHON=...)"; exit 2; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# Installed at the exact versions of pipeline/requirements.lock (every DVC stage depends
# on it: a version change there reruns the stages); `make lock` records the venv's.
LOCK := pipeline/requirements.lock

$(VENV)/.installed-run: pyproject.toml $(LOCK) | $(BIN)/python
	$(BIN)/pip install --quiet -c $(LOCK) -e .
	touch $@

# The PyTorch-parity tests (tests/models/test_torch_weights.py, tests/e2e/test_pretrained.py)
# compare with timm on PyTorch's CPU build; pip takes it from this machine's wheel folder
# where there is one. timm without its dependencies: it imports torchvision, which has no
# CPU build on PyPI (pipeline/tools/bench/torchvision_stand_in.py stands in for it).
# Neither is in the lock: they are test tools, not what the pipeline runs on.
TORCH_TEST := torch==2.13.0
TIMM_TEST := timm==1.0.31

$(VENV)/.installed-test: pyproject.toml $(LOCK) | $(BIN)/python
	$(BIN)/pip install --quiet -c $(LOCK) -e ".[test,jax]"
	$(BIN)/pip install --quiet $(TORCH_TEST)
	$(BIN)/pip install --quiet --no-deps $(TIMM_TEST)
	touch $@ $(VENV)/.installed-run

lock: $(VENV)/.installed-test
	{ sed -n '/^#/p' $(LOCK); \
	  $(BIN)/pip freeze --exclude-editable --exclude torch --exclude timm; } > $(LOCK).new
	mv $(LOCK).new $(LOCK)

run: $(VENV)/.installed-run
	dvc repro

lint: $(VENV)/.installed-test
	ruff check pipeline tests
	ruff format --check pipeline tests

# The whole suite on TensorFlow, then the zoo, operator, augmentation, optimizer, loss,
# segmentation model, explain and ONNX export tests again on JAX (the GPU machines have JAX and no TensorFlow).
# Two workers. On TensorFlow each takes a whole file at a time: the end-to-end tests of
# test_e2e.py share one project and run in order, as a user's session would.
# The browser test drives Debian's chromium; the team-server test starts Debian's PostgreSQL.
# Installed here when missing (root or sudo); PIPELINE_REQUIRE_SERVICES=0 skips those tests
# instead of failing them on a machine that cannot install packages.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
export PIPELINE_REQUIRE_SERVICES ?= 1

services:
	@if [ "$(PIPELINE_REQUIRE_SERVICES)" = 1 ] && { [ ! -x /usr/bin/chromium ] || \
	    ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; }; then \
	  echo "installing chromium and postgresql (Debian packages)"; \
	  $(SUDO) apt-get install -y -qq --no-install-recommends chromium postgresql >/dev/null || \
	  { $(SUDO) apt-get update -qq && \
	    $(SUDO) apt-get install -y -qq --no-install-recommends chromium postgresql >/dev/null; }; \
	fi

# Not again on JAX: the explain tests that train a network first (minutes on CI's CPU).
# JAX's gradients (explain/gradients.py, the one backend-aware module) are checked
# against numpy by the other explain tests of the pass.
JAX_SKIP := not pointing_game and not probes_rise
# The JAX pass runs a step or two per model, so XLA's compiles are most of it, and LLVM's
# optimisation most of those: without it the pass took 545 s instead of 828 s here
# (DenseNet-121: build 29 -> 14 s, first train step 52 -> 32 s). The JAX tests of the
# first pass (tests/e2e/test_distributed.py, ...) keep XLA's default.
JAX_FLAGS := KERAS_BACKEND=jax XLA_FLAGS=--xla_backend_optimization_level=0

test: lint services
	python -m pytest -n 2 --dist loadfile
	$(JAX_FLAGS) python -m pytest -n 2 --dist load -k "$(JAX_SKIP)" tests/models/test_zoo.py tests/models/test_layers.py tests/models/test_segmentation_models.py tests/training/test_augment.py tests/training/test_optimizers.py tests/training/test_losses.py tests/explain tests/export
