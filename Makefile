# `make demo` and `make test` work on a fresh machine: they create what they need, once.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export DAGSTER_HOME ?= $(CURDIR)/.dagster
export OMNITHOUGHT_CONFIG ?= $(CURDIR)/omnithought.yaml
HOST ?= 127.0.0.1
PORT ?= 3000
PYTEST_ARGS ?=

.PHONY: env demo test ui bench clean

env: $(STAMP) $(DAGSTER_HOME)/dagster.yaml

# Reinstalled only when pyproject.toml changes (the stamp is older than it).
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $@

$(DAGSTER_HOME)/dagster.yaml: deploy/local/dagster.yaml
	mkdir -p $(DAGSTER_HOME)
	cp $< $@

demo: env
	$(BIN)/omnithought demo

test: env
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# `dg dev` reads [tool.dg] in pyproject.toml; `dagster dev -w workspace.yaml` is equivalent.
ui: env
	$(BIN)/dg dev -h $(HOST) -p $(PORT)

bench: env
	$(BIN)/python bench/seed_ingest.py

clean:
	rm -rf .omnithought .dagster
