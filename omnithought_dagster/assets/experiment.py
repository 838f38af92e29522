"""experiments: one partition per experiment of the project file - its arms' per-item verdicts (experiment_items), their
subsets, checkpoints and costs (experiment_arms), and the numbers (experiment_results): each arm's score per benchmark and
tag slice, each curated arm's paired difference to each control with a bootstrap interval, and the SQL that recomputes it.

The arms are ordinary partitions of sampled_subsets, student_checkpoints and benchmark_scores (experiment/settings.py);
this step trains and scores nothing, it reads what they stored (experiment/run.py) and fails naming the partitions that
are missing (`omnithought experiment run` materialises them).
"""

from collections.abc import Callable
from typing import Any

import dagster as dg

from omnithought_dagster.assets.curate import SAMPLED_SUBSETS_KEY
from omnithought_dagster.assets.metadata import column_schema, markdown_cell, plot
from omnithought_dagster.assets.scores import BENCHMARK_SCORES_KEY
from omnithought_dagster.assets.student import STUDENT_BASELINES_KEY, STUDENT_CHECKPOINTS_KEY
from omnithought_dagster.config import BASELINE_RECIPE, ProjectConfig
from omnithought_dagster.experiment.run import NO_BENCHMARK, MissingArms, collect
from omnithought_dagster.experiment.stats import REPLICATES
from omnithought_dagster.ids import code_version
from omnithought_dagster.resources import CorpusStoreResource, ProjectResource
from omnithought_dagster.store import CorpusStore, table_spec

EXPERIMENT_GROUP = "experiments"
EXPERIMENTS_KEY = dg.AssetKey("experiments")
EXPERIMENT_CODE_VERSION = "experiments-v1"
EXPERIMENT_TABLES = ("experiment_items", "experiment_arms", "experiment_results")


def experiment_partitions(config: ProjectConfig) -> dg.StaticPartitionsDefinition:
    return dg.StaticPartitionsDefinition([e.name for e in config.experiments])


def experiment_partition_keys(config: ProjectConfig) -> list[str]:
    return [e.name for e in config.experiments]


def experiment_settings(config: ProjectConfig) -> dict:
    """What changes an experiment's rows (its code version hashes it): the experiments and the arms they resolve to."""
    return {
        "experiments": [e.model_dump(mode="json") for e in config.experiments],
        "arms": [[vars(a) for a in config.arms(e.name)] for e in config.experiments],
        "benchmarks": {e.name: config.experiment_benchmarks(e.name) for e in config.experiments},
    }


def experiment_selection(config: ProjectConfig, name: str) -> Callable[[dg.AssetKey, str], bool]:
    """What one experiment needs, as `run_demo`'s `only`: every partition of the stages before the subsets, then its arms'
    subsets, its students' baselines, the arms' checkpoints, their scores and the baselines' (what the arms' deltas are
    taken against; a replicate shares its student's), and the experiment itself."""
    arms = config.arms(name)
    keys = {str(dg.MultiPartitionKey({"student": a.student_key, "recipe": a.recipe_key})) for a in arms}
    bases = {str(dg.MultiPartitionKey({"student": a.student, "recipe": BASELINE_RECIPE})) for a in arms}
    wanted = {
        SAMPLED_SUBSETS_KEY: {a.recipe_key for a in arms},
        STUDENT_BASELINES_KEY: {a.student for a in arms},
        STUDENT_CHECKPOINTS_KEY: keys,
        BENCHMARK_SCORES_KEY: keys | bases,
        EXPERIMENTS_KEY: {name},
    }
    return lambda key, partition: key not in wanted or partition in wanted[key]


def build_experiment_assets(config: ProjectConfig) -> list[dg.AssetsDefinition]:
    if not config.experiments:
        return []
    every = dg.AllPartitionMapping()

    @dg.asset(
        key=EXPERIMENTS_KEY,
        partitions_def=experiment_partitions(config),
        deps=[dg.AssetDep(key, partition_mapping=every) for key in (SAMPLED_SUBSETS_KEY, STUDENT_CHECKPOINTS_KEY, BENCHMARK_SCORES_KEY)],
        group_name=EXPERIMENT_GROUP,
        kinds={"duckdb", "parquet"},
        code_version=code_version(EXPERIMENT_CODE_VERSION, experiment_settings(config)),
        tags={"stage": "experiments", "compute": "cpu"},
        metadata={"dagster/column_schema": column_schema(table_spec("experiment_results")), "table": "experiment_results"},
    )
    def experiments(context: dg.AssetExecutionContext, project: ProjectResource, store: CorpusStoreResource) -> dg.MaterializeResult:
        """One experiment: its curated recipes against their controls, per student and benchmark, over its seeds."""
        cfg = project.config
        name = context.partition_key
        corpus = store.open()
        try:
            got = collect(corpus, name, cfg.arms(name), cfg.experiment_benchmarks(name), REPLICATES)
        except MissingArms as exc:
            raise dg.Failure(
                description=f"experiment {name}: {exc} - materialise them first (`omnithought experiment run {name}`)",
                metadata={"missing": len(exc.partitions)},
            ) from None
        # The numbers last: a reader who sees them sees the rows they came from.
        corpus.write_partition("experiment_items", {"experiment": name}, got.items)
        corpus.write_partition("experiment_arms", {"experiment": name}, got.arms)
        corpus.write_partition("experiment_results", {"experiment": name}, got.results)
        results = got.results.to_pylist()
        differences = [r for r in results if r["row"] == "difference" and r["measure"] == "score"]
        metadata: dict[str, Any] = {
            "arms": len(cfg.arms(name)),
            "items": got.items.num_rows,
            "differences": len(differences),
            "not_comparable": sum(r["verdict"] == "not comparable" for r in differences),
            "results": dg.MetadataValue.md(results_table(results)),
            "dagster/row_count": got.results.num_rows,
        }
        if any(r["low"] is not None for r in differences):
            metadata["plot/differences"] = plot(lambda ax: forest(ax, differences), f"{name}: curated arm minus control, 95% interval")
        scored = [r for r in results if r["row"] == "arm" and r["measure"] == "score" and r["slice"] == "all" and r["low"] is not None]
        if scored:
            metadata["plot/arms"] = plot(lambda ax: arm_bars(ax, scored), f"{name}: each arm's score over its seeds, 95% interval")
        return dg.MaterializeResult(metadata=metadata)

    return [experiments]


