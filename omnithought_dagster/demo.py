"""`omnithought demo`: materialise every stage that exists, in order, on the configured instance.

Runs go through the real Dagster instance ($DAGSTER_HOME), so `make ui` shows them: the same
jobs, checks and metadata a user launches from the UI. A partition whose inputs did not
change since its last materialisation (same input fingerprint, data still in the store, its
checks passed) is skipped, which makes a second `make demo` fast.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import dagster as dg

from omnithought_dagster.assets.annotate import ANNOTATIONS_KEY, annotations_fingerprint
from omnithought_dagster.assets.curate import FILTERED_SET_KEY, SAMPLED_SUBSETS_KEY, filter_fingerprint, subset_fingerprint
from omnithought_dagster.assets.student import (STUDENT_BASELINES_KEY, STUDENT_CHECKPOINTS_KEY, expected_checkpoint_id, student_partition_keys,
                                                student_partitions)
from omnithought_dagster.assets.scores import BENCHMARK_SCORES_KEY, expected_scores_fingerprint, score_partition_keys, score_partitions
from omnithought_dagster.assets.seed import IMAGES_KEY, QUARANTINE_KEY, SEED_CODE_VERSION, SEED_POOL_KEY
from omnithought_dagster.assets.teacher import COT_TRACES_KEY, traces_fingerprint, traces_partitions
from omnithought_dagster.config import BASELINE_RECIPE, SOURCES_PARTITIONS, ProjectConfig
from omnithought_dagster.curation.seed import earlier_sources, input_fingerprint, partition_version
from omnithought_dagster.defs import ANNOTATE_JOB, FILTER_JOB, SEED_JOB, SUBSET_JOB, TEACHER_JOB, TRAIN_JOB, BASELINE_JOB, SCORE_JOB, build_definitions
from omnithought_dagster.ids import shard_keys
from omnithought_dagster.llm.backends import describe_backend
from omnithought_dagster.llm.vllm_server import keep_servers, stop_kept_servers
from omnithought_dagster.pools import run_in_process
from omnithought_dagster.sources import make_reader
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


@dataclass(frozen=True)
class Stage:
    name: str
    job: str
    asset_key: dg.AssetKey
    table: str
    partitions: Callable[[ProjectConfig], list[str]]
    fingerprint: Callable[[ProjectConfig, CorpusStore, str], str]
    counts: Callable[[CorpusStore, str, dict], dict[str, Any]]
    check_assets: tuple[dg.AssetKey, ...]  # the assets whose checks run in the stage's job
    store_key: Callable[[str], Any] | None = None  # the table partition a Dagster partition writes, when not the same key
    uses_llm: bool = False  # its steps talk to the teacher or the judge (a kept vLLM server)


def run_demo(config: ProjectConfig, instance: dg.DagsterInstance, force: bool = False,
             say: Callable[[str], None] = lambda line: None) -> list[StageOutcome]:
    """Materialise every stage in order; `say` hears each partition start and end and the steps' own log lines."""
    defs = build_definitions(config)
    loggers = {DEMO_LOGGER: _say_logger(say)}
    store = open_store(config.store)
    if config.dynamic_sources:
        # The demo runs the project file's sources; manifest sources arrive through the sensor.
        missing = [name for name in config.source_names if not instance.has_dynamic_partition(SOURCES_PARTITIONS, name)]
        instance.add_dynamic_partitions(SOURCES_PARTITIONS, missing)
    graph = defs.resolve_asset_graph()
    with keep_servers():  # one vLLM start for the teacher and the judge of every partition
        return _run_stages(config, instance, defs, graph, store, loggers, force, say)


