"""Where checked rows go: a store partition writer, or Arrow tables in memory, a flush batch at a time."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import pyarrow as pa

from omnithought_dagster.store.tables import TableSpec

# Rows gathered before they go to a sink as one Arrow table (bounds the rows held in memory).
FLUSH_ROWS = 2048


class RowSink(Protocol):
    """Where a table's rows go, an Arrow table at a time (the store's PartitionWriter, or a TableSink)."""

    def write(self, data: pa.Table) -> None: ...


class TableSink:
    """Rows collected in memory, as one Arrow table of a spec's schema."""

    def __init__(self, spec: TableSpec):
        self.spec, self.pieces = spec, []

    def write(self, data: pa.Table) -> None:
        self.pieces.append(data)

    def table(self) -> pa.Table:
        return pa.concat_tables(self.pieces) if self.pieces else self.spec.schema.empty_table()


@dataclass
class SeedSinks:
    kept: RowSink
    quarantine: RowSink
    images: RowSink


class Batcher:
    """Rows gathered into Arrow tables of FLUSH_ROWS, each handed to `write` (a sink's write, a ParquetWriter's write_table)."""

    def __init__(self, write: Callable[[pa.Table], None], spec: TableSpec):
        self.write, self.spec, self.rows = write, spec, []

    def add(self, row: dict) -> None:
        self.rows.append(row)
        if len(self.rows) >= FLUSH_ROWS:
            self.flush()

    def flush(self) -> None:
        if self.rows:
            self.write(pa.Table.from_pylist(self.rows, schema=self.spec.schema))
            self.rows = []
