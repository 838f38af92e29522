"""Asset checks on seed_pool and quarantine, per source partition.

Each check re-reads what the store holds (never the materialisation's own counters), so it
can be re-run from the UI at any time and fails on data damaged after the fact. Column-level
rules go through Great Expectations (`checks.gx`); DuckDB computes the cross-partition facts.
"""

import dagster as dg
import pandas as pd

from omnithought_dagster.assets.seed import QUARANTINE_KEY, SEED_POOL_KEY, seed_partitions
from omnithought_dagster.checks.gx import Expect, gx_check_result
from omnithought_dagster.config import ProjectConfig
from omnithought_dagster.ids import ID_PATTERN
from omnithought_dagster.resources import CorpusStoreResource, ProjectResource
from omnithought_dagster.seed.answers import ANSWER_TYPES, LETTERS
from omnithought_dagster.seed.sources import QuarantineReason, make_reader
from omnithought_dagster.seed.sources.recount import raw_record_count
from omnithought_dagster.store import table_spec

SAMPLE_ID_UNIQUE = "sample_id_unique"
REQUIRED_COLUMNS = "required_columns_present"
ANSWER_TYPE_VALID = "answer_type_valid"
IMAGES_IN_STORE = "images_in_store"
ROW_ACCOUNTING = "row_accounting"
REASONS_KNOWN = "reasons_known"


