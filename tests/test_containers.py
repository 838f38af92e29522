"""The CPU image, built here, run: the paths the pods name exist in it; a whole run with every step in its own container
(dagster-docker's executor, examples/containers) writes the rows, ids and checks the same project writes on the laptop
and leaves no container behind; a step container SIGKILLed mid-generation takes its vLLM server with it and the rerun
resumes from the flushed replies.

The `containers` tier: `make test-images` (after `make image-smoke`, which builds the image and runs its three smoke
checks in a container); CI runs it after `make test`. It needs the image `make image` built - a missing one fails here,
it is not skipped. Each test leaves `podman ps -a` as it found it.
"""

import functools
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import pytest
import yaml

from omnithought_dagster.containers import LABEL, PODMAN_CONF

from conftest import wait_while_running

pytestmark = pytest.mark.containers

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "containers" / "omnithought.yaml"
ENGINE = [str(REPO / "deploy" / "container" / "engine.sh")]
IMAGE = os.environ.get("IMAGE", "omnithought-dagster:latest")
OMNITHOUGHT = str(Path(sys.executable).parent / "omnithought")


@functools.cache
def engine_name() -> str:
    """docker or podman, as engine.sh decides (once: the tests poll the engine in loops)."""
    return subprocess.run([*ENGINE, "name"], capture_output=True, text=True, check=True).stdout.strip()


def engine(*args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "CONTAINERS_CONF": os.environ.get("CONTAINERS_CONF", str(PODMAN_CONF))}
    return subprocess.run([engine_name(), *args], capture_output=True, text=True, check=check, timeout=timeout, env=env)


def containers(project: str, *, running_only: bool = False) -> list[str]:
    """Names of the step containers of `project` (every one carries the label), running or all."""
    args = ["ps", "--format", "{{.Names}}", "--filter", f"label={LABEL}={project}"]
    return engine(*args, *([] if running_only else ["-a"])).stdout.split()


@pytest.fixture(scope="module")
def image() -> str:
    found = engine("image", "inspect", IMAGE, check=False)
    assert found.returncode == 0, f"no image {IMAGE}: `make image` builds it ({found.stderr.strip()})"
    return IMAGE


@pytest.fixture
def no_new_containers():
    before = engine("ps", "-a", "--format", "{{.ID}}").stdout.split()
    yield
    after = engine("ps", "-a", "--format", "{{.ID}}").stdout.split()
    assert sorted(after) == sorted(before), f"containers left behind: {sorted(set(after) - set(before))}"


def steps_in_containers(dagster_home: Path) -> int:
    """Steps the instance's runs executed, each asserted to have started in a container (dagster-docker's event)."""
    import dagster as dg

    total = 0
    with dg.DagsterInstance.from_ref(dg._core.instance.ref.InstanceRef.from_dir(str(dagster_home))) as instance:
        for run in instance.get_runs():
            records = instance.all_logs(run.run_id)
            started = {
                r.step_key: r.dagster_event.event_specific_data.metadata.get("Docker container id")
                for r in records
                if r.dagster_event and r.dagster_event.event_type_value == "STEP_WORKER_STARTING"
            }
            executed = {r.step_key for r in records if r.dagster_event and r.dagster_event.event_type_value == "STEP_START"}
            assert executed and executed <= set(started), (run.job_name, executed - set(started))
            assert all(started[step] for step in executed), run.job_name
            total += len(executed)
    return total


