# `make run` and `make test` are the whole set-up: both install into .venv first.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3

.PHONY: install run test

install: $(VENV)/.installed

# torch==2.13.0 (pinned in pyproject.toml) is the CPU wheel pip takes from local disk.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e '.[test]'
	touch $@

run: install
	$(VENV)/bin/brainmets run

test: install
	$(PY) -m pytest
