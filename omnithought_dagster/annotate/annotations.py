"""annotations rows: computed evidence (verifier, pass rate) and judge evidence for one partition.

Plain Python over the store and a backend; judge replies go through the same cached runner as
generation (`llm.runner.run_cached`, cache "annotation", keyed by annotation_id), so a
re-materialisation with the same judge sends nothing and a killed step resumes.
"""

from __future__ import annotations

import bisect
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

import pyarrow as pa

from omnithought_dagster.annotate.judge import JudgeParseError, JudgePrompt, judge_schema, parse_judgement
from omnithought_dagster.annotate.settings import AnnotationConfig
from omnithought_dagster.annotate.taxonomy import Taxonomy
from omnithought_dagster.curation.verify import Tolerance, verify
from omnithought_dagster.ids import content_id
from omnithought_dagster.llm.backends import ChatRequest, image_data_url
from omnithought_dagster.llm.runner import PendingRequest, RunResult, RunStats, run_cached
from omnithought_dagster.store import CorpusStore
from omnithought_dagster.store.tables import ANNOTATIONS
from omnithought_dagster.teacher.traces import BackendPlan

ANNOTATION_CACHE = "annotation"
TRACE_COLUMNS = ["trace_id", "sample_id", "teacher", "rollout", "final_answer", "reasoning", "finish_reason", "n_tokens", "text"]
SAMPLE_COLUMNS = ["sample_id", "image_ids", "question", "answer", "answer_type", "choices", "source_tags", "source_difficulty"]


@dataclass
class AnnotateResult:
    rows: pa.Table
    stats: RunStats  # every judge's run added up
    samples: dict[str, dict] = field(default_factory=dict)
    runs: list[tuple[BackendPlan, RunResult, list[str]]] = field(default_factory=list)  # per judge: its run and the teachers it judged


def annotation_id(trace: str, annotator: str, prompt: JudgePrompt, taxonomy: Taxonomy, settings: AnnotationConfig, schema: bool) -> str:
    return content_id(
        "annotation",
        {
            "trace": trace,
            "annotator": annotator,
            "prompt": [prompt.version, prompt.text_hash],
            "taxonomy": taxonomy.version,
            "sampling": {
                "temperature": settings.temperature,
                "top_p": settings.top_p,
                "max_tokens": settings.max_tokens,
                "images": settings.with_images,
                "reasoning_max_chars": settings.reasoning_max_chars,
                "max_tags": settings.max_tags,
                "schema": schema,
            },
        },
    )


def annotate_shard(
    store: CorpusStore,
    source: str,
    shard: str,
    plan: BackendPlan | Callable[[str], BackendPlan],
    prompt: JudgePrompt,
    settings: AnnotationConfig,
    taxonomy: Taxonomy,
    *,
    progress: Callable[[RunStats], None] | None = None,
    run_label: str | None = None,
    traces: list[dict] | None = None,
) -> AnnotateResult:
    """Annotate every trace of the (source, shard) partition. `plan` is the judge, or a function from a trace's teacher to
    its judge (several teachers: each judged by another); each judge's requests go through the cache, one judge after the
    other. `traces` (rows with TRACE_COLUMNS) stand in for the partition's stored traces (a cost estimate's sample)."""
    partition = {"source": source, "shard": shard}
    if traces is None:
        stored = store.read_partition("cot_traces", partition, TRACE_COLUMNS)
        if stored is None:
            raise LookupError(f"cot_traces[{source}/{shard}] is not materialised")
        traces = stored.to_pylist()
    seed = store.read_partition("seed_pool", source, SAMPLE_COLUMNS)
    if seed is None:
        raise LookupError(f"seed_pool[{source}] is not materialised")
    samples = {row["sample_id"]: row for row in seed.to_pylist()}
    traces = sorted(traces, key=lambda t: (t["sample_id"], t["teacher"], t["rollout"]))
    missing = {t["sample_id"] for t in traces} - set(samples)
    if missing:
        raise LookupError(f"{len(missing)} traces name samples seed_pool[{source}] does not have (e.g. {sorted(missing)[0]})")

    judge_of = plan if callable(plan) and not isinstance(plan, BackendPlan) else (lambda _teacher, judge=plan: judge)
    judges: dict[str, BackendPlan] = {}  # judge identity -> its plan, in the order traces first need it
    judged_teachers: dict[str, list[str]] = {}
    judge_by_teacher = {}
    for teacher in dict.fromkeys(t["teacher"] for t in traces):
        judge = judge_of(teacher)
        judge_by_teacher[teacher] = judges.setdefault(judge.identity, judge)
        judged_teachers.setdefault(judge.identity, []).append(teacher)
    ids, schemas = {}, {}
    for t in traces:
        judge = judge_by_teacher[t["teacher"]]
        schema = schemas.setdefault(judge.identity, judge_schema(taxonomy, settings) if judge.structured_output else None)
        ids[t["trace_id"]] = annotation_id(t["trace_id"], judge.identity, prompt, taxonomy, settings, schema is not None)
    cache = store.cache(ANNOTATION_CACHE)
    view = cache.view(partition)
    runs: list[tuple[BackendPlan, RunResult, list[str]]] = []
    completions = {}
    total = RunStats()
    for identity, judge in judges.items():
        pending = [
            PendingRequest(
                ids[t["trace_id"]],
                _request_builder(
                    store,
                    ids[t["trace_id"]],
                    t,
                    samples[t["sample_id"]],
                    prompt,
                    settings,
                    taxonomy,
                    schemas[identity],
                    # As a teacher's rollouts: a seed derived from the request's id, so a judge sampling at temperature > 0
                    # answers the same request the same way (a rerun, another machine, a container).
                    int(ids[t["trace_id"]][:8], 16) % (2**31) if judge.send_seed else None,
                ),
            )
            for t in traces
            if judge_by_teacher[t["teacher"]].identity == identity and t["finish_reason"] != "error" and t["text"]
        ]
        run = run_cached(pending, judge.open, view, flush_every=settings.flush_every, progress=progress, run_label=run_label)
        runs.append((judge, run, judged_teachers[identity]))
        completions.update(run.completions)
        total.add(run.stats)

    tolerance = Tolerance(settings.numeric_rel_tol, settings.numeric_abs_tol)
    rows = []
    for trace in traces:
        sample = samples[trace["sample_id"]]
        completion = completions.get(ids[trace["trace_id"]])
        judgement, error = _judgement(completion, taxonomy, settings)
        verdict = verify(trace["final_answer"], sample["answer"], sample["answer_type"], sample["choices"], tolerance)
        correct, method = verdict.correct, verdict.method
        if correct is None:
            if settings.free_form_judge_fallback and judgement is not None and judgement.answer_correct is not None:
                correct, method = judgement.answer_correct, "judge"
            else:
                correct = False
        rows.append(
            {
                "annotation_id": ids[trace["trace_id"]],
                "trace_id": trace["trace_id"],
                "sample_id": trace["sample_id"],
                "source": source,
                "shard": shard,
                "annotator": judge_by_teacher[trace["teacher"]].identity,
                "prompt_version": prompt.version,
                "taxonomy_version": taxonomy.version,
                "correct": correct,
                "verify_method": method,
                "extracted_answer": verdict.extracted,
                "difficulty": judgement.difficulty if judgement else None,
                "verbosity": judgement.verbosity if judgement else None,
                "quality": judgement.quality if judgement else None,
                "tags": judgement.tags if judgement else [],
                "raw_tags": judgement.raw_tags if judgement else [],
                "judge_answer_correct": judgement.answer_correct if judgement else None,
                "finish_reason": trace["finish_reason"],
                "n_tokens": trace["n_tokens"],
                "judge_reply": completion.text if completion else None,
                "judge_error": error,
            }
        )
    _per_sample(rows, settings)
    return AnnotateResult(pa.Table.from_pylist(rows, schema=ANNOTATIONS.schema), total, samples, runs)


