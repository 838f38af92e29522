"""When stages run without a person: CPU stages follow their upstreams, GPU stages never on their own.

- CPU curation stages (filtered_set, sampled_subsets) and the baselines carry an eager
  automation condition narrowed to upstreams whose blocking checks passed: a new or changed
  upstream partition that failed a blocking check stops there. They also run when their code
  version changes: it hashes the project file's settings that change their output, so an edited
  threshold or recipe re-runs its stage on the next tick.
- The files the pipeline reads (seed_sources, benchmark_items: assets/inputs.py) are observed on
  `operations.observe_cron` and at once when never observed (a reader of an input never observed
  has a missing upstream, which eager automation waits for).
- GPU stages (cot_traces, annotations, student_checkpoints, benchmark_scores) carry none: they
  are expensive, so they run by hand, from a job, or from a schedule someone turned on.
- The `recuration` schedule (cron from `operations.recuration_cron`) re-runs filtered_set for
  every source: a safety net for what a code version cannot see (a benchmark file edited in
  place, automation turned off when the settings changed); sampled_subsets follow through their
  automation condition.
- The `source_manifests` sensor (with `operations.source_manifests` set) adds the sources that
  manifests dropped into a folder or S3 prefix declare as dynamic partitions and requests their
  seed_pool runs; a changed manifest requests a new run (see `sensors.py`).
Turn automation on in the UI (Automation -> default_automation_condition_sensor) or in
dagster.yaml; the schedule starts as `operations.recuration_running` says.
"""

import dagster as dg

from omnithought_dagster.config import SOURCES_PARTITIONS, ProjectConfig

RECURATION_SCHEDULE = "recuration"
TRIGGER_TAG = "omnithought/trigger"


def cpu_stage_condition() -> dg.AutomationCondition:
    """Eager, or its settings edited (a new code version: `ids.code_version`), once upstream blocking checks passed."""
    edited = (
        dg.AutomationCondition.code_version_changed() & ~dg.AutomationCondition.any_deps_missing() & ~dg.AutomationCondition.in_progress()
    )
    return ((dg.AutomationCondition.eager() | edited) & dg.AutomationCondition.all_deps_blocking_checks_passed()).with_label(
        "eager or settings edited, once upstream blocking checks passed"
    )


def build_schedules(config: ProjectConfig, filter_job: str) -> list[dg.ScheduleDefinition]:
    ops = config.operations

    @dg.schedule(
        name=RECURATION_SCHEDULE,
        cron_schedule=ops.recuration_cron,
        job_name=filter_job,
        execution_timezone=ops.timezone,
        default_status=dg.DefaultScheduleStatus.RUNNING if ops.recuration_running else dg.DefaultScheduleStatus.STOPPED,
        description="Re-run the rule filters and selection of every source; subsets follow (automation).",
    )
    def recuration(context: dg.ScheduleEvaluationContext):
        tick = context.scheduled_execution_time.isoformat() if context.scheduled_execution_time else "manual"
        # Dynamic sources: those the manifest sensor registered (a run for an unregistered one would fail).
        sources = context.instance.get_dynamic_partitions(SOURCES_PARTITIONS) if config.dynamic_sources else config.source_names
        for source in sources:
            yield dg.RunRequest(run_key=f"recuration:{source}:{tick}", partition_key=source, tags={TRIGGER_TAG: RECURATION_SCHEDULE})

    return [recuration]