def _run_stages(config, instance, defs, graph, store, loggers, force, say) -> list[StageOutcome]:
    outcomes = []
    for stage in STAGES:
        if not stage.uses_llm:
            stop_kept_servers()  # no later stage asks for them
        if not stage.partitions(config):
            continue
        job = defs.resolve_job_def(stage.job).with_logger_defs(loggers)
        partitions_def = job.partitions_def
        check_keys = [key for key in graph.asset_check_keys if key.asset_key in stage.check_assets]
        for partition in stage.partitions(config):
            try:
                fingerprint = stage.fingerprint(config, store, partition)
            except Exception:  # noqa: BLE001 - e.g. a source that cannot be opened: the step runs and says why
                fingerprint = None
            checks = _latest_checks(instance, check_keys, partition)
            metadata = _latest_metadata(instance, stage.asset_key, partition)
            store_partition = stage.store_key(partition) if stage.store_key else _store_partition(partitions_def, partition)
            if (not force and store.has_partition(stage.table, store_partition) and fingerprint is not None and metadata.get("input_fingerprint") == fingerprint
                    and len(checks) == len(check_keys) and "failed" not in checks.values()):
                outcomes.append(StageOutcome(stage.name, partition, True, True, stage.counts(store, partition, metadata), checks))
                say(f"= {stage.name}[{partition}] up to date")
                continue
            say(f"> {stage.name}[{partition}] started")
            started = time.monotonic()
            result = run_in_process(job, instance, partition_key=partition, raise_on_error=False, run_config=DEMO_RUN_CONFIG)
            seconds = time.monotonic() - started
            checks = {
                e.event_specific_data.check_name: _status(e.event_specific_data.passed, e.event_specific_data.severity)
                for e in result.all_events if e.event_type_value == "ASSET_CHECK_EVALUATION"
            }
            metadata = _latest_metadata(instance, stage.asset_key, partition)
            counts = stage.counts(store, partition, metadata) if store.has_partition(stage.table, store_partition) else {}
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
        if config.recipes:
            say(f"> export[{config.recipes[0].name}] started")
            outcomes.append(_export(config, store, config.recipes[0].name))
            say(outcome_line(outcomes[-1]))
    return outcomes


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
    return "\n".join([text[0], f"... ({len(text) - lines} lines)", *text[-(lines - 1):]])


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
        report = export_subset(store, recipe, "llamafactory", out, cutoff_len=config.curation.rules.max_total_tokens if tokenizer else None,
                               tokenizer=tokenizer, clean_markup=config.curation.rules.markup == "clean")
    except ExportError as exc:
        return StageOutcome("export", recipe, False, False, {"error": str(exc).split("\n")[0]})
    reasons = Counter(a.reason for a in report.set_aside)
    return StageOutcome("export", recipe, False, True, {"input": report.examples + len(report.set_aside), "output": report.examples,
                                                        "flagged": len(report.set_aside), "reasons": dict(reasons),
                                                        "detail": f"{report.format} with {report.images} images at {out}, registered as "
                                                                  f"{report.dataset_name}"})


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

    latest = instance.event_log_storage.get_latest_asset_check_execution_by_key(list(check_keys), partition_filter=PartitionKeyFilter(key=partition))
    statuses = {}
    for key, record in latest.items():
        evaluation = record.event.dagster_event.event_specific_data if record.event and record.event.dagster_event else None
        if record.status == AssetCheckExecutionRecordStatus.SUCCEEDED:
            statuses[key.name] = "passed"
        else:
            severity = getattr(evaluation, "severity", None)  # a planned-but-never-run check has none
            statuses[key.name] = _status(False, severity) if severity is not None else "failed"
    return statuses


# -- stages ----------------------------------------------------------------------------------------


def _seed_fingerprint(config: ProjectConfig, store: CorpusStore, source: str) -> str:
    return input_fingerprint(
        make_reader(config.source(source)).fingerprint(),
        config.seed,
        {name: partition_version(store, name) for name in earlier_sources(config.source_names, source)},
        SEED_CODE_VERSION,
    )


def _seed_counts(store: CorpusStore, source: str, metadata: dict) -> dict[str, Any]:
    con = store.catalog(["seed_pool", "quarantine"])
    kept, near = con.execute("SELECT count(*), count(near_duplicate_of) FROM seed_pool WHERE source = $1", [source]).fetchall()[0]
    reasons = dict(con.execute("SELECT reason, count(*) FROM quarantine WHERE source = $1 GROUP BY 1 ORDER BY 2 DESC, 1", [source]).fetchall())
    dropped = sum(reasons.values())
    return {"input": kept + dropped, "output": kept, "flagged": dropped, "reasons": reasons, "detail": f"{near} near-duplicate images marked"}


def _traces_partitions(config: ProjectConfig) -> list[str]:
    """The project file's sources x shards (also when sources are dynamic partitions)."""
    return [str(dg.MultiPartitionKey({"source": source, "shard": shard})) for source in config.source_names
            for shard in shard_keys(config.generation.shards)]


def _traces_fingerprint(config: ProjectConfig, store: CorpusStore, partition: str) -> str:
    keys = traces_partitions(config).get_partition_key_from_str(partition).keys_by_dimension
    identity, structured = describe_backend(config.teacher, models_dir=config.models_dir)
    return traces_fingerprint(config, store, keys["source"], keys["shard"], identity, structured)


