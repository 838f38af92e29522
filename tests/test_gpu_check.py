"""The GPU check (omnithought_dagster/gpu_check.py): here on CPU through the same code path as on a GPU machine, a failing
method reported as failed, and the wheels that machine needs: the exact set, under what a device call carries, and
nothing the check imports left out."""

from __future__ import annotations

import ast
import json
import math
import subprocess
import sys
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest

from omnithought_dagster import gpu_check

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "omnithought_dagster"


def _run(*args: str, timeout: float = 400) -> tuple[int, dict]:
    done = subprocess.run(
        [sys.executable, "-m", "omnithought_dagster.gpu_check", *args], capture_output=True, text=True, timeout=timeout, cwd=REPO
    )
    out = done.stdout
    assert "{" in out, done.stderr[-3000:]
    return done.returncode, json.loads(out[out.index("{") :])


@pytest.mark.slow
def test_every_method_trains_and_the_student_generates_on_this_machine(tmp_path):
    """What `make gpu-check` runs, on CPU: every method through the trainer and the deepspeed launcher (ZeRO-2), then a batch
    of generation; the JSON printed is the one written, with each method's numbers."""
    code, result = _run("--out", str(tmp_path / "out"))
    assert code == 0, json.dumps(result)[-4000:]
    assert json.loads((tmp_path / "out" / "gpu_check.json").read_text()) == result
    assert result["ok"] and result["scale"] == "tiny" and result["engine"] == "deepspeed" and result["skipped"] == []
    assert list(result["methods"]) == list(gpu_check.METHODS)
    for name, run in result["methods"].items():
        assert run["ok"] and run["steps"] == gpu_check.SCALES["tiny"].steps, name
        assert run["engine"] == "deepspeed" and run["device"] == "cpu" and run["precision"] == "fp32", name
        assert run["optimizer"] == "adamw_torch" and run["attention"] and run["peak_gpu_memory_mib"] is None, name
        assert run["steps_per_s"] > 0 and run["tokens_per_s"] > 0 and run["examples"] == gpu_check.SCALES["tiny"].examples, name
        assert math.isfinite(run["loss_first"]) and math.isfinite(run["loss_last"]), name
    assert result["methods"]["kd"]["kd_loss_first"] is not None and "reward_last" in result["methods"]["grpo"]
    generation = result["generation"]
    assert generation["ok"] and generation["requests"] == 8 and generation["tokens"] > 0 and generation["tokens_per_s"] > 0
    assert result["environment"]["deepspeed"] and result["models"]["teacher"] > result["models"]["student"] > 0
    assert result["wall_s"] < 180  # the budget for CPU


@pytest.mark.slow
def test_without_deepspeed_the_trainer_runs_plain_torch_and_says_so(tmp_path):
    code, result = _run("--methods", "sft", "--engine", "torch", "--work", str(tmp_path))
    assert code == 0 and result["engine"] == "torch" and result["methods"]["sft"]["engine"] == "torch"
    assert result["skipped"] == [{"what": "deepspeed", "why": "engine torch asked for"}]
    spec = json.loads((tmp_path / "sft" / "spec.json").read_text())
    assert spec["training"]["engine"] == "torch"
    assert json.loads((tmp_path / "sft" / "out" / "train_log.json").read_text())["deepspeed"] is None


@pytest.mark.slow
def test_a_method_that_fails_is_reported_with_its_output_and_the_check_fails(tmp_path):
    code, result = _run("--methods", "sft,grpo", "--timeout", "0.5", "--work", str(tmp_path))
    assert code == 1 and result["ok"] is False
    sft = result["methods"]["sft"]
    assert sft["ok"] is False and sft["exit_status"] is None and "timed out after" in sft["output_tail"]
    whats = {s["what"]: s["why"] for s in result["skipped"]}
    assert "sft" in whats["grpo"] and "generation" in whats and "grpo" not in result["methods"]


def test_unknown_methods_are_refused():
    done = subprocess.run(
        [sys.executable, "-m", "omnithought_dagster.gpu_check", "--methods", "sft,dpo"], capture_output=True, text=True, cwd=REPO
    )
    assert done.returncode == 2 and "unknown methods ['dpo']" in done.stderr


def test_measurements_are_read_off_the_train_log():
    log = {
        "method": "grpo",
        "steps": 10,
        "train_seconds": 4.0,
        "losses": [2.0, None, 1.5],
        "tokens_per_s": 100.0,
        "steady_tokens_per_s": 120.0,
        "peak_gpu_memory_bytes": 3 * 2**20,
        "rewards": [0.1, 0.4],
        "examples": 8,
        "engine": "deepspeed",
        "precision": "bf16",
        "optimizer": "adamw_torch_fused",
        "attention": "sdpa",
        "device": "NVIDIA H200",
    }
    out = gpu_check.measurements(log)
    assert out["steps_per_s"] == 2.5 and out["loss_first"] == 2.0 and out["loss_last"] == 1.5 and out["peak_gpu_memory_mib"] == 3.0
    assert out["reward_first"] == 0.1 and out["reward_last"] == 0.4 and out["optimizer"] == "adamw_torch_fused"
    assert gpu_check.measurements({"steps": 0, "train_seconds": 0})["steps_per_s"] is None


