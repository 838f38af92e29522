"""`omnithought experiment report`: a curated recipe against its controls from stored per-item verdicts, and the SQL
it prints recomputing the same numbers through `omnithought query`."""

from __future__ import annotations

import json

import pyarrow as pa
import pytest
from typer.testing import CliRunner

from omnithought_dagster.cli import app
from omnithought_dagster.config import load_config
from omnithought_dagster.experiment.report import compare_controls
from omnithought_dagster.store import CorpusStore, table_spec

from conftest import write_config

runner = CliRunner()
ITEMS = [f"item-{i:02d}" for i in range(40)]
RECIPES = [
    {"name": "curated", "size": 10, "difficulty_mix": {"hard": 1}, "controls": ["curated-random", "curated-filtered"]},
    {"name": "curated-random", "kind": "random", "seed": 1},
    {"name": "curated-filtered", "kind": "filtered", "seed": 1},
]


def _verdicts(
    store: CorpusStore, student: str, recipe: str, correct: list[bool], benchmark: str = "held", items=ITEMS, settings: str = "h"
) -> None:
    rows = [
        {
            "checkpoint_id": f"ckpt-{recipe}",
            "student": student,
            "recipe": recipe,
            "benchmark": benchmark,
            "doc_index": i,
            "item_id": item,
            "tag": "counting",
            "target": "1",
            "response": "Answer: 1" if ok else "Answer: 2",
            "extracted_answer": "1" if ok else "2",
            "correct": ok,
            "problem": None,
            "eval_config_hash": settings,
        }
        for i, (item, ok) in enumerate(zip(items, correct, strict=True))
    ]
    schema = table_spec("benchmark_samples").schema
    store.write_partition("benchmark_samples", {"student": student, "recipe": recipe}, pa.Table.from_pylist(rows, schema=schema))


@pytest.fixture
def project(tmp_path):
    path = write_config(
        tmp_path,
        [{"name": "synthetic", "kind": "synthetic", "n_samples": 4}],
        benchmarks=[{"name": "held", "kind": "synthetic", "n_samples": 4, "seed": 3, "start_index": 900}],
        recipes=RECIPES,
        students=[{"name": "tiny"}, {"name": "other", "recipes": ["curated"]}],
        evaluation={"benchmarks": ["held"]},
    )
    config = load_config(path)
    store = CorpusStore(config.store.root)
    _verdicts(store, "tiny", "curated", [i < 32 for i in range(40)])  # 0.8
    _verdicts(store, "tiny", "curated-random", [i < 16 or i >= 36 for i in range(40)])  # 0.5: right on 16 the curated arm gets, 4 it misses
    return path, config, store


def test_each_control_is_compared_for_each_student_trained_on_both(project):
    _, config, store = project
    trained_on = {s.name: config.student_recipes(s.name) for s in config.students}
    comparisons = compare_controls(store, config.recipes, trained_on, ["held"], replicates=500)
    assert [(c.control, c.student) for c in comparisons] == [("curated-random", "tiny"), ("curated-filtered", "tiny")]  # not `other`
    random, filtered = comparisons
    assert random.kind == "random" and random.recipe_score == 0.8 and random.control_score == 0.5
    assert random.difference.estimate == pytest.approx(0.3) and random.difference.items == 40 and random.difference.low > 0
    assert filtered.difference is None and filtered.missing == ("curated-filtered",)


def test_the_cli_reports_and_its_sql_recomputes_the_interval(project):
    path, _, _ = project
    result = runner.invoke(app, ["experiment", "report", "--config", str(path), "--json", "--replicates", "400"])
    assert result.exit_code == 0, result.output
    random, filtered = json.loads(result.stdout)
    assert filtered["missing"] == ["curated-filtered"] and "difference" not in filtered
    shown = random["difference"]
    again = runner.invoke(app, ["query", random["sql"], "--config", str(path), "--json"])
    assert again.exit_code == 0, again.output
    (row,) = json.loads(again.stdout)
    assert row["replicates"] == shown["replicates"]
    assert (row["estimate"], row["low"], row["high"]) == pytest.approx((shown["estimate"], shown["low"], shown["high"]), abs=1e-12)
    text = runner.invoke(app, ["experiment", "report", "--config", str(path), "--replicates", "400"])
    assert text.exit_code == 0 and "better" in text.output and "no per-item verdicts of curated-filtered" in text.output


def test_a_project_without_controls_has_nothing_to_compare(tmp_path):
    path = write_config(tmp_path, [{"name": "synthetic", "kind": "synthetic", "n_samples": 4}])
    result = runner.invoke(app, ["experiment", "report", "--config", str(path)])
    assert result.exit_code == 1 and "nothing to compare" in result.output


def test_arms_scored_on_other_items_or_under_other_settings_are_not_compared_and_the_rest_still_is(project):
    path, config, store = project
    _verdicts(store, "tiny", "curated-filtered", [True] * 20, items=ITEMS[:20])  # an evaluation limit changed in between
    trained_on = {s.name: config.student_recipes(s.name) for s in config.students}
    random, filtered = compare_controls(store, config.recipes, trained_on, ["held"], replicates=200)
    assert random.difference is not None and filtered.difference is None and "different items" in filtered.problem
    _verdicts(store, "tiny", "curated-filtered", [True] * 40, settings="other")
    (_, filtered) = compare_controls(store, config.recipes, trained_on, ["held"], replicates=200)
    assert filtered.difference is None and "different evaluation settings" in filtered.problem
    text = runner.invoke(app, ["experiment", "report", "--config", str(path), "--replicates", "200"])
    assert text.exit_code == 0 and "better" in text.output and "not comparable" in text.output
