"""An experiment's rows, from what the pipeline stored: each arm's per-item verdicts (`experiment_items`), each arm's
subset, checkpoint and costs per seed (`experiment_arms`), and the numbers (`experiment_results`): each arm's score per
benchmark and tag slice and its costs, each curated arm's paired difference to each of its controls with its interval,
and the DuckDB query that recomputes that interval from the two tables above. No Dagster here (assets/experiment.py).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import astuple, dataclass, fields

import pyarrow as pa

from omnithought_dagster.experiment.settings import Arm
from omnithought_dagster.experiment.stats import (
    LEVEL,
    REPLICATES,
    arm_interval,
    arm_interval_sql,
    interval_sql,
    literal,
    paired_difference,
)
from omnithought_dagster.store import CorpusStore, table_spec

COSTS = ("training_tokens", "teacher_tokens", "correct_share", "subset_size")  # experiment_arms' measures, one value per seed
NO_BENCHMARK = "-"  # an arm's cost is not a benchmark's
NO_CONTROL = "-"
SETTINGS_DIFFER = "scored under different evaluation settings (eval_config_hash): re-score the arms"


class MissingArms(RuntimeError):
    """Arms whose partitions are not materialised yet; `partitions` names them (asset, partition key)."""

    def __init__(self, partitions: list[tuple[str, str]]):
        self.partitions = partitions
        shown = ", ".join(f"{asset}[{key}]" for asset, key in partitions[:6])
        more = f" and {len(partitions) - 6} more" if len(partitions) > 6 else ""
        super().__init__(f"{len(partitions)} arm partitions are missing or out of date: {shown}{more}")


@dataclass(frozen=True)
class Collected:
    items: pa.Table  # experiment_items
    arms: pa.Table  # experiment_arms
    results: pa.Table  # experiment_results


def _arms_table(arms: Sequence[Arm]) -> pa.Table:
    names = [f.name for f in fields(Arm)]
    return pa.Table.from_pylist([dict(zip(names, astuple(a), strict=True)) for a in arms])


def collect(store: CorpusStore, experiment: str, arms: Sequence[Arm], benchmarks: Sequence[str], replicates: int = REPLICATES) -> Collected:
    """Read every arm's rows: the verdicts of its stored checkpoint, the subset version it was trained on; MissingArms
    when a subset, checkpoint or benchmark's verdicts are not stored, or not those of what is stored upstream."""
    con = store.catalog(["benchmark_samples", "subset_members", "student_checkpoints", "annotations", "cot_traces"])
    try:
        con.register("arms", _arms_table(arms))
        con.register("wanted", pa.table({"benchmark": list(benchmarks)}))
        missing = _missing(con, arms, benchmarks)
        if missing:
            raise MissingArms(missing)
        items = con.sql(
            """
            SELECT a.experiment, a.student, s.benchmark, a.curated, a.arm, a.kind, a.seed::BIGINT AS seed, s.item_id AS item,
                   s.tag, CASE WHEN s.correct THEN 1.0 ELSE 0.0 END AS score, a.student_key AS student_partition,
                   a.recipe_key AS recipe_partition, s.checkpoint_id
            FROM arms a
            JOIN student_checkpoints c ON c.student = a.student_key AND c.recipe = a.recipe_key
            JOIN benchmark_samples s ON s.student = a.student_key AND s.recipe = a.recipe_key AND s.checkpoint_id = c.checkpoint_id
            WHERE s.benchmark IN (SELECT benchmark FROM wanted)
            ORDER BY a.student, s.benchmark, a.curated, a.arm, a.seed, s.item_id
            """
        ).to_arrow_table()
        settings = con.execute(
            """SELECT a.student, s.benchmark, a.arm, list(DISTINCT s.eval_config_hash)
            FROM arms a
            JOIN student_checkpoints c ON c.student = a.student_key AND c.recipe = a.recipe_key
            JOIN benchmark_samples s ON s.student = a.student_key AND s.recipe = a.recipe_key AND s.checkpoint_id = c.checkpoint_id
            WHERE s.benchmark IN (SELECT benchmark FROM wanted) GROUP BY ALL"""
        ).fetchall()
        arm_rows = con.sql(
            """
            WITH members AS (
                -- one row per member trace, whatever other partitions hold a copy of it
                SELECT m.subset, m.subset_version, count(*) AS subset_size,
                       avg(CASE WHEN n.correct THEN 1.0 ELSE 0.0 END) FILTER (WHERE n.correct IS NOT NULL) AS correct_share,
                       coalesce(sum(t.n_tokens), 0) AS teacher_tokens
                FROM (SELECT DISTINCT subset, subset_version, trace_id FROM subset_members) m
                LEFT JOIN (SELECT trace_id, any_value(n_tokens) AS n_tokens FROM cot_traces GROUP BY trace_id) t ON t.trace_id = m.trace_id
                LEFT JOIN (SELECT trace_id, bool_and(correct) AS correct FROM annotations GROUP BY trace_id) n ON n.trace_id = m.trace_id
                GROUP BY m.subset, m.subset_version
            )
            SELECT a.experiment, a.student, a.curated, a.arm, a.kind, a.seed::BIGINT AS seed, a.student_key AS student_partition,
                   a.recipe_key AS recipe_partition, m.subset_version, m.subset_size, m.correct_share,
                   m.teacher_tokens::BIGINT AS teacher_tokens, c.checkpoint_id, c.tokens_seen AS training_tokens, c.train_seconds
            FROM arms a
            JOIN student_checkpoints c ON c.student = a.student_key AND c.recipe = a.recipe_key
            JOIN members m ON m.subset = a.recipe_key AND m.subset_version = c.subset_version
            ORDER BY a.student, a.curated, a.arm, a.seed
            """
        ).to_arrow_table()
    finally:
        con.close()
    items = items.cast(table_spec("experiment_items").schema)
    arm_rows = arm_rows.cast(table_spec("experiment_arms").schema)
    hashes = {(student, benchmark, arm): set(found) for student, benchmark, arm, found in settings}
    results = results_rows(experiment, arms, items, arm_rows, benchmarks, hashes, replicates)
    return Collected(items, arm_rows, results)