def _image_provided() -> set[str]:
    names = set()
    for line in gpu_check.WHEELS_FILE.read_text().splitlines():
        if line.startswith("# image:"):
            names.update(gpu_check._normal(n) for n in line.removeprefix("# image:").split())
    return names


def test_the_pins_are_the_cpu_locks_versions():
    lock = {}
    for line in (REPO / "deploy/env/cpu/dagster.lock").read_text().splitlines():
        if "==" in line and not line.startswith((" ", "#")):
            name, _, version = line.split(" ")[0].partition("==")
            lock[gpu_check._normal(name)] = version
    pins = gpu_check.pins()
    assert pins and {name: lock.get(name) for name in pins} == pins
    assert not set(pins) & _image_provided()


def test_a_pin_that_is_not_exact_is_refused(tmp_path):
    (tmp_path / "w.txt").write_text("transformers>=5\n")
    with pytest.raises(ValueError, match="not an exact pin"):
        gpu_check.pins(tmp_path / "w.txt")


# Imports on the check's code path (found from its modules, following the package's own imports) that it never executes
# there, and why: the ones it does execute must be pinned or the image's.
NOT_RUN_BY_THE_CHECK = {
    "dagster": "the project file's Dagster helpers (the operations section's cron check), used by the assets",
    "duckdb": "the corpus store (the export's pre-flight), not the trainer",
    "jmespath": "seed field paths",
    "openai": "the OpenAI-compatible backend; the check generates through the transformers backend",
    "tenacity": "the OpenAI-compatible backend's retries",
    "httpx": "the OpenAI-compatible backend's transport (which timeouts mean an unreachable endpoint)",
}


def test_every_import_on_the_checks_path_is_carried_or_the_images():
    """Every module imported (at any depth: lazy imports too) by the trainer, its methods, the models, the backends and the
    check, following this package's own imports, comes from a pinned wheel or the image, or is named above as not run.
    (measured: grpo's reward imports math_verify lazily, and the first GPU run lacked it.)"""
    start = [*PACKAGE.glob("train/*.py"), *PACKAGE.glob("models/*.py"), PACKAGE / "llm/backends.py", PACKAGE / "gpu_check.py"]
    seen, todo, third = set(), list(start), {}
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top == "omnithought_dagster":
                    module = REPO.joinpath(*name.split("."))
                    for candidate in (module.with_suffix(".py"), module / "__init__.py"):
                        if candidate.is_file():
                            todo.append(candidate)
                elif top not in sys.stdlib_module_names and top != "__future__":
                    third.setdefault(top, set()).add(path.relative_to(REPO).as_posix())
    distributions = packages_distributions()
    carried = set(gpu_check.pins()) | _image_provided()
    missing = {
        top: sorted(where)
        for top, where in third.items()
        if top not in NOT_RUN_BY_THE_CHECK and not {gpu_check._normal(d) for d in distributions.get(top, [top])} & carried
    }
    assert not missing, f"imported on the check's path, neither pinned in {gpu_check.WHEELS_FILE.name} nor the image's: {missing}"
    assert "math_verify" in third and "trl" in third  # the walk reaches lazy imports


@pytest.mark.slow
def test_the_wheel_set_downloads_and_fits_what_a_device_call_carries(tmp_path):
    """The exact pinned set, for Python 3.12 (DeepSpeed built here), with the working tree under the 64 MiB a call carries;
    a wheel left from another pin is removed."""
    dest = tmp_path / ".whl"
    dest.mkdir()
    (dest / "transformers-4.0.0-py3-none-any.whl").write_bytes(b"old")
    made = gpu_check.prepare_wheels(dest)
    pins = gpu_check.pins()
    found = {gpu_check._wheel_name(Path(w)): gpu_check._wheel_version(Path(w)) for w in made["wheels"]}
    assert found == pins and len(made["wheels"]) == len(pins)
    for wheel in made["wheels"]:
        tags = wheel.removesuffix(".whl").split("-")[-3:]
        assert tags[0] in ("py3", "cp312", "py312") or tags[0].startswith("py3"), wheel
    tracked = subprocess.run(["git", "ls-files", "-z"], capture_output=True, cwd=REPO, check=True).stdout.split(b"\0")
    tree = sum((REPO / name.decode()).stat().st_size for name in tracked if name and (REPO / name.decode()).is_file())
    assert made["mib"] * 2**20 + tree < gpu_check.CARRY_LIMIT
