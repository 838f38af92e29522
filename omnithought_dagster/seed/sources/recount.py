"""How many raw records a source holds, counted by a route that shares no parsing code with the readers.

`row_accounting` compares this count with kept + quarantined rows. A reader that splits a record
in two, merges two, or skips one (a line separator taken for a line break, a byte-order mark
swallowing the first record) cannot hide behind a count it made itself:
- JSONL: non-blank lines, found on the raw bytes (blank = only JSON whitespace);
- JSON: the elements of the top-level array (or 1 for a single value), found by a byte-level
  scanner of strings and brackets - not the json module; a file whose brackets or strings do not
  balance is one record (the reader's unreadable_file);
- Parquet: the row count in the files' footers; Arrow (datasets.save_to_disk): the record batches'
  lengths as the IPC stream states them;
- synthetic: the configured number of samples.
The files themselves are the reader's list (which files belong to a source is not parsing).
"""

from __future__ import annotations

import re
from pathlib import Path

BOM = b"\xef\xbb\xbf"
JSON_WHITESPACE = b" \t\r\n"
# A JSON string (escapes included), a structural character, or a run of anything else (numbers, literals, junk).
_TOKEN = re.compile(rb'"(?:[^"\\]|\\.)*"|[\[\]{},:]|[^\s\[\]{},:"]+', re.DOTALL)


def raw_record_count(config, reader) -> int:
    """Records in the source of `config`, whose files `reader` lists."""
    if config.kind == "synthetic":
        return config.n_samples
    roots = getattr(reader, "roots", None)  # a manifest's source: its granted folders (sources/confine.py)
    if config.kind in ("json", "sharegpt"):
        return sum(json_file_records(path, roots) for path in reader.files)
    if config.kind == "hf":
        return sum(table_file_rows(path, roots) for path in reader.files)
    raise ValueError(f"no independent count for source kind {config.kind!r}")


def json_file_records(path: Path, roots: tuple[str, ...] | None = None) -> int:
    """Records of one .json / .jsonl file, from its bytes."""
    from omnithought_dagster.seed.sources.confine import open_data

    try:
        with open_data(path, roots) as handle:
            data = handle.read()
    except OSError:
        return 1  # the reader's unreadable_file record
    if data.startswith(BOM):
        data = data[len(BOM) :]
    lines = [line for line in data.split(b"\n") if line.strip(JSON_WHITESPACE)]
    if path.suffix.lower() == ".jsonl":
        return len(lines)
    start = data.lstrip(JSON_WHITESPACE)[:1]
    if start == b"{" and len(lines) > 1 and lines[0].rstrip(JSON_WHITESPACE).endswith(b"}"):
        return len(lines)  # one object per line, in a file named .json
    return _top_level_elements(data)


def _top_level_elements(data: bytes) -> int:
    """Elements of the top-level array; 1 for any other single value or for bytes that do not balance."""
    opened: list[bytes] = []  # the brackets open now, innermost last
    count, expecting, balanced, position = 0, False, True, 0
    array = data.lstrip(JSON_WHITESPACE)[:1] == b"["
    for match in _TOKEN.finditer(data):
        token = match.group()
        if data[position : match.start()].strip(JSON_WHITESPACE):
            balanced = False  # bytes no token covers: an unterminated string
            break
        if array and not opened and position > 0:
            balanced = False  # anything after the array's closing bracket
            break
        position = match.end()
        if token in (b"[", b"{"):
            if len(opened) == 1 and expecting:
                count, expecting = count + 1, False
            opened.append(token)
            expecting = len(opened) == 1
        elif token in (b"]", b"}"):
            if not opened or _CLOSES[token] != opened.pop():
                balanced = False
                break
        elif token == b",":
            expecting = expecting or len(opened) == 1
        elif token != b":" and len(opened) == 1 and expecting:
            count, expecting = count + 1, False
    if data[position:].strip(JSON_WHITESPACE):
        balanced = False
    if not array or not balanced or opened:
        return 1
    return count


_CLOSES = {b"]": b"[", b"}": b"{"}


def table_file_rows(path: Path, roots: tuple[str, ...] | None = None) -> int:
    """Rows of a Parquet file (its footer) or an Arrow IPC stream/file (its batches' lengths, until it breaks, and one
    for the broken rest). A file whose footer or stream header cannot be read at all is one record: the reader's
    unreadable_file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from omnithought_dagster.seed.sources.confine import open_data

    errors = (pa.ArrowException, OSError, ValueError, EOFError)
    if path.suffix == ".arrow":
        rows = 0
        try:
            with pa.memory_map(str(path)) if roots is None else open_data(path, roots) as source:
                for batch in pa.ipc.open_stream(source):
                    rows += batch.num_rows
        except errors:
            rows += 1
        return rows
    try:
        if roots is None:
            return pq.ParquetFile(path).metadata.num_rows
        with open_data(path, roots) as handle:
            return pq.ParquetFile(handle).metadata.num_rows
    except errors:
        return 1
