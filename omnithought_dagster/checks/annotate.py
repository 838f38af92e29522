"""Asset checks on annotations, per (source, shard) partition; each re-reads the store."""

import dagster as dg
import pandas as pd

from omnithought_dagster.annotate.annotations import pass_rates
from omnithought_dagster.annotate.taxonomy import Taxonomy
from omnithought_dagster.assets.annotate import ANNOTATIONS_KEY
from omnithought_dagster.assets.teacher import traces_partitions
from omnithought_dagster.checks.gx import Expect, gx_check_result
from omnithought_dagster.checks.teacher import partition_keys, rate_result
from omnithought_dagster.config import ProjectConfig
from omnithought_dagster.resources import CorpusStoreResource, ProjectResource

EVERY_TRACE_ANNOTATED = "every_trace_annotated"
VALUES_IN_RANGE = "values_in_range"
TAGS_IN_TAXONOMY = "tags_in_taxonomy"
PASS_RATE_CONSISTENT = "pass_rate_consistent"
PARSE_FAILURE_RATE = "judge_parse_failure_rate"


def build_annotate_checks(config: ProjectConfig) -> list[dg.AssetChecksDefinition]:
    partitions = traces_partitions(config)

    def check(name: str):
        return dg.asset_check(asset=ANNOTATIONS_KEY, name=name, partitions_def=partitions, blocking=True)

    def load(context, store: CorpusStoreResource, columns: list[str] | None = None):
        source, shard = partition_keys(context, partitions)
        data = store.open().read_partition("annotations", {"source": source, "shard": shard}, columns)
        if data is None:
            return dg.AssetCheckResult(passed=False, description=f"annotations[{source}/{shard}] is not in the store: materialise it first")
        return data

    @check(EVERY_TRACE_ANNOTATED)
    def every_trace_annotated(context: dg.AssetCheckExecutionContext, store: CorpusStoreResource) -> dg.AssetCheckResult:
        """Each trace has exactly one annotation (and no annotation lacks a trace); each has a judgement or its error."""
        annotations = load(context, store, ["trace_id", "difficulty", "judge_error"])
        if isinstance(annotations, dg.AssetCheckResult):
            return annotations
        source, shard = partition_keys(context, partitions)
        traces = store.open().read_partition("cot_traces", {"source": source, "shard": shard}, ["trace_id"])
        trace_ids = set(traces.column("trace_id").to_pylist()) if traces is not None else set()
        frame = annotations.to_pandas()
        frame["has_trace"] = frame["trace_id"].isin(trace_ids)
        frame["judged_or_error"] = frame["difficulty"].notna() | frame["judge_error"].notna()
        missing = sorted(trace_ids - set(frame["trace_id"]))
        return gx_check_result(
            frame,
            [
                Expect("expect_column_values_to_be_unique", column="trace_id"),
                Expect("expect_column_values_to_be_in_set", column="has_trace", value_set=[True]),
                Expect("expect_column_values_to_be_in_set", column="judged_or_error", value_set=[True]),
                Expect("expect_table_row_count_to_equal", value=len(trace_ids)),
            ],
            extra_metadata={"traces": len(trace_ids), "traces_without_annotation": len(missing), "examples": missing[:5]},
        )

    @check(VALUES_IN_RANGE)
    def values_in_range(
        context: dg.AssetCheckExecutionContext, store: CorpusStoreResource, project: ProjectResource
    ) -> dg.AssetCheckResult:
        """Judge scores within 0-9, pass_rate within 0-1, difficulty bin and label within the configured bins."""
        annotations = load(context, store, ["difficulty", "verbosity", "quality", "pass_rate", "difficulty_bin", "difficulty_label"])
        if isinstance(annotations, dg.AssetCheckResult):
            return annotations
        settings = project.config.annotation
        return gx_check_result(
            annotations.to_pandas(),
            [
                *(
                    Expect("expect_column_values_to_be_between", column=c, min_value=0, max_value=9)
                    for c in ("difficulty", "verbosity", "quality")
                ),
                Expect("expect_column_values_to_be_between", column="pass_rate", min_value=0, max_value=1),
                Expect("expect_column_values_to_not_be_null", column="pass_rate"),
                Expect("expect_column_values_to_be_between", column="difficulty_bin", min_value=0, max_value=len(settings.difficulty_bins)),
                Expect("expect_column_values_to_be_in_set", column="difficulty_label", value_set=list(settings.difficulty_labels)),
            ],
        )

    @check(TAGS_IN_TAXONOMY)
    def tags_in_taxonomy(
        context: dg.AssetCheckExecutionContext, store: CorpusStoreResource, project: ProjectResource
    ) -> dg.AssetCheckResult:
        """Every tag is a label of the configured taxonomy; judged rows have at least one."""
        annotations = load(context, store, ["tags", "judge_error"])
        if isinstance(annotations, dg.AssetCheckResult):
            return annotations
        taxonomy = Taxonomy.load(project.config.annotation.taxonomy)
        rows = annotations.to_pylist()
        tags = pd.DataFrame({"tag": [t for r in rows for t in r["tags"]]})
        judged = pd.DataFrame({"n_tags": [len(r["tags"]) for r in rows if r["judge_error"] is None]})
        return gx_check_result(
            tags if len(tags) else pd.DataFrame({"tag": pd.Series([], dtype=str)}),
            [
                Expect("expect_column_values_to_be_in_set", column="tag", value_set=taxonomy.names),
            ],
            extra_metadata={
                "taxonomy_version": taxonomy.version,
                "judged_without_tags": int((judged["n_tags"] == 0).sum()) if len(judged) else 0,
            },
        )

    @check(PASS_RATE_CONSISTENT)
    def pass_rate_consistent(context: dg.AssetCheckExecutionContext, store: CorpusStoreResource) -> dg.AssetCheckResult:
        """pass_rate and n_rollouts equal what the trace-level `correct` values of each sample give (recomputed here)."""
        annotations = load(context, store, ["sample_id", "correct", "pass_rate", "n_rollouts"])
        if isinstance(annotations, dg.AssetCheckResult):
            return annotations
        rows = annotations.to_pylist()
        recomputed = pass_rates(rows)
        frame = pd.DataFrame(
            {
                "sample_id": [r["sample_id"] for r in rows],
                "consistent": [
                    abs(r["pass_rate"] - recomputed[r["sample_id"]][0]) < 1e-9 and r["n_rollouts"] == recomputed[r["sample_id"]][1]
                    for r in rows
                ],
            }
        )
        bad = sorted(set(frame.loc[~frame["consistent"], "sample_id"]))
        return gx_check_result(
            frame,
            [Expect("expect_column_values_to_be_in_set", column="consistent", value_set=[True])],
            extra_metadata={"samples": len(recomputed), "inconsistent_samples": len(bad), "examples": bad[:5]},
        )

    @check(PARSE_FAILURE_RATE)
    def judge_parse_failure_rate(
        context: dg.AssetCheckExecutionContext, store: CorpusStoreResource, project: ProjectResource
    ) -> dg.AssetCheckResult:
        """Share of judge replies that did not parse or validate: warn / fail thresholds from annotation.parse_failure_rate."""
        annotations = load(context, store, ["judge_reply", "judge_error"])
        if isinstance(annotations, dg.AssetCheckResult):
            return annotations
        replies = [
            error
            for reply, error in zip(
                annotations.column("judge_reply").to_pylist(), annotations.column("judge_error").to_pylist(), strict=True
            )
            if reply is not None
        ]
        failed = sum(1 for error in replies if error)
        return rate_result("judge parse failure", failed, len(replies), project.config.annotation.parse_failure_rate)

    return [every_trace_annotated, values_in_range, tags_in_taxonomy, pass_rate_consistent, judge_parse_failure_rate]
