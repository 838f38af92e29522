"""The recuration schedule and the automation conditions: CPU stages follow, GPU stages never run on their own."""

from __future__ import annotations

from datetime import UTC, datetime

import dagster as dg
import pytest

from omnithought_dagster.assets.inputs import BENCHMARK_ITEMS_KEY, SEED_SOURCES_KEY, observe_job_name
from omnithought_dagster.automation import RECURATION_SCHEDULE, TRIGGER_TAG
from omnithought_dagster.config import ConfigError, load_config
from omnithought_dagster.defs import FILTER_JOB, build_definitions
from omnithought_dagster.store import CorpusStore

from conftest import rewrite_partition, run_job, run_partition_checks, write_config
from curation_data import build_store

RECIPES = [
    {"name": "even", "size": 12, "difficulty_mix": {"easy": 1, "medium": 1, "hard": 1}},
    {"name": "small", "size": 4, "difficulty_mix": {"easy": 1}},
]
GPU_STAGES = ["cot_traces", "annotations", "student_checkpoints", "benchmark_scores"]


def _project(tmp_path, **operations):
    build_store(tmp_path / "store", n_samples=24)
    path = write_config(
        tmp_path,
        [{"name": "synthetic", "kind": "synthetic", "n_samples": 24}],
        recipes=RECIPES,
        benchmarks=[{"name": "held", "kind": "synthetic", "n_samples": 4, "seed": 3, "start_index": 900}],
        students=[{"name": "tiny"}],
        evaluation={"benchmarks": ["held"]},
        operations=operations,
    )
    return load_config(path)


def test_recuration_schedule_requests_every_source_on_the_filter_job(tmp_path):
    config = _project(tmp_path, recuration_cron="30 2 * * 1", timezone="Europe/Paris")
    defs = build_definitions(config)
    schedule = defs.resolve_schedule_def(RECURATION_SCHEDULE)
    assert schedule.cron_schedule == "30 2 * * 1" and schedule.execution_timezone == "Europe/Paris"
    assert schedule.job_name == FILTER_JOB and schedule.default_status == dg.DefaultScheduleStatus.STOPPED
    with dg.build_schedule_context(
        scheduled_execution_time=datetime(2026, 11, 23, 2, 30, tzinfo=UTC), repository_def=defs.get_repository_def()
    ) as context:
        requests = list(schedule.evaluate_tick(context).run_requests)
    assert [r.partition_key for r in requests] == ["synthetic"] and requests[0].tags[TRIGGER_TAG] == RECURATION_SCHEDULE
    assert requests[0].run_key == "recuration:synthetic:2026-11-23T02:30:00+00:00"
    running = build_definitions(_project(tmp_path / "on", recuration_running=True)).resolve_schedule_def(RECURATION_SCHEDULE)
    assert running.default_status == dg.DefaultScheduleStatus.RUNNING


def test_a_bad_cron_fails_at_load(tmp_path):
    with pytest.raises(ConfigError, match="operations.recuration_cron: .*not a cron expression"):
        _project(tmp_path, recuration_cron="every night")


def test_gpu_stages_carry_no_automation_and_cpu_stages_do(tmp_path):
    graph = build_definitions(_project(tmp_path)).resolve_asset_graph()
    for name in GPU_STAGES:
        assert graph.get(dg.AssetKey(name)).automation_condition is None, name
    for name in ["filtered_set", "sampled_subsets", "student_baselines"]:
        assert "blocking checks passed" in graph.get(dg.AssetKey(name)).automation_condition.get_label(), name


