"""The files the pipeline reads that no asset writes, as observable source assets: Dagster records their data
versions, so a seed file or benchmark edited in place makes what read it stale (unsynced) in the UI.

- `seed_sources`, one partition per source: a source's data version is the reader's fingerprint of it (file sizes and
  mtimes, generator settings) chained with those of the sources before it in deduplication order - a sample an earlier
  source keeps is a duplicate here, so an edited earlier source changes this one's seed_pool too.
- `benchmark_items`: the fingerprints of the benchmarks decontamination and evaluation read.

They are observed by their `observe_*` job (the UI's "Observe sources" button runs the same function), by Dagster's
automation on `operations.observe_cron` (and at once when never observed: an unobserved input counts as a missing upstream,
which eager automation waits for), and by the demo before the stage that reads them; the nightly re-curation re-runs
filtered_set whatever was observed, a safety net.
"""

from __future__ import annotations

import dagster as dg

from omnithought_dagster.config import SOURCES_PARTITIONS, ProjectConfig
from omnithought_dagster.ids import content_id
from omnithought_dagster.resources import CorpusStoreResource, ProjectResource
from omnithought_dagster.seed.sources import make_reader

SEED_SOURCES_KEY = dg.AssetKey("seed_sources")
BENCHMARK_ITEMS_KEY = dg.AssetKey("benchmark_items")


def observe_job_name(key: dg.AssetKey) -> str:
    """The job that observes an input (one per observable source asset: their partitions differ)."""
    return f"observe_{key.to_python_identifier()}"


def reader_fingerprint(spec) -> str:
    """The reader's fingerprint of a source or benchmark; one that cannot be opened gets a version naming why, so its readers
    stay stale (and their next run says why) until it opens."""
    try:
        return make_reader(spec).fingerprint()
    except Exception as exc:  # noqa: BLE001 - any failure to open is the input's state, reported by the step that reads it
        return f"unreadable: {type(exc).__name__}: {exc}"


def chained_versions(fingerprints: list[tuple[str, str]]) -> dict[str, str]:
    """Each source's data version: its fingerprint and those of every source before it, in order."""
    return {name: content_id("seed-source", fingerprints[: i + 1]) for i, (name, _) in enumerate(fingerprints)}


def source_order(config: ProjectConfig, instance: dg.DagsterInstance | None) -> list[str]:
    """Every source in deduplication order: the project file's, then manifest sources in the order they were added."""
    if not config.dynamic_sources or instance is None:
        return config.source_names
    return config.source_names + [n for n in instance.get_dynamic_partitions(SOURCES_PARTITIONS) if n not in config.source_names]


def seed_source_versions(config: ProjectConfig, store: CorpusStoreResource, order: list[str]) -> dict[str, str]:
    """The data version of every source in deduplication order (a manifest source's spec is read from its manifest)."""
    fingerprints = []
    for name in order:
        try:
            spec = store.source(config, name)
        except Exception as exc:  # noqa: BLE001 - a manifest that cannot be read: the seed step fails saying why
            fingerprints.append((name, f"unreadable: {type(exc).__name__}: {exc}"))
            continue
        fingerprints.append((name, reader_fingerprint(spec)))
    return chained_versions(fingerprints)


def benchmark_names(config: ProjectConfig) -> list[str]:
    """The benchmarks some stage reads: decontamination's, then evaluation's."""
    names = [*config.curation.decontamination.benchmarks, *config.evaluation.benchmarks]
    return list(dict.fromkeys(names))


def benchmark_items_version(config: ProjectConfig) -> str:
    return content_id("benchmark-items", {name: reader_fingerprint(config.benchmark(name)) for name in benchmark_names(config)})


def observe_condition(config: ProjectConfig) -> dg.AutomationCondition:
    """Observed on `operations.observe_cron` and as soon as automation is on when never observed: a reader of an input never
    observed counts it missing, and eager automation waits for missing upstreams."""
    never = dg.AutomationCondition.missing()
    tick = dg.AutomationCondition.cron_tick_passed(config.operations.observe_cron, config.operations.timezone)
    return ((never | tick) & ~dg.AutomationCondition.in_progress()).with_label("never observed, or the observe_cron tick")


def build_seed_sources(config: ProjectConfig, partitions: dg.PartitionsDefinition, group: str) -> dg.SourceAsset:
    @dg.observable_source_asset(
        key=SEED_SOURCES_KEY,
        partitions_def=partitions,
        group_name=group,
        automation_condition=observe_condition(config),
        description="The seed source files as their readers see them: one data version per source (see assets/inputs.py).",
    )
    def seed_sources(context, project: ProjectResource, store: CorpusStoreResource) -> dg.DataVersionsByPartition:
        cfg = project.config
        versions = seed_source_versions(cfg, store, source_order(cfg, context.instance))
        return dg.DataVersionsByPartition({name: dg.DataVersion(version) for name, version in versions.items()})

    return seed_sources


def build_benchmark_items(config: ProjectConfig, group: str) -> list[dg.SourceAsset]:
    if not benchmark_names(config):
        return []

    @dg.observable_source_asset(
        key=BENCHMARK_ITEMS_KEY,
        group_name=group,
        automation_condition=observe_condition(config),
        description="The benchmark files decontamination and evaluation read, as their readers see them.",
    )
    def benchmark_items(project: ProjectResource) -> dg.DataVersion:
        return dg.DataVersion(benchmark_items_version(project.config))

    return [benchmark_items]
