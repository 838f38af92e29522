"""The source_manifests sensor: manifests dropped into a folder become dynamic partitions and seed_pool runs.

Evaluated with Dagster's sensor test context over a real instance, and the runs it requests are
executed; the S3-prefix variant is in test_s3.py.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime

import dagster as dg
import pytest
import yaml

from omnithought_dagster.assets.seed import SOURCES_PARTITIONS
from omnithought_dagster.automation import RECURATION_SCHEDULE, TRIGGER_TAG
from omnithought_dagster.config import ConfigError, load_config
from omnithought_dagster.defs import SEED_JOB, build_definitions
from omnithought_dagster.sensors import MANIFEST_TAG, SENSOR_NAME
from omnithought_dagster.store import CorpusStore

from conftest import check_evaluations, materializations, write_config


def _project(tmp_path, sources=None, **operations):
    path = write_config(
        tmp_path,
        sources if sources is not None else [{"name": "synthetic", "kind": "synthetic", "n_samples": 6}],
        operations={"source_manifests": "manifests", **operations},
    )
    return load_config(path)


def _manifest(tmp_path, name: str, body) -> None:
    folder = tmp_path / "manifests"
    folder.mkdir(exist_ok=True)
    (folder / name).write_text(body if isinstance(body, str) else yaml.safe_dump(body))


def _tick(defs, instance, cursor=None) -> dg.SensorResult:
    sensor = defs.resolve_sensor_def(SENSOR_NAME)
    with dg.build_sensor_context(instance=instance, cursor=cursor, definitions=defs) as context:
        return sensor(context)


def _apply_and_run(defs, instance, result) -> dict[str, dg.ExecuteInProcessResult]:
    """What the daemon does with a tick: add the partitions, then launch the requested runs."""
    for request in result.dynamic_partitions_requests:
        instance.add_dynamic_partitions(request.partitions_def_name, list(request.partition_keys))
    job = defs.resolve_job_def(SEED_JOB)
    return {
        r.partition_key: job.execute_in_process(partition_key=r.partition_key, instance=instance, tags=r.tags, raise_on_error=False)
        for r in result.run_requests
    }


def test_manifests_become_partitions_and_seed_runs_changed_ones_rerun(tmp_path, instance):
    config = _project(tmp_path)
    _manifest(tmp_path, "extra.yaml", {"kind": "synthetic", "n_samples": 5, "seed": 3, "start_index": 500})
    _manifest(tmp_path, "broken.yaml", {"kind": "nope"})
    _manifest(tmp_path, "synthetic.json", json.dumps({"kind": "synthetic"}))  # cannot replace a project-file source
    _manifest(tmp_path, "notes.txt", "not a manifest")
    defs = build_definitions(config)
    sensor = defs.resolve_sensor_def(SENSOR_NAME)
    assert sensor.job_name == SEED_JOB and sensor.default_status == dg.DefaultSensorStatus.STOPPED

    first = _tick(defs, instance)
    # The project file's source first (config order decides which duplicate is kept), then the manifest's.
    (add,) = first.dynamic_partitions_requests
    assert add.partitions_def_name == SOURCES_PARTITIONS and list(add.partition_keys) == ["synthetic", "extra"]
    assert [r.partition_key for r in first.run_requests] == ["synthetic", "extra"]
    extra_request = first.run_requests[1]
    assert extra_request.tags[TRIGGER_TAG] == SENSOR_NAME and extra_request.tags[MANIFEST_TAG].endswith("manifests/extra.yaml")
    # invalid manifests are remembered (skipped until they change), never requested
    assert set(json.loads(first.cursor)) == {"extra", "broken", "synthetic"}

    runs = _apply_and_run(defs, instance, first)
    assert all(run.success for run in runs.values())
    assert all(c.passed for c in check_evaluations(runs["extra"]).values())
    assert materializations(runs["extra"])["seed_pool"]["rows_read"] == 5
    assert instance.get_dynamic_partitions(SOURCES_PARTITIONS) == ["synthetic", "extra"]
    store = CorpusStore(config.store.root)
    assert store.catalog().execute("SELECT source, count(*) FROM seed_pool GROUP BY 1 ORDER BY 1").fetchall() == [
        ("extra", 5),
        ("synthetic", 6),
    ]

    # Nothing new: the tick skips and requests nothing.
    second = _tick(defs, instance, first.cursor)
    assert (
        not second.run_requests
        and not second.dynamic_partitions_requests
        and "no new or changed manifests" in second.skip_reason.skip_message
    )

    # A changed manifest is a new run of the same partition (a new run key); a fixed one is picked up too.
    _manifest(tmp_path, "extra.yaml", {"kind": "synthetic", "n_samples": 7, "seed": 3, "start_index": 500})
    _manifest(tmp_path, "broken.yaml", {"kind": "synthetic", "n_samples": 2, "start_index": 900})
    third = _tick(defs, instance, second.cursor)
    assert sorted(r.partition_key for r in third.run_requests) == ["broken", "extra"]
    assert [list(r.partition_keys) for r in third.dynamic_partitions_requests] == [["broken"]]
    assert third.run_requests[1].run_key != extra_request.run_key
    rerun = _apply_and_run(defs, instance, third)
    assert materializations(rerun["extra"])["seed_pool"]["rows_read"] == 7 and rerun["broken"].success

    # A removed manifest removes nothing but the cursor entry.
    (tmp_path / "manifests" / "broken.yaml").unlink()
    fourth = _tick(defs, instance, third.cursor)
    assert not fourth.run_requests and "broken" not in json.loads(fourth.cursor)
    assert store.has_partition("seed_pool", "broken")


def test_a_partition_without_a_source_fails_with_where_it_looked(tmp_path, instance):
    config = _project(tmp_path)
    instance.add_dynamic_partitions(SOURCES_PARTITIONS, ["ghost"])
    result = (
        build_definitions(config)
        .resolve_job_def(SEED_JOB)
        .execute_in_process(partition_key="ghost", instance=instance, raise_on_error=False)
    )
    assert not result.success
    failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE")
    message = failure.event_specific_data.error.message
    assert "no source named 'ghost'" in message and "ghost.yaml" in message


def test_recuration_and_config_with_dynamic_sources(tmp_path, instance):
    # Only manifests: no project-file source is needed once a folder is watched.
    config = _project(tmp_path, sources=[], manifest_sensor_running=True)
    defs = build_definitions(config)
    assert defs.resolve_sensor_def(SENSOR_NAME).default_status == dg.DefaultSensorStatus.RUNNING
    assert "no new or changed manifests" in _tick(defs, instance).skip_reason.skip_message  # the folder need not exist yet
    instance.add_dynamic_partitions(SOURCES_PARTITIONS, ["a", "b"])
    schedule = defs.resolve_schedule_def(RECURATION_SCHEDULE)
    with dg.build_schedule_context(
        instance=instance, scheduled_execution_time=datetime(2026, 11, 23, 3, tzinfo=UTC), repository_def=defs.get_repository_def()
    ) as context:
        assert [r.partition_key for r in schedule.evaluate_tick(context).run_requests] == ["a", "b"]
    with pytest.raises(ConfigError, match="at least one source, or operations.source_manifests"):
        load_config(write_config(tmp_path / "none", []))
    # Without a watched folder there is no manifest sensor (the dead-run reaper only) and partitions stay static.
    static = build_definitions(load_config(write_config(tmp_path / "static", [{"name": "s", "kind": "synthetic", "n_samples": 2}])))
    assert [sensor.name for sensor in static.sensors] == ["dead_run_reaper"]