def _missing(con, arms: Sequence[Arm], benchmarks: Sequence[str]) -> list[tuple[str, str]]:
    """(asset, partition) of each arm's subset, checkpoint and scores that the store lacks or holds out of date: a
    checkpoint trained on another version of its subset than the stored one, verdicts of another checkpoint than the
    stored one (a partition re-materialised and not what reads it)."""
    subsets = dict(con.execute("SELECT subset, any_value(subset_version) FROM subset_members GROUP BY subset").fetchall())
    checkpoints = {
        (student, recipe): (checkpoint, version)
        for student, recipe, checkpoint, version in con.execute(
            "SELECT student, recipe, checkpoint_id, subset_version FROM student_checkpoints"
        ).fetchall()
    }
    scored = {tuple(r) for r in con.execute("SELECT DISTINCT student, recipe, benchmark, checkpoint_id FROM benchmark_samples").fetchall()}
    missing: list[tuple[str, str]] = []
    for arm in arms:
        key = f"{arm.recipe_key}|{arm.student_key}"
        checkpoint, trained_on = checkpoints.get((arm.student_key, arm.recipe_key), (None, None))
        wanted = [
            ("sampled_subsets", arm.recipe_key, arm.recipe_key in subsets),
            ("student_checkpoints", key, checkpoint is not None and trained_on == subsets.get(arm.recipe_key)),
            *(("benchmark_scores", key, (arm.student_key, arm.recipe_key, b, checkpoint) in scored) for b in benchmarks),
        ]
        missing += [(asset, partition) for asset, partition, present in wanted if not present and (asset, partition) not in missing]
    return missing


def _row(experiment: str, row: str, measure: str, student: str, benchmark: str, slice_: str, curated: str, arm: str, **values) -> dict:
    base = dict.fromkeys(table_spec("experiment_results").column_names)
    return {
        **base,
        "experiment": experiment,
        "row": row,
        "measure": measure,
        "student": student,
        "benchmark": benchmark,
        "slice": slice_,
        "curated": curated,
        "arm": arm,
        "control": NO_CONTROL,
        **values,
    }


