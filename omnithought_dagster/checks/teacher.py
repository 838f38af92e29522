"""Asset checks on cot_traces, per (source, shard) partition; each re-reads the store."""

import dagster as dg
import pandas as pd

from omnithought_dagster.assets.teacher import COT_TRACES_KEY, teacher_identities, traces_partitions
from omnithought_dagster.checks.gx import Expect, gx_check_result
from omnithought_dagster.config import ProjectConfig, ThresholdConfig
from omnithought_dagster.resources import CorpusStoreResource, ProjectResource
from omnithought_dagster.teacher.traces import shard_samples

SAMPLES_IN_SEED_POOL = "samples_in_seed_pool"
TRACE_ID_UNIQUE = "trace_id_unique"
ROLLOUTS_COMPLETE = "rollouts_complete"
ERROR_RATE = "error_rate"
TRUNCATION_RATE = "truncation_rate"
FINAL_ANSWER_PRESENT = "final_answer_present"


def build_teacher_checks(config: ProjectConfig) -> list[dg.AssetChecksDefinition]:
    partitions = traces_partitions(config)

    def check(name: str, description: str | None = None):
        return dg.asset_check(asset=COT_TRACES_KEY, name=name, partitions_def=partitions, blocking=True, description=description)

    @check(SAMPLES_IN_SEED_POOL)
    def samples_in_seed_pool(context: dg.AssetCheckExecutionContext, store: CorpusStoreResource) -> dg.AssetCheckResult:
        """Every trace's sample_id is a sample of seed_pool (for the same source)."""
        source, shard = partition_keys(context, partitions)
        traces = _traces(store, source, shard, ["sample_id"])
        if isinstance(traces, dg.AssetCheckResult):
            return traces
        seed = store.open().read_partition("seed_pool", source, ["sample_id"])
        known = set(seed.column("sample_id").to_pylist()) if seed is not None else set()
        frame = pd.DataFrame({"sample_id": traces.column("sample_id").to_pylist()})
        frame["in_seed_pool"] = frame["sample_id"].isin(known)
        return gx_check_result(
            frame,
            [Expect("expect_column_values_to_be_in_set", column="in_seed_pool", value_set=[True])],
            extra_metadata={"orphan_samples": sorted(set(frame.loc[~frame["in_seed_pool"], "sample_id"]))[:10]},
        )

    @check(TRACE_ID_UNIQUE)
    def trace_id_unique(context: dg.AssetCheckExecutionContext, store: CorpusStoreResource) -> dg.AssetCheckResult:
        """trace_id is unique within the partition (and well formed)."""
        traces = _traces(store, *partition_keys(context, partitions), ["trace_id"])
        if isinstance(traces, dg.AssetCheckResult):
            return traces
        return gx_check_result(
            traces.to_pandas(),
            [
                Expect("expect_column_values_to_be_unique", column="trace_id"),
                Expect("expect_column_values_to_match_regex", column="trace_id", regex=r"^[0-9a-f]{32}$"),
            ],
        )

    @check(ROLLOUTS_COMPLETE)
    def rollouts_complete(
        context: dg.AssetCheckExecutionContext, store: CorpusStoreResource, project: ProjectResource
    ) -> dg.AssetCheckResult:
        """Every sample of the shard has exactly rollouts 0..N-1 from every teacher (its own N), and no trace of a teacher the
        project does not have (an errored rollout still counts: it is recorded)."""
        source, shard = partition_keys(context, partitions)
        cfg = project.config
        traces = _traces(store, source, shard, ["sample_id", "teacher", "rollout"])
        if isinstance(traces, dg.AssetCheckResult):
            return traces
        expected = {s["sample_id"] for s in shard_samples(store.open(), source, shard, cfg.generation.shards)}
        identities = teacher_identities(cfg)
        want = {identities[t.label]: list(range(cfg.rollouts_of(t))) for t in cfg.teachers}
        have: dict[str, dict[str, list[int]]] = {}
        for sample, teacher, rollout in zip(*(traces.column(c).to_pylist() for c in ("sample_id", "teacher", "rollout")), strict=True):
            have.setdefault(sample, {}).setdefault(teacher, []).append(rollout)
        frame = pd.DataFrame({"sample_id": sorted(expected | set(have))})
        frame["rollouts_ok"] = [{t: sorted(r) for t, r in have.get(s, {}).items()} == want for s in frame["sample_id"]]
        bad = frame.loc[~frame["rollouts_ok"], "sample_id"].tolist()
        return gx_check_result(
            frame,
            [Expect("expect_column_values_to_be_in_set", column="rollouts_ok", value_set=[True])],
            extra_metadata={
                "samples": len(expected),
                "rollouts": cfg.generation.rollouts,
                "rollouts_per_teacher": {t: len(r) for t, r in want.items()},
                "samples_incomplete": len(bad),
                "examples": {s: {t: sorted(r) for t, r in have.get(s, {}).items()} for s in bad[:5]},
            },
        )

    def finish_rate_check(name: str, finish_reason: str, what: str, threshold: str, description: str):
        @check(name, description)
        def rate_check(context: dg.AssetCheckExecutionContext, store: CorpusStoreResource, project: ProjectResource) -> dg.AssetCheckResult:
            traces = _traces(store, *partition_keys(context, partitions), ["finish_reason"])
            if isinstance(traces, dg.AssetCheckResult):
                return traces
            reasons = traces.column("finish_reason").to_pylist()
            return rate_result(what, sum(r == finish_reason for r in reasons), len(reasons), getattr(project.config.generation, threshold))

        return rate_check

    error_rate = finish_rate_check(
        ERROR_RATE,
        "error",
        "error",
        "error_rate",
        "Share of traces whose request failed after retries: warn / fail thresholds from generation.error_rate.",
    )
    truncation_rate = finish_rate_check(
        TRUNCATION_RATE,
        "length",
        "truncation",
        "truncation_rate",
        "Share of traces cut at max_tokens (finish_reason=length): warn / fail thresholds.",
    )

    @check(FINAL_ANSWER_PRESENT)
    def final_answer_present(
        context: dg.AssetCheckExecutionContext, store: CorpusStoreResource, project: ProjectResource
    ) -> dg.AssetCheckResult:
        """Finished traces (finish_reason=stop) carry a parsed final answer: warn / fail thresholds on the missing share."""
        traces = _traces(store, *partition_keys(context, partitions), ["finish_reason", "final_answer"])
        if isinstance(traces, dg.AssetCheckResult):
            return traces
        finished = [
            a
            for r, a in zip(traces.column("finish_reason").to_pylist(), traces.column("final_answer").to_pylist(), strict=True)
            if r == "stop"
        ]
        missing = sum(1 for a in finished if not a)
        return rate_result("missing final answer", missing, len(finished), project.config.generation.missing_answer_rate)

    return [samples_in_seed_pool, trace_id_unique, rollouts_complete, error_rate, truncation_rate, final_answer_present]


