"""A curated recipe against its controls, from the stored per-item verdicts (`benchmark_samples`).

For each curated recipe with controls, each control, each student trained on both and each benchmark, the two arms are
the student's checkpoints on the two recipes, scored on the same items: `stats.paired_difference` of their per-item
verdicts, and `arm_rows_sql` - the rows it reads, as a query any reader can run - so `stats.interval_sql` over it gives
the same numbers. Arms are one training seed each until the experiments section trains several (seed 0 here).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace

from omnithought_dagster.curation.settings import RecipeConfig
from omnithought_dagster.experiment.stats import REPLICATES, Interval, interval_sql, literal, paired_difference
from omnithought_dagster.store import CorpusStore


@dataclass(frozen=True)
class Comparison:
    recipe: str  # the curated arm's
    control: str
    kind: str  # the control's: random | filtered
    student: str
    benchmark: str
    recipe_score: float | None
    control_score: float | None
    difference: Interval | None  # None: an arm is not scored on the benchmark yet (`missing`), or the arms do not compare (`problem`)
    missing: tuple[str, ...] = ()
    replicates: int = REPLICATES  # asked for (the interval says how many weighed both arms)
    problem: str | None = None  # why two scored arms are not compared (other items, other evaluation settings)

    def sql(self) -> str:
        """The query that recomputes `difference` from benchmark_samples."""
        rows = f"({arm_rows_sql(self.student, self.benchmark, (self.recipe, self.control))})"
        return interval_sql(rows, self.recipe, self.control, replicates=self.replicates)


def arm_rows_sql(student: str, benchmark: str, recipes: Iterable[str]) -> str:
    """benchmark_samples as (arm, seed, item, score) rows: the recipe is the arm, a verdict the score."""
    arms = ", ".join(literal(r) for r in recipes)
    return (
        "SELECT recipe AS arm, 0 AS seed, item_id AS item, correct::DOUBLE AS score FROM benchmark_samples "
        f"WHERE student = {literal(student)} AND benchmark = {literal(benchmark)} AND recipe IN ({arms})"
    )


def compare_controls(
    store: CorpusStore,
    recipes: list[RecipeConfig],
    trained_on: Mapping[str, list[str]],
    benchmarks: list[str],
    replicates: int = REPLICATES,
) -> list[Comparison]:
    """Every (curated recipe, control, student trained on both, benchmark) comparison; `trained_on` maps a student to its
    recipes."""
    kinds = {r.name: r.kind for r in recipes}
    con = store.catalog(["benchmark_samples"])
    try:
        return [
            _compare(con, recipe.name, control, kinds[control], student, benchmark, replicates)
            for recipe in recipes
            for control in recipe.controls
            for student, theirs in trained_on.items()
            if recipe.name in theirs and control in theirs
            for benchmark in benchmarks
        ]
    finally:
        con.close()


def _compare(con, recipe: str, control: str, kind: str, student: str, benchmark: str, replicates: int) -> Comparison:
    rows = con.execute(arm_rows_sql(student, benchmark, (recipe, control))).fetchall()
    arms = {name: {(item, seed): score for arm, seed, item, score in rows if arm == name} for name in (recipe, control)}
    missing = tuple(name for name, scores in arms.items() if not scores)
    mean = {name: (sum(scores.values()) / len(scores) if scores else None) for name, scores in arms.items()}
    found = Comparison(recipe, control, kind, student, benchmark, mean[recipe], mean[control], None, missing, replicates)
    if missing:
        return found
    settings = con.execute(
        "SELECT count(DISTINCT eval_config_hash) FROM benchmark_samples WHERE student = $student AND benchmark = $benchmark "
        "AND recipe IN ($recipe, $control)",
        {"student": student, "benchmark": benchmark, "recipe": recipe, "control": control},
    ).fetchone()[0]
    if settings > 1:
        return replace(found, problem="scored under different evaluation settings (eval_config_hash): re-score both arms")
    try:
        difference = paired_difference(arms[recipe], arms[control], arms=(recipe, control), replicates=replicates)
    except ValueError as exc:  # other items (an evaluation limit changed, a benchmark edited between the two scorings)
        return replace(found, problem=str(exc))
    return replace(found, difference=difference)