def _trace_counts(store: CorpusStore, partition: str, metadata: dict) -> dict[str, Any]:
    shard, source = partition.split("|")
    con = store.catalog(["cot_traces"])
    samples, traces, errors, truncated, answered = con.execute(
        "SELECT count(DISTINCT sample_id), count(*), count(*) FILTER (finish_reason = 'error'), "
        "count(*) FILTER (finish_reason = 'length'), count(final_answer) FROM cot_traces WHERE source = $1 AND shard = $2",
        [source, shard],
    ).fetchall()[0]
    reasons = {k: v for k, v in {"error": errors, "length": truncated}.items() if v}
    detail = (f"{metadata.get('requests_sent', '?')} requests sent, {metadata.get('cache_hits', '?')} from cache, "
              f"{metadata.get('tokens_per_s', '?')} tokens/s; {answered}/{traces} answers parsed")
    return {"input": samples, "output": traces, "flagged": errors + truncated, "reasons": reasons, "detail": detail}


def _annotations_fingerprint(config: ProjectConfig, store: CorpusStore, partition: str) -> str:
    keys = traces_partitions(config).get_partition_key_from_str(partition).keys_by_dimension
    identity, _ = describe_backend(config.annotator, models_dir=config.models_dir)
    return annotations_fingerprint(config, store, keys["source"], keys["shard"], identity)


def _annotation_counts(store: CorpusStore, partition: str, metadata: dict) -> dict[str, Any]:
    shard, source = partition.split("|")
    con = store.catalog(["annotations"])
    traces, correct, errors, samples, pass_rate = con.execute(
        "SELECT count(*), count(*) FILTER (correct), count(judge_error), count(DISTINCT sample_id), avg(pass_rate) "
        "FROM annotations WHERE source = $1 AND shard = $2", [source, shard],
    ).fetchall()[0]
    labels = dict(con.execute("SELECT difficulty_label, count(DISTINCT sample_id) FROM annotations WHERE source = $1 AND shard = $2 "
                              "GROUP BY 1 ORDER BY 1", [source, shard]).fetchall())
    auc = metadata.get("quality_auc_vs_correct")
    detail = (f"{correct}/{traces} correct, mean pass rate {pass_rate or 0:.2f}; samples by difficulty {labels}; "
              f"{metadata.get('requests_sent', '?')} judge requests, {metadata.get('cache_hits', '?')} from cache, "
              f"parse failures {metadata.get('judge_parse_failure_rate', '?')}, quality AUC vs correct {auc if auc is not None else 'n/a'}")
    return {"input": traces, "output": traces - errors, "flagged": errors, "reasons": {"judge_error": errors} if errors else {}, "detail": detail}


def _filter_counts(store: CorpusStore, source: str, metadata: dict) -> dict[str, Any]:
    con = store.catalog(["filter_decisions"])
    total, kept = con.execute("SELECT count(*), count(*) FILTER (kept) FROM filter_decisions WHERE source = $1", [source]).fetchall()[0]
    reasons = dict(con.execute("SELECT r.code, count(*) FROM filter_decisions, unnest(reasons) AS u(r) WHERE source = $1 "
                               "GROUP BY 1 ORDER BY 2 DESC, 1", [source]).fetchall())
    markup = {key.split("/", 1)[1]: value for key, value in metadata.items() if key.startswith("markup_kept/")}
    detail = f"{kept}/{total} traces kept; {metadata.get('contaminated_samples', '?')} samples matched a benchmark" + (
        f"; kept traces holding markup, deleted where exported: {', '.join(f'{k} {v}' for k, v in sorted(markup.items()))}" if markup else "")
    return {"input": total, "output": kept, "flagged": total - kept, "reasons": reasons, "detail": detail}


def _subset_counts(store: CorpusStore, recipe: str, metadata: dict) -> dict[str, Any]:
    con = store.catalog(["subset_members"])
    members, samples = con.execute("SELECT count(*), count(DISTINCT sample_id) FROM subset_members WHERE subset = $1", [recipe]).fetchall()[0]
    strata = dict(con.execute("SELECT split_part(stratum, '/', 1), count(*) FROM subset_members WHERE subset = $1 GROUP BY 1 ORDER BY 1",
                              [recipe]).fetchall())
    target, shortfall = metadata.get("target_size", "?"), metadata.get("shortfall", 0)
    detail = (f"{members} of {target} traces ({samples} samples), by difficulty {strata}; version {str(metadata.get('subset_version', ''))[:12]}"
              + (f"; shortfall {shortfall} (too few candidates)" if shortfall else ""))
    return {"input": metadata.get("candidates", "?"), "output": members, "flagged": shortfall or 0, "reasons": {}, "detail": detail}


def _baseline_fingerprint(config: ProjectConfig, store: CorpusStore, student: str) -> str:
    return expected_checkpoint_id(config, store, student, BASELINE_RECIPE)


