"""Duplicates across sources and near-duplicate images: what earlier sources kept wins."""

from __future__ import annotations

from array import array
from collections.abc import Iterable
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq

from omnithought_dagster.seed.near_dup import earliest_near_duplicates
from omnithought_dagster.seed.sinks import FLUSH_ROWS, RowSink
from omnithought_dagster.store.tables import SEED_POOL


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


def near_duplicate_marks(
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


def copy_with_marks(spill: str, sink: RowSink, marks: dict[int, tuple[str, int]]) -> None:
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