def pass_rates(rows: list[dict]) -> dict[str, tuple[float, int]]:
    """sample_id -> (share of its rollouts that are correct, number of rollouts)."""
    by_sample: dict[str, list[bool]] = defaultdict(list)
    for row in rows:
        by_sample[row["sample_id"]].append(bool(row["correct"]))
    return {sample: (sum(flags) / len(flags), len(flags)) for sample, flags in by_sample.items()}


def _per_sample(rows: list[dict], settings: AnnotationConfig) -> None:
    """Fill pass_rate, n_rollouts and the sample-level difficulty score, bin and label."""
    rates = pass_rates(rows)
    difficulties: dict[str, list[int]] = defaultdict(list)
    for row in rows:
        if row["difficulty"] is not None:
            difficulties[row["sample_id"]].append(row["difficulty"])
    for row in rows:
        rate, n = rates[row["sample_id"]]
        judged = difficulties.get(row["sample_id"])
        sample_difficulty = sum(judged) / len(judged) if judged else None
        failure = 9.0 * (1.0 - rate)
        w = settings.pass_rate_weight
        score = failure if sample_difficulty is None else (1 - w) * sample_difficulty + w * failure
        bin_index = bisect.bisect_right(settings.difficulty_bins, score)
        row.update(
            pass_rate=rate,
            n_rollouts=n,
            sample_difficulty=sample_difficulty,
            difficulty_score=round(score, 4),
            difficulty_bin=bin_index,
            difficulty_label=settings.difficulty_labels[bin_index],
        )


def _judgement(completion, taxonomy: Taxonomy, settings: AnnotationConfig):
    if completion is None:
        return None, "the trace has no reply to judge"
    if completion.finish_reason == "error":
        return None, f"judge request failed: {completion.error}"
    try:
        return parse_judgement(completion.text, taxonomy, settings), None
    except JudgeParseError as exc:
        suffix = " (judge reply truncated at max_tokens)" if completion.finish_reason == "length" else ""
        return None, f"unparsable judge reply: {exc}{suffix}"


def _request_builder(
    store: CorpusStore,
    key: str,
    trace: dict,
    sample: dict,
    prompt: JudgePrompt,
    settings: AnnotationConfig,
    taxonomy: Taxonomy,
    schema: dict | None,
    seed: int | None = None,
):
    def build() -> ChatRequest:
        content = []
        if settings.with_images:
            content += [{"type": "image_url", "image_url": {"url": image_data_url(store.images.get(i))}} for i in sample["image_ids"]]
        content.append(
            {
                "type": "text",
                "text": prompt.user_text(
                    question=sample["question"],
                    choices=sample["choices"],
                    reference=sample["answer"],
                    reasoning=trace["reasoning"],
                    final_answer=trace["final_answer"],
                    taxonomy=taxonomy,
                    settings=settings,
                ),
            }
        )
        return ChatRequest(
            key=key,
            messages=[{"role": "system", "content": prompt.config.system}, {"role": "user", "content": content}],
            max_tokens=settings.max_tokens,
            temperature=settings.temperature,
            top_p=settings.top_p,
            json_schema=schema,
            seed=seed,
        )

    return build
