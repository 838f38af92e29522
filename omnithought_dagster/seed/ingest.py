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

import os
import tempfile
from array import array
from collections import Counter
from collections.abc import Callable, Iterable
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from omnithought_dagster.seed.dedup import PriorSamples, copy_with_marks, near_duplicate_marks
from omnithought_dagster.seed.parallel import checked_records
from omnithought_dagster.seed.settings import SeedSettings
from omnithought_dagster.seed.sinks import Batcher, SeedSinks, TableSink
from omnithought_dagster.seed.sources.base import (
    QuarantineReason,
    SeedRecord,
)
from omnithought_dagster.seed.validate import Context, SetAside, quarantine_row
from omnithought_dagster.store.tables import IMAGES, QUARANTINE, SEED_POOL

PREVIEW_ROWS = 10


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
    context = Context(source, settings, image_root, [Path(root) for root in allowed_roots], read_roots)
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
        kept_out = Batcher(spill.write_table if spill is not None else sinks.kept.write, SEED_POOL)
        quarantine_out, images_out = Batcher(sinks.quarantine.write, QUARANTINE), Batcher(sinks.images.write, IMAGES)

        def set_aside(
            record: SeedRecord, reason: QuarantineReason, detail: str, sample: str | None = None, first: str | None = None
        ) -> None:
            nonlocal rows_quarantined
            row = quarantine_row(source, record, reason, detail, sample, first)
            quarantine_out.add(row)
            rows_quarantined += 1
            reasons[row["reason"]] += 1
            if len(quarantine_head) < PREVIEW_ROWS:
                quarantine_head.append(row)

        with closing(checked_records(records, context, workers, notes, put_image)) as checked:
            for record, outcome in checked:
                rows_read += 1
                if record.record_index != last_index:
                    records_read, last_index = records_read + 1, record.record_index
                if progress is not None and rows_read % 1000 == 0:
                    progress(records_read)
                if isinstance(outcome, SetAside):
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
            marks = near_duplicate_marks(prior, kept_ids, kept_hashes, kept_owners, settings.near_duplicate_max_distance)
            near = len(marks)
            copy_with_marks(os.path.join(scratch, "kept.parquet"), sinks.kept, marks)
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
