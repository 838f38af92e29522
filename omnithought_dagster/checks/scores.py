"""Asset checks on benchmark_scores (per student x recipe); each re-reads the store."""

import dagster as dg

from omnithought_dagster.assets.scores import BENCHMARK_SCORES_KEY, score_partitions
from omnithought_dagster.checks.teacher import partition_dims
from omnithought_dagster.config import ProjectConfig
from omnithought_dagster.evaluation.run import OVERALL
from omnithought_dagster.evaluation.tasks import task_name
from omnithought_dagster.resources import CorpusStoreResource, ProjectResource

SCORES_VALID = "scores_valid"
NO_REGRESSION = "no_regression_vs_baseline"


def build_score_checks(config: ProjectConfig) -> list[dg.AssetChecksDefinition]:
    partitions = score_partitions(config)

    @dg.asset_check(asset=BENCHMARK_SCORES_KEY, name=SCORES_VALID, partitions_def=partitions, blocking=True)
    def scores_valid(context: dg.AssetCheckExecutionContext, store: CorpusStoreResource, project: ProjectResource) -> dg.AssetCheckResult:
        """Every configured benchmark has an overall score; scores lie in [0, 1]; n equals the benchmark's size (or the limit);
        our benchmarks' scores are the share of their stored item rows marked correct."""
        rows = _rows(store, context, partitions)
        if not rows:
            return dg.AssetCheckResult(passed=False, description=f"benchmark_scores[{context.partition_key}] is missing or empty")
        evaluation = project.config.evaluation
        problems = [f"{r['benchmark']}/{r['slice']}: score {r['score']} outside [0, 1]" for r in rows if not 0 <= r["score"] <= 1]
        overall = {r["task"]: r for r in rows if r["slice"] == OVERALL}
        expected = [task_name(b) for b in evaluation.benchmarks] + list(evaluation.lmms_tasks)
        problems += [f"{task}: no overall score" for task in expected if task not in overall]
        for task, row in overall.items():
            size = row["n_benchmark"]
            want = min(size, evaluation.limit) if size is not None and evaluation.limit else size
            if want is not None and row["n"] != want:
                problems.append(f"{row['benchmark']}: n = {row['n']} but the benchmark has {want} items")
            tagged = sum(r["n"] for r in rows if r["task"] == task and r["slice"].startswith("tag:"))
            if tagged and tagged != row["n"]:
                problems.append(f"{row['benchmark']}: tag slices cover {tagged} items, overall {row['n']}")
        ours = {task: overall[task] for task in map(task_name, evaluation.benchmarks) if task in overall}
        problems += _scores_from_items(store, context, partitions, ours)
        return dg.AssetCheckResult(
            passed=not problems, metadata={"rows": len(rows), "problems": len(problems)}, description="; ".join(problems[:5]) or None
        )

    @dg.asset_check(asset=BENCHMARK_SCORES_KEY, name=NO_REGRESSION, partitions_def=partitions, blocking=False)
    def no_regression_vs_baseline(
        context: dg.AssetCheckExecutionContext, store: CorpusStoreResource, project: ProjectResource
    ) -> dg.AssetCheckResult:
        """Warns when an overall score is below the student's baseline by more than evaluation.regression_margin."""
        rows = _rows(store, context, partitions)
        if not rows:
            return dg.AssetCheckResult(passed=False, description=f"benchmark_scores[{context.partition_key}] is missing or empty")
        margin = project.config.evaluation.regression_margin
        overall = [r for r in rows if r["slice"] == OVERALL]
        missing = [r["benchmark"] for r in overall if r["delta"] is None]
        worse = [
            f"{r['benchmark']}: {r['score']:.3f} vs baseline {r['baseline_score']:.3f} ({r['delta']:+.3f})"
            for r in overall
            if r["delta"] is not None and r["delta"] < -margin
        ]
        metadata = {"margin": margin, "regressions": len(worse), "without_baseline": len(missing)}
        if worse or missing:
            reasons = worse + [f"{b}: the baseline has no score to compare with" for b in missing]
            return dg.AssetCheckResult(passed=False, severity=dg.AssetCheckSeverity.WARN, metadata=metadata, description="; ".join(reasons))
        return dg.AssetCheckResult(passed=True, metadata=metadata)

    return [scores_valid, no_regression_vs_baseline]


def _scores_from_items(store: CorpusStoreResource, context, partitions: dg.MultiPartitionsDefinition, overall: dict) -> list[str]:
    """Our benchmarks' scores (`overall`: task -> its overall row) against their stored item rows (benchmark_samples):
    the share marked correct, over as many items - what a reader with DuckDB recomputes."""
    table = store.open().read_partition("benchmark_samples", partition_dims(context, partitions), columns=["benchmark", "correct"])
    items: dict[str, list[bool]] = {}
    for row in table.to_pylist() if table is not None else []:
        items.setdefault(row["benchmark"], []).append(bool(row["correct"]))
    problems = []
    for row in overall.values():
        marks = items.get(row["benchmark"], [])
        if len(marks) != row["n"] or abs(sum(marks) / max(len(marks), 1) - row["score"]) > 1e-9:
            problems.append(
                f"{row['benchmark']}: score {row['score']:.4f} over {row['n']} items, but its stored item rows give "
                f"{sum(marks)}/{len(marks)}"
            )
    return problems


def _rows(store: CorpusStoreResource, context, partitions: dg.MultiPartitionsDefinition) -> list[dict]:
    table = store.open().read_partition("benchmark_scores", partition_dims(context, partitions))
    return table.to_pylist() if table is not None else []