def item_rows_sql(experiment: str, student: str, benchmark: str, arms: tuple[str, str], tag: str | None = None) -> str:
    """experiment_items as the (arm, seed, item, score) rows `interval_sql` reads, for two arms of one student and benchmark."""
    where = f" AND tag = {literal(tag)}" if tag is not None else ""
    return (
        f"(SELECT arm, seed, item, score FROM experiment_items WHERE experiment = {literal(experiment)} AND student = {literal(student)} "
        f"AND benchmark = {literal(benchmark)} AND arm IN ({literal(arms[0])}, {literal(arms[1])}){where})"
    )


def cost_rows_sql(experiment: str, student: str, measure: str, arms: tuple[str, str]) -> str:
    """experiment_arms' `measure` as (arm, seed, item, score) rows: one item per seed (a cost has no items to resample)."""
    if measure not in COSTS:
        raise ValueError(f"unknown measure {measure!r}; measures: {COSTS}")
    return (
        f"(SELECT arm, seed, 'arm' AS item, {measure}::DOUBLE AS score FROM experiment_arms WHERE experiment = {literal(experiment)} "
        f"AND student = {literal(student)} AND arm IN ({literal(arms[0])}, {literal(arms[1])}) AND {measure} IS NOT NULL)"
    )


def verdict(low: float, high: float, seeds: tuple[int, int] = (2, 2)) -> str:
    """higher / lower when the interval excludes 0; with one seed per arm the interval does not cover the training's own
    variance, and the verdict says so."""
    said = "higher" if low > 0 else "lower" if high < 0 else "no difference shown"
    return f"{said} (one seed)" if said != "no difference shown" and max(seeds) == 1 else said


def results_rows(
    experiment: str,
    arms: Sequence[Arm],
    items: pa.Table,
    arm_rows: pa.Table,
    benchmarks: Sequence[str],
    settings: dict[tuple[str, str, str], set[str]],
    replicates: int = REPLICATES,
) -> pa.Table:
    """experiment_results from experiment_items and experiment_arms (`settings`: (student, benchmark, arm) -> the
    evaluation settings its verdicts were scored under: two arms scored under different ones are not compared)."""
    scores: dict[tuple, dict[tuple[str, int], float]] = defaultdict(dict)  # (student, benchmark, arm, tag|None) -> {(item, seed): score}
    for r in items.to_pylist():
        scores[(r["student"], r["benchmark"], r["arm"], None)][(r["item"], r["seed"])] = r["score"]
        scores[(r["student"], r["benchmark"], r["arm"], r["tag"])][(r["item"], r["seed"])] = r["score"]
    costs: dict[tuple, dict[tuple[str, int], float]] = defaultdict(dict)  # (student, arm, measure) -> {("arm", seed): value}
    for r in arm_rows.to_pylist():
        for measure in COSTS:
            if r[measure] is not None:
                costs[(r["student"], r["arm"], measure)][("arm", r["seed"])] = float(r[measure])
    kinds = {a.arm: a.kind for a in arms}
    groups: dict[tuple[str, str], list[str]] = {}  # (student, curated) -> its arms, curated first
    for a in arms:
        names = groups.setdefault((a.student, a.curated), [])
        if a.arm not in names:
            names.append(a.arm)
    tags = sorted({r["tag"] for r in items.to_pylist()})
    rows = []
    for (student, curated), names in groups.items():
        for name in names:
            for benchmark in benchmarks:
                for tag in [None, *tags]:
                    got = scores.get((student, benchmark, name, tag))
                    if got:
                        row = _arm_row(
                            experiment, "score", student, benchmark, "all" if tag is None else f"tag:{tag}", curated, name, kinds, got
                        )
                        rows.append(
                            {
                                **row,
                                **_arm_interval(got, name, item_rows_sql(experiment, student, benchmark, (name, name), tag), replicates),
                            }
                        )
            for measure in COSTS:
                got = costs.get((student, name, measure))
                if got:
                    rows.append(_arm_row(experiment, measure, student, NO_BENCHMARK, "all", curated, name, kinds, got))
        for control in names[1:]:
            pair = (curated, control)
            for benchmark in benchmarks:
                scored_under = settings.get((student, benchmark, curated), set()) | settings.get((student, benchmark, control), set())
                problem = SETTINGS_DIFFER if len(scored_under) > 1 else None
                sql = interval_sql(item_rows_sql(experiment, student, benchmark, pair), *pair, replicates=replicates)
                rows.append(
                    _difference(
                        experiment,
                        "score",
                        student,
                        benchmark,
                        curated,
                        control,
                        kinds,
                        scores.get((student, benchmark, curated, None)),
                        scores.get((student, benchmark, control, None)),
                        problem,
                        sql,
                        replicates,
                    )
                )
            for measure in COSTS:
                sql = interval_sql(cost_rows_sql(experiment, student, measure, pair), *pair, replicates=replicates)
                rows.append(
                    _difference(
                        experiment,
                        measure,
                        student,
                        NO_BENCHMARK,
                        curated,
                        control,
                        kinds,
                        costs.get((student, curated, measure)),
                        costs.get((student, control, measure)),
                        None,
                        sql,
                        replicates,
                    )
                )
    return pa.Table.from_pylist(rows, schema=table_spec("experiment_results").schema)