def test_subsets_follow_a_new_filtered_set_only_when_its_blocking_checks_passed(tmp_path, instance):
    config = _project(tmp_path)
    defs = build_definitions(config)
    subsets = dg.AssetKey("sampled_subsets")
    first = dg.evaluate_automation_conditions(defs=defs, instance=instance)
    assert not [k for k in first.get_requested_partitions(subsets)]  # filtered_set never ran: nothing to follow

    assert run_job(config, instance, FILTER_JOB, "synthetic").success  # its blocking checks ran and passed in the run
    second = dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=first.cursor)
    assert set(second.get_requested_partitions(subsets)) == {"even", "small"}
    requested = {key.to_user_string() for key in (r.key for r in second.results if r.true_subset.size)}
    assert not requested & set(GPU_STAGES)

    # (The request counts as handled on the tick after it; a quiet tick lets it pass.)
    quiet = dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=second.cursor)
    assert not set(quiet.get_requested_partitions(subsets))

    # Updated again (e.g. by the recuration schedule), checks passing: the subsets follow again.
    assert run_job(config, instance, FILTER_JOB, "synthetic").success
    third = dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=quiet.cursor)
    assert set(third.get_requested_partitions(subsets)) == {"even", "small"}
    quiet = dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=third.cursor)

    # Updated again, but now failing a blocking check: the subsets stay put.
    store = CorpusStore(config.store.root)
    assert run_job(config, instance, FILTER_JOB, "synthetic").success
    rewrite_partition(store, "filter_decisions", "synthetic", lambda rows: rows + [rows[0]])  # a trace decided twice
    assert not run_partition_checks(config, instance, "filtered_set", "synthetic")["one_decision_per_trace"].passed
    fourth = dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=quiet.cursor)
    assert not set(fourth.get_requested_partitions(subsets))


def test_an_edited_threshold_requests_its_stage_on_the_next_tick_and_nothing_else(tmp_path, instance):
    """code_version_changed(): the settings that change filtered_set are hashed into its code version."""
    import yaml
    from dagster._core.definitions.asset_checks.asset_check_evaluation import AssetCheckEvaluationTargetMaterializationData

    from omnithought_dagster.ids import shard_keys

    config = _project(tmp_path)
    # the store was written directly (curation_data): tell Dagster its upstream partitions exist, as their runs would have
    # and that their blocking checks passed
    checks = build_definitions(config).resolve_asset_graph().asset_check_keys
    upstream = {
        "seed_pool": ["synthetic"],
        **{asset: [f"{shard}|synthetic" for shard in shard_keys(config.generation.shards)] for asset in ("cot_traces", "annotations")},
    }
    for asset, partitions in upstream.items():
        for partition in partitions:
            instance.report_runless_asset_event(dg.AssetMaterialization(asset, partition=partition))
            (record,) = instance.fetch_materializations(
                dg.AssetRecordsFilter(asset_key=dg.AssetKey(asset), asset_partitions=[partition]), limit=1
            ).records
            target = AssetCheckEvaluationTargetMaterializationData(
                storage_id=record.storage_id, run_id=record.run_id, timestamp=record.timestamp
            )
            for check in (c for c in checks if c.asset_key.to_user_string() == asset):
                instance.report_runless_asset_event(
                    dg.AssetCheckEvaluation(
                        check.asset_key, check.name, passed=True, partition=partition, target_materialization_data=target
                    )
                )
    for key in (SEED_SOURCES_KEY, BENCHMARK_ITEMS_KEY):  # as automation does on its first tick (the test below)
        assert build_definitions(config).resolve_job_def(observe_job_name(key)).execute_in_process(instance=instance).success
    assert run_job(config, instance, FILTER_JOB, "synthetic").success
    first = dg.evaluate_automation_conditions(defs=build_definitions(config), instance=instance)
    quiet = dg.evaluate_automation_conditions(defs=build_definitions(config), instance=instance, cursor=first.cursor)
    assert not [r.key for r in quiet.results if r.true_subset.size]

    path = config.config_path
    document = yaml.safe_load(open(path).read())
    document.setdefault("curation", {}).setdefault("rules", {})["min_quality"] = 5
    open(path, "w").write(yaml.safe_dump(document))
    edited = dg.evaluate_automation_conditions(defs=build_definitions(load_config(path)), instance=instance, cursor=quiet.cursor)
    requested = {r.key.to_user_string(): set(edited.get_requested_partitions(r.key)) for r in edited.results if r.true_subset.size}
    assert requested == {"filtered_set": {"synthetic"}}


def test_the_files_read_are_observed_by_automation_when_never_observed_and_on_their_cron(tmp_path, instance):
    """An input never observed counts as a missing upstream (eager waits for those): automation observes it at once."""
    config = _project(tmp_path)
    defs = build_definitions(config)
    first = dg.evaluate_automation_conditions(defs=defs, instance=instance)
    requested = {r.key: r.true_subset.size for r in first.results if r.true_subset.size}
    assert requested == {SEED_SOURCES_KEY: 1, BENCHMARK_ITEMS_KEY: 1}
    for key in requested:
        assert defs.resolve_job_def(observe_job_name(key)).execute_in_process(instance=instance).success
    after = dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=first.cursor)
    assert not [r.key for r in after.results if r.true_subset.size]  # observed, and no cron tick since
