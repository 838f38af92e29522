"""`omnithought demo`: materialise every stage that exists, in order, on the configured instance.

Runs go through the real Dagster instance ($DAGSTER_HOME), so `make ui` shows them: the same
jobs, checks and metadata a user launches from the UI. Before a stage, the demo observes the
files it reads (assets/inputs.py); a partition Dagster calls fresh (`staleness.py`: materialised,
no new code version, no upstream with newer data), whose rows are in the store and whose checks
passed, is skipped - which makes a second `make demo` fast.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import dagster as dg

from omnithought_dagster.assets.inputs import observe_job_name
from omnithought_dagster.config import SOURCES_PARTITIONS, ProjectConfig
from omnithought_dagster.defs import build_definitions
from omnithought_dagster.llm.vllm_server import keep_servers, stop_kept_servers
from omnithought_dagster.pools import run_in_process
from omnithought_dagster.stages import STAGES
from omnithought_dagster.staleness import Staleness
from omnithought_dagster.store import CorpusStore, open_store

# The demo's runs log through one logger of its own (below): the steps' own lines (progress with
# rate and ETA, server starts, the trainer's reports through Pipes) without Dagster's event lines.
DEMO_LOGGER = "omnithought_demo"
DEMO_RUN_CONFIG = {"loggers": {DEMO_LOGGER: {"config": {}}}}
FAILURE_LINES = 25  # of a failure's message: the failing tool's last lines come at its end


@dataclass
class StageOutcome:
    stage: str
    partition: str
    skipped: bool
    success: bool
    counts: dict[str, Any] = field(default_factory=dict)
    checks: dict[str, str] = field(default_factory=dict)  # name -> passed | warn | failed
    run_id: str | None = None
    seconds: float | None = None


def run_demo(
    config: ProjectConfig,
    instance: dg.DagsterInstance,
    force: bool = False,
    say: Callable[[str], None] = lambda line: None,
    only: Callable[[dg.AssetKey, str], bool] | None = None,
) -> list[StageOutcome]:
    """Materialise every stage in order; `say` hears each partition start and end and the steps' own log lines. `only`
    (a stage's main asset, partition) -> bool limits the partitions (`omnithought experiment run`: one experiment's)."""
    defs = build_definitions(config)
    loggers = {DEMO_LOGGER: _say_logger(say)}
    store = open_store(config.store)
    if config.dynamic_sources:
        # The demo runs the project file's sources; manifest sources arrive through the sensor.
        missing = [name for name in config.source_names if not instance.has_dynamic_partition(SOURCES_PARTITIONS, name)]
        instance.add_dynamic_partitions(SOURCES_PARTITIONS, missing)
    graph = defs.resolve_asset_graph()
    with keep_servers():  # one vLLM start for the teacher and the judge of every partition
        return _run_stages(config, instance, defs, graph, store, loggers, force, say, only)


def _run_stages(config, instance, defs, graph, store, loggers, force, say, only=None) -> list[StageOutcome]:
    outcomes = []
    for stage in STAGES:
        if not stage.uses_llm:
            stop_kept_servers()  # no later stage asks for them
        partitions = stage.partition_keys(config) if stage.enabled(config) else []
        partitions = [p for p in partitions if only is None or only(stage.key, p)]
        if not partitions:
            continue
        job = defs.resolve_job_def(stage.job).with_logger_defs(loggers)
        partitions_def = job.partitions_def
        check_keys = [key for key in graph.asset_check_keys if key.asset_key in stage.keys]
        observed = True  # a failed observation leaves the last one standing: then nothing of this stage is skipped
        for key in stage.observes:
            if graph.has(key):
                if not run_job(config, defs, observe_job_name(key), instance, loggers).success:
                    say(f"! observing {key.to_user_string()} failed: every {stage.name} partition runs")
                    observed = False
        staleness = Staleness(instance, defs)  # after its upstreams ran and its inputs were observed
        for partition in partitions:
            checks = _latest_checks(instance, check_keys, partition)
            metadata = _latest_metadata(instance, stage.key, partition)
            store_partition = stage.store_key(partition) if stage.store_key else _store_partition(partitions_def, partition)
            if (
                not force
                and observed
                and store.has_partition(stage.table, store_partition)
                and staleness.of(stage.key, partition).fresh
                and len(checks) == len(check_keys)
                and "failed" not in checks.values()
            ):
                outcomes.append(StageOutcome(stage.name, partition, True, True, stage.summary(store, partition, metadata), checks))
                say(f"= {stage.name}[{partition}] up to date")
                continue
            say(f"> {stage.name}[{partition}] started")
            started = time.monotonic()
            result = run_job(config, defs, stage.job, instance, loggers, partition)
            seconds = time.monotonic() - started
            checks = {
                e.event_specific_data.check_name: _status(e.event_specific_data.passed, e.event_specific_data.severity)
                for e in result.all_events
                if e.event_type_value == "ASSET_CHECK_EVALUATION"
            }
            metadata = _latest_metadata(instance, stage.key, partition)
            counts = stage.summary(store, partition, metadata) if store.has_partition(stage.table, store_partition) else {}
            if not result.success:
                failure = next((e for e in result.all_events if e.event_type_value == "STEP_FAILURE"), None)
                if failure is not None:
                    error = failure.event_specific_data.error
                    cause = error.cause or error
                    counts["error"] = failure_text(cause.message or error.message)
            outcome = StageOutcome(stage.name, partition, False, result.success, counts, checks, result.run_id, seconds)
            outcomes.append(outcome)
            say(outcome_line(outcome))
        if not all(o.success for o in outcomes):
            break  # later stages build on this one
    else:
        if config.recipes and only is None:
            say(f"> export[{config.recipes[0].name}] started")
            outcomes.append(_export(config, store, config.recipes[0].name))
            say(outcome_line(outcomes[-1]))
    return outcomes


def run_job(
    config: ProjectConfig, defs: dg.Definitions, name: str, instance: dg.DagsterInstance, loggers: dict, partition: str | None = None
):
    """One run of job `name` on `instance`: in this process, watched (pools.run_in_process), with the demo's console logger;
    under `operations.executor: docker` through the job's own executor (a container per step, containers.py), the job
    reconstructed from the code location's module as a run launched from the UI would be."""
    job = defs.resolve_job_def(name)
    if config.operations.executor != "docker":
        return run_in_process(
            job.with_logger_defs(loggers), instance, partition_key=partition, raise_on_error=False, run_config=DEMO_RUN_CONFIG
        )
    from omnithought_dagster.containers import reconstructable_job

    tags = job.partitions_def.get_tags_for_partition_key(partition) if partition is not None and job.partitions_def else {}
    run_config = {"loggers": {"console": {"config": {"log_level": "INFO"}}}}  # the steps' own lines, not every event
    return dg.execute_job(reconstructable_job(config, name), instance, run_config=run_config, tags=tags, raise_on_error=False)


