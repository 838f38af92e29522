"""Shared fixtures: tiny images, project files written to tmp folders, Dagster instances."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import settings
from PIL import Image, ImageDraw

# Property tests draw the same examples every run (derandomized: CI cannot go red on a new draw); set
# HYPOTHESIS_PROFILE=explore to draw fresh ones while hunting for bugs.
settings.register_profile("ci", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
os.environ.setdefault("DAGSTER_TELEMETRY_DISABLED", "1")


def png_bytes(seed: int = 0, size: tuple[int, int] = (64, 64), fmt: str = "PNG") -> bytes:
    """A small image whose content (and perceptual hash) depends on the seed."""
    image = Image.new("RGB", size, (255, 255, 255))
    draw = ImageDraw.Draw(image)
    w, h = size
    # Different seeds put blocks in different places, so perceptual hashes differ a lot.
    for i in range(4):
        x = (seed * 37 + i * 53) % max(1, w - w // 4)
        y = (seed * 91 + i * 29) % max(1, h - h // 4)
        draw.rectangle([x, y, x + w // 4, y + h // 4], fill=((seed * 50 + i * 60) % 256, (seed * 80) % 256, (i * 90) % 256))
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def write_image(path: Path, seed: int = 0, **kwargs: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png_bytes(seed, **kwargs))
    return path


def write_json(path: Path, records: Any, jsonl: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if jsonl:
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    else:
        path.write_text(json.dumps(records))
    return path


def write_config(
    folder: Path, sources: list[dict], seed: dict | None = None, store_root: str = "store", name: str = "omnithought.yaml", **sections
) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    document = {"project": "test", "store": {"root": store_root}, "sources": sources, **sections}
    if seed:
        document["seed"] = seed
    path = folder / name
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


@pytest.fixture
def project(tmp_path):
    """Factory: write a project file with these sources into tmp_path and load it."""
    from omnithought_dagster.config import load_config

    def make(sources: list[dict], seed: dict | None = None):
        return load_config(write_config(tmp_path, sources, seed))

    return make


@pytest.fixture
def instance(tmp_path):
    import dagster as dg

    home = tmp_path / "dagster_home"
    home.mkdir()
    with dg.instance_for_test(temp_dir=str(home)) as inst:
        yield inst


@pytest.fixture(autouse=True)
def _no_ambient_config(monkeypatch):
    """Tests never pick up the repo's omnithought.yaml or the user's DAGSTER_HOME by accident."""
    monkeypatch.delenv("OMNITHOUGHT_CONFIG", raising=False)
    monkeypatch.delenv("DAGSTER_HOME", raising=False)


# -- Dagster helpers --------------------------------------------------------------------------------


def materialize_source(config, instance, partition: str):
    """Run the real ingest_seeds job for one source partition (asset + its checks)."""
    from omnithought_dagster.defs import SEED_JOB, build_definitions

    job = build_definitions(config).resolve_job_def(SEED_JOB)
    return job.execute_in_process(partition_key=partition, instance=instance, raise_on_error=False)


def run_checks(config, instance, partition: str) -> dict:
    """Run only the seed-stage checks (seed_pool, quarantine) for one source; {check_name: AssetCheckEvaluation}."""
    return run_partition_checks(config, instance, ["seed_pool", "quarantine"], partition)


def check_evaluations(result) -> dict:
    return {
        e.event_specific_data.check_name: e.event_specific_data for e in result.all_events if e.event_type_value == "ASSET_CHECK_EVALUATION"
    }


def materializations(result) -> dict:
    """{asset key string: metadata dict of raw values} for a run's materialisations."""
    out = {}
    for event in result.all_events:
        if event.event_type_value == "ASSET_MATERIALIZATION":
            m = event.event_specific_data.materialization
            out[m.asset_key.to_user_string()] = {k: getattr(v, "value", v) for k, v in m.metadata.items()}
    return out


# A run of one job in a process of its own, for the tests that kill it (and tests of two runs at once).
_RUN_IN_A_PROCESS = (
    "import sys; import dagster as dg; from omnithought_dagster.config import load_config;"
    "from omnithought_dagster.defs import build_definitions;"
    "r = build_definitions(load_config(sys.argv[1])).resolve_job_def(sys.argv[2]).execute_in_process("
    "partition_key=sys.argv[3], instance=dg.DagsterInstance.get(), raise_on_error=False); sys.exit(0 if r.success else 1)"
)


