"""Materialisation metadata shared by the assets: schema, previews and count tables for the UI."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import dagster as dg
import pyarrow as pa

from omnithought_dagster.store import TableSpec

PREVIEW_ROWS = 5
PREVIEW_CELL_CHARS = 80


def column_schema(spec: TableSpec) -> dg.TableSchema:
    return dg.TableSchema(
        columns=[
            dg.TableColumn(name=c.name, type=str(c.type), description=c.description,
                           constraints=dg.TableColumnConstraints(nullable=c.nullable))
            for c in spec.columns
        ]
    )


def preview(table: pa.Table, columns: list[str], rows: int = PREVIEW_ROWS) -> dg.MetadataValue:
    """A markdown table of the first rows (long cells shortened), for the asset page."""
    head = table.select(columns).slice(0, rows).to_pylist()
    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    for row in head:
        lines.append("| " + " | ".join(_cell(row[c]) for c in columns) + " |")
    if not head:
        lines.append("| " + " | ".join("" for _ in columns) + " |")
    return dg.MetadataValue.md("\n".join(lines))


def counts(mapping: Mapping[str, int], key: str, value: str = "rows") -> dg.MetadataValue:
    lines = [f"| {key} | {value} |", "| --- | ---: |"]
    lines += [f"| {k} | {v} |" for k, v in sorted(mapping.items(), key=lambda kv: (-kv[1], kv[0]))]
    return dg.MetadataValue.md("\n".join(lines))


def _cell(value: Any) -> str:
    if isinstance(value, list):
        value = ", ".join(str(v) for v in value)
    text = "" if value is None else str(value)
    text = text.replace("|", "\\|").replace("\n", " ")
    return text if len(text) <= PREVIEW_CELL_CHARS else text[: PREVIEW_CELL_CHARS - 3] + "..."