def outcome_line(o: StageOutcome) -> str:
    """`< stage[partition] ran in 12.3 s: 300 in, 1200 out, 0 flagged; checks 6/6 passed` (or the failure)."""
    c = o.counts
    rows = f"{c.get('input', '?')} in, {c.get('output', '?')} out, {c.get('flagged', '?')} flagged"
    passed = sum(status == "passed" for status in o.checks.values())
    checks = f"; checks {passed}/{len(o.checks)} passed" if o.checks else ""
    took = f" in {o.seconds:.1f} s" if o.seconds is not None else ""
    if not o.success:
        return f"x {o.stage}[{o.partition}] FAILED{took}:\n" + "\n".join(f"    {line}" for line in str(c.get("error", "")).split("\n"))
    return f"< {o.stage}[{o.partition}] ran{took}: {rows}{checks}"


def failure_text(message: str, lines: int = FAILURE_LINES) -> str:
    """A step failure's message, its first line and its last lines (where the failing tool's own output is)."""
    text = [line.rstrip() for line in message.strip().split("\n") if line.strip()]
    if len(text) <= lines:
        return "\n".join(text)
    return "\n".join([text[0], f"... ({len(text) - lines} lines)", *text[-(lines - 1) :]])


class _SayHandler(logging.Handler):
    """Passes a step's own log lines to `say`; Dagster's event records (step start, materialisation...) are left out."""

    def __init__(self, say: Callable[[str], None]):
        super().__init__(logging.INFO)
        self.say = say

    def emit(self, record: logging.LogRecord) -> None:
        meta = getattr(record, "dagster_meta", None) or {}
        if meta.get("dagster_event") is not None:
            return  # framework events; a failure is reported by the demo with its message
        step = meta.get("step_key") or ""
        message = meta.get("orig_message", record.getMessage())
        self.say(f"    {step + ': ' if step else ''}{message}")