def start_run(config, instance, job: str, partition: str, **popen):
    """Start the job's run of one partition in a new process (its step runs there: the in-process executor)."""
    popen = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL, **popen}
    return subprocess.Popen(
        [sys.executable, "-c", _RUN_IN_A_PROCESS, config.config_path, job, partition],
        env={**os.environ, "DAGSTER_HOME": instance.root_directory},
        **popen,
    )


def wait_while_running(child, ready, timeout: float) -> None:
    """Until `ready()` holds, while `child` (a run started by start_run) still runs: the moment a test kills it mid-work."""
    deadline = time.monotonic() + timeout
    while not ready():
        assert child.poll() is None, "the run finished before it could be killed"
        assert time.monotonic() < deadline, f"not ready within {timeout} s"
        time.sleep(0.05)


def processes_mentioning(*texts: str) -> list[str]:
    """Live processes (not zombies) whose command line contains every one of `texts`: "<pid> <command line>"."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
        if all(text in command for text in texts) and state != "Z":
            found.append(f"{entry.name} {command}")
    return found


def wait_for_process(*texts: str, timeout: float = 300, run=None) -> list[str]:
    """Wait until a process whose command line contains `texts` runs (while `run`, the Popen starting it, lives)."""
    deadline = time.monotonic() + timeout
    while not (found := processes_mentioning(*texts)):
        assert run is None or run.poll() is None, "the run ended before its process was seen"
        assert time.monotonic() < deadline, f"no process mentioning {texts} within {timeout} s"
        time.sleep(0.1)
    return found


def assert_none_left(text: str, timeout: float = 30) -> None:
    """Within `timeout`, no process whose command line contains `text` is left."""
    deadline = time.monotonic() + timeout
    while (left := processes_mentioning(text)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left, f"left running: {left}"


def wait_for_webserver(port: int, process, timeout: float = 120) -> None:
    """Until Dagster's webserver on `port` (started as `process`, output piped) answers; its output if it dies first."""
    import urllib.request

    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/server_info", timeout=2)
            return
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the webserver did not start:\n{process.stdout.read()}") from None
            time.sleep(0.5)


# -- the tiny teacher and a vLLM server shared by the session ---------------------------------------

REPO = Path(__file__).resolve().parents[1]
VLLM_PYTHON = REPO / ".venv-vllm" / "bin" / "python"
SERVED_NAME = "tiny-teacher-test"


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory) -> Path:
    """The tiny teacher, built once per session into a temporary models folder."""
    from omnithought_dagster.models.tiny import TINY_TEACHER, build_tiny_model

    return build_tiny_model(TINY_TEACHER, tmp_path_factory.mktemp("models") / TINY_TEACHER.name)


@pytest.fixture(scope="session")
def vllm_server(tiny_teacher, tmp_path_factory):
    """A real vLLM (CPU) server on loopback serving the tiny teacher, started once per session."""
    from omnithought_dagster.llm.vllm_server import VLLMServer

    if not VLLM_PYTHON.exists():
        pytest.fail(f"{VLLM_PYTHON} is missing: `make test` creates it (make vllm-env)")
    server = VLLMServer(
        str(VLLM_PYTHON),
        str(tiny_teacher),
        served_model_name=SERVED_NAME,
        max_model_len=2048,
        log_dir=tmp_path_factory.mktemp("vllm-logs"),
        startup_timeout_s=300,
    )
    with server:
        _SESSION_SERVERS.append(server)
        yield server
    _SESSION_SERVERS.clear()


# The session's server is shared by many modules: one that ends (a crash inside vLLM, say) would fail every later test that
# asks for it. Before each module and each test it is started again, in place (same URL), if it has ended; the warnings
# summary says when, with the exit code and the end of its log, so the cause is not lost.
_SESSION_SERVERS: list = []


def _revive_session_servers() -> None:
    import warnings

    for server in _SESSION_SERVERS:
        if server.process is not None and server.process.poll() is not None:
            code, tail = server.process.returncode, server.tail(60)
            warnings.warn(
                f"the session's vLLM server had ended (exit code {code}); starting it again. The end of its log:\n{tail}", stacklevel=2
            )
            server.start()


@pytest.fixture(scope="module", autouse=True)
def _session_server_alive_for_the_module():
    _revive_session_servers()


@pytest.fixture(autouse=True)
def _session_server_alive():
    _revive_session_servers()


