"""A content-addressed result cache in the corpus store: one mechanism for every model stage.

Results are keyed by the id of what produced them (a trace id, an annotation id), so a key
found here never needs a request again, and a changed teacher, prompt or sampling parameter
is a different key, a miss. Writers append small batch files (atomically, like partitions),
so a process killed mid-run loses at most the batch it had not flushed; `compact` folds the
batches of a partition into one file once the step is done.

    cache/<name>/<key>=<value>[/...]/batch-<time>-<uuid>.parquet   columns: key, payload (JSON), written_at
"""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from collections.abc import Iterable, Mapping
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from omnithought_dagster.store.files import sweep_temporaries

CACHE_SCHEMA = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),
        pa.field("payload", pa.string(), nullable=False),
        pa.field("written_at", pa.float64(), nullable=False),
    ]
)


class ResultCache:
    """`store.cache(name)`: batches of (key, JSON payload) per partition."""

    def __init__(self, store, name: str):
        self._store = store
        self.name = name

    def directory(self, partition: Mapping[str, str]) -> str:
        return self._store.path("cache", self.name, *(f"{k}={v}" for k, v in partition.items()))

    def view(self, partition: Mapping[str, str]):
        """The partition's slice for llm.runner.run_cached, with its journal of provider batches (`<name>-batches`)."""
        from omnithought_dagster.llm.runner import CacheView

        journal = self._store.cache(f"{self.name}-batches")
        return CacheView(
            load=lambda: self.load(partition),
            append=lambda batch: self.append(partition, batch),
            batches=CacheView(load=lambda: journal.load(partition), append=lambda batch: journal.append(partition, batch)),
        )

    def load(self, partition: Mapping[str, str]) -> dict[str, dict[str, Any]]:
        """Every cached result of the partition; the newest wins when a key repeats."""
        entries: dict[str, tuple[float, dict]] = {}
        for path in self._batches(partition):
            table = self._read(path)
            if table is None:
                continue
            for key, payload, written in zip(*(table.column(c).to_pylist() for c in ("key", "payload", "written_at")), strict=True):
                if key not in entries or written >= entries[key][0]:
                    entries[key] = (written, json.loads(payload))
        return {key: payload for key, (_, payload) in entries.items()}

    def append(self, partition: Mapping[str, str], results: Iterable[tuple[str, dict[str, Any]]]) -> int:
        """Write one batch file; returns how many results it holds."""
        rows = [(key, json.dumps(payload, ensure_ascii=False)) for key, payload in results]
        if not rows:
            return 0
        now = time.time()
        table = pa.table(
            {"key": [k for k, _ in rows], "payload": [p for _, p in rows], "written_at": [now] * len(rows)}, schema=CACHE_SCHEMA
        )
        self._write(partition, f"batch-{int(now * 1000):013d}-{uuid.uuid4().hex[:8]}.parquet", table)
        return len(rows)

    def compact(self, partition: Mapping[str, str]) -> None:
        """Fold the partition's batches into one file (written before the old ones are removed)."""
        batches = self._batches(partition)
        if len(batches) < 2:
            return
        # Another process may fold the same batches at the same time (two runs of one partition): a batch that is
        # gone was folded by it, and its file holds the rows - skip it here, never fail for it.
        tables = [table for table in map(self._read, batches) if table is not None]
        if tables:
            self._write(
                partition, f"batch-{int(time.time() * 1000):013d}-compacted-{uuid.uuid4().hex[:8]}.parquet", pa.concat_tables(tables)
            )
        for path in batches:
            with contextlib.suppress(FileNotFoundError):
                self._store.fs.delete_file(path)

    def _read(self, path: str) -> pa.Table | None:
        try:
            return pq.read_table(path, filesystem=self._store.fs)
        except FileNotFoundError:
            return None

    def batch_count(self, partition: Mapping[str, str]) -> int:
        return len(self._batches(partition))

    def _batches(self, partition: Mapping[str, str]) -> list[str]:
        directory = self.directory(partition)
        if self._store.fs.get_file_info(directory).type != pafs.FileType.Directory:
            return []
        infos = self._store.fs.get_file_info(pafs.FileSelector(directory))
        return sorted(i.path for i in infos if i.type == pafs.FileType.File and i.base_name.startswith("batch-"))

    def _write(self, partition: Mapping[str, str], name: str, table: pa.Table) -> None:
        directory = self.directory(partition)
        self._store.fs.create_dir(directory, recursive=True)
        final = f"{directory}/{name}"
        if not self._store.is_local:
            pq.write_table(table, final, filesystem=self._store.fs)
            return
        sweep_temporaries(directory)
        temporary = f"{directory}/.{name}.{uuid.uuid4().hex[:8]}.tmp"
        pq.write_table(table, temporary, filesystem=self._store.fs)
        self._store.fs.move(temporary, final)