def results_table(rows: list[dict]) -> str:
    """Score differences first (with their intervals), then each arm's overall score and costs, as markdown."""
    lines = ["| student | benchmark | curated vs control | difference | 95% interval | verdict |", "| --- | --- | --- | ---: | --- | --- |"]
    for r in rows:
        if r["row"] != "difference" or r["measure"] != "score":
            continue
        interval = "" if r["low"] is None else f"[{r['low']:+.3f}, {r['high']:+.3f}]"
        estimate = "" if r["estimate"] is None else f"{r['estimate']:+.3f}"
        verdict = r["verdict"] if r["problem"] is None else f"{r['verdict']}: {r['problem']}"
        arms = f"{r['curated']} vs {r['control']} ({r['kind']})"
        cells = (r["student"], r["benchmark"], arms, estimate, interval, verdict)
        lines.append("| " + " | ".join(markdown_cell(c, None) for c in cells) + " |")
    lines += ["", "| student | arm | measure | value | seeds |", "| --- | --- | --- | ---: | ---: |"]
    for r in rows:
        if r["row"] == "arm" and r["slice"] == "all":
            measure = r["measure"] if r["benchmark"] == NO_BENCHMARK else f"{r['measure']} ({r['benchmark']})"
            cells = (r["student"], f"{r['arm']} ({r['kind']})", measure, f"{r['estimate']:.4g}", r["seeds"])
            lines.append("| " + " | ".join(markdown_cell(c, None) for c in cells) + " |")
    return "\n".join(lines)


def forest(ax, differences: list[dict]) -> None:
    """One line per difference: its estimate and interval, zero marked."""
    shown = [r for r in differences if r["low"] is not None]
    labels = [f"{r['student']} / {r['benchmark']}: {r['curated']} - {r['control']}" for r in shown]
    for y, r in enumerate(shown):
        ax.plot([r["low"], r["high"]], [y, y], color="tab:blue", linewidth=2)
        ax.plot([r["estimate"]], [y], "o", color="tab:blue")
    ax.axvline(0, color="grey", linestyle="--", linewidth=1)
    ax.set_yticks(range(len(shown)), labels)
    ax.set_xlabel("score difference (curated arm minus control)")
    ax.invert_yaxis()


def arm_bars(ax, arms: list[dict]) -> None:
    """One line per arm (student / benchmark / arm): its score and interval."""
    labels = [f"{r['student']} / {r['benchmark']}: {r['arm']} ({r['kind']}, {r['seeds']} seeds)" for r in arms]
    for y, r in enumerate(arms):
        color = "tab:green" if r["kind"] == "curated" else "tab:grey"
        ax.plot([r["low"], r["high"]], [y, y], color=color, linewidth=2)
        ax.plot([r["estimate"]], [y], "o", color=color)
    ax.set_yticks(range(len(arms)), labels)
    ax.set_xlabel("score")
    ax.invert_yaxis()


def experiment_summary(store: CorpusStore, partition: str, metadata: dict) -> dict[str, Any]:
    table = store.read_partition("experiment_results", {"experiment": partition})
    rows = table.to_pylist() if table is not None else []
    differences = [r for r in rows if r["row"] == "difference" and r["measure"] == "score"]
    parts = [
        f"{r['student']}/{r['benchmark']} {r['curated']} - {r['control']}: "
        + (f"{r['estimate']:+.3f} [{r['low']:+.3f}, {r['high']:+.3f}] {r['verdict']}" if r["low"] is not None else r["verdict"])
        for r in differences
    ]
    items = store.read_partition("experiment_items", {"experiment": partition}, columns=["item"])
    return {
        "input": items.num_rows if items is not None else 0,
        "output": len(rows),
        "flagged": sum(r["verdict"] == "not comparable" for r in differences),
        "reasons": {},
        "detail": f"{partition}: " + "; ".join(parts),
    }
