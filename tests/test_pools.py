"""Pool slots whose holder died (pools.py): freed on the CLI path, by a waiting run and by the daemon's sensor;
a step outliving its killed run worker keeps the slot until it ends; a step waiting for a slot obeys SIGTERM.

The runs are real: `dagster asset materialize` (the multiprocess executor, as `dagster dev` runs it) and the
`omnithought` commands' in-process runner, on an instance with the shipped dagster.yaml (one `gpu` slot), over a
code location (pool_location.py) whose step waits for a file."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import dagster as dg
import pytest

from omnithought_dagster import pools
from omnithought_dagster.llm.vllm_server import free_port
from omnithought_dagster.sensors import REAPER_INTERVAL_S, dead_run_reaper

from conftest import wait_for_webserver, write_config

REPO = Path(__file__).resolve().parents[1]
LOCATION = Path(__file__).with_name("pool_location.py")
DAGSTER = Path(sys.executable).with_name("dagster")
IN_PROCESS = (
    f"import sys; sys.path.insert(0, {str(LOCATION.parent)!r}); import dagster as dg;"
    "from pool_location import defs; from omnithought_dagster.pools import run_in_process;"
    "i = dg.DagsterInstance.get(); r = run_in_process(defs.resolve_implicit_global_asset_job_def(), i, raise_on_error=False);"
    "sys.exit(0 if r.success else 1)"
)


@pytest.fixture
def site(tmp_path):
    """A DAGSTER_HOME with the shipped dagster.yaml, a project file, the step's folder, and a way to start runs."""
    home = tmp_path / "home"
    home.mkdir()
    shutil.copy(REPO / "omnithought_dagster" / "dagster.yaml", home / "dagster.yaml")
    files = tmp_path / "files"
    files.mkdir()
    config = write_config(tmp_path, [{"name": "s", "kind": "synthetic", "n_samples": 4}])
    env = {**os.environ, "DAGSTER_HOME": str(home), "OMNITHOUGHT_CONFIG": str(config), "POOL_TEST_DIR": str(files)}
    started: list[subprocess.Popen] = []

    class Site:
        def __init__(self):
            self.home, self.files = home, files

        def start(self, how: str = "cli", *args: str) -> subprocess.Popen:
            command = {
                "cli": [str(DAGSTER), "asset", "materialize", "-f", str(LOCATION), "--select", "held"],
                "in_process": [sys.executable, "-c", IN_PROCESS],
                "dev": [str(DAGSTER), "dev", "-f", str(LOCATION), *args],
            }[how]
            process = subprocess.Popen(
                command, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
            )
            started.append(process)
            return process

        def runs_started(self) -> list[str]:
            return sorted(p.name.removeprefix("started-") for p in files.glob("started-*"))

        def wait_started(self, count: int, process: subprocess.Popen, timeout: float = 120) -> list[str]:
            deadline = time.monotonic() + timeout
            while len(self.runs_started()) < count:
                assert process.poll() is None, process.stdout.read()[-3000:]
                assert time.monotonic() < deadline, "the step did not start"
                time.sleep(0.1)
            return self.runs_started()

        def release(self):
            (files / "release").touch()

    with dg.DagsterInstance.from_config(str(home)) as instance:  # what the runs see (instance_for_test would not read the yaml)
        yield Site(), instance
    for process in started:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def _gpu(instance):
    return instance.event_log_storage.get_concurrency_info("gpu")


def _waiting_runs(instance) -> set[str]:
    return {step.run_id for step in _gpu(instance).pending_steps if step.assigned_timestamp is None}


def _wait_for(predicate, timeout: float = 60, what: str = ""):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def _failure_message(instance, run_id: str) -> str:
    events = [e for e in instance.all_logs(run_id) if e.dagster_event and e.dagster_event.event_type_value == "PIPELINE_FAILURE"]
    return " ".join(e.message or "" for e in events) + " ".join(e.dagster_event.message or "" for e in events)


@pytest.mark.slow
def test_a_killed_cli_run_frees_its_slot_for_the_next_run(site):
    """Before: the killed run's slot stayed claimed and the next GPU step waited forever."""
    site, instance = site
    first = site.start()
    (killed,) = site.wait_started(1, first)
    assert [s.run_id for s in _gpu(instance).claimed_slots] == [killed]
    os.killpg(first.pid, signal.SIGKILL)  # the run worker and its step, as the OOM killer or a preempted pod would
    first.wait()
    assert [s.run_id for s in _gpu(instance).claimed_slots] == [killed]  # nobody freed it
    site.release()
    second = site.start()
    output = second.communicate(timeout=180)[0]
    assert second.returncode == 0, output[-3000:]
    assert f"freed 1 pool slot(s) of run {killed}" in output
    assert instance.get_run_by_id(killed).status == dg.DagsterRunStatus.FAILURE
    assert "died without ending the run" in _failure_message(instance, killed)
    assert not _gpu(instance).claimed_slots and not _gpu(instance).pending_steps
    assert not list((site.home / pools.RECORD_DIR).glob(f"{killed}*"))


