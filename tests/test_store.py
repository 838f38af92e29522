"""The corpus store: schema-checked partitions, atomic replace, image dedup, DuckDB views."""

from __future__ import annotations

import threading

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from omnithought_dagster.store import TABLES, CorpusStore, StoreError


def _quarantine_rows(source: str, n: int, reason: str = "missing_image") -> pa.Table:
    return pa.Table.from_pylist(
        [
            {
                "source": source,
                "native_id": f"r{i}",
                "record_index": i,
                "turn": None,
                "reason": reason,
                "detail": "d",
                "sample_id": None,
                "duplicate_of": None,
                "raw_excerpt": None,
            }
            for i in range(n)
        ]
    )


def test_write_read_replace_and_list(tmp_path):
    store = CorpusStore(str(tmp_path / "root"))
    store.write_partition("quarantine", "a", _quarantine_rows("a", 3))
    store.write_partition("quarantine", {"source": "b"}, _quarantine_rows("b", 2))
    assert store.list_partitions("quarantine") == [{"source": "a"}, {"source": "b"}]
    assert store.read_partition("quarantine", "a").num_rows == 3
    written = store.write_partition("quarantine", "a", _quarantine_rows("a", 1, "duplicate"))
    assert written.rows == 1 and written.bytes > 0
    replaced = store.read_partition("quarantine", "a")
    assert replaced.num_rows == 1 and replaced.column("reason").to_pylist() == ["duplicate"]
    assert store.read_table("quarantine").num_rows == 3
    assert store.read_partition("quarantine", "never") is None
    assert list((tmp_path / "root" / "tables" / "quarantine" / "source=a").iterdir()) == [
        tmp_path / "root" / "tables" / "quarantine" / "source=a" / "data.parquet"
    ]


def test_failed_write_leaves_previous_partition_and_no_temp_file(tmp_path, monkeypatch):
    store = CorpusStore(str(tmp_path))
    store.write_partition("quarantine", "a", _quarantine_rows("a", 3))

    real_write = pq.ParquetWriter.write_table

    def half_write(self, table, **kwargs):
        real_write(self, table.slice(0, 2), **kwargs)  # some rows reach the temporary file, then the disk fills
        raise OSError("disk full")

    monkeypatch.setattr(pq.ParquetWriter, "write_table", half_write)
    with pytest.raises(OSError, match="disk full"):
        store.write_partition("quarantine", "a", _quarantine_rows("a", 5))
    monkeypatch.undo()
    assert store.read_partition("quarantine", "a").num_rows == 3
    assert [p.name for p in (tmp_path / "tables/quarantine/source=a").iterdir()] == ["data.parquet"]
    assert store.catalog(["quarantine"]).execute("SELECT count(*) FROM quarantine").fetchone()[0] == 3


def test_readers_never_see_a_half_written_partition(tmp_path):
    store = CorpusStore(str(tmp_path))
    sizes = [1000, 20000]
    store.write_partition("quarantine", "a", _quarantine_rows("a", sizes[0]))
    tables = [_quarantine_rows("a", n) for n in sizes]
    stop = threading.Event()
    seen, errors = set(), []

    def read_loop():
        con = store.catalog(["quarantine"])
        while not stop.is_set():
            try:
                seen.add(con.execute("SELECT count(*) FROM quarantine").fetchone()[0])
            except Exception as exc:  # a torn file would surface here
                errors.append(exc)

    reader = threading.Thread(target=read_loop)
    reader.start()
    for i in range(40):
        store.write_partition("quarantine", "a", tables[i % 2])
    stop.set()
    reader.join()
    assert not errors
    assert seen <= set(sizes) and seen


def test_schema_is_enforced(tmp_path):
    store = CorpusStore(str(tmp_path))
    with pytest.raises(StoreError, match="missing \\['detail'"):
        store.write_partition("quarantine", "a", _quarantine_rows("a", 1).drop_columns(["detail"]))
    with pytest.raises(StoreError, match="nulls in required columns \\['reason'\\]"):
        bad = _quarantine_rows("a", 1).set_column(4, "reason", pa.array([None], pa.string()))
        store.write_partition("quarantine", "a", bad)
    with pytest.raises(StoreError, match="rows carry source=\\['b'\\]"):
        store.write_partition("quarantine", "a", _quarantine_rows("b", 1))
    for key in ["", "../x", ".hidden", "a=b"]:
        with pytest.raises(StoreError, match="bad partition value"):
            store.write_partition("quarantine", key, _quarantine_rows(key, 0))


def test_image_store_is_content_addressed(tmp_path):
    store = CorpusStore(str(tmp_path))
    assert store.images.put("ab" + "0" * 30, b"bytes") is True
    assert store.images.put("ab" + "0" * 30, b"bytes") is False
    assert store.images.get("ab" + "0" * 30) == b"bytes"
    assert store.images.ids() == {"ab" + "0" * 30}
    assert (tmp_path / "images" / "ab" / ("ab" + "0" * 30)).is_file()


