"""Seed ingestion: validate, normalise, identify and deduplicate the records of one source.

`ingest_source_into` takes any reader's records and streams the rows of three tables (seed_pool,
quarantine, images) into sinks - the store's partition writers in the asset - so memory does not
grow with the rows' text; `ingest_source` collects them as Arrow tables instead (tests, benchmark
sets). Plain Python: no Dagster, and the only other side effect is the `put_image` callback that
stores accepted images. Invariant, asserted before returning: rows read = rows kept + rows set aside.

The expensive part of a record - reading, decoding and hashing its images, validating its text - runs
in a pool of processes over batches of records (`workers`); the results are merged in record order, so
deduplication ("the first copy wins") and the output are the same whatever the number of workers. A
record that kills its process (a crashing decoder, memory) is retried alone and then set aside as
record_error; the rest of the source goes on.
"""

from __future__ import annotations

import functools
import io
import itertools
import json
import math
import multiprocessing
import os
import re
import signal
import stat
import tempfile
import unicodedata
from array import array
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import pyarrow as pa
import pyarrow.parquet as pq

from omnithought_dagster.config import SeedSettings
from omnithought_dagster.curation.near_dup import earliest_near_duplicates
from omnithought_dagster.ids import bytes_id, sample_id
from omnithought_dagster.markup import IMAGE_PLACEHOLDER as PLACEHOLDER
from omnithought_dagster.markup import TOKEN_KINDS, first_markup, storable
from omnithought_dagster.processes import available_cores, die_with_parent, main_module_hidden
from omnithought_dagster.redact import redact
from omnithought_dagster.sources.base import (
    Candidate,
    ImageRef,
    NonStandardLiteral,
    QuarantineReason,
    Rejected,
    SeedRecord,
    bounded_excerpt,
    error_text,
)
from omnithought_dagster.sources.confine import OutsideRoots, inside, open_regular, opened_path
from omnithought_dagster.store.tables import IMAGES, QUARANTINE, SEED_POOL, TableSpec

ANSWER_TYPES = ("multiple_choice", "numeric", "math", "free_form")
ANSWER_TYPE_ALIASES = {
    "multiple_choice": "multiple_choice",
    "multiple-choice": "multiple_choice",
    "multi_choice": "multiple_choice",
    "mc": "multiple_choice",
    "choice": "multiple_choice",
    "mcq": "multiple_choice",
    "numeric": "numeric",
    "number": "numeric",
    "numerical": "numeric",
    "integer": "numeric",
    "float": "numeric",
    "math": "math",
    "expression": "math",
    "latex": "math",
    "symbolic": "math",
    "free_form": "free_form",
    "free-form": "free_form",
    "freeform": "free_form",
    "open": "free_form",
    "text": "free_form",
    # MathVista-style answer_type is the answer's data type: text / integer / float / list.
    "list": "free_form",
    "string": "free_form",
    "str": "free_form",
    "int": "numeric",
}
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
_EXIF_ORIENTATION = 0x0112
_SURROGATE = re.compile("[\ud800-\udfff]")
# The raster formats a seed image may be in (PIL format names); anything else is unsupported_image_format.
SEED_IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")
_RASTER_SIGNATURES = (b"\x89PNG", b"\xff\xd8", b"GIF8", b"BM", b"II*\x00", b"MM\x00*")  # WEBP: RIFF....WEBP
# A number (thousands separators, decimals, a fraction, %) optionally followed by a short unit.
_NUMERIC = re.compile(r"^[-+]?(?:\d{1,3}(?:,\d{3})+|\d+|(?=\.\d))(?:\.\d+)?(?:\s*/\s*\d+)?\s*[%°]?\s*(?:[a-zA-Z][a-zA-Z0-9^²³/ ]{0,11})?$")
_LATEX_MARKERS = re.compile(r"\\|\$|\^|√|π|sqrt\(|frac")
_FORMULA = re.compile(r"^[\w\s+\-*/^().=]+$")
_OPTION_LINE = re.compile(r"^\s*\(?([A-Z])[\).:]\s+(.+?)\s*$")
_OPTIONS_HEADER = re.compile(r"^\s*(options|choices)\s*:?\s*$", re.IGNORECASE)
_LETTER_ANSWER = re.compile(r"^\(?([A-Z])[\).:]?$")

# Rows gathered before they go to a sink as one Arrow table (bounds the rows held in memory).
FLUSH_ROWS = 2048
# Records a worker checks per task: large enough to amortise the round trip, small enough to keep every worker busy.
BATCH_RECORDS = 32
# A source this small per worker is checked in the step's own process: starting a process costs ~1-2 s.
MIN_RECORDS_PER_WORKER = 256
PREVIEW_ROWS = 10
# While the workers start, the step's process checks the first batches itself (tests turn this off to make every
# batch go through the pool).
CHECK_WHILE_WORKERS_START = True


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


@dataclass
class PriorSamples:
    """Samples already kept by sources earlier in config order: the 'first' copies."""

    keys: dict[str, str] = field(default_factory=dict)  # sample_id -> "source/native_id"
    ordered_ids: list[str] = field(default_factory=list)  # sample ids in global order
    phashes: list[list[str]] = field(default_factory=list)  # aligned with ordered_ids

    @classmethod
    def from_rows(cls, rows: Iterable[dict]) -> PriorSamples:
        """From seed_pool rows (sample_id, source, native_id, image_phashes) in global order."""
        prior = cls()
        for row in rows:
            prior.keys.setdefault(row["sample_id"], f"{row['source']}/{row['native_id']}")
            prior.ordered_ids.append(row["sample_id"])
            prior.phashes.append(list(row["image_phashes"] or []))
        return prior