def _baseline_counts(store: CorpusStore, student: str, metadata: dict) -> dict[str, Any]:
    (row,) = store.read_partition("student_checkpoints", {"student": student, "recipe": BASELINE_RECIPE}).to_pylist()
    return {"input": 0, "output": 1, "flagged": 0, "reasons": {}, "detail": f"{student}: untrained {row['base_model']} (the baseline)"}


def _checkpoint_fingerprint(config: ProjectConfig, store: CorpusStore, partition: str) -> str:
    keys = student_partitions(config).get_partition_key_from_str(partition).keys_by_dimension
    return expected_checkpoint_id(config, store, keys["student"], keys["recipe"]) or "no subset yet"


def _checkpoint_counts(store: CorpusStore, partition: str, metadata: dict) -> dict[str, Any]:
    recipe, student = partition.split("|")
    (row,) = store.read_partition("student_checkpoints", {"student": student, "recipe": recipe}).to_pylist()
    if metadata.get("initial_reward") is not None and metadata.get("final_reward") is not None:  # grpo: the reward is the objective
        moved = f"reward {metadata['initial_reward']:.3f} -> {metadata['final_reward']:.3f}"
    else:
        moved = f"loss {row['initial_loss']:.3f} -> {row['final_loss']:.3f}"
    detail = (f"{student} on {recipe}: {moved} over {row['steps']} steps, "
              f"{row['tokens_per_s']} tokens/s ({row['launcher']}); checkpoint {row['checkpoint_id'][:12]}"
              + (" reused" if metadata.get("reused") else ""))
    return {"input": row["examples"], "output": 1, "flagged": 0, "reasons": {}, "detail": detail}


def _scores_fingerprint(config: ProjectConfig, store: CorpusStore, partition: str) -> str:
    keys = score_partitions(config).get_partition_key_from_str(partition).keys_by_dimension
    return expected_scores_fingerprint(config, store, keys["student"], keys["recipe"]) or "not scored yet"


def _scores_counts(store: CorpusStore, partition: str, metadata: dict) -> dict[str, Any]:
    recipe, student = partition.split("|")
    rows = store.read_partition("benchmark_scores", {"student": student, "recipe": recipe}).to_pylist()
    overall = [r for r in rows if r["slice"] == "all"]
    parts = [f"{r['benchmark']} {r['metric']} {r['score']:.3f}" + ("" if r["delta"] is None else f" ({r['delta']:+.3f} vs base)")
             for r in overall]
    return {"input": sum(r["n"] for r in overall), "output": len(rows), "flagged": 0, "reasons": {},
            "detail": f"{student}/{recipe}: " + "; ".join(parts) + f"; {len(rows) - len(overall)} tag slices"}


STAGES = [
    Stage("seed_pool", SEED_JOB, SEED_POOL_KEY, "seed_pool", lambda config: config.source_names, _seed_fingerprint, _seed_counts,
          (SEED_POOL_KEY, QUARANTINE_KEY, IMAGES_KEY)),
    Stage("cot_traces", TEACHER_JOB, COT_TRACES_KEY, "cot_traces", _traces_partitions, _traces_fingerprint, _trace_counts,
          (COT_TRACES_KEY,), uses_llm=True),
    Stage("annotations", ANNOTATE_JOB, ANNOTATIONS_KEY, "annotations", _traces_partitions, _annotations_fingerprint, _annotation_counts,
          (ANNOTATIONS_KEY,), uses_llm=True),
    Stage("filtered_set", FILTER_JOB, FILTERED_SET_KEY, "filter_decisions", lambda config: config.source_names, filter_fingerprint,
          _filter_counts, (FILTERED_SET_KEY,)),
    Stage("sampled_subsets", SUBSET_JOB, SAMPLED_SUBSETS_KEY, "subset_members", lambda config: [r.name for r in config.recipes],
          subset_fingerprint, _subset_counts, (SAMPLED_SUBSETS_KEY,)),
    Stage("student_baselines", BASELINE_JOB, STUDENT_BASELINES_KEY, "student_checkpoints", lambda config: [s.name for s in config.students],
          _baseline_fingerprint, _baseline_counts, (STUDENT_BASELINES_KEY,), lambda student: {"student": student, "recipe": BASELINE_RECIPE}),
    Stage("student_checkpoints", TRAIN_JOB, STUDENT_CHECKPOINTS_KEY, "student_checkpoints", student_partition_keys, _checkpoint_fingerprint,
          _checkpoint_counts, (STUDENT_CHECKPOINTS_KEY,)),
    Stage("benchmark_scores", SCORE_JOB, BENCHMARK_SCORES_KEY, "benchmark_scores",
          lambda config: score_partition_keys(config) if config.evaluation.benchmarks or config.evaluation.lmms_tasks else [],
          _scores_fingerprint, _scores_counts, (BENCHMARK_SCORES_KEY,)),
]