def test_catalog_has_a_view_per_table_even_when_empty(tmp_path):
    store = CorpusStore(str(tmp_path))
    con = store.catalog()
    for name, spec in TABLES.items():
        cursor = con.execute(f"SELECT * FROM {name}")
        assert [d[0] for d in cursor.description] == spec.column_names
        assert cursor.fetchall() == []
    store.write_partition("quarantine", "a", _quarantine_rows("a", 2))
    assert con.execute("SELECT count(*) FROM quarantine").fetchone()[0] == 0  # views are built once
    assert store.catalog().execute("SELECT count(*), any_value(source) FROM quarantine").fetchone() == (2, "a")


def test_a_non_local_filesystem_works_through_the_same_api():
    """The store never assumes a local path: an in-memory fsspec filesystem stands in for S3 here."""
    import pyarrow.fs as pafs
    from fsspec.implementations.memory import MemoryFileSystem

    fs = pafs.PyFileSystem(pafs.FSSpecHandler(MemoryFileSystem()))
    store = CorpusStore("memory://bucket/corpus", filesystem=fs)
    assert not store.is_local
    store.write_partition("quarantine", "a", _quarantine_rows("a", 3))
    store.write_partition("quarantine", "a", _quarantine_rows("a", 2))  # replaced in place
    store.write_partition("quarantine", "b", _quarantine_rows("b", 1))
    assert store.list_partitions("quarantine") == [{"source": "a"}, {"source": "b"}]
    con = store.catalog()
    assert con.execute("SELECT source, count(*) FROM quarantine GROUP BY 1 ORDER BY 1").fetchall() == [("a", 2), ("b", 1)]
    assert con.execute("SELECT count(*) FROM seed_pool").fetchone()[0] == 0
    assert store.images.put("cd" + "1" * 30, b"x") and store.images.ids() == {"cd" + "1" * 30}
    assert store.images.uri("cd" + "1" * 30) == "memory://bucket/corpus/images/cd/cd" + "1" * 30


def test_a_partition_lock_waits_for_its_holder_and_is_freed_when_the_holder_is_killed(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    from omnithought_dagster.store.store import PartitionBusy

    store = CorpusStore(str(tmp_path))
    partition = {"source": "s", "shard": "000"}
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from omnithought_dagster.store import CorpusStore\n"
            f"s = CorpusStore({str(tmp_path)!r})\n"
            "with s.partition_lock('cot_traces', {'source': 's', 'shard': '000'}):\n"
            "    print('held', flush=True); time.sleep(600)\n",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        started = time.monotonic()
        with pytest.raises(PartitionBusy, match=f"being written by pid {holder.pid} on .* waited"):
            with store.partition_lock("cot_traces", partition, wait_s=1.0, poll_s=0.1):
                pass
        assert time.monotonic() - started >= 1.0
        holder.send_signal(signal.SIGKILL)  # no cleanup runs: the kernel releases the flock
        holder.wait(timeout=10)
        with store.partition_lock("cot_traces", partition, wait_s=5.0, poll_s=0.1):
            pass
    finally:
        if holder.poll() is None:
            holder.kill()


def test_stale_temporaries_are_swept_and_never_look_like_tables(tmp_path):
    import glob
    import os
    import time

    store = CorpusStore(str(tmp_path))
    store.write_partition("quarantine", "a", _quarantine_rows("a", 2))
    directory = tmp_path / "tables/quarantine/source=a"
    stale, fresh = directory / ".data.parquet.dead.tmp", directory / ".data.parquet.live.tmp"
    for path in (stale, fresh):
        path.write_bytes(b"PAR1 half")
    os.utime(stale, (time.time() - 2 * 3600, time.time() - 2 * 3600))
    cache_dir = tmp_path / "cache/generation/source=a/shard=000"
    cache_dir.mkdir(parents=True)
    (cache_dir / ".batch-1.parquet.x.tmp").write_bytes(b"half")
    os.utime(cache_dir / ".batch-1.parquet.x.tmp", (0, 0))
    assert not [p for p in glob.glob(str(tmp_path / "**/*.parquet"), recursive=True) if p.endswith(".tmp")]
    store.write_partition("quarantine", "a", _quarantine_rows("a", 3))  # the next writer in the folder sweeps
    store.cache("generation").append({"source": "a", "shard": "000"}, [("k", {"v": 1})])
    assert not stale.exists() and fresh.exists()  # a temporary still being written (recently) stays
    assert not (cache_dir / ".batch-1.parquet.x.tmp").exists()
    image_dir = tmp_path / "images/ab"
    image_dir.mkdir(parents=True)
    (image_dir / ".abcd.123.tmp").write_bytes(b"x")
    os.utime(image_dir / ".abcd.123.tmp", (0, 0))
    assert store.images.sweep_temporaries() == 1


def test_concurrent_compactions_of_one_cache_partition_lose_nothing(tmp_path):
    """Before: a run compacting a cache partition failed reading a batch file another run had just folded and deleted."""
    import threading

    store = CorpusStore(str(tmp_path))
    partition = {"source": "a", "shard": "000"}
    for batch in range(12):
        store.cache("generation").append(partition, [(f"k{batch}-{i}", {"v": i}) for i in range(5)])
    errors, barrier = [], threading.Barrier(4)

    def compact():
        try:
            barrier.wait()
            store.cache("generation").compact(partition)
        except Exception as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=compact) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert len(store.cache("generation").load(partition)) == 60
