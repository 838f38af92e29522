"""Controls as recipes: a random and a filtered-only subset drawn uniformly at the realised size of the curated recipe that
names them - in the project file, in the draw, through the sampled_subsets job and its checks (each failing here too)."""

from __future__ import annotations

import pyarrow as pa
import pytest
from pydantic import ValidationError
from test_curate_asset import _project
from test_curation import _candidates

from omnithought_dagster.config import RecipeConfig
from omnithought_dagster.curation.sampling import sample_subset, sample_uniform
from omnithought_dagster.defs import FILTER_JOB, SUBSET_JOB
from omnithought_dagster.store import CorpusStore

from conftest import check_evaluations, materializations, rewrite_partition, run_job, run_partition_checks

CURATED = {"name": "curated", "size": 20, "difficulty_mix": {"hard": 1}, "controls": ["uniform", "unbalanced"]}
CHECKS = ["size_matches_recipe", "strata_within_tolerance", "no_sample_twice", "members_are_kept", "no_contamination", "exportable"]
CONTROLS = [{"name": "uniform", "kind": "random", "seed": 1}, {"name": "unbalanced", "kind": "filtered", "seed": 2}]


# -- the project file ------------------------------------------------------------------------------------------------------


def test_a_curated_recipe_needs_a_mix_and_a_size_and_a_control_takes_no_balancing():
    with pytest.raises(ValidationError, match="a curated recipe needs at least one difficulty label"):
        RecipeConfig(name="r", size=5)
    assert RecipeConfig(name="r", difficulty_mix={"easy": 1}).size is None  # a curated control takes its recipe's size
    with pytest.raises(ValidationError, match="difficulty_mix, tag_caps: a random control draws uniformly"):
        RecipeConfig(name="r", kind="random", size=5, difficulty_mix={"easy": 1}, tag_caps={"a": 1})
    assert RecipeConfig(name="r", kind="filtered", size=5).is_control


@pytest.mark.parametrize(
    ("recipes", "message"),
    [
        ([{**CURATED, "controls": ["nope"]}], "controls: no recipe 'nope'"),
        (
            [{**CURATED, "controls": ["other"]}, {**CURATED, "name": "other", "controls": []}],
            r"recipes \(name=other\).size: a control takes it",
        ),
        ([{**CURATED, "controls": ["curated"]}], "a recipe is not its own control"),
        ([{**CURATED, "controls": ["other"]}, {**CURATED, "name": "other", "size": None, "controls": ["x"]}], "names controls of its own"),
        ([{**CURATED, "controls": ["uniform"]}, {**CONTROLS[0], "teachers": ["tiny:teacher"]}], "teachers: a control takes it"),
        ([{"name": "r", "difficulty_mix": {"easy": 1}}], "a curated recipe needs its own size"),
        ([CURATED, {**CURATED, "name": "again", "controls": ["uniform"]}, *CONTROLS], "'uniform' is already the control of 'curated'"),
        ([CURATED, {**CONTROLS[0], "size": 20}, CONTROLS[1]], r"recipes \(name=uniform\).size: a control takes it from the recipe"),
        ([CURATED, {**CONTROLS[0], "traces_per_sample": 1}, CONTROLS[1]], "traces_per_sample: a control takes it"),
        ([{"name": "alone", "kind": "random"}], "a control no curated recipe names needs its own size"),
    ],
)
def test_controls_are_checked_against_the_recipe_naming_them(tmp_path, recipes, message):
    from omnithought_dagster.config import ConfigError

    with pytest.raises(ConfigError, match=message):
        _project(tmp_path, recipes)


# -- the draw --------------------------------------------------------------------------------------------------------------


def test_a_uniform_draw_has_the_size_respects_traces_per_sample_and_follows_its_seed():
    candidates = _candidates(300)  # every sample has several traces
    control = RecipeConfig(name="c", kind="filtered", size=40)
    a, b, other = (
        sample_uniform(candidates, control),
        sample_uniform(candidates, control),
        sample_uniform(candidates, control.model_copy(update={"seed": 5})),
    )
    assert a.members.num_rows == 40 and a.shortfall == 0 and a.members.equals(b.members) and other.version != a.version
    assert len(set(a.members.column("sample_id").to_pylist())) == 40  # traces_per_sample 1
    two = sample_uniform(candidates, control.model_copy(update={"traces_per_sample": 2, "size": 10_000}))
    per_sample = pa.TableGroupBy(two.members, "sample_id").aggregate([("trace_id", "count")]).column("trace_id_count").to_pylist()
    assert max(per_sample) == 2 and two.shortfall == 10_000 - two.members.num_rows
    only = sample_uniform(candidates, control.model_copy(update={"sources": ["y"]}))
    assert set(only.members.column("source").to_pylist()) == {"y"}


def test_a_uniform_draw_is_uniform_over_difficulty_where_the_curated_one_follows_its_mix():
    candidates = _candidates(600)  # the three labels equally often
    curated = sample_subset(candidates, RecipeConfig(name="r", size=90, difficulty_mix={"hard": 1}))
    control = sample_uniform(candidates, RecipeConfig(name="c", kind="filtered", size=90))
    labels = [s.split("/")[0] for s in control.members.column("stratum").to_pylist()]
    assert {s.split("/")[0] for s in curated.members.column("stratum").to_pylist()} == {"hard"}
    assert all(15 <= labels.count(label) <= 45 for label in ("easy", "medium", "hard")), labels  # ~30 each


# -- through Dagster -------------------------------------------------------------------------------------------------------