def container_processes(init_pid: int) -> dict[int, str]:
    """{host pid: command line} of the container's init and everything under it (its PID namespace's processes)."""
    children: dict[int, list[int]] = {}
    commands: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            commands[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(parent, []).append(int(entry.name))
    found, todo = {}, [init_pid]
    while todo:
        pid = todo.pop()
        if pid in commands:
            found[pid] = commands[pid]
            todo.extend(children.get(pid, []))
    return found


def variant(tmp_path: Path, name: str, executor: str, models: Path, generation_only: bool = False, **teacher) -> Path:
    """The example project with its own store, work folders and instance under tmp_path/name; the tiny models shared.
    `generation_only`: its synthetic source, generation, judging and filtering (no subsets, students or scores)."""
    base = tmp_path / name
    base.mkdir(parents=True)
    doc = yaml.safe_load(EXAMPLE.read_text())
    if generation_only:
        doc["sources"] = doc["sources"][:1]
        for section in ("benchmarks", "recipes", "students", "training", "evaluation"):
            doc.pop(section)
        doc["curation"].pop("decontamination")
    doc["project"] = f"containers-test-{name}"
    doc["store"]["root"] = str(base / "store")
    doc["models_dir"] = str(models)
    doc["teacher"].update(teacher)
    for source in doc["sources"]:
        if "path" in source:
            source["path"] = str((EXAMPLE.parent / source["path"]).resolve())
    if "training" in doc:
        doc["training"]["work_dir"] = str(base / "work" / "train")
        doc["evaluation"]["work_dir"] = str(base / "work" / "eval")
    doc["operations"]["gpu_lock_dir"] = str(base / "work" / "gpu-locks")
    doc["operations"]["executor"] = executor
    doc["operations"]["docker"]["image"] = IMAGE
    doc["operations"]["docker"]["volumes"] = [str(base), str(models), str(REPO / "examples" / "mini_llava")]
    path = base / "omnithought.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def demo(config: Path, timeout: float = 1500, **popen) -> subprocess.Popen:
    env = {**os.environ, "DAGSTER_HOME": str(config.parent / "dagster"), "OMNITHOUGHT_CONFIG": str(config)}
    env.pop("DOCKER_HOST", None)
    return subprocess.Popen([OMNITHOUGHT, "demo", "--config", str(config)], env=env, text=True, **popen)


def outcome_lines(output: str) -> list[str]:
    """The demo's per-partition lines, without their times: `< stage[partition] ran: N in, M out, K flagged; checks x/y passed`."""
    lines = []
    for line in output.split("\n"):
        if line.startswith(("< ", "= ", "x ")):
            lines.append(" ".join(word for word in line.split(" in ")[0].split() if word != "ran") + " " + line.split(": ", 1)[-1])
    return lines


def table_ids(store_root: Path) -> dict[str, list]:
    """Per stored table: its rows' *_id columns (sorted), read with DuckDB from the Parquet files."""
    out = {}
    for table in sorted(p for p in (store_root / "tables").iterdir() if p.is_dir()):
        files = [str(f) for f in table.rglob("*.parquet")]
        if not files:
            continue
        relation = duckdb.read_parquet(files, hive_partitioning=True, union_by_name=True)
        columns = [c for c in relation.columns if c.endswith("_id") or c in ("rollout", "source")]
        rows = relation.project(", ".join(f'"{c}"' for c in columns)).fetchall() if columns else []
        out[table.name] = sorted(json.dumps(row, default=str) for row in rows)
    return out


def test_the_image_holds_what_pods_and_step_containers_start(image, no_new_containers):
    """`dagster` on the image's PATH (the step command), and the interpreters a project file without any resolves to."""
    interpreters = "from omnithought_dagster.settings_model import project_environment as p; print(p('.venv-vllm'), p('.venv-lmms'))"
    script = f'command -v dagster; echo $OMNITHOUGHT_ROOT; python -c "{interpreters}"'
    out = engine("run", "--rm", image, "sh", "-c", script).stdout.split()
    dagster, root, vllm_python, lmms_python = out
    assert dagster == f"{root}/.venv/bin/dagster" and root == "/opt/omnithought"
    for python in (vllm_python, lmms_python):
        assert engine("run", "--rm", image, "test", "-x", python, check=False).returncode == 0, python


@pytest.mark.timeout(3000)  # two whole runs, one with a container per step
def test_a_whole_run_in_containers_equals_the_laptop_run_and_leaves_no_container(image, tmp_path, no_new_containers):
    models = tmp_path / "models"
    models.mkdir()
    boxed = variant(tmp_path, "boxed", "docker", models)
    laptop = variant(tmp_path, "laptop", "in_process", models)

    started = time.monotonic()
    run = demo(boxed, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    boxed_out, _ = run.communicate(timeout=1500)
    boxed_s = time.monotonic() - started
    assert run.returncode == 0, boxed_out[-6000:]
    assert steps_in_containers(tmp_path / "boxed" / "dagster") >= 40  # every step of every run started in a container
    assert containers("containers-test-boxed") == []  # removed by the executor at each run's end

    started = time.monotonic()
    run = demo(laptop, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    laptop_out, _ = run.communicate(timeout=1500)
    laptop_s = time.monotonic() - started
    assert run.returncode == 0, laptop_out[-6000:]
    assert "Docker" not in laptop_out

    # The same partitions, rows in / out / flagged and checks passed; the same ids in every table.
    assert outcome_lines(boxed_out) == outcome_lines(laptop_out)
    assert len(outcome_lines(boxed_out)) >= 8
    boxed_ids, laptop_ids = table_ids(tmp_path / "boxed" / "store"), table_ids(tmp_path / "laptop" / "store")
    assert set(boxed_ids) == set(laptop_ids) and {"seed_pool", "cot_traces", "annotations", "benchmark_scores"} <= set(boxed_ids)
    for table in boxed_ids:
        assert boxed_ids[table] == laptop_ids[table], table
    print(json.dumps({"containerised_run_s": round(boxed_s, 1), "laptop_run_s": round(laptop_s, 1)}))


@pytest.mark.timeout(2400)
def test_a_killed_step_container_takes_its_processes_and_the_rerun_resumes(image, tmp_path, no_new_containers):
    models = tmp_path / "models"
    models.mkdir()
    # Four requests at a time: the replies arrive in flush batches spread over the step, not all at its end.
    config = variant(tmp_path, "killed", "docker", models, generation_only=True, max_concurrency=4)
    project = "containers-test-killed"
    cache = tmp_path / "killed" / "store" / "cache" / "generation"
    log = (tmp_path / "run.log").open("w")
    run = demo(config, stdout=log, stderr=subprocess.STDOUT)

    def generating() -> str | None:
        """The cot_traces container, once its vLLM server answers and a flush batch of replies is in the cache."""
        if not any(cache.rglob("*.parquet")):
            return None
        for name in containers(project, running_only=True):
            env = engine("inspect", "--format", "{{json .Config.Env}}", name, check=False).stdout
            if "DAGSTER_RUN_STEP_KEY=cot_traces" in env:
                return name
        return None

    try:
        wait_while_running(run, generating, timeout=900)
        name = generating()
        # The container's processes as the host sees them: the step, its guard, the vLLM server and its engine.
        processes = container_processes(int(engine("inspect", "--format", "{{.State.Pid}}", name).stdout))
        assert any("vllm" in command for command in processes.values()), processes
        pids = list(processes)
        flushed = sum(1 for _ in cache.rglob("*.parquet"))
        engine("kill", "--signal", "KILL", name)
        deadline = time.monotonic() + 30
        while (alive := [pid for pid in pids if Path(f"/proc/{pid}").exists()]) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not alive, f"processes of the killed container left: {alive}"
        assert run.wait(timeout=600) == 1  # the run saw its step fail
        assert containers(project) == []  # the killed step's container too: removed when its run ended
    finally:
        if run.poll() is None:  # a failed test: stop the run as a user would (its containers removed), then whatever is left
            run.terminate()
            run.wait(timeout=120)
        log.close()
        for left in containers(project):
            engine("rm", "-f", left, check=False)
    output = (tmp_path / "run.log").read_text()
    assert "cot_traces" in output and "FAILED" in output, output[-4000:]

    # The rerun: generation resumes from the replies flushed before the kill, the run completes.
    rerun = demo(config, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out, _ = rerun.communicate(timeout=1500)
    assert rerun.returncode == 0, out[-6000:]
    # Resumed: the replies flushed before the kill came from the cache (flush_every 16), only the rest were sent.
    sent, cached = map(int, re.search(r"cot_traces\[000\|synthetic\]: (\d+) requests sent, (\d+) from cache", out).groups())
    assert cached >= 16 and sent + cached == 80, (sent, cached)
    print(json.dumps({"flush_files_before_kill": flushed, "rerun_requests_sent": sent, "rerun_from_cache": cached}))
    from omnithought_dagster.config import load_config
    from omnithought_dagster.store import open_store

    store = open_store(load_config(config).store)
    traces = store.read_table("cot_traces", columns=["trace_id"]).to_pylist()
    assert traces and len({t["trace_id"] for t in traces}) == len(traces)
    assert flushed >= 1 and containers(project) == []