def _arm_row(experiment, measure, student, benchmark, slice_, curated, arm, kinds, got: dict) -> dict:
    by_seed: dict[int, list[float]] = defaultdict(list)
    for (_, seed), value in got.items():
        by_seed[seed].append(value)
    means = [sum(v) / len(v) for v in by_seed.values()]
    return _row(
        experiment,
        "arm",
        measure,
        student,
        benchmark,
        slice_,
        curated,
        arm,
        kind=kinds[arm],
        estimate=sum(means) / len(means),
        items=len({item for item, _ in got}),
        seeds=len(by_seed),
    )


def _arm_interval(got: dict, arm: str, rows_sql: str, replicates: int) -> dict:
    """An arm's score interval (`stats.arm_interval`) and the query that recomputes it; none when an item lacks a seed."""
    try:
        interval = arm_interval(got, arm=arm, replicates=replicates)
    except ValueError as exc:
        return {"problem": str(exc)}
    if not (math.isfinite(interval.low) and math.isfinite(interval.high)):
        return {"problem": "no bootstrap replicate weighed the arm"}
    return {
        "low": interval.low,
        "high": interval.high,
        "level": interval.level,
        "replicates": interval.replicates,
        "sql": arm_interval_sql(rows_sql, arm, replicates=replicates),
    }


def _difference(experiment, measure, student, benchmark, curated, control, kinds, first, second, problem, sql, replicates) -> dict:
    row = _row(
        experiment,
        "difference",
        measure,
        student,
        benchmark,
        "all",
        curated,
        curated,
        control=control,
        kind=kinds[control],
        level=LEVEL,
        sql=sql,
    )
    if problem is None and (not first or not second):
        problem = f"no {measure} for " + " and ".join(n for n, got in ((curated, first), (control, second)) if not got)
    if problem is None:
        try:
            d = paired_difference(first, second, arms=(curated, control), replicates=replicates)
        except ValueError as exc:  # other items, a seed not scored on every item
            problem = str(exc)
        else:
            finite = all(math.isfinite(v) for v in (d.estimate, d.low, d.high))
            return {
                **row,
                "estimate": d.estimate,
                "low": d.low if finite else None,
                "high": d.high if finite else None,
                "replicates": d.replicates,
                "items": d.items,
                "seeds": d.seeds[0],
                "control_seeds": d.seeds[1],
                "verdict": verdict(d.low, d.high, d.seeds) if finite else "not comparable",
                "problem": None if finite else "no bootstrap replicate weighed both arms",
            }
    return {**row, "verdict": "not comparable", "problem": problem, "sql": None}  # its query would compute what this row refuses