def requests_served(server) -> float:
    """Requests the server has finished, from its Prometheus counters."""
    return server.metrics().get("vllm:request_success_total", 0.0)


# -- projects whose teacher (and judge) is the session's vLLM server ---------------------------------

TEST_GENERATION = {"rollouts": 4, "shards": 2, "max_tokens": 96, "reasoning_max_chars": 120, "answer_max_chars": 16, "flush_every": 4}


def served_config(folder: Path, base_url: str, n_samples: int = 8, teacher: dict | None = None, generation: dict | None = None, **extra):
    """A project with a synthetic source whose teacher is an OpenAI-compatible server at base_url."""
    from omnithought_dagster.config import load_config

    teacher = teacher or {
        "backend": "openai",
        "base_url": base_url,
        "model": SERVED_NAME,
        "name": "tiny-test",
        "max_concurrency": 8,
        "max_retries": 1,
    }
    path = write_config(
        folder,
        [{"name": "synthetic", "kind": "synthetic", "n_samples": n_samples}],
        **({} if "teachers" in extra else {"teacher": teacher}),  # `teachers:` (the list) replaces the one teacher
        generation={**TEST_GENERATION, **(generation or {})},
        **extra,
    )
    return load_config(path)


def run_job(config, instance, job: str, partition: str):
    from omnithought_dagster.defs import build_definitions

    return (
        build_definitions(config).resolve_job_def(job).execute_in_process(partition_key=partition, instance=instance, raise_on_error=False)
    )


def run_partition_checks(config, instance, asset: str | list[str], partition: str) -> dict:
    """Only the checks of the given asset(s), for one partition.

    A checks-only job has no asset to carry a PartitionsDefinition; the partition travels as a tag.
    """
    import dagster as dg

    from omnithought_dagster.defs import build_definitions

    assets = [asset] if isinstance(asset, str) else asset
    name = "_".join(assets) + "_checks"
    job = dg.define_asset_job(name, selection=dg.AssetSelection.checks_for_assets(*assets))
    defs = dg.Definitions.merge(build_definitions(config), dg.Definitions(jobs=[job]))
    result = defs.resolve_job_def(name).execute_in_process(tags={"dagster/partition": partition}, instance=instance, raise_on_error=False)
    return check_evaluations(result)


def rewrite_partition(store, table: str, partition: dict, change) -> None:
    """Rewrite a partition file directly (bypassing the store's validation) to plant bad data."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = f"{store.partition_dir(table, partition)}/data.parquet"
    rows = change(pq.read_table(path).to_pylist())
    pq.write_table(pa.Table.from_pylist(rows, schema=pa.schema([f.with_nullable(True) for f in pq.read_schema(path)])), path)


def plot_image(value: str):
    """The picture inside a `plot/...` metadata value (markdown with a PNG data URI), opened with PIL."""
    import base64
    import re

    from PIL import Image as PILImage

    match = re.fullmatch(r"!\[([^\]]+)\]\(data:image/png;base64,([A-Za-z0-9+/=]+)\)\n\n\*([^*]+)\*", value)
    assert match, value[:120]
    image = PILImage.open(io.BytesIO(base64.b64decode(match.group(2))))
    image.load()
    assert image.format == "PNG" and image.size == (700, 320) and match.group(1) == match.group(3)
    return image


# Test tiers, from what each test uses (`slow` and `containers` are marked by hand): `server` - it needs the session's vLLM server;
# `dagster` - it runs jobs on a Dagster instance; `slow` - it starts subprocesses (trainers, servers, lmms-eval, Dagster
# runs in their own processes; marked where written); `browser` - it drives chromium; `containers` - it runs the built
# image (marked where written, tests/test_containers.py: `make test-images`, not `make test`); `fast` - none of these
# (`make test-fast`).


def pytest_collection_modifyitems(config, items):
    for item in items:
        module = getattr(item, "module", None)
        tiers = set()
        fixtures = getattr(item, "fixturenames", ())
        if "vllm_server" in fixtures:
            tiers.add("server")
        if "instance" in fixtures:
            tiers.add("dagster")
        if module is not None and any("playwright" in name for name in vars(module)):
            tiers.add("browser")
        for tier in tiers:
            item.add_marker(tier)
        if not tiers and item.get_closest_marker("slow") is None and item.get_closest_marker("containers") is None:
            item.add_marker("fast")
