"""cot_traces rows: trace ids, the requests that produce them, and the rows built from replies.

Plain Python over the store and a backend (no Dagster): `generate_shard` is what the asset,
the benchmark and the tests call.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from contextlib import AbstractContextManager
from dataclasses import dataclass, field

import pyarrow as pa

from omnithought_dagster.ids import content_id, shard_of
from omnithought_dagster.llm.backends import Backend, ChatRequest, Completion, image_data_url
from omnithought_dagster.llm.runner import PendingRequest, RunStats, given, run_cached
from omnithought_dagster.store import CorpusStore
from omnithought_dagster.store.tables import COT_TRACES
from omnithought_dagster.teacher.prompt import TeacherPrompt, json_schema, parse_reply, reply_regex
from omnithought_dagster.teacher.settings import GenerationConfig

GENERATION_CACHE = "generation"
SEED_COLUMNS = ["sample_id", "source", "record_index", "image_ids", "question", "choices", "answer_type"]


def sampling_params(generation: GenerationConfig, mode: str) -> dict:
    """Everything about sampling that changes a reply (with `constraint`, the sample's own): part of every trace id."""
    return {
        "temperature": generation.temperature,
        "top_p": generation.top_p,
        "max_tokens": generation.max_tokens,
        "seed": generation.seed,
        "structured_output": mode,
    }


def constraint(generation: GenerationConfig, mode: str, sample: dict) -> dict:
    """The structured-output constraint for one sample (its answer type shapes the final answer)."""
    n_choices = len(sample.get("choices") or [])
    if mode == "json":
        return {"json_schema": json_schema(generation, sample["answer_type"], n_choices)}
    if mode == "regex":
        return {"regex": reply_regex(generation, sample["answer_type"], n_choices)}
    return {}


def trace_id(sample_id: str, teacher: str, prompt: TeacherPrompt, sampling: dict, rollout: int) -> str:
    return content_id(
        "trace",
        {"sample": sample_id, "teacher": teacher, "prompt": [prompt.version, prompt.text_hash], "sampling": sampling, "rollout": rollout},
    )


def shard_samples(store: CorpusStore, source: str, shard: str, n_shards: int) -> list[dict]:
    """The seed samples of one (source, shard) partition, in record order."""
    table = store.read_partition("seed_pool", source, columns=SEED_COLUMNS)
    if table is None:
        raise LookupError(f"seed_pool[{source}] is not materialised")
    rows = [row for row in table.to_pylist() if shard_of(row["sample_id"], n_shards) == int(shard)]
    return sorted(rows, key=lambda row: row["record_index"])


@dataclass(frozen=True)
class BackendPlan:
    """What trace ids need to know of a backend, and how to open it when requests must be sent."""

    identity: str
    structured_output: bool
    open: Callable[[], AbstractContextManager[Backend]]
    names: tuple[str, ...] = ()  # what the project file calls it (its label, its model): where its price is looked up
    token_source: str = "provider"  # who counts its tokens: the server (provider) or this process (counted)
    batched: bool = False  # sent through a provider's batch API (priced with its batch discount)
    send_seed: bool = True  # each request carries a seed derived from its key: the same request samples the same way


@dataclass
class ShardResult:
    rows: pa.Table
    stats: RunStats
    completions: dict[str, Completion] = field(default_factory=dict)  # trace id -> the reply (cached or sent), for the ledger


def generate_shard(
    store: CorpusStore,
    source: str,
    shard: str,
    backend: Backend | BackendPlan,
    prompt: TeacherPrompt,
    generation: GenerationConfig,
    *,
    send_seed: bool = True,
    progress: Callable[[RunStats], None] | None = None,
    run_label: str | None = None,
    only: Collection[str] | None = None,
) -> ShardResult:
    """Every rollout of every sample in the partition (or of the samples in `only`), from the cache or the backend.

    `backend` is an open Backend, or a BackendPlan that opens one only if the cache misses.
    """
    plan = (
        backend
        if isinstance(backend, BackendPlan)
        else BackendPlan(backend.identity, backend.supports_structured_output, lambda: given(backend))
    )
    samples = shard_samples(store, source, shard, generation.shards)
    if only is not None:
        wanted = set(only)
        samples = [s for s in samples if s["sample_id"] in wanted]
    mode = prompt.mode if plan.structured_output else "none"
    sampling = sampling_params(generation, mode)
    partition = {"source": source, "shard": shard}
    specs, pending = [], []
    for sample in samples:
        messages = _lazy_messages(store, sample, prompt)
        shape = constraint(generation, mode, sample)
        for rollout in range(generation.rollouts):
            key = trace_id(sample["sample_id"], plan.identity, prompt, {**sampling, **shape}, rollout)
            # A per-rollout seed derived from the trace id: the same trace samples the same way.
            seed = (generation.seed * 1_000_003 + int(key[:8], 16)) % (2**31) if send_seed else None
            specs.append((key, sample, rollout))
            pending.append(PendingRequest(key, _request_builder(key, messages, generation, shape, seed)))
    cache = store.cache(GENERATION_CACHE)
    result = run_cached(
        pending,
        plan.open,
        cache.view(partition),
        flush_every=generation.flush_every,
        progress=progress,
        run_label=run_label,
    )
    rows = [
        _row(key, sample, rollout, shard, plan.identity, prompt, result.completions[key], generation.answer_pattern)
        for key, sample, rollout in specs
    ]
    return ShardResult(pa.Table.from_pylist(rows, schema=COT_TRACES.schema), result.stats, result.completions)


def _lazy_messages(store: CorpusStore, sample: dict, prompt: TeacherPrompt) -> Callable[[], list[dict]]:
    """Messages built on first use and shared by the sample's rollouts (images read once)."""
    built: list[list[dict]] = []

    def get() -> list[dict]:
        if not built:
            content = [{"type": "image_url", "image_url": {"url": image_data_url(store.images.get(i))}} for i in sample["image_ids"]]
            content.append({"type": "text", "text": prompt.user_text(sample["question"], sample["choices"], sample["answer_type"])})
            built.append([{"role": "system", "content": prompt.config.system}, {"role": "user", "content": content}])
        return built[0]

    return get


def _request_builder(key: str, messages: Callable[[], list[dict]], generation: GenerationConfig, shape: dict, seed: int | None):
    def build() -> ChatRequest:
        return ChatRequest(
            key=key,
            messages=messages(),
            max_tokens=generation.max_tokens,
            temperature=generation.temperature,
            top_p=generation.top_p,
            seed=seed,
            **shape,
        )

    return build


def _row(
    key: str, sample: dict, rollout: int, shard: str, teacher: str, prompt: TeacherPrompt, completion: Completion, answer_pattern: str
) -> dict:
    parsed = parse_reply(completion.text, answer_pattern) if completion.finish_reason != "error" else None
    return {
        "trace_id": key,
        "sample_id": sample["sample_id"],
        "source": sample["source"],
        "shard": shard,
        "teacher": teacher,
        "prompt_version": prompt.version,
        "rollout": rollout,
        "text": completion.text,
        "reasoning": parsed.reasoning if parsed else None,
        "final_answer": parsed.final_answer if parsed else None,
        "finish_reason": completion.finish_reason,
        "n_prompt_tokens": completion.n_prompt_tokens,
        "n_tokens": completion.n_tokens,
        "latency_s": round(completion.latency_s, 4),
        "attempts": completion.attempts,
        "error": completion.error,
    }


# -- several teachers ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class TeacherPlan:
    """One teacher of the project: its label in the project file, how to reach it, its prompt and its sampling."""

    label: str
    plan: BackendPlan
    prompt: TeacherPrompt
    generation: GenerationConfig
    send_seed: bool = True


@dataclass
class TeachersResult:
    rows: pa.Table  # every teacher's traces, teacher by teacher in project-file order
    results: list[tuple[TeacherPlan, ShardResult]]

    @property
    def stats(self) -> RunStats:
        """The runs added up (what a one-teacher step reported before)."""
        total = RunStats()
        for _, result in self.results:
            total.add(result.stats)
        return total


def generate_teachers(
    store: CorpusStore,
    source: str,
    shard: str,
    teachers: list[TeacherPlan],
    *,
    progress: Callable[[str, RunStats], None] | None = None,
    run_label: str | None = None,
    only: Collection[str] | None = None,
) -> TeachersResult:
    """Every teacher's rollouts of the partition's samples (or of the samples in `only`), one teacher after the other (each
    engine started only when its cache misses, and stopped before the next starts)."""
    identities = [t.plan.identity for t in teachers]
    if len(set(identities)) != len(identities):
        raise ValueError(f"two teachers share an identity in trace ids ({identities}): give each its own name")
    results = []
    for teacher in teachers:
        result = generate_shard(
            store,
            source,
            shard,
            teacher.plan,
            teacher.prompt,
            teacher.generation,
            send_seed=teacher.send_seed,
            progress=(lambda s, label=teacher.label: progress(label, s)) if progress else None,
            run_label=run_label,
            only=only,
        )
        results.append((teacher, result))
    rows = pa.concat_tables([r.rows for _, r in results]) if results else COT_TRACES.schema.empty_table()
    return TeachersResult(rows, results)
