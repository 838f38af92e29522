"""Parquet shards and HF `datasets.save_to_disk` folders: flat rows through the field mapping, or (`format: llava`)
a `conversations` column of {from, value} turns, as LLaVA-OneVision's parquet holds them.

The image column holds what the HF `Image` feature stores: a struct {bytes, path} (bytes may
be null with a path relative to `image_root`), a list of such structs, or a plain path. Rows
are read a record batch at a time, so a large shard never sits in memory whole. The
`datasets` library is not needed to read: parquet is read by pyarrow, and `save_to_disk`
folders are Arrow IPC streams listed in their state.json.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from omnithought_dagster.ids import content_id
from omnithought_dagster.seed.settings import HFSourceConfig
from omnithought_dagster.seed.sources.base import (
    ImageRef,
    QuarantineReason,
    Rejected,
    SeedRecord,
    excerpt,
    expand_paths,
    files_fingerprint,
    get_path,
    parse_guarded,
)
from omnithought_dagster.seed.sources.confine import check, check_all, open_data, source_roots
from omnithought_dagster.seed.sources.jsonfile import candidate_from_mapping, llava_records

BATCH_ROWS = 1024


class HFReader:
    """`kind: hf`."""

    def __init__(self, config: HFSourceConfig):
        self.config = config
        self.fields = config.fields
        self.roots = source_roots(config)  # a manifest's source reads only inside these (sources/confine.py)
        self.files = _data_files(Path(config.path), config.split, self.roots)
        root = Path(config.path)
        self.image_root = Path(config.image_root) if config.image_root else (root if root.is_dir() else root.parent)

    def records(self) -> Iterator[SeedRecord]:
        index = 0
        for path in self.files:
            for batch in _batches(path, self.roots):
                if isinstance(batch, _Unreadable):  # a file or a row group that does not decode: its rows, set aside
                    for offset in range(batch.rows):
                        yield Rejected(index, None, QuarantineReason.UNREADABLE_FILE, batch.detail(offset))
                        index += 1
                    continue
                try:
                    rows = batch.to_pylist()
                except UnicodeDecodeError:
                    rows = [_row_or_error(batch, i) for i in range(batch.num_rows)]
                for row in rows:
                    yield from parse_guarded(self._parse, index, row)
                    index += 1

    def count(self) -> int:
        return sum(_num_rows(path, self.roots) for path in self.files)

    def fingerprint(self) -> str:
        return content_id(
            "hf-source",
            {
                "files": files_fingerprint(self.files),
                "fields": self.fields.model_dump(),
                "split": self.config.split,
                "allowed_image_roots": self.config.allowed_image_roots,
                "format": self.config.format,
                "multi_turn": self.config.multi_turn,
            },
        )

    def _parse(self, index: int, row: Any) -> SeedRecord | list[SeedRecord]:
        if isinstance(row, Rejected):
            row.record_index = index
            return row
        images = _images_from_cell(get_path(row, self.fields.image))
        if images is None:
            native = get_path(row, self.fields.id)
            return Rejected(
                index,
                None if native in (None, "") else str(native),
                QuarantineReason.MALFORMED_RECORD,
                f"column {self.fields.image!r} holds no image struct, path or list of them",
                excerpt(_printable(row)),
            )
        if self.config.format == "llava":
            parsed = llava_records(index, row, self.fields, images, self.config.multi_turn)
        else:
            parsed = [candidate_from_mapping(index, row, self.fields, images=images)]
        for item in parsed:
            item.raw_excerpt = excerpt(_printable(row))
        return parsed


def _data_files(path: Path, split: str | None, roots: tuple[str, ...] | None = None) -> list[Path]:
    """The data files of a parquet file/folder/glob or of a save_to_disk Dataset / DatasetDict; with `roots`, every
    folder, metadata file and data file inside them (a split or a state.json file name is checked before it is read)."""
    check(path, roots)
    if path.is_dir() and (path / "dataset_dict.json").is_file():
        with open_data(path / "dataset_dict.json", roots) as handle:
            splits = json.loads(handle.read())["splits"]
        if split is not None and split not in splits:
            raise FileNotFoundError(f"{path}: no split {split!r}; it has {splits}")
        return [f for s in ([split] if split else splits) for f in _data_files(path / s, None, roots)]
    if path.is_dir() and (path / "state.json").is_file():
        with open_data(path / "state.json", roots) as handle:
            state = json.loads(handle.read())
        return check_all([path / item["filename"] for item in state["_data_files"]], roots)
    return check_all(expand_paths(str(path), (".parquet", ".arrow")), roots)


class _Unreadable:
    """Rows of a data file that cannot be decoded: `rows` of them (1 when not even the count can be read)."""

    def __init__(self, path: Path, rows: int, why: BaseException, where: str = ""):
        self.path, self.rows, self.why, self.where = path, rows, why, where

    def detail(self, offset: int) -> str:
        what = f"row {offset} of {self.where}" if self.where else "the file"
        return f"{self.path.name}: {what} cannot be read: {type(self.why).__name__}: {str(self.why)[:200]}"


# What pyarrow raises on bytes that are not the format they claim, or cut short.
_ARROW_ERRORS = (pa.ArrowException, OSError, ValueError, EOFError)


def _batches(path: Path, roots: tuple[str, ...] | None = None) -> Iterator[pa.RecordBatch | _Unreadable]:
    """Record batches of one file. A file that cannot be opened is one _Unreadable row; a Parquet row group that does
    not decode is an _Unreadable of its rows (the footer says how many); an Arrow stream that breaks part-way is one
    _Unreadable for what is left. Readers of the source go on with the next row group or file."""
    if path.suffix == ".arrow":
        try:
            with pa.memory_map(str(path)) if roots is None else open_data(path, roots) as source:
                stream = pa.ipc.open_stream(source)
                while True:
                    try:
                        batch = stream.read_next_batch()
                    except StopIteration:
                        return
                    yield batch
        except _ARROW_ERRORS as exc:
            yield _Unreadable(path, 1, exc)
        return
    try:
        parquet = pq.ParquetFile(path if roots is None else open_data(path, roots))
    except _ARROW_ERRORS as exc:
        yield _Unreadable(path, 1, exc)
        return
    for group in range(parquet.metadata.num_row_groups):
        done = 0
        try:
            for batch in parquet.iter_batches(batch_size=BATCH_ROWS, row_groups=[group]):
                yield batch
                done += batch.num_rows
        except _ARROW_ERRORS as exc:  # the group's rows not read yet are set aside, one quarantine row each
            yield _Unreadable(path, parquet.metadata.row_group(group).num_rows - done, exc, f"row group {group} (after {done} rows)")


def _num_rows(path: Path, roots: tuple[str, ...] | None = None) -> int:
    if path.suffix != ".arrow":
        try:
            if roots is None:
                return pq.ParquetFile(path).metadata.num_rows
            with open_data(path, roots) as handle:
                return pq.ParquetFile(handle).metadata.num_rows
        except _ARROW_ERRORS:
            return 1
    return sum(item.rows if isinstance(item, _Unreadable) else item.num_rows for item in _batches(path, roots))


def _row_or_error(batch: pa.RecordBatch, i: int) -> dict | Rejected:
    try:
        return batch.slice(i, 1).to_pylist()[0]
    except UnicodeDecodeError as exc:
        return Rejected(-1, None, QuarantineReason.INVALID_UTF8, f"a text column holds invalid UTF-8 ({exc.reason} at byte {exc.start})")


def _images_from_cell(cell: Any) -> list[ImageRef] | None:
    if cell is None:
        return []
    if isinstance(cell, list):
        refs = [_image_ref(item) for item in cell]
        return None if any(ref is None for ref in refs) else refs
    ref = _image_ref(cell)
    return None if ref is None else [ref]


def _image_ref(item: Any) -> ImageRef | None:
    if isinstance(item, str):
        return ImageRef(path=item)
    if isinstance(item, dict) and ("bytes" in item or "path" in item):
        if item.get("bytes") is not None:
            return ImageRef(data=bytes(item["bytes"]), path=None)
        if item.get("path"):
            return ImageRef(path=item["path"])
    return None


def _printable(row: dict) -> dict:
    """The row without image bytes, for the quarantine excerpt."""

    def clean(value: Any) -> Any:
        if isinstance(value, bytes):
            return f"<{len(value)} bytes>"
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, list):
            return [clean(v) for v in value]
        return value

    return clean(row)
