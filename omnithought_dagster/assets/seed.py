"""seed_pool (with its quarantine and images tables): one partition per configured source."""

import contextlib
import time
from typing import Any

import dagster as dg
import pyarrow as pa

from omnithought_dagster.assets.inputs import SEED_SOURCES_KEY, build_seed_sources, source_order
from omnithought_dagster.assets.metadata import bar_plot, column_schema, counts, preview
from omnithought_dagster.config import SOURCES_PARTITIONS, ProjectConfig
from omnithought_dagster.ids import code_version, version_of
from omnithought_dagster.progress import progress_line
from omnithought_dagster.resources import CorpusStoreResource, ProjectResource
from omnithought_dagster.seed.dedup import earlier_sources, prior_samples
from omnithought_dagster.seed.ingest import ingest_source_into
from omnithought_dagster.seed.parallel import ingest_workers
from omnithought_dagster.seed.sinks import SeedSinks
from omnithought_dagster.seed.sources import make_reader
from omnithought_dagster.seed.sources.confine import source_roots
from omnithought_dagster.seed.sources.recount import raw_record_count
from omnithought_dagster.store import CorpusStore, table_spec
from omnithought_dagster.store.tables import QUARANTINE, SEED_POOL

SEED_GROUP = "seed"
SEED_POOL_KEY = dg.AssetKey("seed_pool")
QUARANTINE_KEY = dg.AssetKey("quarantine")
IMAGES_KEY = dg.AssetKey("images")
# Bump when ingestion would produce different rows from the same input.
SEED_CODE_VERSION = "seed-v3"
PREVIEW_COLUMNS = ["sample_id", "native_id", "question", "answer", "answer_type", "source_tags"]


def seed_partitions(config: ProjectConfig) -> dg.PartitionsDefinition:
    """One partition per source: the project file's (static), or - with `operations.source_manifests`
    set - the dynamic partitions `sources`, which the source_manifests sensor fills."""
    if config.dynamic_sources:
        return dg.DynamicPartitionsDefinition(name=SOURCES_PARTITIONS)
    return dg.StaticPartitionsDefinition(config.source_names)


def seed_settings(config: ProjectConfig) -> dict:
    """The project file's settings that change seed_pool (its code version hashes them)."""
    return {"seed": config.seed.output_settings()}