@pytest.mark.slow
def test_a_step_outliving_its_killed_run_worker_keeps_the_slot_until_it_ends(site):
    """The multiprocess executor's step process survives a SIGKILL of its run worker alone and still uses the GPU:
    its slot stays claimed (a waiting run waits) until it ends, then the waiting run frees it and goes on."""
    site, instance = site
    first = site.start()
    (orphaned,) = site.wait_started(1, first)
    step_pid = int((site.files / f"started-{orphaned}").read_text())
    assert step_pid != first.pid
    os.kill(first.pid, signal.SIGKILL)
    first.wait()
    os.kill(step_pid, 0)  # the step lives on
    assert pools.run_alive(instance, orphaned) is True
    assert pools.free_dead_runs(instance) == []
    second = site.start()
    _wait_for(lambda: _waiting_runs(instance), what="the second run to wait for the slot")
    time.sleep(pools.REAP_INTERVAL_S + 1)  # a reap went by: the live step kept its slot
    assert [s.run_id for s in _gpu(instance).claimed_slots] == [orphaned] and len(site.runs_started()) == 1
    site.release()  # the orphaned step ends; the waiting run's next reap frees its slot
    output = second.communicate(timeout=180)[0]
    assert second.returncode == 0, output[-3000:]
    assert f"freed 1 pool slot(s) of run {orphaned}" in output
    assert instance.get_run_by_id(orphaned).status == dg.DagsterRunStatus.FAILURE
    assert len(site.runs_started()) == 2


@pytest.mark.slow
@pytest.mark.parametrize("how", ["in_process", "cli"])
def test_a_run_waiting_for_a_slot_obeys_sigterm(site, how):
    """Before: a step waiting in the in-process executor (the `omnithought` commands' runner) ignored SIGTERM."""
    site, instance = site
    holder = site.start("in_process")
    (holding,) = site.wait_started(1, holder)
    waiting = site.start(how)
    _wait_for(lambda: _waiting_runs(instance), what="the second run to wait for the slot")
    (waiting_run,) = _waiting_runs(instance)
    time.sleep(1)
    signalled = time.monotonic()
    os.kill(waiting.pid, signal.SIGTERM)
    output = waiting.communicate(timeout=30)[0]
    assert time.monotonic() - signalled < 10
    assert waiting.returncode != 0, output[-3000:]
    assert instance.get_run_by_id(waiting_run).status in (dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED)
    assert not _waiting_runs(instance)  # its place in the queue went with it
    assert [s.run_id for s in _gpu(instance).claimed_slots] == [holding]  # the holder was not disturbed
    site.release()
    assert holder.wait(timeout=60) == 0
    assert site.runs_started() == [holding]


def _graphql(port: int, query: str, variables: dict | None = None) -> dict:
    body = json.dumps({"query": query, "variables": variables or {}}).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{port}/graphql", data=body, headers={"content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())["data"]


@pytest.mark.slow
def test_dagster_dev_the_daemon_frees_a_killed_runs_slot_with_no_other_run(site):
    """A run launched from the UI of `dagster dev` (the default launcher, a run worker process per run), its run
    worker and step SIGKILLed: with no other run to notice, the daemon's dead_run_reaper sensor marks it failed
    and frees its slot."""
    site, instance = site
    port = free_port()
    dev = site.start("dev", "-h", "127.0.0.1", "-p", str(port))
    wait_for_webserver(port, dev)
    (repository,) = _graphql(port, "{ repositoriesOrError { ... on RepositoryConnection { nodes { name location { name } } } } }")[
        "repositoriesOrError"
    ]["nodes"]
    selector = {"repositoryLocationName": repository["location"]["name"], "repositoryName": repository["name"], "jobName": "__ASSET_JOB"}
    launched = _graphql(
        port,
        """mutation($p: ExecutionParams!) { launchRun(executionParams: $p) { __typename
        ... on LaunchRunSuccess { run { runId } } ... on PythonError { message } } }""",
        {"p": {"selector": {**selector, "assetSelection": [{"path": ["held"]}]}, "runConfigData": {}}},
    )["launchRun"]
    assert launched["__typename"] == "LaunchRunSuccess", launched
    run_id = launched["run"]["runId"]
    site.wait_started(1, dev, timeout=180)
    worker = int((site.home / pools.RECORD_DIR / f"{run_id}.lock").read_text().split()[3])  # "run worker pid N on HOST"
    step = int((site.files / f"started-{run_id}").read_text())
    assert [s.run_id for s in _gpu(instance).claimed_slots] == [run_id]
    for pid in {worker, step}:
        os.kill(pid, signal.SIGKILL)
    _wait_for(lambda: not _gpu(instance).claimed_slots, timeout=REAPER_INTERVAL_S * 4, what="the sensor to free the slot")
    # Dagster's code server may mark the run failed first, when its run worker exits; only the reaper frees the slot
    # (without the sensor it stays claimed) and removes the run's record.
    assert instance.get_run_by_id(run_id).status == dg.DagsterRunStatus.FAILURE
    assert not (site.home / pools.RECORD_DIR / f"{run_id}.lock").exists()


