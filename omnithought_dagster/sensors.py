"""The `source_manifests` sensor: new seed sources arrive as files, not as edits of the project file.

With `operations.source_manifests` set, seed_pool (and everything partitioned by source) is
partitioned by the dynamic partitions `sources`. Each tick the sensor
- registers the project file's sources that are not partitions yet (config order first: it
  decides which duplicate is kept), and requests their seed_pool runs;
- scans the manifest folder / S3 prefix (`manifests.py`): a manifest not seen before adds
  its partition and requests its run; a changed one (new sha256) requests a new run; an invalid
  one is logged with its reason and skipped until it changes (it is in the cursor too);
- keeps `{name: sha256}` of what it handled as its cursor. A removed manifest removes nothing:
  its partition and data stay, and the sensor says so once.
Runs carry `omnithought/trigger=source_manifests` and the manifest's path and digest as tags.

And, always, `dead_run_reaper` (pools.py): runs whose processes all died get marked failed and their pool slots freed.
"""

from __future__ import annotations

import json

import dagster as dg

from omnithought_dagster.assets.seed import seed_partitions
from omnithought_dagster.automation import TRIGGER_TAG
from omnithought_dagster.config import SOURCES_PARTITIONS, ProjectConfig
from omnithought_dagster.manifests import manifest_filesystem, scan_manifests
from omnithought_dagster.pools import free_dead_runs

SENSOR_NAME = "source_manifests"
REAPER_NAME = "dead_run_reaper"
REAPER_INTERVAL_S = 30
MANIFEST_TAG = "omnithought/manifest"


def build_manifest_sensors(config: ProjectConfig, seed_job: str) -> list[dg.SensorDefinition]:
    """The seed stage's `source_manifests` sensor, with `operations.source_manifests` set (`dead_run_reaper` is the project's)."""
    if not config.dynamic_sources:
        return []
    ops = config.operations
    partitions = seed_partitions(config)

    @dg.sensor(
        name=SENSOR_NAME,
        job_name=seed_job,
        minimum_interval_seconds=ops.manifest_sensor_interval_s,
        default_status=dg.DefaultSensorStatus.RUNNING if ops.manifest_sensor_running else dg.DefaultSensorStatus.STOPPED,
        description=f"Adds the sources that manifests in {ops.source_manifests} declare as partitions and requests their seed_pool runs.",
    )
    def source_manifests(context: dg.SensorEvaluationContext) -> dg.SensorResult:
        seen: dict[str, str] = json.loads(context.cursor) if context.cursor else {}
        registered = set(context.instance.get_dynamic_partitions(SOURCES_PARTITIONS))
        new_partitions: list[str] = []
        requests: list[dg.RunRequest] = []

        for name in config.source_names:
            if name not in registered:
                new_partitions.append(name)
                requests.append(dg.RunRequest(run_key=f"config:{name}", partition_key=name, tags={TRIGGER_TAG: SENSOR_NAME}))

        fs, folder = manifest_filesystem(config)  # S3 keys: the env vars the store config names
        found = scan_manifests(config, fs, folder)
        for manifest in found:
            if seen.get(manifest.name) == manifest.digest:
                continue
            seen[manifest.name] = manifest.digest
            if manifest.source is None:
                context.log.warning(f"manifest skipped: {manifest.error}")
                continue
            if manifest.name not in registered and manifest.name not in new_partitions:
                new_partitions.append(manifest.name)
            requests.append(
                dg.RunRequest(
                    run_key=f"manifest:{manifest.name}:{manifest.digest[:16]}",
                    partition_key=manifest.name,
                    tags={TRIGGER_TAG: SENSOR_NAME, MANIFEST_TAG: manifest.uri, f"{MANIFEST_TAG}_sha256": manifest.digest},
                )
            )
            context.log.info(f"manifest {manifest.uri}: source {manifest.name!r} ({manifest.source.kind}) -> seed_pool run requested")
        present = {m.name for m in found}
        for gone in sorted(set(seen) - present):
            context.log.info(f"manifest of {gone!r} was removed: its partition and data stay (delete them in the UI if meant)")
            del seen[gone]

        cursor = json.dumps(seen, sort_keys=True)
        if not requests and not new_partitions:
            return dg.SensorResult(skip_reason=f"no new or changed manifests in {ops.source_manifests} ({len(found)} seen)", cursor=cursor)
        return dg.SensorResult(
            run_requests=requests,
            dynamic_partitions_requests=[partitions.build_add_request(new_partitions)] if new_partitions else [],
            cursor=cursor,
        )

    return [source_manifests]


@dg.sensor(
    name=REAPER_NAME,
    minimum_interval_seconds=REAPER_INTERVAL_S,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Where the daemon runs: marks runs of this machine whose every process died as failed and frees their "
    "pool slots (a run that starts, or a step waiting for a slot, does the same).",
)
def dead_run_reaper(context: dg.SensorEvaluationContext) -> dg.SkipReason:
    freed = free_dead_runs(context.instance, context.log)
    if not freed:
        return dg.SkipReason("no dead runs hold pool slots")
    return dg.SkipReason("; ".join(f"run {item.run_id}: {item.reason}, {item.slots} pool slot(s) freed" for item in freed))