def build_seed_assets(config: ProjectConfig) -> list[dg.AssetsDefinition]:
    partitions = seed_partitions(config)
    version = code_version(SEED_CODE_VERSION, seed_settings(config))

    @dg.multi_asset(
        name="ingest_seed_source",
        partitions_def=partitions,
        group_name=SEED_GROUP,
        specs=[
            _table_asset(
                SEED_POOL_KEY, "Normalised multimodal questions (images + question + reference answer), one partition per source.", version
            ),
            _table_asset(QUARANTINE_KEY, "Seed records set aside with a reason code and detail: rows read = kept + quarantined.", version),
            _table_asset(IMAGES_KEY, "The content-addressed image store (bytes under their hash) and one metadata row per image.", version),
        ],
    )
    def ingest_seed_source(context: dg.AssetExecutionContext, project: ProjectResource, store: CorpusStoreResource):
        """Read one source, validate and deduplicate it, store its images, write its three tables."""
        config = project.config
        source_name = context.partition_key
        try:
            source = store.source(config, source_name)
        except KeyError as exc:
            raise dg.Failure(description=str(exc.args[0])) from exc
        names = source_order(config, context.instance)
        try:
            reader = make_reader(source)
        except FileNotFoundError as exc:
            raise dg.Failure(description=f"source {source_name!r}: {exc}") from exc
        except (OSError, ValueError, KeyError, TypeError) as exc:  # a dataset_dict.json / state.json that does not parse, ...
            raise dg.Failure(
                description=f"source {source_name!r} cannot be opened ({getattr(source, 'path', '')}): {type(exc).__name__}: {exc}"
            ) from exc
        corpus = store.open()
        swept = corpus.images.sweep_temporaries()
        if swept:
            context.log.info(f"removed {swept} temporary image files that killed writers left behind")
        earlier = earlier_sources(names, source_name)
        total = raw_record_count(source, reader)
        workers = ingest_workers(config.seed, total)
        context.log.info(
            f"{source_name}: reading {total} records ({source.kind}), checked in {workers} process{'es' if workers > 1 else ''}"
        )
        started = time.monotonic()

        # Rows stream into the three partitions as they are checked. They commit images first, seed_pool last
        # (ExitStack exits in reverse): a reader of seed_pool never sees an id whose image or quarantine siblings
        # are not written yet, and a failed or killed step leaves the old partitions as they were.
        with contextlib.ExitStack() as partitions:
            seed_out = partitions.enter_context(corpus.partition_writer("seed_pool", source_name))
            quarantine_out = partitions.enter_context(corpus.partition_writer("quarantine", source_name))
            images_out = partitions.enter_context(corpus.partition_writer("images", source_name))
            result = ingest_source_into(
                source_name,
                reader.records(),
                config.seed,
                image_root=reader.image_root,
                allowed_roots=getattr(source, "allowed_image_roots", []),
                read_roots=source_roots(source),  # a manifest's source: its images lie inside its granted folders too
                put_image=corpus.images.put,
                sinks=SeedSinks(seed_out, quarantine_out, images_out),
                prior=prior_samples(corpus, earlier),
                progress=lambda done: context.log.info(progress_line(source_name, done, total, time.monotonic() - started, "records")),
                workers=workers,
            )
        for note in result.notes:
            context.log.warning(f"{source_name}: {note}")
        seed_written, quarantine_written, images_written = seed_out.written, quarantine_out.written, images_out.written
        kept_ids = corpus.read_partition("seed_pool", source_name, columns=["sample_id"]).column("sample_id").to_pylist()
        image_ids = corpus.read_partition("images", source_name, columns=["image_id"]).column("image_id").to_pylist()

        later_conflicts = _later_conflicts(corpus, names, source_name, set(kept_ids))
        for other, n in later_conflicts.items():
            context.log.warning(
                f"{n} samples kept here are also kept by the later source {other!r}; re-materialise seed_pool[{other}] "
                "so it quarantines them as duplicates"
            )

        yield dg.MaterializeResult(
            asset_key=IMAGES_KEY,
            metadata={
                "dagster/row_count": len(image_ids),
                "images_stored": result.images_stored,
                "images_already_in_store": result.images_reused,
                "path": dg.MetadataValue.path(images_written.uri),
            },
            data_version=dg.DataVersion(version_of(image_ids)),
        )
        yield dg.MaterializeResult(
            asset_key=QUARANTINE_KEY,
            metadata={
                "dagster/row_count": result.rows_quarantined,
                "by_reason": counts(result.reasons, "reason"),
                **(
                    {"plot/quarantine_reasons": bar_plot(result.reasons, "records set aside at ingestion, by reason", "records")}
                    if result.reasons
                    else {}
                ),
                **{f"reason/{reason}": n for reason, n in sorted(result.reasons.items())},
                "preview": preview(
                    pa.Table.from_pylist(result.quarantine_head, schema=QUARANTINE.schema),
                    ["record_index", "turn", "native_id", "reason", "detail"],
                ),
                "path": dg.MetadataValue.path(quarantine_written.uri),
            },
        )
        yield dg.MaterializeResult(
            asset_key=SEED_POOL_KEY,
            metadata={
                "dagster/row_count": result.rows_kept,
                "records_read": result.records_read,
                "rows_read": result.rows_read,
                "rows_kept": result.rows_kept,
                "rows_quarantined": result.rows_quarantined,
                "accounting": f"{result.rows_read} read = {result.rows_kept} kept + {result.rows_quarantined} quarantined"
                + (f" (from {result.records_read} records split into turns)" if result.rows_read != result.records_read else ""),
                "workers": result.workers,
                "records_per_s": round(result.rows_read / max(time.monotonic() - started, 1e-9), 1),
                "quarantined_by_reason": counts(result.reasons, "reason"),
                "near_duplicates_marked": result.near_duplicates,
                "answer_types": counts(result.answer_types, "answer_type"),
                "source_tags": counts(result.source_tags, "tag"),
                "preview": preview(pa.Table.from_pylist(result.kept_head, schema=SEED_POOL.schema), PREVIEW_COLUMNS),
                "path": dg.MetadataValue.path(seed_written.uri),
                "parquet_bytes": seed_written.bytes,
                "later_source_conflicts": dg.MetadataValue.json(later_conflicts),
            },
            data_version=dg.DataVersion(version_of(kept_ids)),
        )

    return [build_seed_sources(config, partitions, SEED_GROUP), ingest_seed_source]


def _table_asset(key: dg.AssetKey, description: str, version: str) -> dg.AssetSpec:
    """An asset backed by a store table of the same name, its schema shown in the UI."""
    table = key.to_user_string()
    return dg.AssetSpec(
        key,
        description=description,
        kinds={"parquet", "duckdb"},
        code_version=version,
        deps=[SEED_SOURCES_KEY],  # the files it reads (observed: assets/inputs.py)
        metadata={"dagster/column_schema": column_schema(table_spec(table)), "table": table},
        tags={"stage": "seed", "compute": "cpu"},
    )


def _later_conflicts(corpus, source_names: list[str], source: str, kept_ids: set[str]) -> dict[str, int]:
    """Later sources already holding samples this one now keeps (they materialised first)."""
    conflicts = {}
    for other in source_names[source_names.index(source) + 1 :]:
        table = corpus.read_partition("seed_pool", other, columns=["sample_id"])
        if table is not None:
            n = len(kept_ids & set(table.column("sample_id").to_pylist()))
            if n:
                conflicts[other] = n
    return conflicts


# -- the demo's view of the stage: its summary line ------------------------


def seed_summary(store: CorpusStore, source: str, metadata: dict) -> dict[str, Any]:
    con = store.catalog(["seed_pool", "quarantine"])
    kept, near = con.execute("SELECT count(*), count(near_duplicate_of) FROM seed_pool WHERE source = $1", [source]).fetchall()[0]
    reasons = dict(
        con.execute("SELECT reason, count(*) FROM quarantine WHERE source = $1 GROUP BY 1 ORDER BY 2 DESC, 1", [source]).fetchall()
    )
    dropped = sum(reasons.values())
    return {
        "input": kept + dropped,
        "output": kept,
        "flagged": dropped,
        "reasons": reasons,
        "detail": f"{near} near-duplicate images marked",
    }