# The reaper's rules, on runs and claims made directly in storage.


@pytest.fixture
def pooled(tmp_path):
    with dg.instance_for_test(temp_dir=str(tmp_path), overrides={"concurrency": {"pools": {"default_limit": 4}}}) as instance:
        instance.event_log_storage.initialize_concurrency_limit_to_default("gpu")
        yield instance


def _run(instance, status: dg.DagsterRunStatus, claim: bool = True) -> str:
    from dagster._core.test_utils import create_run_for_test

    run = create_run_for_test(instance, job_name="gpu_job", status=status)
    if claim:
        assert instance.event_log_storage.claim_concurrency_slot("gpu", run.run_id, "step", 0).is_claimed
    return run.run_id


def _dead_record(instance, run_id: str) -> Path:
    path = pools.record_dir(instance) / f"{run_id}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("run worker pid 1234 on elsewhere\n")  # nobody holds it: every process of the run is gone
    return path


def _holders(instance) -> set[str]:
    return {slot.run_id for slot in _gpu(instance).claimed_slots}


def test_reaper_frees_dead_and_ended_runs_and_leaves_live_and_unknown_ones(pooled):
    dead = _run(pooled, dg.DagsterRunStatus.STARTED)
    record = _dead_record(pooled, dead)
    ended = _run(pooled, dg.DagsterRunStatus.SUCCESS)  # ended without freeing (a crash between the two)
    unknown = _run(pooled, dg.DagsterRunStatus.STARTED)  # no record here: another machine's, or not watched
    live = _run(pooled, dg.DagsterRunStatus.STARTED)
    with pools.run_worker_record(pooled, live):
        assert pools.run_alive(pooled, live) is True and pools.run_alive(pooled, dead) is False
        assert pools.run_alive(pooled, unknown) is None
        freed = {item.run_id: item for item in pools.free_dead_runs(pooled)}
        assert set(freed) == {dead, ended}
        assert freed[dead].slots == 1 and "pid 1234 on elsewhere died" in freed[dead].reason
        assert _holders(pooled) == {unknown, live}
        assert pooled.get_run_by_id(dead).status == dg.DagsterRunStatus.FAILURE
        assert "died without ending the run" in _failure_message(pooled, dead)
        assert pooled.get_run_by_id(live).status == dg.DagsterRunStatus.STARTED
        assert not record.exists()
        assert pools.free_dead_runs(pooled) == []  # nothing twice


def test_reaper_frees_a_dead_runs_place_in_the_queue(pooled):
    """A dead run waiting in the queue would be handed the next free slot and never take it."""
    first, second, third, fourth = (_run(pooled, dg.DagsterRunStatus.STARTED) for _ in range(4))
    queued = _run(pooled, dg.DagsterRunStatus.STARTED, claim=False)
    assert not pooled.event_log_storage.claim_concurrency_slot("gpu", queued, "step", 0).is_claimed
    _dead_record(pooled, queued)
    assert {item.run_id for item in pools.free_dead_runs(pooled)} == {queued}
    assert not _gpu(pooled).pending_step_count and _holders(pooled) == {first, second, third, fourth}


def test_records_are_never_seen_unheld_while_a_run_lives_and_are_removed_when_it_ends(pooled):
    run_id = _run(pooled, dg.DagsterRunStatus.STARTED)
    folder = pools.record_dir(pooled)
    stale = folder / ".old.99.tmp"
    folder.mkdir(parents=True, exist_ok=True)
    stale.write_text("")
    with pools.run_worker_record(pooled, run_id):
        assert [p.name for p in folder.iterdir() if p.suffix == ".tmp"] == [stale.name]  # named before anyone could look
        with pools.joining_run(pooled, run_id):  # a step process of the run
            pass
        assert pools.run_alive(pooled, run_id) is True
        pools.free_dead_runs(pooled)
        assert not stale.exists()
    pooled.report_run_failed(pooled.get_run_by_id(run_id))
    _wait_for(lambda: not (folder / f"{run_id}.lock").exists(), timeout=10, what="the record to go")
    with pools.joining_run(pooled, "never-recorded"):  # a run outside the watched paths: no record is made
        assert not (folder / "never-recorded.lock").exists()


def test_the_daemons_sensor_frees_dead_runs(pooled):
    dead = _run(pooled, dg.DagsterRunStatus.STARTED)
    _dead_record(pooled, dead)
    result = dead_run_reaper(dg.build_sensor_context(instance=pooled))
    assert dead in result.skip_message and "1 pool slot(s) freed" in result.skip_message
    assert not _holders(pooled)
    assert "no dead runs" in dead_run_reaper(dg.build_sensor_context(instance=pooled)).skip_message
