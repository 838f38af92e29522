"""Materialisation metadata shared by the assets: schema, previews, count tables and plots for the UI.

Plots are markdown values holding a PNG data URI (`![caption](data:image/png;base64,...)`): the
asset page and the run's event log render them; keys start with `plot/`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import dagster as dg
import pyarrow as pa

from omnithought_dagster import plots
from omnithought_dagster.store import TableSpec

PREVIEW_ROWS = 5
PREVIEW_CELL_CHARS = 80
PLOT_TOP = 15


def column_schema(spec: TableSpec) -> dg.TableSchema:
    return dg.TableSchema(
        columns=[
            dg.TableColumn(
                name=c.name, type=str(c.type), description=c.description, constraints=dg.TableColumnConstraints(nullable=c.nullable)
            )
            for c in spec.columns
        ]
    )


def preview(table: pa.Table, columns: list[str], rows: int = PREVIEW_ROWS) -> dg.MetadataValue:
    """A markdown table of the first rows (long cells shortened), for the asset page."""
    head = table.select(columns).slice(0, rows).to_pylist()
    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    for row in head:
        lines.append("| " + " | ".join(markdown_cell(row[c]) for c in columns) + " |")
    if not head:
        lines.append("| " + " | ".join("" for _ in columns) + " |")
    return dg.MetadataValue.md("\n".join(lines))


def counts(mapping: Mapping[str, int], key: str, value: str = "rows") -> dg.MetadataValue:
    lines = [f"| {key} | {value} |", "| --- | ---: |"]
    lines += [
        f"| {markdown_cell(k)} | {v} |" for k, v in sorted(mapping.items(), key=lambda kv: (-kv[1], kv[0]))
    ]  # keys may be a dataset's tags
    return dg.MetadataValue.md("\n".join(lines))


def plot(draw, caption: str) -> dg.MetadataValue:
    """A picture for the UI: `draw(ax)` on a matplotlib axes, embedded as a PNG data URI with its caption."""
    return dg.MetadataValue.md(f"![{caption}](data:image/png;base64,{plots.png_base64(draw)})\n\n*{caption}*")


def bar_plot(
    counter: Mapping[str, int], caption: str, axis: str, *, horizontal: bool = True, top_n: int = PLOT_TOP, order: list[str] | None = None
) -> dg.MetadataValue:
    """Counts as bars: horizontal and largest first (the rest summed as `other`), or vertical in `order`."""
    if order is not None:
        data = [(k, counter.get(k, 0)) for k in order] + [(k, v) for k, v in sorted(counter.items()) if k not in order]
    else:
        data = plots.top(counter, top_n)
    draw = (lambda ax: plots.barh(ax, data, axis)) if horizontal else (lambda ax: plots.bar(ax, data, axis))
    return plot(draw, caption)


# In a cell, a row's text is data: what markdown reads as structure or markup is escaped (CommonMark lets a backslash
# escape any ASCII punctuation), and every line ending - \r too - becomes a space.
_MARKDOWN = re.compile(r"([\\`*_~\[\]<>&|#!])")
_LINE_ENDS = re.compile("\r\n|[\r\n]")


def markdown_cell(value: Any, limit: int | None = PREVIEW_CELL_CHARS) -> str:
    """A value as one markdown table cell: text, never structure or markup; shortened to `limit` characters."""
    if isinstance(value, list):
        value = ", ".join(str(v) for v in value)
    text = _LINE_ENDS.sub(" ", "" if value is None else str(value))
    text = text if limit is None or len(text) <= limit else text[: limit - 3] + "..."
    return _MARKDOWN.sub(r"\\\1", text)
