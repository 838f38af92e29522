"""What a planned run will cost, measured on a sample of it before it is paid for.

`estimate` picks a deterministic share of every source's seed samples (by sample id hash, at least `min_samples`), has every
teacher write its rollouts of them and every judge judge those traces - the very requests the run will send, through the same
caches, so the run later finds them there and nothing measured is paid twice - then scales each model's measured tokens and
engine time per request to the requests the whole run will send, and prices them like the ledger does. No Dagster here.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from omnithought_dagster.annotate.annotations import TRACE_COLUMNS, annotate_shard
from omnithought_dagster.ledger.ledger import money
from omnithought_dagster.ledger.settings import CostsConfig
from omnithought_dagster.llm.backends import Completion
from omnithought_dagster.store import CorpusStore
from omnithought_dagster.teacher.traces import BackendPlan, TeacherPlan, generate_teachers, shard_samples

ESTIMATE_RUN = "estimate"  # the paid_by stamp of the replies an estimate sends


@dataclass
class ModelEstimate:
    role: str  # teacher | judge
    model: str
    planned_requests: int  # what the whole run will send this model
    measured_requests: int  # what the sample sent it (or found cached)
    prompt_tokens_per_request: float
    completion_tokens_per_request: float
    engine_seconds_per_request: float | None  # None when every measured reply predates the ledger
    prompt_tokens: int = 0
    completion_tokens: int = 0
    engine_seconds: float | None = None
    gpu_seconds: float | None = None
    currency: str = "USD"
    cost: float | None = None
    token_cost: float | None = None
    gpu_cost: float | None = None
    price_version: str | None = None


@dataclass
class Estimate:
    samples: int  # seed samples the run covers
    measured_samples: int
    models: list[ModelEstimate] = field(default_factory=list)

    @property
    def cost(self) -> float | None:
        """The run's money, or None when any model's is unknown."""
        costs = [m.cost for m in self.models]
        return None if any(c is None for c in costs) else sum(costs)

    def as_dict(self) -> dict:
        return {
            "samples": self.samples,
            "measured_samples": self.measured_samples,
            "cost": self.cost,
            "models": [asdict(m) for m in self.models],
        }


def pick(sample_ids: list[str], share: float, min_samples: int) -> set[str]:
    """The measured samples: the lowest hash keys (sample ids are hashes), `share` of them and at least `min_samples`."""
    wanted = min(len(sample_ids), max(min_samples, math.ceil(share * len(sample_ids))))
    return set(sorted(sample_ids)[:wanted])


def estimate(
    store: CorpusStore,
    sources: list[str],
    shards: list[str],
    teachers: list[TeacherPlan],
    judge_of: Callable[[str], BackendPlan],
    judge_prompt,
    annotation,
    taxonomy,
    costs: CostsConfig,
    *,
    share: float = 0.1,
    min_samples: int = 8,
) -> Estimate:
    """See the module docstring. `shards` are the cot_traces shard keys; seed_pool must hold every source."""
    by_partition: dict[tuple[str, str], list[str]] = {}
    for source in sources:
        for shard in shards:
            samples = shard_samples(store, source, shard, len(shards))
            by_partition[(source, shard)] = [s["sample_id"] for s in samples]
    everything = [s for ids in by_partition.values() for s in ids]
    measured = pick(everything, share, min_samples)
    replies: dict[tuple[str, str], list[Completion]] = {}
    planned: dict[tuple[str, str], int] = {}
    judged_share: dict[str, tuple[int, int]] = {}  # teacher identity -> (traces judged, traces) in the sample
    plan_of: dict[tuple[str, str], BackendPlan] = {}
    for (source, shard), ids in by_partition.items():
        only = [s for s in ids if s in measured]
        for teacher in teachers:
            key = ("teacher", teacher.plan.identity)
            plan_of[key] = teacher.plan
            planned[key] = planned.get(key, 0) + len(ids) * teacher.generation.rollouts
        if not only:
            continue
        generated = generate_teachers(store, source, shard, teachers, run_label=ESTIMATE_RUN, only=only)
        rows = generated.rows.select(TRACE_COLUMNS).to_pylist()
        for teacher, result in generated.results:
            replies.setdefault(("teacher", teacher.plan.identity), []).extend(result.completions.values())
            judged = sum(
                1 for r in result.rows.select(["finish_reason", "text"]).to_pylist() if r["finish_reason"] != "error" and r["text"]
            )
            done, total = judged_share.get(teacher.plan.identity, (0, 0))
            judged_share[teacher.plan.identity] = (done + judged, total + result.rows.num_rows)
        if rows:
            annotated = annotate_shard(
                store, source, shard, judge_of, judge_prompt, annotation, taxonomy, run_label=ESTIMATE_RUN, traces=rows
            )
            for plan, run, _teachers in annotated.runs:
                key = ("judge", plan.identity)
                plan_of[key] = plan
                replies.setdefault(key, []).extend(run.completions.values())
    # A judge's planned requests: the traces of the teachers it judges that will have a text to judge (the sample's share).
    for teacher in teachers:
        judge = judge_of(teacher.plan.identity)
        key = ("judge", judge.identity)
        plan_of.setdefault(key, judge)
        done, total = judged_share.get(teacher.plan.identity, (0, 0))
        traces = planned[("teacher", teacher.plan.identity)]
        planned[key] = planned.get(key, 0) + (round(traces * done / total) if total else traces)
    result = Estimate(samples=len(everything), measured_samples=len(measured))
    for key, n in planned.items():
        result.models.append(_scale(key, n, replies.get(key, []), plan_of[key], costs))
    return result


def _scale(key: tuple[str, str], planned: int, replies: list[Completion], plan: BackendPlan, costs: CostsConfig) -> ModelEstimate:
    role, model = key
    ok = [c for c in replies if c.finish_reason != "error"]
    prompt = sum(c.n_prompt_tokens or 0 for c in ok) / len(ok) if ok else 0.0
    completion = sum(c.n_tokens or 0 for c in ok) / len(ok) if ok else 0.0
    timed = [c for c in replies if c.engine_s is not None]
    engine = sum(c.engine_s for c in timed) / len(timed) if timed else None
    gpu = sum(c.gpu_s or 0.0 for c in timed) / len(timed) if timed else None
    row = {
        "prompt_tokens": round(prompt * planned),
        "completion_tokens": round(completion * planned),
        "gpu_seconds": round(gpu * planned, 3) if gpu is not None else 0.0,
        "unstamped": int(gpu is None),  # no engine time measured: GPU money unknown
        "batched": plan.batched,
        "batched_prompt_tokens": round(prompt * planned) if plan.batched else 0,
        "batched_completion_tokens": round(completion * planned) if plan.batched else 0,
    }
    priced = money(row, costs.price(*plan.names), costs)
    if not ok and planned:  # nothing answered: no tokens per request to scale
        priced = {**priced, "token_cost": None, "cost": None}
    return ModelEstimate(
        role=role,
        model=model,
        planned_requests=planned,
        measured_requests=len(replies),
        prompt_tokens_per_request=round(prompt, 2),
        completion_tokens_per_request=round(completion, 2),
        engine_seconds_per_request=round(engine, 6) if engine is not None else None,
        prompt_tokens=row["prompt_tokens"],
        completion_tokens=row["completion_tokens"],
        engine_seconds=round(engine * planned, 1) if engine is not None else None,
        gpu_seconds=row["gpu_seconds"] if gpu is not None else None,
        currency=costs.currency,
        cost=priced["cost"],
        token_cost=priced["token_cost"],
        gpu_cost=priced["gpu_cost"],
        price_version=priced["price_version"],
    )