def rate_result(what: str, count: int, total: int, threshold: ThresholdConfig) -> dg.AssetCheckResult:
    """Pass at or under `warn`; a WARN above it; an ERROR above `fail`."""
    rate = count / total if total else 0.0
    metadata = {"count": count, "total": total, "rate": round(rate, 5), "warn_above": threshold.warn, "fail_above": threshold.fail}
    if rate > threshold.fail:
        return dg.AssetCheckResult(
            passed=False,
            severity=dg.AssetCheckSeverity.ERROR,
            metadata=metadata,
            description=f"{what} rate {rate:.2%} ({count}/{total}) is above the fail threshold {threshold.fail:.2%}",
        )
    if rate > threshold.warn:
        return dg.AssetCheckResult(
            passed=False,
            severity=dg.AssetCheckSeverity.WARN,
            metadata=metadata,
            description=f"{what} rate {rate:.2%} ({count}/{total}) is above the warn threshold {threshold.warn:.2%}",
        )
    return dg.AssetCheckResult(passed=True, metadata=metadata)


def partition_keys(context, partitions: dg.MultiPartitionsDefinition) -> tuple[str, str]:
    """(source, shard) of the partition a check runs for."""
    keys = partition_dims(context, partitions)
    return keys["source"], keys["shard"]


def partition_dims(context, partitions: dg.MultiPartitionsDefinition) -> dict[str, str]:
    """{dimension: key} of the multi-partition a check runs for (a MultiPartitionKey, or its string in a tagged run)."""
    key = context.partition_key
    if not isinstance(key, dg.MultiPartitionKey):  # a run tagged with the key as a plain string
        key = partitions.get_partition_key_from_str(key)
    return dict(key.keys_by_dimension)


def _traces(store: CorpusStoreResource, source: str, shard: str, columns: list[str]):
    data = store.open().read_partition("cot_traces", {"source": source, "shard": shard}, columns)
    if data is None:
        return dg.AssetCheckResult(passed=False, description=f"cot_traces[{source}/{shard}] is not in the store: materialise it first")
    return data
