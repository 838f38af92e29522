"""`omnithought demo`: materialise every stage that exists, in order, on the configured instance.

Runs go through the real Dagster instance ($DAGSTER_HOME), so `make ui` shows them: the same
jobs, checks and metadata a user launches from the UI. A partition whose inputs did not
change since its last successful materialisation (same input fingerprint, data still in the
store, checks passed) is skipped, which makes a second `make demo` fast.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import dagster as dg

from omnithought_dagster.assets.seed import SEED_CODE_VERSION, SEED_POOL_KEY
from omnithought_dagster.config import ProjectConfig
from omnithought_dagster.curation.seed import earlier_sources, input_fingerprint, partition_version
from omnithought_dagster.defs import SEED_JOB, build_definitions
from omnithought_dagster.sources import make_reader
from omnithought_dagster.store import CorpusStore

QUIET_RUN_CONFIG = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}


@dataclass
class StageOutcome:
    stage: str
    partition: str
    skipped: bool
    success: bool
    counts: dict[str, Any] = field(default_factory=dict)
    checks: dict[str, bool] = field(default_factory=dict)
    run_id: str | None = None


def run_demo(config: ProjectConfig, instance: dg.DagsterInstance, force: bool = False) -> list[StageOutcome]:
    defs = build_definitions(config)
    store = CorpusStore(config.store.root)
    outcomes = []
    job = defs.resolve_job_def(SEED_JOB)
    check_keys = [key for key in defs.resolve_asset_graph().asset_check_keys]
    for source in config.source_names:
        fingerprint = input_fingerprint(
            make_reader(config.source(source)).fingerprint(),
            config.seed,
            {name: partition_version(store, name) for name in earlier_sources(config.source_names, source)},
            SEED_CODE_VERSION,
        )
        checks = _latest_checks(instance, check_keys, source)
        if not force and _up_to_date(instance, store, source, fingerprint) and checks and all(checks.values()):
            outcomes.append(StageOutcome("seed_pool", source, True, True, _seed_counts(store, source), checks))
            continue
        result = job.execute_in_process(partition_key=source, instance=instance, raise_on_error=False, run_config=QUIET_RUN_CONFIG)
        checks = {
            f"{e.event_specific_data.asset_key.to_user_string()}:{e.event_specific_data.check_name}": e.event_specific_data.passed
            for e in result.all_events
            if e.event_type_value == "ASSET_CHECK_EVALUATION"
        }
        counts = _seed_counts(store, source) if result.success or store.has_partition("seed_pool", source) else {}
        if not result.success:
            failure = next((e for e in result.all_events if e.event_type_value == "STEP_FAILURE"), None)
            if failure is not None:
                counts["error"] = failure.event_specific_data.error.message.strip().splitlines()[0]
        outcomes.append(StageOutcome("seed_pool", source, False, result.success, counts, checks, result.run_id))
    return outcomes


def _up_to_date(instance: dg.DagsterInstance, store: CorpusStore, source: str, fingerprint: str) -> bool:
    if not store.has_partition("seed_pool", source):
        return False
    records = instance.fetch_materializations(dg.AssetRecordsFilter(asset_key=SEED_POOL_KEY, asset_partitions=[source]), limit=1).records
    if not records:
        return False
    materialization = records[0].asset_materialization
    recorded = materialization.metadata.get("input_fingerprint") if materialization else None
    return recorded is not None and recorded.value == fingerprint


def _latest_checks(instance: dg.DagsterInstance, check_keys, partition: str) -> dict[str, bool]:
    from dagster._core.event_api import PartitionKeyFilter
    from dagster._core.storage.asset_check_execution_record import AssetCheckExecutionRecordStatus

    latest = instance.event_log_storage.get_latest_asset_check_execution_by_key(list(check_keys), partition_filter=PartitionKeyFilter(key=partition))
    return {
        f"{key.asset_key.to_user_string()}:{key.name}": record.status == AssetCheckExecutionRecordStatus.SUCCEEDED
        for key, record in latest.items()
    }


def _seed_counts(store: CorpusStore, source: str) -> dict[str, Any]:
    con = store.catalog(["seed_pool", "quarantine", "images"])
    kept, near = con.execute(
        "SELECT count(*), count(near_duplicate_of) FROM seed_pool WHERE source = $1", [source]
    ).fetchone()
    reasons = dict(con.execute("SELECT reason, count(*) FROM quarantine WHERE source = $1 GROUP BY 1 ORDER BY 2 DESC, 1", [source]).fetchall())
    images = con.execute("SELECT count(*) FROM images WHERE source = $1", [source]).fetchone()[0]
    quarantined = sum(reasons.values())
    return {"read": kept + quarantined, "kept": kept, "quarantined": quarantined, "reasons": reasons, "images": images, "near_duplicates": near}
