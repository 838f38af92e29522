# `make demo` and `make test` work on a fresh machine: they create what they need, once.
# Every environment installs from a committed lock (deploy/env/<profile>/<env>.lock, exact
# versions with hashes); `make lock` is the only way versions move. See deploy/env/README.md.
include deploy/env/envs.mk
.DEFAULT_GOAL := env

export DAGSTER_HOME ?= $(CURDIR)/.dagster
export OMNITHOUGHT_CONFIG ?= $(CURDIR)/omnithought.yaml
HOST ?= 127.0.0.1
PORT ?= 3000
PYTEST_ARGS ?=
# `make test` leaves the image tier to `make test-images`; PYTEST_MARK="not containers and not browser" narrows it further.
PYTEST_MARK ?= not containers
# More `docker build` / `podman build` arguments, e.g. --build-arg UV_FIND_LINKS=<the CPU torch wheel's folder or page>.
IMAGE_BUILD_ARGS ?=

# The container images (deploy/docker/): built by `make envs` from the same locks.
IMAGE ?= omnithought-dagster:latest
GPU_IMAGE ?= omnithought-dagster-gpu:latest

.PHONY: env envs vllm-env lmms-env browser demo sandbox teachers test test-fast lint check-defs ui bench lock doctor image image-gpu image-smoke image-gpu-check demo-containers test-images clean gpu-check gpu-wheels

env: envs $(DAGSTER_HOME)/dagster.yaml browser

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
	$(BIN)/python -m pytest -m "$(PYTEST_MARK)" $(PYTEST_ARGS)

# The image tier (README "Containers"): the CPU image built, its smoke checks in a container, then the tests that run it -
# the image's paths, a whole run in containers against the laptop run, a killed step container. CI runs it after `make test`.
test-images: env image-smoke
	$(BIN)/python -m pytest -m containers $(PYTEST_ARGS)

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

# The images (README "Containers"): Docker where a Docker daemon answers, else podman, installed and set up by
# deploy/container/engine.sh (Debian's packages; the base image made from Debian's archive when no registry answers).
ENGINE := deploy/container/engine.sh
image:
	$(ENGINE) build deploy/docker/Dockerfile $(IMAGE) $(IMAGE_BUILD_ARGS)

image-gpu:
	$(ENGINE) build deploy/docker/Dockerfile.gpu $(GPU_IMAGE) $(IMAGE_BUILD_ARGS)

# The CPU image's three smoke checks, inside a container of it (/dev/shm: DeepSpeed's and vLLM's shared memory).
image-smoke: image
	$(ENGINE) run --rm --shm-size=2g $(IMAGE) omnithought doctor --profile cpu --smoke

# A smaller demo with every step in its own container of $(IMAGE) (dagster-docker; examples/containers): its own store
# and Dagster instance, shared with the containers at the same paths.
demo-containers: env image
	DAGSTER_HOME=$(CURDIR)/.dagster-containers $(BIN)/omnithought demo --config examples/containers/omnithought.yaml

# The GPU image on a machine without a GPU: its environments against their locks, and each one's imports.
image-gpu-check: image-gpu
	$(ENGINE) run --rm $(GPU_IMAGE) omnithought doctor --profile gpu --imports

clean:
	rm -rf .omnithought .dagster .omnithought-containers .dagster-containers .omnithought-sandbox .dagster-sandbox .omnithought-teachers .dagster-teachers .cache examples/*/.cache
