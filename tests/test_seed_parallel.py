"""Ingestion over a pool of worker processes: the same rows as one process, workers that die with the step, a
record that kills its worker set aside alone, a pool that cannot run given up for the step's own process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from omnithought_dagster.config import JsonSourceConfig, SeedSettings
from omnithought_dagster.ids import bytes_id
from omnithought_dagster.seed import parallel, sinks
from omnithought_dagster.seed.ingest import ingest_source
from omnithought_dagster.seed.parallel import BATCH_RECORDS, MIN_RECORDS_PER_WORKER, ingest_workers
from omnithought_dagster.seed.sources import make_reader

from conftest import write_image

N_PICTURES = 12


@pytest.fixture(autouse=True)
def every_batch_through_the_pool(monkeypatch):
    monkeypatch.setattr(parallel, "CHECK_WHILE_WORKERS_START", False)


@pytest.fixture
def mixed_source(tmp_path):
    """More records than several batches: good ones, bad ones, exact duplicates across batch boundaries, near duplicates."""
    for i in range(N_PICTURES):
        write_image(tmp_path / f"p{i}.png", i)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    records = []
    for i in range(3 * BATCH_RECORDS + 7):
        record = {
            "id": f"r{i}",
            "question": f"How many shapes are in picture {i % N_PICTURES}, case {i // 3}?",
            "answer": str(i % 5),
            "image": f"p{i % N_PICTURES}.png",
        }
        if i % 17 == 5:
            record["image"] = "broken.png"
        if i % 23 == 7:
            record = dict(records[i - 7], id=f"dup{i}")  # an exact copy of a record one batch or more earlier
        if i == 40:
            record["answer"] = None
        records.append(record)
    path = tmp_path / "mixed.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return JsonSourceConfig(name="src", kind="json", path=str(path), image_root=str(tmp_path))


def _run(config, workers: int, put_image=None):
    reader = make_reader(config)
    return ingest_source(
        "src",
        reader.records(),
        SeedSettings(),
        image_root=reader.image_root,
        put_image=put_image or (lambda image_id, data: True),
        workers=workers,
    )


def test_a_pool_gives_the_same_rows_as_one_process(mixed_source):
    alone, pooled = _run(mixed_source, 1), _run(mixed_source, 2)
    assert pooled.workers == 2 and not pooled.notes
    for table in ("kept", "quarantine", "images"):
        assert getattr(pooled, table).to_pylist() == getattr(alone, table).to_pylist(), table
    assert pooled.reasons == alone.reasons and {"duplicate", "corrupt_image", "missing_answer"} <= set(pooled.reasons)
    assert alone.near_duplicates > 0 and pooled.near_duplicates == alone.near_duplicates
    duplicates = [r for r in pooled.quarantine.to_pylist() if r["reason"] == "duplicate"]
    assert all(r["duplicate_of"].startswith("src/r") for r in duplicates)  # the first copy won, batches notwithstanding


class KillWorkerOn:
    """A put_image for worker processes that kills the worker holding one given image (a crashing decoder, as seen
    from the pool). Picklable, so the pool hands it to its workers."""

    def __init__(self, image_id: str, home: int):
        self.image_id, self.home = image_id, home

    def __call__(self, image_id: str, data: bytes) -> bool:
        if image_id == self.image_id and os.getpid() != self.home:
            os.kill(os.getpid(), signal.SIGKILL)
        return True


def test_a_record_that_kills_its_worker_is_set_aside_and_the_source_goes_on(mixed_source, tmp_path):
    deadly = bytes_id((tmp_path / "p3.png").read_bytes())
    alone = _run(mixed_source, 1)
    pooled = _run(mixed_source, 2, put_image=KillWorkerOn(deadly, os.getpid()))
    victims = [r for r in alone.kept.to_pylist() if deadly in r["image_ids"]]
    assert victims
    assert pooled.rows_read == alone.rows_read == pooled.rows_kept + pooled.rows_quarantined
    assert pooled.rows_kept == alone.rows_kept - len(victims)
    killed = [r for r in pooled.quarantine.to_pylist() if r["reason"] == "record_error"]
    assert sorted(r["native_id"] for r in killed) == sorted(r["native_id"] for r in victims)
    assert all("killed its worker process" in r["detail"] for r in killed)
    assert not pooled.notes  # the pool itself was sound


class RefusesToTravel:
    """Pickles in the step but cannot be unpickled in a worker: every worker fails to start."""

    def __init__(self):
        self.home = os.getpid()

    def __setstate__(self, state):
        if os.getpid() != state["home"]:
            raise RuntimeError("cannot live in a worker")
        self.__dict__.update(state)

    def __call__(self, image_id: str, data: bytes) -> bool:
        return True


def test_a_pool_that_cannot_run_falls_back_to_the_steps_own_process(mixed_source):
    alone = _run(mixed_source, 1)
    pooled = _run(mixed_source, 2, put_image=RefusesToTravel())
    assert pooled.kept.to_pylist() == alone.kept.to_pylist()
    assert pooled.quarantine.to_pylist() == alone.quarantine.to_pylist()
    assert len(pooled.notes) == 1 and "cannot run" in pooled.notes[0]


def test_worker_count_follows_the_setting_and_the_source_size():
    assert ingest_workers(SeedSettings(workers=1), 10**6) == 1
    assert ingest_workers(SeedSettings(workers=4), 10**6) == 4
    assert ingest_workers(SeedSettings(workers=4), 2 * MIN_RECORDS_PER_WORKER) == 2
    assert ingest_workers(SeedSettings(workers=8), 10) == 1  # too small to pay for starting processes
    assert ingest_workers(SeedSettings(), 10**6) == parallel.available_cores()


def test_workers_die_with_a_killed_step(tmp_path):
    """SIGKILL the process that runs ingestion mid-source: none of its workers lives on."""
    for i in range(N_PICTURES):
        write_image(tmp_path / f"p{i}.png", i, size=(512, 512))
    records = [{"id": f"r{i}", "question": f"Question {i}?", "answer": "1", "image": f"p{i % N_PICTURES}.png"} for i in range(20000)]
    (tmp_path / "big.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    script = tmp_path / "step.py"
    script.write_text(
        textwrap.dedent(f"""
        from omnithought_dagster.config import JsonSourceConfig, SeedSettings
        from omnithought_dagster.seed.ingest import ingest_source
        from omnithought_dagster.seed.sources import make_reader

        config = JsonSourceConfig(name="src", kind="json", path={str(tmp_path / "big.jsonl")!r}, image_root={str(tmp_path)!r})
        reader = make_reader(config)
        print("started", flush=True)
        ingest_source("src", reader.records(), SeedSettings(), image_root=reader.image_root, put_image=lambda i, d: True, workers=2)
    """)
    )  # no __main__ guard on purpose: the workers must not run it again
    step = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parents[1])
    try:
        assert step.stdout.readline().strip() == "started"
        workers: list[int] = []
        deadline = time.monotonic() + 60
        while len(workers) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
            workers = _children(step.pid)
        assert len(workers) >= 2, f"workers never started: {workers}"
        time.sleep(1.0)  # mid-source
        assert step.poll() is None
        step.kill()
        step.wait(timeout=10)
        deadline = time.monotonic() + 10
        while any(_alive(pid) for pid in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [pid for pid in workers if _alive(pid)], "a worker outlived its step"
    finally:
        if step.poll() is None:
            step.kill()


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(child) for child in (task / "children").read_text().split()]
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"  # a zombie is dead, waiting for its (re)parent to reap it


def test_a_failing_step_stops_its_workers(mixed_source, monkeypatch):
    """An error in the step (a store that refuses a write) ends the pool: no worker is left behind."""
    import multiprocessing

    from omnithought_dagster.seed.ingest import ingest_source_into
    from omnithought_dagster.seed.sinks import SeedSinks, TableSink
    from omnithought_dagster.store.tables import IMAGES, QUARANTINE

    class FullDisk:
        def write(self, data):
            raise OSError(28, "No space left on device")

    reader = make_reader(mixed_source)
    settings = SeedSettings(near_duplicate_max_distance=-1)  # kept rows go straight to their sink
    monkeypatch.setattr(sinks, "FLUSH_ROWS", 8)  # the first write comes while batches are still in flight
    with pytest.raises(OSError, match="No space left"):
        ingest_source_into(
            "src",
            reader.records(),
            settings,
            image_root=reader.image_root,
            put_image=lambda i, d: True,
            sinks=SeedSinks(FullDisk(), TableSink(QUARANTINE), TableSink(IMAGES)),
            workers=2,
        )
    assert multiprocessing.active_children() == []


def test_the_pool_runs_inside_a_step_that_the_dagster_cli_launches(tmp_path):
    """The real thing: `dagster asset materialize` under the project's multiprocess executor, a source large enough for
    two workers; the step's __main__ is Dagster's CLI, which the workers must not run again."""
    from conftest import write_config

    for i in range(N_PICTURES):
        write_image(tmp_path / "pics" / f"p{i}.png", i)
    n = 2 * MIN_RECORDS_PER_WORKER + 10
    records = [
        {"id": f"r{i}", "question": f"How many shapes, case {i}?", "answer": str(i % 4), "image": f"p{i % N_PICTURES}.png"}
        for i in range(n)
    ]
    (tmp_path / "big.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    config = write_config(
        tmp_path / "project",
        [{"name": "big", "kind": "json", "path": str(tmp_path / "big.jsonl"), "image_root": str(tmp_path / "pics")}],
        seed={"workers": 2},
        store_root=str(tmp_path / "store"),
    )
    home = tmp_path / "dagster_home"
    home.mkdir()
    env = {**os.environ, "OMNITHOUGHT_CONFIG": str(config), "DAGSTER_HOME": str(home)}
    run = subprocess.run(
        [
            str(Path(sys.executable).parent / "dagster"),
            "asset",
            "materialize",
            "-m",
            "omnithought_dagster.definitions",
            "--select",
            "seed_pool,quarantine,images",
            "--partition",
            "big",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "checked in 2 processes" in run.stderr
    from omnithought_dagster.store import CorpusStore

    assert CorpusStore(str(tmp_path / "store")).read_partition("seed_pool", "big").num_rows == n
