# Developer entry points. Everything runs from a project-local virtualenv in .venv/,
# installed with the pinned constraints, so a machine needs nothing but Python 3.11.
#
#   make venv        create/refresh .venv (re-runs when pyproject.toml or the pins change)
#   make run         the main job: configs/mnist_noisy_labels.py end to end (ARGS="..." for flags)
#   make demo        the hypergradient demo (trainers/hypergrad_demo.py)
#   make test        ruff, then the fast test suite (this is what .ci/run does)
#   make test-slow   only the tests marked @pytest.mark.slow
#   make lint        ruff, and check that BUILD is up to date with the sources
#   make build-file  regenerate BUILD from the sources (tools/gen_build.py)
#   make bench       run the hypergradient benchmarks (extra flags: make bench ARGS="...")
#   make faults      the fault suite (kills, damaged checkpoints, NaN, bad configs/data), a table
#   make clean       remove caches and build outputs; `make distclean` also removes .venv

SHELL := /bin/bash

# Prefer python3.11; fall back to python3 (which must then be 3.11, checked below).
# Override with: make PYTHON=/path/to/python3.11 venv
ifeq ($(origin PYTHON),undefined)
PYTHON := $(shell command -v python3.11 2>/dev/null || command -v python3 2>/dev/null)
endif

VENV := .venv
VENV_PY := $(VENV)/bin/python
CONSTRAINTS := requirements/constraints.txt
STAMP := $(VENV)/.installed

# The library is written against Keras 2 (tf_keras); TF must be told before it is imported.
TF_ENV := TF_USE_LEGACY_KERAS=1 TF_CPP_MIN_LOG_LEVEL=2

ARGS ?=
PYTEST_ARGS ?=

.PHONY: venv run demo test test-slow lint build-file bench faults clean distclean

venv: $(STAMP)

$(STAMP): pyproject.toml $(CONSTRAINTS)
	@test -n "$(PYTHON)" || { echo "error: no python3.11 or python3 on PATH" >&2; exit 1; }
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' || { \
	  echo "error: $(PYTHON) is not Python 3.11; install it or run: make PYTHON=/path/to/python3.11" >&2; \
	  exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(VENV_PY) -m pip install --upgrade -c $(CONSTRAINTS) pip
	$(VENV_PY) -m pip install -c $(CONSTRAINTS) -e ".[test]"
	touch $@

run: venv
	$(TF_ENV) $(VENV_PY) -m trainers.meta_pretrain --config=configs/mnist_noisy_labels.py \
	  --workdir=runs/mnist_noisy_labels $(ARGS)

demo: venv
	$(TF_ENV) $(VENV_PY) -m trainers.hypergrad_demo $(ARGS)

test: venv
	$(VENV)/bin/ruff check .
	$(TF_ENV) $(VENV_PY) -m pytest -q $(PYTEST_ARGS)

# pytest exits 5 when it collects nothing; no slow tests is not a failure.
test-slow: venv
	$(TF_ENV) $(VENV_PY) -m pytest -q -m slow $(PYTEST_ARGS) || [ $$? -eq 5 ]

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV_PY) tools/gen_build.py --check

build-file:
	$(PYTHON) tools/gen_build.py

bench: venv
	$(TF_ENV) $(VENV_PY) -m benchmarks.hypergrad_bench $(ARGS)

# The same cases as tests/reliability/ (pytest), printed as one table; exits 1 on a failure.
faults: venv
	$(TF_ENV) $(VENV_PY) -m tests.reliability.fault_suite

clean:
	rm -rf build/ dist/ ./*.egg-info .pytest_cache .ruff_cache
	find . -path ./$(VENV) -prune -o -path ./.git -prune -o -type d -name __pycache__ -prune \
	  -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)