def _say_logger(say: Callable[[str], None]) -> dg.LoggerDefinition:
    @dg.logger(description="the demo's console: the steps' own lines, no event records")
    def demo_logger(_init_context) -> logging.Logger:
        log = logging.Logger(DEMO_LOGGER, level=logging.INFO)
        log.addHandler(_SayHandler(say))
        return log

    return demo_logger


def _export(config: ProjectConfig, store: CorpusStore, recipe: str) -> StageOutcome:
    """The first recipe as LLaMA-Factory training data under <store>/exports/<recipe>/."""
    from collections import Counter
    from pathlib import Path

    from omnithought_dagster.curation.export import ExportError, export_subset
    from omnithought_dagster.train.launch import resolve_student

    local = not config.store.root.startswith("s3://")  # an object store's export still lands on this machine
    out = (Path(config.store.root) if local else Path(config.training.work_dir).parent) / "exports" / recipe
    # The cutoff counts what LLaMA-Factory counts - the first student's chat template and image tokens - so an example the
    # export accepts is never cut by the client.
    tokenizer = resolve_student(config.students[0], config.models_dir)[0] if config.students else None
    try:
        report = export_subset(
            store,
            recipe,
            "llamafactory",
            out,
            cutoff_len=config.curation.rules.max_total_tokens if tokenizer else None,
            tokenizer=tokenizer,
            clean_markup=config.curation.rules.markup == "clean",
        )
    except ExportError as exc:
        return StageOutcome("export", recipe, False, False, {"error": str(exc).split("\n")[0]})
    reasons = Counter(a.reason for a in report.set_aside)
    return StageOutcome(
        "export",
        recipe,
        False,
        True,
        {
            "input": report.examples + len(report.set_aside),
            "output": report.examples,
            "flagged": len(report.set_aside),
            "reasons": dict(reasons),
            "detail": f"{report.format} with {report.images} images at {out}, registered as {report.dataset_name}",
        },
    )


def _store_partition(partitions_def, partition: str):
    if isinstance(partitions_def, dg.MultiPartitionsDefinition):
        return dict(partitions_def.get_partition_key_from_str(partition).keys_by_dimension)
    return partition


def _latest_metadata(instance: dg.DagsterInstance, asset_key: dg.AssetKey, partition: str) -> dict[str, Any]:
    records = instance.fetch_materializations(dg.AssetRecordsFilter(asset_key=asset_key, asset_partitions=[partition]), limit=1).records
    materialization = records[0].asset_materialization if records else None
    return {k: getattr(v, "value", v) for k, v in (materialization.metadata if materialization else {}).items()}


def _status(passed: bool, severity: dg.AssetCheckSeverity) -> str:
    return "passed" if passed else "warn" if severity == dg.AssetCheckSeverity.WARN else "failed"


def _latest_checks(instance: dg.DagsterInstance, check_keys, partition: str) -> dict[str, str]:
    from dagster._core.event_api import PartitionKeyFilter
    from dagster._core.storage.asset_check_execution_record import AssetCheckExecutionRecordStatus

    latest = instance.event_log_storage.get_latest_asset_check_execution_by_key(
        list(check_keys), partition_filter=PartitionKeyFilter(key=partition)
    )
    statuses = {}
    for key, record in latest.items():
        evaluation = record.event.dagster_event.event_specific_data if record.event and record.event.dagster_event else None
        if record.status == AssetCheckExecutionRecordStatus.SUCCEEDED:
            statuses[key.name] = "passed"
        else:
            severity = getattr(evaluation, "severity", None)  # a planned-but-never-run check has none
            statuses[key.name] = _status(False, severity) if severity is not None else "failed"
    return statuses
