"""The container images: built from the same locks and Makefile target as a laptop, with the entry points the deployments name.

What can be checked without building them: the Dockerfiles' instructions, the install command they run against the
Makefile, and their commands against the Helm values. tests/test_containers.py builds and runs the CPU image.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DOCKER = REPO / "deploy" / "docker"
IMAGES = {"Dockerfile": ("cpu", "image", "IMAGE"), "Dockerfile.gpu": ("gpu", "image-gpu", "GPU_IMAGE")}


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n\s*", " ", "\n".join(line for line in path.read_text().split("\n") if not line.lstrip().startswith("#")))
    pairs = []
    for line in text.split("\n"):
        if line.strip():
            word, _, rest = line.strip().partition(" ")
            pairs.append((word.upper(), rest.strip()))
    return pairs


@pytest.mark.parametrize("name", sorted(IMAGES))
def test_each_image_installs_its_profile_with_the_makefile_from_the_locks(name):
    profile, _, _ = IMAGES[name]
    steps = instructions(DOCKER / name)
    known = {"FROM", "RUN", "WORKDIR", "ENV", "COPY", "ARG", "EXPOSE", "CMD"}
    assert {word for word, _ in steps} <= known and steps[0][0] == "FROM"
    copies = [args for word, args in steps if word == "COPY"]
    assert "deploy/env deploy/env" in copies and any("pyproject.toml" in c for c in copies)
    runs = [args for word, args in steps if word == "RUN"]
    install = next(r for r in runs if "make -f deploy/env/envs.mk envs" in r)
    assert f"PROFILE={profile}" in install
    # The copied sources exist, and the locks come in before the install that reads them.
    for copy in copies:
        for source in shlex.split(copy)[:-1]:
            assert (REPO / source).exists(), source
    order = [args for word, args in steps if word in ("COPY", "RUN")]
    assert order.index("deploy/env deploy/env") < order.index(install)
    # The code and the Makefile's other targets come after the install: an edit of either rebuilds no environment.
    assert order.index("omnithought_dagster omnithought_dagster") > order.index(install)
    assert all("Makefile" not in args for args in order[: order.index(install)])
    # What `make envs` runs in the image: every environment synced from this profile's lock.
    dry = subprocess.run(
        ["make", "-n", "-B", "-f", "deploy/env/envs.mk", "envs", f"PROFILE={profile}", "SMOKE=0"],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "MAKEFLAGS": ""},
    )
    assert dry.returncode == 0, dry.stderr
    for env in ("dagster", "vllm", "lmms"):
        assert f"deploy/env/{profile}/{env}.lock" in dry.stdout
    assert "--require-hashes" in dry.stdout and "omnithought doctor" not in dry.stdout  # SMOKE=0: no servers at build time


def test_the_code_location_image_serves_what_the_helm_chart_asks_for():
    values = yaml.safe_load((REPO / "deploy/k8s/values.yaml").read_text())
    deployment = values["dagster-user-deployments"]["deployments"][0]
    (cmd,) = [args for word, args in instructions(DOCKER / "Dockerfile") if word == "CMD"]
    command = yaml.safe_load(cmd)  # exec form: a JSON list
    assert command[:3] == ["dagster", "api", "grpc"]
    grpc_args = deployment["dagsterApiGrpcArgs"]
    assert command[3 : 3 + len(grpc_args)] == grpc_args
    assert command[command.index("--port") + 1] == str(deployment["port"])
    (expose,) = [args for word, args in instructions(DOCKER / "Dockerfile") if word == "EXPOSE"]
    assert expose == str(deployment["port"])
    # The module the image serves is the code location workspace.yaml names for `dagster dev`.
    workspace = yaml.safe_load((REPO / "workspace.yaml").read_text())
    assert workspace["load_from"][0]["python_module"]["module_name"] == grpc_args[-1]


def test_the_images_the_deployment_names_are_the_ones_make_builds():
    values = yaml.safe_load((REPO / "deploy/k8s/values.yaml").read_text())
    repository = values["dagster-user-deployments"]["deployments"][0]["image"]["repository"]
    for name, (_, target, _variable) in IMAGES.items():
        dry = subprocess.run(["make", "-n", target], cwd=REPO, capture_output=True, text=True, env={**os.environ, "MAKEFLAGS": ""})
        assert dry.returncode == 0, dry.stderr
        assert f"deploy/container/engine.sh build deploy/docker/{name} omnithought-dagster" in dry.stdout
    assert repository.rsplit("/", 1)[-1] == "omnithought-dagster"
    assert "omnithought-dagster-gpu" in (REPO / "deploy/k8s/values.yaml").read_text()  # operations.k8s.gpu_image, documented there


def test_the_build_context_leaves_the_local_environments_out():
    ignored = (REPO / ".dockerignore").read_text().split()
    assert {".venv*", ".cache", ".omnithought*", ".dagster*", ".git"} <= set(ignored)