def build_seed_checks(config: ProjectConfig) -> list[dg.AssetChecksDefinition]:
    partitions = seed_partitions(config)

    @dg.asset_check(asset=SEED_POOL_KEY, name=SAMPLE_ID_UNIQUE, partitions_def=partitions, blocking=True)
    def sample_id_unique(context: dg.AssetCheckExecutionContext, store: CorpusStoreResource) -> dg.AssetCheckResult:
        """sample_id is unique within the source and appears in no other source's partition."""
        corpus = store.open()
        kept = _partition_or_fail(corpus, "seed_pool", context.partition_key, ["sample_id"])
        if isinstance(kept, dg.AssetCheckResult):
            return kept
        frame = kept.to_pandas()
        con = corpus.catalog(["seed_pool"])
        elsewhere = dict(
            con.execute(
                "SELECT sample_id, count(DISTINCT source) FROM seed_pool WHERE source <> $source AND sample_id IN "
                "(SELECT sample_id FROM seed_pool WHERE source = $source) GROUP BY sample_id",
                {"source": context.partition_key},
            ).fetchall()
        )
        frame["other_sources"] = frame["sample_id"].map(elsewhere).fillna(0).astype(int)
        return gx_check_result(
            frame,
            [
                Expect("expect_column_values_to_be_unique", column="sample_id"),
                Expect("expect_column_values_to_be_between", column="other_sources", min_value=0, max_value=0),
            ],
            extra_metadata={"in_other_sources": len(elsewhere)},
        )

    @dg.asset_check(asset=SEED_POOL_KEY, name=REQUIRED_COLUMNS, partitions_def=partitions, blocking=True)
    def required_columns_present(
        context: dg.AssetCheckExecutionContext, store: CorpusStoreResource, project: ProjectResource
    ) -> dg.AssetCheckResult:
        """Required columns have no nulls; ids are well-formed; question, answer and images are non-empty."""
        spec = table_spec("seed_pool")
        kept = _partition_or_fail(store.open(), "seed_pool", context.partition_key)
        if isinstance(kept, dg.AssetCheckResult):
            return kept
        scalar = [c.name for c in spec.columns if not c.nullable and c.name not in ("image_ids", "image_phashes", "choices", "source_tags")]
        frame = kept.select(scalar).to_pandas()
        frame["n_images"] = [len(ids) if ids is not None else None for ids in kept.column("image_ids").to_pylist()]
        min_images = 1 if project.config.seed.require_image else 0
        expectations = [Expect("expect_column_values_to_not_be_null", column=c) for c in [*scalar, "n_images"]]
        expectations += [
            Expect("expect_column_values_to_match_regex", column="sample_id", regex=ID_PATTERN.pattern),
            Expect("expect_column_value_lengths_to_be_between", column="question", min_value=1),
            Expect("expect_column_value_lengths_to_be_between", column="answer", min_value=1),
            Expect("expect_column_values_to_be_between", column="n_images", min_value=min_images),
        ]
        return gx_check_result(frame, expectations)

    @dg.asset_check(asset=SEED_POOL_KEY, name=ANSWER_TYPE_VALID, partitions_def=partitions, blocking=True)
    def answer_type_valid(context: dg.AssetCheckExecutionContext, store: CorpusStoreResource) -> dg.AssetCheckResult:
        """answer_type is in the allowed set, and every multiple-choice answer names one of its options."""
        kept = _partition_or_fail(store.open(), "seed_pool", context.partition_key, ["sample_id", "answer", "answer_type", "choices"])
        if isinstance(kept, dg.AssetCheckResult):
            return kept
        rows = kept.to_pylist()
        frame = pd.DataFrame(
            {
                "answer_type": [r["answer_type"] for r in rows],
                "choice_answer_ok": [_choice_answer_ok(r) for r in rows],
            }
        )
        return gx_check_result(
            frame,
            [
                Expect("expect_column_values_to_be_in_set", column="answer_type", value_set=list(ANSWER_TYPES)),
                Expect("expect_column_values_to_be_in_set", column="choice_answer_ok", value_set=[True]),
            ],
        )

    @dg.asset_check(asset=SEED_POOL_KEY, name=IMAGES_IN_STORE, partitions_def=partitions, blocking=True)
    def images_in_store(context: dg.AssetCheckExecutionContext, store: CorpusStoreResource) -> dg.AssetCheckResult:
        """Every image_id a sample names is an object in the image store and a row of the images table."""
        corpus = store.open()
        kept = _partition_or_fail(corpus, "seed_pool", context.partition_key, ["image_ids"])
        if isinstance(kept, dg.AssetCheckResult):
            return kept
        image_ids = sorted({i for ids in kept.column("image_ids").to_pylist() for i in ids})
        stored = corpus.images.ids()
        described = corpus.read_partition("images", context.partition_key, ["image_id"])
        described_ids = set(described.column("image_id").to_pylist()) if described is not None else set()
        frame = pd.DataFrame(
            {
                "image_id": image_ids,
                "in_store": [i in stored for i in image_ids],
                "in_images_table": [i in described_ids for i in image_ids],
            }
        )
        return gx_check_result(
            frame,
            [
                Expect("expect_column_values_to_be_in_set", column="in_store", value_set=[True]),
                Expect("expect_column_values_to_be_in_set", column="in_images_table", value_set=[True]),
            ],
            extra_metadata={
                "distinct_images": len(image_ids),
                "missing_from_store": [i for i in image_ids if i not in stored][:10],
            },
        )

    @dg.asset_check(asset=SEED_POOL_KEY, name=ROW_ACCOUNTING, partitions_def=partitions, blocking=True)
    def row_accounting(context: dg.AssetCheckExecutionContext, store: CorpusStoreResource, project: ProjectResource) -> dg.AssetCheckResult:
        """Records in the source (counted again now, without the readers' parsing: sources/recount.py) are each accounted
        for by rows kept + rows quarantined: every record index once - or, for a conversation split into turns, once
        per turn - and none missing or out of range."""
        corpus = store.open()
        source = context.partition_key
        source_config = store.source(project.config, source)
        read = raw_record_count(source_config, make_reader(source_config))
        rows = [
            table.select(["record_index", "turn"]).to_pylist()
            for table in (corpus.read_partition("seed_pool", source), corpus.read_partition("quarantine", source))
            if table is not None
        ]
        keys = [(row["record_index"], row["turn"]) for part in rows for row in part]
        accounted = {index for index, _ in keys}
        counted_twice = len(keys) - len(set(keys))
        never_accounted = len(set(range(read)) - accounted)
        out_of_range = len(accounted - set(range(read)))
        n_kept, n_quarantined = (len(rows[0]), len(rows[1])) if len(rows) == 2 else (0, 0)
        passed = len(accounted) == read and counted_twice == 0 and never_accounted == 0 and out_of_range == 0
        return dg.AssetCheckResult(
            passed=passed,
            metadata={
                "read": read,
                "kept": n_kept,
                "quarantined": n_quarantined,
                "records_accounted": len(accounted),
                "unaccounted": read - len(accounted),
                "turn_rows_beyond_one_per_record": len(set(keys)) - len(accounted),
                "records_counted_twice": counted_twice,
                "records_never_accounted": never_accounted,
                "record_indices_out_of_range": out_of_range,
            },
            description=None
            if passed
            else (
                f"source has {read} records; the store accounts for {len(accounted)} of them ({n_kept} kept + {n_quarantined} "
                f"quarantined rows), {counted_twice} rows twice, misses {never_accounted} and names {out_of_range} that do not exist"
            ),
        )

    @dg.asset_check(asset=QUARANTINE_KEY, name=REASONS_KNOWN, partitions_def=partitions, blocking=True)
    def reasons_known(context: dg.AssetCheckExecutionContext, store: CorpusStoreResource) -> dg.AssetCheckResult:
        """Every quarantine row has a known reason code and a non-empty detail."""
        quarantined = _partition_or_fail(store.open(), "quarantine", context.partition_key, ["reason", "detail"])
        if isinstance(quarantined, dg.AssetCheckResult):
            return quarantined
        return gx_check_result(
            quarantined.to_pandas(),
            [
                Expect("expect_column_values_to_be_in_set", column="reason", value_set=[r.value for r in QuarantineReason]),
                Expect("expect_column_value_lengths_to_be_between", column="detail", min_value=1),
            ],
        )

    return [sample_id_unique, required_columns_present, answer_type_valid, images_in_store, row_accounting, reasons_known]


def _partition_or_fail(corpus, table: str, partition: str, columns: list[str] | None = None):
    data = corpus.read_partition(table, partition, columns)
    if data is None:
        return dg.AssetCheckResult(passed=False, description=f"{table}[{partition}] is not in the store: materialise it first")
    return data


def _choice_answer_ok(row: dict) -> bool:
    if row["answer_type"] != "multiple_choice":
        return True
    choices = row["choices"] or []
    return len(choices) >= 2 and row["answer"] in LETTERS[: len(choices)]
