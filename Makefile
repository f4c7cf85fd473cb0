# `make test` on a fresh machine: builds .venv, installs swajax with its test
# and HF extras (torch pinned to 2.13.0), then runs the default test suite.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: install test test-all train

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test,hf]"
	touch $@

install: $(VENV)/.installed

test: $(VENV)/.installed
	$(PY) -m pytest -m "not slow" -n 2 --durations=15 $(PYTEST_ARGS)

test-all: $(VENV)/.installed
	$(PY) -m pytest -n 2 --durations=25 $(PYTEST_ARGS)

train: $(VENV)/.installed
	$(VENV)/bin/swajax train