@pytest.fixture
def arms(tmp_path, instance):
    config = _project(tmp_path, [CURATED, *CONTROLS])
    assert run_job(config, instance, FILTER_JOB, "synthetic").success
    results = {recipe: run_job(config, instance, SUBSET_JOB, recipe) for recipe in ("curated", "uniform", "unbalanced")}
    return config, CorpusStore(config.store.root), results, instance


def test_controls_get_the_curated_recipes_realised_size_and_their_own_pools(arms):
    config, store, results, _ = arms
    assert all(result.success for result in results.values())
    for name in ("uniform", "unbalanced"):  # every check of a control passes (the curated arm's size warns: its shortfall)
        assert {check: c.passed for check, c in check_evaluations(results[name]).items()} == dict.fromkeys(CHECKS, True), name
    sizes = {name: store.read_partition("subset_members", name).num_rows for name in results}
    curated_size = sizes["curated"]
    assert curated_size < CURATED["size"]  # 22 clean samples x 1/3 hard: the curated recipe falls short ...
    assert sizes == {"curated": curated_size, "uniform": curated_size, "unbalanced": curated_size}  # ... and its controls follow
    meta = materializations(results["uniform"])["sampled_subsets"]
    assert meta["kind"] == "random" and meta["control_of"] == "curated" and meta["target_size"] == curated_size
    con = store.catalog(["subset_members", "filter_decisions"])
    kept = dict(
        con.execute("SELECT subset, avg(d.kept::INT) FROM subset_members m JOIN filter_decisions d USING (trace_id) GROUP BY 1").fetchall()
    )
    assert kept["curated"] == 1 and kept["unbalanced"] == 1 and kept["uniform"] < 1  # the random control ignores the filters
    contaminated = con.execute(
        "SELECT count(*) FROM subset_members m JOIN filter_decisions d USING (trace_id) "
        "WHERE list_has_any(list_transform(d.reasons, lambda r: r.code), ['contaminated_question', 'contaminated_image'])"
    ).fetchone()[0]
    assert contaminated == 0  # ... but never a benchmark item ...
    unannotated = con.execute(
        "SELECT count(*) FROM subset_members m JOIN filter_decisions d USING (trace_id) WHERE m.subset = 'uniform' "
        "AND list_contains(list_transform(d.reasons, lambda r: r.code), 'not_annotated')"
    ).fetchone()[0]
    assert unannotated == 0  # ... nor a trace without annotations


def test_a_control_of_another_size_than_its_arm_fails_its_check(arms):
    config, store, _, instance = arms
    rewrite_partition(store, "subset_members", "uniform", lambda rows: rows[:-1])
    checks = run_partition_checks(config, instance, "sampled_subsets", "uniform")
    assert not checks["size_matches_recipe"].passed and "the arms differ in size" in checks["size_matches_recipe"].description


def test_a_control_holding_a_trace_outside_its_pool_fails_its_check(arms):
    config, store, _, instance = arms
    con = store.catalog(["filter_decisions"])
    contaminated = "list_has_any(list_transform(reasons, lambda r: r.code), ['contaminated_question', 'contaminated_image'])"
    dropped = con.execute(f"SELECT trace_id, sample_id FROM filter_decisions WHERE NOT kept AND NOT {contaminated} ORDER BY 1").fetchone()
    leaked = con.execute(f"SELECT trace_id, sample_id FROM filter_decisions WHERE {contaminated} ORDER BY 1").fetchone()

    def plant(trace):
        return lambda rows: [{**rows[0], "trace_id": trace[0], "sample_id": trace[1]}, *rows[1:]]

    rewrite_partition(store, "subset_members", "unbalanced", plant(dropped))  # the filtered control's pool is the filtered set
    assert not run_partition_checks(config, instance, "sampled_subsets", "unbalanced")["members_are_kept"].passed
    rewrite_partition(store, "subset_members", "uniform", plant(dropped))  # the random control's holds dropped traces ...
    assert run_partition_checks(config, instance, "sampled_subsets", "uniform")["members_are_kept"].passed
    rewrite_partition(store, "subset_members", "uniform", plant(leaked))  # ... but no contaminated one
    checks = run_partition_checks(config, instance, "sampled_subsets", "uniform")
    assert not checks["members_are_kept"].passed and not checks["no_contamination"].passed


def test_the_random_pool_is_every_annotated_trace_that_is_not_contaminated():
    import duckdb

    from omnithought_dagster.curation.sampling import pool_where

    con = duckdb.connect()
    con.execute("CREATE TABLE filter_decisions (trace_id VARCHAR, source VARCHAR, kept BOOLEAN, reasons STRUCT(code VARCHAR)[])")
    rows = [
        ("kept", "a", True, []),
        ("short", "a", False, [{"code": "too_short"}, {"code": "low_quality"}]),
        ("leak", "a", False, [{"code": "low_quality"}, {"code": "contaminated_image"}]),
        ("bare", "a", False, [{"code": "not_annotated"}]),
        ("other", "b", False, [{"code": "too_short"}]),
    ]
    con.executemany("INSERT INTO filter_decisions VALUES (?, ?, ?, ?)", rows)

    def pool(kind, sources=None):
        where, params = pool_where(sources, kind)
        return [r[0] for r in con.execute(f"SELECT trace_id FROM filter_decisions WHERE {where} ORDER BY 1", params or None).fetchall()]

    assert pool("random") == ["kept", "other", "short"]
    assert pool("random", ["a"]) == ["kept", "short"]
    assert pool("filtered") == pool("curated") == ["kept"]