@dataclass
class IngestResult:
    """What ingesting one source did. `kept`, `quarantine` and `images` hold the rows only when they were
    collected in memory (`ingest_source`); streamed to sinks they are None and `kept_head` / `quarantine_head`
    hold the first rows."""

    source: str
    rows_read: int  # samples the reader yielded: one per record, or one per turn of a split conversation
    records_read: int  # raw records (distinct record indices)
    rows_kept: int
    rows_quarantined: int
    reasons: Counter
    images_stored: int  # new objects written to the image store
    images_reused: int  # images already in the store (content dedup)
    near_duplicates: int
    answer_types: Counter
    source_tags: Counter
    workers: int
    kept_head: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what went wrong with the worker pool itself (never a record's verdict)
    quarantine_head: list[dict] = field(default_factory=list)
    kept: pa.Table | None = None
    quarantine: pa.Table | None = None
    images: pa.Table | None = None


class _Reject(Exception):
    def __init__(self, reason: QuarantineReason, detail: str):
        super().__init__(detail)
        self.reason, self.detail = reason, detail


@dataclass
class _Image:
    image_id: str
    data: bytes | None  # None once a worker stored it (the bytes need not travel back)
    width: int
    height: int
    format: str
    mode: str
    phash: str
    n_bytes: int
    stored: bool | None = None  # set by a worker that stored the bytes: True when new to the store


@dataclass
class _Context:
    """What checking a record needs besides the record: the same in the step and in every worker."""

    source: str
    settings: SeedSettings
    image_root: Path | None
    allowed_roots: list[Path]
    read_roots: tuple[str, ...] | None = None  # a manifest's source: every image read lies inside these too


@dataclass
class _Accepted:
    row: dict
    images: list[_Image]


@dataclass
class _SetAside:
    reason: QuarantineReason
    detail: str


def ingest_workers(settings: SeedSettings, records: int) -> int:
    """Processes that check a source of `records` records: `seed.workers`, or one per core the step may use
    (0, the default); one - the step's own process, no pool - when the source is too small to pay for starting them."""
    wanted = settings.workers or available_cores()
    return max(1, min(wanted, records // MIN_RECORDS_PER_WORKER))


def ingest_source(
    source: str,
    records: Iterable[SeedRecord],
    settings: SeedSettings,
    *,
    image_root: Path | None,
    put_image: Callable[[str, bytes], bool],
    prior: PriorSamples | None = None,
    progress: Callable[[int], None] | None = None,
    allowed_roots: Iterable[str | Path] = (),
    workers: int = 1,
    read_roots: tuple[str, ...] | None = None,
) -> IngestResult:
    """`ingest_source_into` with the three tables collected in memory (on the result's kept / quarantine / images)."""
    sinks = SeedSinks(TableSink(SEED_POOL), TableSink(QUARANTINE), TableSink(IMAGES))
    result = ingest_source_into(
        source,
        records,
        settings,
        image_root=image_root,
        put_image=put_image,
        sinks=sinks,
        prior=prior,
        progress=progress,
        allowed_roots=allowed_roots,
        workers=workers,
        read_roots=read_roots,
    )
    result.kept, result.quarantine, result.images = sinks.kept.table(), sinks.quarantine.table(), sinks.images.table()
    return result


def ingest_source_into(
    source: str,
    records: Iterable[SeedRecord],
    settings: SeedSettings,
    *,
    image_root: Path | None,
    put_image: Callable[[str, bytes], bool],
    sinks: SeedSinks,
    prior: PriorSamples | None = None,
    progress: Callable[[int], None] | None = None,
    allowed_roots: Iterable[str | Path] = (),
    workers: int = 1,
    read_roots: tuple[str, ...] | None = None,
) -> IngestResult:
    """Turn one source's records into kept rows, quarantine rows and image rows, written to `sinks` in record order.

    Image paths resolve under `image_root`, or under one of `allowed_roots` (absolute paths a dataset holds); with
    `read_roots` (a manifest's source: sources/confine.py) the file read must lie inside those as well.
    `workers` > 1 checks records in that many processes (`ingest_workers` picks the number).
    """
    context = _Context(source, settings, image_root, [Path(root) for root in allowed_roots], read_roots)
    prior = prior or PriorSamples()
    marking = settings.near_duplicate_max_distance >= 0
    seen: dict[bytes, str] = {}  # sample id (16 bytes) -> native_id of the kept copy
    images_seen: set[str] = set()
    kept_ids = bytearray()  # 16 bytes per kept row, in order: near-duplicate marks name them
    kept_hashes, kept_owners = array("Q"), array("q")  # every kept image's pHash and its row's position
    reasons, answer_types, source_tags = Counter(), Counter(), Counter()
    kept_head: list[dict] = []
    quarantine_head: list[dict] = []
    notes: list[str] = []
    stored = reused = rows_read = records_read = rows_kept = rows_quarantined = 0
    last_index: int | None = None

    with tempfile.TemporaryDirectory(prefix="omnithought-seed-") as scratch:
        # With near-duplicate marking on, kept rows wait in a local spill file: their marks are known at the end.
        spill = pq.ParquetWriter(os.path.join(scratch, "kept.parquet"), SEED_POOL.schema, compression="lz4") if marking else None
        kept_out = _Batcher(spill.write_table if spill is not None else sinks.kept.write, SEED_POOL)
        quarantine_out, images_out = _Batcher(sinks.quarantine.write, QUARANTINE), _Batcher(sinks.images.write, IMAGES)

        def set_aside(
            record: SeedRecord, reason: QuarantineReason, detail: str, sample: str | None = None, first: str | None = None
        ) -> None:
            nonlocal rows_quarantined
            row = _quarantine_row(source, record, reason, detail, sample, first)
            quarantine_out.add(row)
            rows_quarantined += 1
            reasons[row["reason"]] += 1
            if len(quarantine_head) < PREVIEW_ROWS:
                quarantine_head.append(row)

        with closing(_checked(records, context, workers, notes, put_image)) as checked:
            for record, outcome in checked:
                rows_read += 1
                if record.record_index != last_index:
                    records_read, last_index = records_read + 1, record.record_index
                if progress is not None and rows_read % 1000 == 0:
                    progress(records_read)
                if isinstance(outcome, _SetAside):
                    set_aside(record, outcome.reason, outcome.detail)
                    continue
                row = outcome.row
                digest = bytes.fromhex(row["sample_id"])
                first = prior.keys.get(row["sample_id"]) or (f"{source}/{seen[digest]}" if digest in seen else None)
                if first is not None:
                    set_aside(record, QuarantineReason.DUPLICATE, f"same sample_id as {first}, which is kept", row["sample_id"], first)
                    continue
                seen[digest] = row["native_id"]
                for image in outcome.images:
                    if image.stored if image.stored is not None else put_image(image.image_id, image.data):
                        stored += 1
                    else:
                        reused += 1
                    if image.image_id not in images_seen:
                        images_seen.add(image.image_id)
                        images_out.add(
                            {
                                "image_id": image.image_id,
                                "source": source,
                                "width": image.width,
                                "height": image.height,
                                "format": image.format,
                                "mode": image.mode,
                                "n_bytes": image.n_bytes,
                                "phash": image.phash,
                            }
                        )
                if marking:
                    kept_ids += digest
                    for phash in row["image_phashes"]:
                        kept_hashes.append(int(phash, 16))
                        kept_owners.append(rows_kept)
                kept_out.add(row)
                rows_kept += 1
                answer_types[row["answer_type"]] += 1
                source_tags.update(row["source_tags"])
                if len(kept_head) < PREVIEW_ROWS:
                    kept_head.append(row)
        kept_out.flush()
        quarantine_out.flush()
        images_out.flush()
        near = 0
        if spill is not None:
            spill.close()
            marks = _near_duplicate_marks(prior, kept_ids, kept_hashes, kept_owners, settings.near_duplicate_max_distance)
            near = len(marks)
            _copy_with_marks(os.path.join(scratch, "kept.parquet"), sinks.kept, marks)
            for position, row in enumerate(kept_head):
                row["near_duplicate_of"], row["near_duplicate_distance"] = marks.get(position, (None, None))

    if rows_read != rows_kept + rows_quarantined:
        raise AssertionError(f"{source}: row accounting broken: read {rows_read} != kept {rows_kept} + quarantined {rows_quarantined}")
    return IngestResult(
        source=source,
        rows_read=rows_read,
        records_read=records_read,
        rows_kept=rows_kept,
        rows_quarantined=rows_quarantined,
        reasons=reasons,
        images_stored=stored,
        images_reused=reused,
        near_duplicates=near,
        answer_types=answer_types,
        source_tags=source_tags,
        workers=workers,
        kept_head=kept_head,
        quarantine_head=quarantine_head,
        notes=notes,
    )


class _Batcher:
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


# -- checking records, in this process or in a pool ----------------------------------------------------


def _check(record: SeedRecord, context: _Context) -> _Accepted | _SetAside:
    """One record's verdict: its row and images, or why it is set aside. Never raises for the record's sake."""
    if isinstance(record, Rejected):
        return _SetAside(record.reason, record.detail)
    try:
        row, images = _validate(context.source, record, context.settings, context.image_root, context.allowed_roots, context.read_roots)
        _check_column_types(row)
    except _Reject as problem:
        return _SetAside(problem.reason, problem.detail)
    except Exception as exc:  # noqa: BLE001 - an unknown problem with one record quarantines that record, with what it was
        return _SetAside(QuarantineReason.RECORD_ERROR, f"validating the record failed: {error_text(exc)}")
    return _Accepted(row, images)


def _checked(
    records: Iterable[SeedRecord], context: _Context, workers: int, notes: list[str], put_image: Callable[[str, bytes], bool] | None = None
) -> Iterator[tuple[SeedRecord, _Accepted | _SetAside]]:
    """(record, verdict) in record order; with workers > 1 the verdicts come from a pool of processes (what went
    wrong with the pool itself is added to `notes`). Workers also store accepted images when `put_image` can be
    sent to them (the store's own method can; a lambda cannot): the bytes then never travel back."""
    if workers <= 1:
        for record in records:
            yield record, _check(record, context)
        return
    pool = _CheckPool(workers, context, put_image if _picklable(put_image) else None)
    finished = False
    try:
        window: deque = deque()  # batches in flight, oldest first: results are taken in order
        for batch in _batches(records, BATCH_RECORDS):
            # While the workers start (an interpreter and its imports, ~0.5-1 s) this process checks batches itself.
            window.append((batch, pool.submit(batch) if pool.ready() or not CHECK_WHILE_WORKERS_START else _done(batch, context)))
            if len(window) > 2 * workers:
                yield from pool.collect(*window.popleft())
        while window:
            yield from pool.collect(*window.popleft())
        finished = True
    finally:
        pool.close(terminate=not finished)
        if pool.fell_back:
            notes.append(pool.fell_back)


def _batches(items: Iterable, size: int) -> Iterator[list]:
    iterator = iter(items)
    while batch := list(itertools.islice(iterator, size)):
        yield batch


class _CheckPool:
    """Worker processes that check batches of records. They die with the step (parent-death signal). A record
    that kills its worker is retried alone in a fresh pool and, if the fresh pool itself is sound, set aside as
    record_error: the source goes on. A pool that cannot run at all (a main module that starts ingestion again
    on import, no /dev/shm, ...) is given up: the records are checked in this process, and `fell_back` says why."""

    def __init__(self, workers: int, context: _Context, put_image: Callable[[str, bytes], bool] | None = None):
        self.workers, self.context, self.put_image = workers, context, put_image
        self.fell_back: str | None = None
        # spawn: a fresh interpreter, not a fork of a step that may hold threads and locks (Dagster's, Arrow's).
        self._mp = multiprocessing.get_context("spawn")
        self._start()

    def _start(self) -> None:
        self._executor = ProcessPoolExecutor(
            self.workers, mp_context=self._mp, initializer=_start_worker, initargs=(self.context, os.getpid(), self.put_image)
        )
        with main_module_hidden():  # every worker is spawned here, by these first submits (one each), never later
            self._warming = [self._executor.submit(_check_batch, []) for _ in range(self.workers)]

    def ready(self) -> bool:
        """Whether a worker has started (or the pool has failed: then submit() finds out and falls back)."""
        if self._warming and any(future.done() for future in self._warming):
            self._warming = []
        return not self._warming

    def submit(self, batch: list[SeedRecord]) -> Future:
        if self.fell_back:
            return _done(batch, self.context)
        try:
            return self._executor.submit(_check_batch, batch)
        except BrokenProcessPool:  # an earlier batch killed a worker: the pool is gone, start another
            self._restart()
            return self.submit(batch)

    def collect(self, batch: list[SeedRecord], future: Future) -> Iterator[tuple[SeedRecord, _Accepted | _SetAside]]:
        try:
            verdicts = future.result()
        except BrokenProcessPool:
            verdicts = [self._alone(record) for record in batch]
        return zip(batch, verdicts, strict=True)  # a verdict per record, or the pool is broken

    def _alone(self, record: SeedRecord) -> _Accepted | _SetAside:
        try:
            return self.submit([record]).result()[0]
        except BrokenProcessPool as exc:
            self._restart()
            if not self._sound():
                self.fell_back = f"the worker pool cannot run ({exc}); records are checked in the step's process"
                self._executor.shutdown(wait=False, cancel_futures=True)
                return _check(record, self.context)
            return _SetAside(
                QuarantineReason.RECORD_ERROR,
                "checking the record killed its worker process (a crashing image decoder, or "
                "memory); retried alone in a fresh process, it did so again",
            )

    def _restart(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._start()

    def _sound(self) -> bool:
        """Whether a fresh pool checks an empty batch: a pool that cannot even do that is not the record's fault."""
        try:
            return self._executor.submit(_check_batch, []).result(timeout=120) == []
        except Exception:  # noqa: BLE001 - broken, timed out, unpicklable: not sound
            return False

    def close(self, terminate: bool = False) -> None:
        if terminate:  # the step is failing or being stopped: no worker outlives it
            for process in list((getattr(self._executor, "_processes", None) or {}).values()):
                process.terminate()
        self._executor.shutdown(wait=True, cancel_futures=True)


def _done(batch: list[SeedRecord], context: _Context) -> Future:
    future: Future = Future()
    future.set_result([_check(record, context) for record in batch])
    return future


_WORKER_CONTEXT: _Context | None = None
_WORKER_PUT: Callable[[str, bytes], bool] | None = None


def _start_worker(context: _Context, parent_pid: int, put_image: Callable[[str, bytes], bool] | None) -> None:
    global _WORKER_CONTEXT, _WORKER_PUT
    die_with_parent(parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the step's to handle; it stops the pool
    _WORKER_CONTEXT, _WORKER_PUT = context, put_image
    import imagehash  # noqa: F401 - imported now, not inside the first batch
    from PIL import Image  # noqa: F401


def _check_batch(batch: list[SeedRecord]) -> list[_Accepted | _SetAside]:
    assert _WORKER_CONTEXT is not None, "worker started without its context"
    verdicts = [_check(record, _WORKER_CONTEXT) for record in batch]
    if _WORKER_PUT is not None:
        for verdict in verdicts:
            if isinstance(verdict, _Accepted):
                for image in verdict.images:
                    image.stored, image.data = _WORKER_PUT(image.image_id, image.data), None
    return verdicts


def _picklable(value: Any) -> bool:
    import pickle

    try:
        pickle.dumps(value)
    except Exception:  # noqa: BLE001 - lambdas, closures, open handles: not sendable
        return False
    return True


# -- validation ----------------------------------------------------------------------------------


def _validate(
    source: str,
    record: Candidate,
    settings: SeedSettings,
    image_root: Path | None,
    allowed_roots: list[Path],
    read_roots: tuple[str, ...] | None = None,
) -> tuple[dict, list[_Image]]:
    native_id = _text(record.native_id, "native_id")
    question = _text(record.question, "question", empty=QuarantineReason.EMPTY_QUESTION)
    question = unicodedata.normalize("NFC", question).strip()
    if not question:
        raise _Reject(QuarantineReason.EMPTY_QUESTION, "question is empty or whitespace")
    if record.placeholder_count is None and PLACEHOLDER in question:
        # A flat record's <image> placeholders mark where its images go, as LLaVA's do: as many as images, then removed.
        if question.count(PLACEHOLDER) != len(record.images):
            raise _Reject(
                QuarantineReason.IMAGE_PLACEHOLDER_MISMATCH,
                f"{question.count(PLACEHOLDER)} {PLACEHOLDER} placeholders in the question but {len(record.images)} images",
            )
        question = question.replace(PLACEHOLDER, "").strip()
        if not question:
            raise _Reject(QuarantineReason.EMPTY_QUESTION, "question holds nothing but <image> placeholders")
    answer = _answer_text(record.answer)
    choices = [_text(c, "choices") for c in record.choices] if record.choices else []
    _refuse_markup({"question": question, "answer": answer, **{f"option {i + 1}": c for i, c in enumerate(choices)}})
    if not choices:
        question, choices = _split_options(question)
    if len(question) > settings.max_question_chars:
        raise _Reject(QuarantineReason.QUESTION_TOO_LONG, f"question has {len(question)} characters, limit {settings.max_question_chars}")
    answer_type = _answer_type(record.answer_type, answer, choices)
    if answer_type == "multiple_choice" and len(choices) < 2:
        raise _Reject(QuarantineReason.MALFORMED_RECORD, f"multiple choice needs at least two options, got {len(choices)}")
    if answer_type == "multiple_choice":
        answer = _choice_letter(answer, choices)
    metadata = _metadata_json(record.metadata)

    if not record.images and settings.require_image:
        raise _Reject(QuarantineReason.NO_IMAGE, "the record has no image and seed.require_image is on")
    if len(record.images) > settings.max_images_per_sample:
        raise _Reject(QuarantineReason.TOO_MANY_IMAGES, f"{len(record.images)} images, limit {settings.max_images_per_sample}")
    if record.placeholder_count and record.placeholder_count != len(record.images):
        raise _Reject(
            QuarantineReason.IMAGE_PLACEHOLDER_MISMATCH, f"{record.placeholder_count} <image> placeholders but {len(record.images)} images"
        )
    images = [_load_image(ref, position, image_root, settings, allowed_roots, read_roots) for position, ref in enumerate(record.images)]

    image_ids = [image.image_id for image in images]
    row = {
        "sample_id": sample_id(question, image_ids, answer, choices),
        "source": source,
        "native_id": native_id,
        "record_index": record.record_index,
        "turn": record.turn,
        "image_ids": image_ids,
        "image_phashes": [image.phash for image in images],
        "question": question,
        "answer": answer,
        "answer_type": answer_type,
        "choices": choices,
        "source_tags": [_text(t, "tags") for t in record.tags],
        "source_difficulty": record.difficulty,
        "metadata": metadata,
        "near_duplicate_of": None,
        "near_duplicate_distance": None,
    }
    return row, images


def _refuse_markup(fields: dict[str, str]) -> None:
    """Text from a dataset is data: a field holding a string a tokenizer or a training format reads as markup (a special
    token, a placeholder, the reply format's delimiters) sets the record aside, naming the string. Control characters
    stay (they are text to a tokenizer; curation and the reply format deal with them where models write them)."""
    for name, text in fields.items():
        found = first_markup(text, TOKEN_KINDS)
        if found is not None:
            raise _Reject(QuarantineReason.MARKUP_IN_TEXT, f"{name} holds {found.describe()}: text from a dataset is data, never markup")


def _check_column_types(row: dict) -> None:
    """The row against its seed_pool column types, now: a value that does not fit (an integer past int32, a
    list where text goes) is this record's quarantine, not a failed partition write after the loop.
    Checked in Python from the Arrow schema (a one-row Arrow conversion costs ~250 us, 7% of an image's decode)."""
    for name, arrow_type, nullable, common in _seed_columns():
        value = row.get(name)
        if type(value) is common or (common is _STRINGS and type(value) is list and all(type(v) is str for v in value)):
            continue  # the common case, decided without the general walk below
        problem = _misfit(value, arrow_type, nullable)
        if problem:
            raise _Reject(QuarantineReason.MALFORMED_RECORD, f"a value does not fit its column: {name} {problem}")


_STRINGS = object()  # marks list<string> columns in _seed_columns


@functools.cache
def _seed_columns() -> tuple:
    """(name, type, nullable, the Python type that always fits) per seed_pool column: text is str, lists of text are
    checked item by item; integers always go through the bounds."""

    def common(arrow_type: pa.DataType):
        if pa.types.is_string(arrow_type):
            return str
        if pa.types.is_list(arrow_type) and pa.types.is_string(arrow_type.value_type):
            return _STRINGS
        return None

    return tuple((f.name, f.type, f.nullable, common(f.type)) for f in SEED_POOL.schema)


_INT_BOUNDS = {pa.int32(): 2**31, pa.int64(): 2**63}


def _misfit(value: Any, arrow_type: pa.DataType, nullable: bool) -> str | None:
    """Why `value` cannot be stored as `arrow_type` (None when it can)."""
    if value is None:
        return None if nullable else "is missing"
    if pa.types.is_string(arrow_type):
        return None if isinstance(value, str) else f"holds a {type(value).__name__}, not text"
    if arrow_type in _INT_BOUNDS:
        bound = _INT_BOUNDS[arrow_type]
        if not isinstance(value, int) or isinstance(value, bool):
            return f"holds a {type(value).__name__}, not an integer"
        return None if -bound <= value < bound else f"= {value} does not fit {arrow_type}"
    if pa.types.is_list(arrow_type):
        if not isinstance(value, list):
            return f"holds a {type(value).__name__}, not a list"
        return next((f"[{i}] {why}" for i, item in enumerate(value) if (why := _misfit(item, arrow_type.value_type, False))), None)
    return None  # a type this table does not use


def _text(value: Any, name: str, empty: QuarantineReason | None = None) -> str:
    """A text field as valid Unicode, or a rejection naming the field."""
    if value is None and empty is not None:
        raise _Reject(empty, f"{name} is missing")
    if isinstance(value, NonStandardLiteral):
        raise _Reject(QuarantineReason.MALFORMED_RECORD, f"{name} is the non-standard JSON literal {value!r}, not a value")
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise _Reject(QuarantineReason.INVALID_UTF8, f"{name} is not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        raise _Reject(QuarantineReason.MALFORMED_RECORD, f"{name} is a {type(value).__name__}, not text")
    _require_valid_unicode(value, name)
    return value


def _require_valid_unicode(value: str, name: str) -> None:
    # JSON was decoded with surrogateescape: invalid UTF-8 bytes show up as lone surrogates.
    bad = _SURROGATE.search(value)
    if bad:
        raise _Reject(QuarantineReason.INVALID_UTF8, f"{name} is not valid UTF-8 (bad byte near character {bad.start()})")


def _safe_text(value: Any) -> str | None:
    """Text for a quarantine row: lone surrogates (invalid UTF-8 read with surrogateescape) as U+FFFD (markup.storable)."""
    return None if value is None else storable(str(value))


def _answer_text(value: Any) -> str:
    if value is None or (isinstance(value, str) and not value.strip()):
        raise _Reject(QuarantineReason.MISSING_ANSWER, "answer is missing or empty")
    if isinstance(value, float) and not math.isfinite(value):
        raise _Reject(QuarantineReason.MALFORMED_RECORD, f"answer is {value!r}, not a value")
    if isinstance(value, bool):
        value = "Yes" if value else "No"
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    text = unicodedata.normalize("NFC", _text(value, "answer")).strip()
    return text


def _answer_type(declared: Any, answer: str, choices: list[str]) -> str:
    if declared not in (None, ""):
        answer_type = ANSWER_TYPE_ALIASES.get(str(declared).strip().lower())
        if answer_type is None:
            raise _Reject(QuarantineReason.MALFORMED_RECORD, f"answer_type {declared!r} is not one of {list(ANSWER_TYPES)} (or an alias)")
        if answer_type == "multiple_choice" and not choices:
            raise _Reject(QuarantineReason.MALFORMED_RECORD, "answer_type is multiple_choice but the record gives no options")
        if choices and answer_type != "multiple_choice":
            # Options and another declared type: a data type of the option (MathVista's `text`) when the answer
            # names an option; otherwise the record contradicts itself, and no guess is made.
            if _names_an_option(answer, choices):
                return "multiple_choice"
            raise _Reject(
                QuarantineReason.ANSWER_TYPE_CONFLICT,
                f"declared {declared!r}, but the record gives {len(choices)} options and its answer {answer[:80]!r} names none of them",
            )
        return answer_type
    if choices:
        return "multiple_choice"
    if _NUMERIC.match(answer):
        return "numeric"
    if _LATEX_MARKERS.search(answer) or (
        _FORMULA.match(answer) and re.search(r"\d", answer) and re.search(r"[a-zA-Z]", answer) and re.search(r"[+*/=^]", answer)
    ):
        return "math"
    return "free_form"


def _names_an_option(answer: str, choices: list[str]) -> bool:
    try:
        _choice_letter(answer, choices)
    except _Reject:
        return False
    return True


def _choice_letter(answer: str, choices: list[str]) -> str:
    """The option letter the answer names (letter, '(B)', 'B.', or the option's text)."""
    match = _LETTER_ANSWER.match(answer.strip().upper())
    if match and LETTERS.index(match.group(1)) < len(choices):
        return match.group(1)
    wanted = " ".join(answer.split()).casefold()
    for index, choice in enumerate(choices):
        if " ".join(choice.split()).casefold() == wanted:
            return LETTERS[index]
    raise _Reject(QuarantineReason.ANSWER_NOT_IN_CHOICES, f"answer {answer[:80]!r} names none of the {len(choices)} options")


def _split_options(question: str) -> tuple[str, list[str]]:
    """Options listed at the end of the question ('A. ...' / '(B) ...' lines) become choices."""
    lines = question.split("\n")  # not splitlines(): U+2028 and friends are text here, not option breaks
    found: list[tuple[str, str]] = []
    end = len(lines)
    while end > 0:
        match = _OPTION_LINE.match(lines[end - 1])
        if not match:
            break
        found.insert(0, (match.group(1), match.group(2)))
        end -= 1
    if len(found) < 2 or [letter for letter, _ in found] != list(LETTERS[: len(found)]):
        return question, []
    if end > 0 and _OPTIONS_HEADER.match(lines[end - 1]):
        end -= 1
    stem = "\n".join(lines[:end]).strip()
    return (stem, [text for _, text in found]) if stem else (question, [])


def _metadata_json(metadata: dict) -> str:
    def default(value: Any) -> Any:
        if isinstance(value, bytes):
            return f"<{len(value)} bytes>"
        return repr(value)

    text = json.dumps(metadata, ensure_ascii=False, sort_keys=True, default=default)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        # Invalid UTF-8 in a field we do not interpret: keep it, escaped, rather than lose the record.
        text = json.dumps(metadata, ensure_ascii=True, sort_keys=True, default=default)
    return text


def _load_image(
    ref: ImageRef,
    position: int,
    image_root: Path | None,
    settings: SeedSettings,
    allowed_roots: list[Path] = (),
    read_roots: tuple[str, ...] | None = None,
) -> _Image:
    """Read, bound-check, decode and hash one image, or reject the record with the reason."""
    label = f"image {position} ({ref.describe()})"
    data = ref.data if ref.data is not None else _read_image_file(ref.path or "", label, image_root, settings, allowed_roots, read_roots)
    if not data:
        raise _Reject(QuarantineReason.EMPTY_IMAGE, f"{label} is zero bytes")
    if len(data) > settings.max_image_bytes:
        raise _Reject(QuarantineReason.OVERSIZED_IMAGE, f"{label} is {len(data)} bytes, limit {settings.max_image_bytes}")

    import imagehash
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        # Only the raster formats a seed pool holds are tried: without `formats`, PIL tries every plugin it
        # has, and some (EPS) run external programs.
        with Image.open(io.BytesIO(data), formats=SEED_IMAGE_FORMATS) as image:
            width, height = image.size
            if width * height > settings.max_image_pixels:
                raise _Reject(
                    QuarantineReason.OVERSIZED_IMAGE,
                    f"{label} is {width}x{height} = {width * height} pixels, limit {settings.max_image_pixels}",
                )
            image.load()
            fmt = image.format or "unknown"
            # What a person sees: the EXIF orientation applied before the size and the hash are taken (looked up
            # first: exif_transpose copies the image even when there is nothing to turn).
            upright = (ImageOps.exif_transpose(image) or image) if image.getexif().get(_EXIF_ORIENTATION, 1) != 1 else image
            width, height = upright.size
            phash = str(imagehash.phash(upright))
            mode = upright.mode
    except _Reject:
        raise
    except Image.DecompressionBombError as exc:
        raise _Reject(QuarantineReason.OVERSIZED_IMAGE, f"{label}: {exc}") from None
    except UnidentifiedImageError:
        if not data.startswith(_RASTER_SIGNATURES) and data[8:12] != b"WEBP":
            raise _Reject(
                QuarantineReason.UNSUPPORTED_IMAGE_FORMAT, f"{label} is not one of {', '.join(SEED_IMAGE_FORMATS)} (starts {data[:12]!r})"
            ) from None
        raise _Reject(QuarantineReason.CORRUPT_IMAGE, f"{label} does not decode as the format its header names") from None
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, struct.error... on bad bytes
        raise _Reject(QuarantineReason.CORRUPT_IMAGE, f"{label} does not decode: {type(exc).__name__}: {exc}") from None
    return _Image(bytes_id(data), data, width, height, fmt, mode, phash, len(data))


def _read_image_file(
    path: str,
    label: str,
    image_root: Path | None,
    settings: SeedSettings,
    allowed_roots: list[Path] = (),
    read_roots: tuple[str, ...] | None = None,
) -> bytes:
    if image_root is None:
        raise _Reject(QuarantineReason.MALFORMED_RECORD, f"{label}: a path, but this source has no image root")
    if not path.strip():
        raise _Reject(QuarantineReason.MISSING_IMAGE, f"{label}: empty path")
    try:
        root, allowed = _resolved_roots(image_root, tuple(allowed_roots))
        target = (root / path).resolve()  # absolute paths replace root; symlinks are followed
        if not any(target.is_relative_to(folder) for folder in allowed):
            hint = (
                "; an absolute path - if the source's images live there, list that folder in its allowed_image_roots"
                if Path(path).is_absolute()
                else ""
            )
            raise _Reject(QuarantineReason.PATH_ESCAPE, f"{label} resolves to {target}, outside the source root {root}{hint}")
        try:
            info = target.stat()  # before any open: a FIFO or a device would block or never end
        except FileNotFoundError:
            raise _Reject(QuarantineReason.MISSING_IMAGE, f"{label}: no file at {target}") from None
        if not stat.S_ISREG(info.st_mode):
            raise _Reject(QuarantineReason.MISSING_IMAGE, f"{label}: no file at {target} (a folder, pipe or device)")
        if info.st_size == 0:
            raise _Reject(QuarantineReason.EMPTY_IMAGE, f"{label} is zero bytes")
        if info.st_size > settings.max_image_bytes:
            raise _Reject(QuarantineReason.OVERSIZED_IMAGE, f"{label} is {info.st_size} bytes, limit {settings.max_image_bytes}")
        try:  # checked again on what was opened: a name swapped since its check (or a FIFO) is not read
            handle = open_regular(target, [str(folder) for folder in allowed])
            if read_roots is not None and not any(inside(opened_path(handle.fileno(), target), root) for root in read_roots):
                handle.close()
                raise OutsideRoots(f"{label} lies outside the folders this source may read")
        except OutsideRoots:
            raise _Reject(
                QuarantineReason.PATH_ESCAPE,
                f"{label} changed between its check and its read, or lies outside the folders this source may read; not read",
            ) from None
        with handle:
            return handle.read(settings.max_image_bytes + 1)
    except (OSError, RuntimeError, ValueError) as exc:  # symlink loops, names too long, NUL bytes, permissions
        raise _Reject(QuarantineReason.UNREADABLE_IMAGE, f"{label} cannot be read: {error_text(exc)}") from None


@functools.lru_cache(maxsize=64)
def _resolved_roots(image_root: Path, allowed_roots: tuple[Path, ...]) -> tuple[Path, list[Path]]:
    """The image root and every folder image paths may resolve into, resolved once per source (not per image)."""
    root = image_root.resolve()
    return root, [root, *(folder.resolve() for folder in allowed_roots)]


def _quarantine_row(
    source: str, record: SeedRecord, reason: QuarantineReason, detail: str, sample: str | None = None, duplicate_of: str | None = None
) -> dict:
    return {
        "source": source,
        "native_id": _safe_text(record.native_id),
        "record_index": record.record_index,
        "turn": record.turn,
        "reason": str(reason),
        "detail": _safe_text(redact(detail)) or "",
        "sample_id": sample,
        "duplicate_of": duplicate_of,
        "raw_excerpt": _safe_text(bounded_excerpt(record.raw_excerpt)),  # whoever made the excerpt
    }


def _near_duplicate_marks(
    prior: PriorSamples, kept_ids: bytes, kept_hashes: array, kept_owners: array, max_distance: int
) -> dict[int, tuple[str, int]]:
    """Kept row position -> (sample_id of the earliest earlier sample with a near image, distance)."""
    if not kept_hashes:
        return {}
    hashes, owners = [], []
    for position, phashes in enumerate(prior.phashes):
        hashes += [int(h, 16) for h in phashes]
        owners += [position] * len(phashes)
    offset = len(prior.ordered_ids)
    hashes += kept_hashes
    owners += [offset + owner for owner in kept_owners]
    matches = earliest_near_duplicates(hashes, owners, max_distance, first_owner=offset)

    def sample_at(position: int) -> str:
        if position < offset:
            return prior.ordered_ids[position]
        start = 16 * (position - offset)
        return kept_ids[start : start + 16].hex()

    return {owner - offset: (sample_at(match), distance) for owner, (match, distance) in matches.items()}


def _copy_with_marks(spill: str, sink: RowSink, marks: dict[int, tuple[str, int]]) -> None:
    """The spilled kept rows into their sink, a batch at a time, with the near-duplicate columns filled in."""
    position = 0
    for batch in pq.ParquetFile(spill).iter_batches(batch_size=FLUSH_ROWS):
        table = pa.Table.from_batches([batch])
        rows = range(position, position + table.num_rows)
        if any(row in marks for row in rows):
            of = pa.array([marks[row][0] if row in marks else None for row in rows], pa.string())
            distance = pa.array([marks[row][1] if row in marks else None for row in rows], pa.int32())
            table = table.set_column(table.schema.get_field_index("near_duplicate_of"), "near_duplicate_of", of)
            table = table.set_column(table.schema.get_field_index("near_duplicate_distance"), "near_duplicate_distance", distance)
        sink.write(table.cast(SEED_POOL.schema))
        position += table.num_rows


# -- reading what earlier sources kept -----------------------------------------------------------


def earlier_sources(source_names: list[str], source: str) -> list[str]:
    """Sources before this one in config order: their copies of a sample win."""
    return source_names[: source_names.index(source)]


def prior_samples(store, sources: list[str]) -> PriorSamples:
    """The kept samples of these sources (in this order) from the store; unmaterialised ones are skipped."""
    rows: list[dict] = []
    for name in sources:
        table = store.read_partition("seed_pool", name, columns=["sample_id", "source", "native_id", "record_index", "image_phashes"])
        if table is not None:
            rows += sorted(table.to_pylist(), key=lambda row: row["record_index"])
    return PriorSamples.from_rows(rows)
