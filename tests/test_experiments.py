"""Experiments: the project file's section and the replicates it adds, the rows an experiment is computed from, its numbers
recomputed by plain DuckDB SQL over the stored rows, the experiments asset and its checks (each failing here too), and
`omnithought experiment report` / `run` on stored rows."""

from __future__ import annotations

import json
import math

import pyarrow as pa
import pytest
from typer.testing import CliRunner

from omnithought_dagster.assets.curate import FILTERED_SET_KEY, SAMPLED_SUBSETS_KEY
from omnithought_dagster.assets.experiment import experiment_selection
from omnithought_dagster.assets.scores import BENCHMARK_SCORES_KEY
from omnithought_dagster.assets.student import STUDENT_CHECKPOINTS_KEY, checkpoint_settings
from omnithought_dagster.cli import app
from omnithought_dagster.config import ConfigError, load_config
from omnithought_dagster.experiment.run import MissingArms, collect
from omnithought_dagster.experiment.stats import paired_difference
from omnithought_dagster.stages import EXPERIMENT_JOB
from omnithought_dagster.store import CorpusStore, table_spec

from conftest import check_evaluations, materializations, rewrite_partition, run_job, run_partition_checks, write_config

runner = CliRunner()
RECIPES = [
    {"name": "curated", "size": 6, "difficulty_mix": {"hard": 1}, "controls": ["shuffled", "unbalanced"]},
    {"name": "shuffled", "kind": "random", "seed": 0},
    {"name": "unbalanced", "kind": "filtered", "seed": 1},
]
STUDENTS = [{"name": "tiny"}, {"name": "other", "recipes": ["curated"]}]
EXPERIMENT = {"name": "balance", "recipes": ["curated"], "students": ["tiny"], "seeds": [0, 1, 2]}
ITEMS = [f"item-{i:02d}" for i in range(30)]
TAGS = ["counting", "chart"]
CHECKS = ("arms_equal_size", "arms_same_items", "intervals_finite")


def _config(tmp_path, experiments=(EXPERIMENT,), recipes=RECIPES, students=STUDENTS, **sections):
    path = write_config(
        tmp_path,
        [{"name": "synthetic", "kind": "synthetic", "n_samples": 4}],
        benchmarks=[{"name": "held", "kind": "synthetic", "n_samples": 4, "seed": 3, "start_index": 900}],
        recipes=list(recipes),
        students=list(students),
        evaluation={"benchmarks": ["held"]},
        experiments=list(experiments),
        **sections,
    )
    return load_config(path)


# -- the project file ------------------------------------------------------------------------------------------------------


def test_an_experiment_adds_a_replicate_for_each_seed_that_is_not_a_students_or_controls_own(tmp_path):
    config = _config(tmp_path)
    replicates = {r.name: (r.replicate_of, r.seed) for r in config.recipes if r.replicate_of}
    # shuffled's own seed is 0, unbalanced's 1: seeds 0-2 need two more of each
    assert replicates == {
        "unbalanced-s0": ("unbalanced", 0),
        "shuffled-s1": ("shuffled", 1),
        "shuffled-s2": ("shuffled", 2),
        "unbalanced-s2": ("unbalanced", 2),
    }
    students = {s.name: s for s in config.students}
    assert students["tiny-s1"].seed == 1 and students["tiny-s1"].replicate_of == "tiny"
    assert students["tiny-s1"].recipes == ["curated", "unbalanced", "shuffled-s1"]
    assert students["tiny"].recipes == ["curated", "shuffled", "unbalanced", "unbalanced-s0"]  # was: every recipe
    assert students["other"].recipes == ["curated"]  # not in the experiment: untouched
    assert config.training_for(students["tiny-s2"]).seed == 2 and config.training_for(students["tiny"]) is config.training
    # a replicate control is its control's: it takes the curated recipe's size
    assert config.controlled_by("shuffled-s2").name == "curated"
    arms = config.arms("balance")
    assert len(arms) == 3 * 3  # seeds x (curated + 2 controls)
    assert {(a.arm, a.seed): (a.student_key, a.recipe_key) for a in arms}[("shuffled", 1)] == ("tiny-s1", "shuffled-s1")
    assert {(a.arm, a.seed): (a.student_key, a.recipe_key) for a in arms}[("curated", 0)] == ("tiny", "curated")
    only = experiment_selection(config, "balance")
    assert only(STUDENT_CHECKPOINTS_KEY, "shuffled-s1|tiny-s1") and not only(STUDENT_CHECKPOINTS_KEY, "curated|other")
    assert only(FILTERED_SET_KEY, "synthetic") and only(BENCHMARK_SCORES_KEY, "base|tiny")  # the deltas' baseline
    assert not only(BENCHMARK_SCORES_KEY, "base|other") and not only(BENCHMARK_SCORES_KEY, "base|tiny-s1")
    assert only(SAMPLED_SUBSETS_KEY, "unbalanced-s2") and not only(STUDENT_CHECKPOINTS_KEY, "unbalanced|tiny")  # tiny is seed 0


def test_without_experiments_nothing_changes_and_a_students_own_seed_is_hashed_only_when_set(tmp_path):
    config = _config(tmp_path / "a", experiments=())
    assert [r.name for r in config.recipes] == ["curated", "shuffled", "unbalanced"]
    assert config.student_recipes("tiny") == ["base", "curated", "shuffled", "unbalanced"]
    assert all("seed" not in s for s in checkpoint_settings(config)["students"])  # ids and code versions as before
    seeded = _config(tmp_path / "b", experiments=(), students=[{"name": "tiny", "seed": 4}])
    assert checkpoint_settings(seeded)["students"][0]["seed"] == 4 and seeded.training_for(seeded.student("tiny")).seed == 4


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"experiments": [{**EXPERIMENT, "recipes": ["nope"]}]}, "recipes: no recipe 'nope'"),
        ({"experiments": [{**EXPERIMENT, "recipes": ["shuffled"]}]}, "'shuffled' is not a curated recipe naming controls"),
        ({"experiments": [{**EXPERIMENT, "students": ["ghost"]}]}, "students: no student 'ghost'"),
        ({"experiments": [{**EXPERIMENT, "benchmarks": ["other"]}]}, r"\['other'\] are not among evaluation.benchmarks"),
        ({"experiments": [EXPERIMENT, EXPERIMENT]}, "experiments: names must be unique"),
        ({"experiments": [{**EXPERIMENT, "seeds": [1, 1]}]}, "distinct seeds"),
        ({"students": [*STUDENTS, {"name": "tiny-s1"}]}, "the replicate 'tiny-s1' of student 'tiny' is the name of a student"),
        (
            {
                "students": [*STUDENTS, {"name": "rl", "method": "grpo", "grpo": {"start_from": "tiny"}}],
                "experiments": [{**EXPERIMENT, "students": ["rl"]}],
            },
            "starts from another student's checkpoint",
        ),
    ],
)
def test_experiments_are_checked_against_the_recipes_students_and_benchmarks(tmp_path, change, message):
    sections = {"experiments": [EXPERIMENT], "students": STUDENTS, **change}
    with pytest.raises(ConfigError, match=message):
        _config(tmp_path, **sections)


# -- the rows: a hand-made store ------------------------------------------------------------------------------------------


def _row(table: str, **given) -> dict:
    defaults = {pa.string(): "x", pa.int64(): 0, pa.int32(): 0, pa.float64(): 0.0, pa.bool_(): False}
    spec = table_spec(table)
    return {c.name: given.get(c.name, defaults.get(c.type, [] if pa.types.is_list(c.type) else None)) for c in spec.columns}


def _write(store: CorpusStore, table: str, partition: dict, rows: list[dict]) -> None:
    rows = [_row(table, **{**partition, **r}) for r in rows]
    store.write_partition(table, partition, pa.Table.from_pylist(rows, schema=table_spec(table).schema))


def accuracy(arm: str, seed: int) -> list[bool]:
    """A known pattern: the curated arm is right on 24 of 30 items, the random control on 15, the filtered one on 20;
    seeds move one item each."""
    right = {"curated": 24, "shuffled": 15, "unbalanced": 20}[arm]
    return [(i + seed) % 30 < right for i in range(len(ITEMS))]


def _store_arms(config, size: dict | None = None, skip: tuple = ()) -> CorpusStore:
    store = CorpusStore(config.store.root)
    traces = []
    for arm in config.arms("balance"):
        if (arm.arm, arm.seed) in skip:
            continue
        n = (size or {}).get(arm.recipe_key, 6)
        members = [
            {"subset": arm.recipe_key, "subset_version": f"v-{arm.recipe_key}", "trace_id": f"{arm.recipe_key}-t{i}"} for i in range(n)
        ]
        if not store.has_partition("subset_members", {"subset": arm.recipe_key}):
            _write(store, "subset_members", {"subset": arm.recipe_key}, members)
            traces += [{"trace_id": m["trace_id"], "n_tokens": 10 + i} for i, m in enumerate(members)]
        ckpt = f"ckpt-{arm.student_key}-{arm.recipe_key}"
        _write(
            store,
            "student_checkpoints",
            {"student": arm.student_key, "recipe": arm.recipe_key},
            [
                {
                    "checkpoint_id": ckpt,
                    "student": arm.student_key,
                    "recipe": arm.recipe_key,
                    "subset_version": f"v-{arm.recipe_key}",
                    "tokens_seen": 1000 + 100 * arm.seed,
                }
            ],
        )
        verdicts = [
            {
                "checkpoint_id": ckpt,
                "student": arm.student_key,
                "recipe": arm.recipe_key,
                "benchmark": "held",
                "item_id": item,
                "tag": TAGS[i % 2],
                "correct": ok,
                "eval_config_hash": "h",
            }
            for i, (item, ok) in enumerate(zip(ITEMS, accuracy(arm.arm, arm.seed), strict=True))
        ]
        _write(store, "benchmark_samples", {"student": arm.student_key, "recipe": arm.recipe_key}, verdicts)
    _write(store, "cot_traces", {"source": "synthetic", "shard": "0"}, traces)
    _write(
        store,
        "annotations",
        {"source": "synthetic", "shard": "0"},
        [{"trace_id": t["trace_id"], "correct": t["n_tokens"] % 2 == 0} for t in traces],
    )
    return store


def test_an_experiments_numbers_are_recomputed_by_plain_duckdb_sql_over_the_stored_rows(tmp_path):
    config = _config(tmp_path)
    store = _store_arms(config)
    got = collect(store, "balance", config.arms("balance"), ["held"], replicates=400)
    assert got.items.num_rows == 9 * 30 and got.arms.num_rows == 9
    rows = got.results.to_pylist()
    arm = {(r["measure"], r["arm"], r["slice"]): r for r in rows if r["row"] == "arm"}
    assert arm[("score", "curated", "all")]["estimate"] == pytest.approx(24 / 30) and arm[("score", "curated", "all")]["seeds"] == 3
    assert arm[("score", "shuffled", "all")]["estimate"] == pytest.approx(15 / 30)
    # a tag slice: items 0, 2, 4 ... (counting); curated seed s is right where (i + s) % 30 < 24
    counting = [sum((i + s) % 30 < 24 for i in range(0, 30, 2)) / 15 for s in range(3)]
    assert arm[("score", "curated", "tag:counting")]["estimate"] == pytest.approx(sum(counting) / 3)
    assert arm[("training_tokens", "curated", "all")]["estimate"] == pytest.approx(1100)
    assert arm[("subset_size", "unbalanced", "all")]["estimate"] == 6
    difference = {(r["measure"], r["control"]): r for r in rows if r["row"] == "difference"}
    score = difference[("score", "shuffled")]
    assert score["estimate"] == pytest.approx(24 / 30 - 15 / 30) and score["verdict"] == "higher"
    assert score["items"] == 30 and (score["seeds"], score["control_seeds"]) == (3, 3)
    # the same interval from the (item, seed) verdicts, and from the stored rows by the row's own SQL
    first = {(item, s): float(ok) for s in range(3) for item, ok in zip(ITEMS, accuracy("curated", s), strict=True)}
    second = {(item, s): float(ok) for s in range(3) for item, ok in zip(ITEMS, accuracy("shuffled", s), strict=True)}
    direct = paired_difference(first, second, arms=("curated", "shuffled"), replicates=400)
    assert (score["low"], score["high"]) == pytest.approx((direct.low, direct.high))
    for table in ("experiment_items", "experiment_arms", "experiment_results"):
        store.write_partition(table, {"experiment": "balance"}, getattr(got, table.removeprefix("experiment_")))
    con = store.catalog()
    recomputed = [r for r in rows if r["sql"] is not None]
    assert {(r["row"], r["slice"] != "all") for r in recomputed} == {("difference", False), ("arm", False), ("arm", True)}
    for r in recomputed:  # every difference, and every arm's score overall and per tag
        estimate, low, high, used = con.execute(r["sql"]).fetchone()
        assert (estimate, low, high, used) == pytest.approx((r["estimate"], r["low"], r["high"], r["replicates"])), (
            r["measure"],
            r["slice"],
        )
    curated = arm[("score", "curated", "all")]
    assert curated["low"] < curated["estimate"] < curated["high"] and curated["replicates"] > 300
    # and an arm's score is a plain mean over the stored item rows
    (mean,) = con.execute(
        "SELECT avg(s) FROM (SELECT seed, avg(score) AS s FROM experiment_items WHERE arm = 'unbalanced' GROUP BY seed)"
    ).fetchone()
    assert mean == pytest.approx(arm[("score", "unbalanced", "all")]["estimate"])
    # a cost difference: one value per seed, resampled over seeds
    tokens = difference[("training_tokens", "shuffled")]
    assert tokens["estimate"] == pytest.approx(0) and tokens["items"] == 1 and math.isfinite(tokens["low"])


def test_missing_arms_are_named_and_arms_on_other_items_or_settings_are_not_comparable(tmp_path):
    config = _config(tmp_path)
    store = _store_arms(config, skip=(("shuffled", 2),))
    with pytest.raises(MissingArms) as missing:
        collect(store, "balance", config.arms("balance"), ["held"], replicates=200)
    assert ("student_checkpoints", "shuffled-s2|tiny-s2") in missing.value.partitions
    assert ("benchmark_scores", "shuffled-s2|tiny-s2") in missing.value.partitions
    config = _config(tmp_path / "b")
    store = _store_arms(config)
    rewrite_partition(store, "benchmark_samples", {"student": "tiny-s1", "recipe": "shuffled-s1"}, lambda rows: rows[:-1])
    rewrite_partition(
        store,
        "benchmark_samples",
        {"student": "tiny", "recipe": "unbalanced-s0"},
        lambda rows: [{**r, "eval_config_hash": "other"} for r in rows],
    )
    rows = collect(store, "balance", config.arms("balance"), ["held"], replicates=200).results.to_pylist()
    verdicts = {r["control"]: (r["verdict"], r["problem"]) for r in rows if r["row"] == "difference" and r["measure"] == "score"}
    assert verdicts["shuffled"][0] == "not comparable" and "missing" in verdicts["shuffled"][1]
    assert verdicts["unbalanced"] == ("not comparable", "scored under different evaluation settings (eval_config_hash): re-score the arms")


# -- the asset and its checks ----------------------------------------------------------------------------------------------


@pytest.fixture
def materialised(tmp_path, instance):
    config = _config(tmp_path)
    store = _store_arms(config)
    result = run_job(config, instance, EXPERIMENT_JOB, "balance")
    return config, store, result


def test_the_experiments_asset_writes_its_rows_and_its_checks_pass(materialised):
    config, store, result = materialised
    assert result.success
    assert {name: e.passed for name, e in check_evaluations(result).items()} == dict.fromkeys(CHECKS, True)
    meta = materializations(result)["experiments"]
    assert meta["arms"] == 9 and meta["differences"] == 2 and meta["not_comparable"] == 0
    assert "plot/differences" in meta and "plot/arms" in meta and "curated vs shuffled (random)" in meta["results"]
    assert store.read_partition("experiment_items", {"experiment": "balance"}).num_rows == 270


def test_each_check_fails_on_what_it_guards(materialised, instance):
    config, store, _ = materialised
    part = {"experiment": "balance"}
    rewrite_partition(
        store,
        "experiment_arms",
        part,
        lambda rows: [{**r, "subset_size": 5} if r["arm"] == "shuffled" and r["seed"] == 1 else r for r in rows],
    )
    rewrite_partition(
        store, "experiment_items", part, lambda rows: [r for r in rows if not (r["arm"] == "unbalanced" and r["item"] == "item-03")]
    )
    rewrite_partition(
        store, "experiment_results", part, lambda rows: [{**r, "low": None} if r["measure"] == "teacher_tokens" else r for r in rows]
    )
    checks = run_partition_checks(config, instance, "experiments", "balance")
    assert {name: e.passed for name, e in checks.items()} == dict.fromkeys(CHECKS, False)
    assert "arms differ in size: tiny/curated seed 1: curated 6, shuffled 5, unbalanced 6" in checks["arms_equal_size"].description
    assert "other items in unbalanced seed 0 (29 items)" in checks["arms_same_items"].description
    assert "teacher_tokens curated - shuffled: not finite" in checks["intervals_finite"].description


def test_the_step_fails_naming_the_missing_partitions(tmp_path, instance):
    config = _config(tmp_path)
    _store_arms(config, skip=(("curated", 1),))
    result = run_job(config, instance, EXPERIMENT_JOB, "balance")
    assert not result.success
    failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE")
    assert "student_checkpoints[curated|tiny-s1]" in failure.event_specific_data.error.message or "curated|tiny-s1" in str(failure)


def test_the_cli_reports_stored_results_with_sql_that_recomputes_them(materialised):
    config, store, _ = materialised
    out = runner.invoke(app, ["experiment", "report", "balance", "--config", config.config_path, "--json"])
    assert out.exit_code == 0, out.output
    rows = json.loads(out.output)["balance"]
    score = next(r for r in rows if r["row"] == "difference" and r["measure"] == "score" and r["control"] == "shuffled")
    query = runner.invoke(app, ["query", score["sql"], "--config", config.config_path, "--json"])
    assert query.exit_code == 0, query.output
    recomputed = json.loads(query.output)[0]
    assert (recomputed["low"], recomputed["high"]) == pytest.approx((score["low"], score["high"]))
    table = runner.invoke(app, ["experiment", "report", "--config", config.config_path], terminal_width=250)
    assert table.exit_code == 0 and "shuffled (random)" in table.output and "higher" in table.output and "training_tokens" in table.output
    unknown = runner.invoke(app, ["experiment", "run", "nope", "--config", config.config_path])
    assert unknown.exit_code == 2 and "no experiment 'nope'" in unknown.output


def test_report_says_when_an_experiment_has_no_results_yet(tmp_path):
    config = _config(tmp_path)
    out = runner.invoke(app, ["experiment", "report", "balance", "--config", config.config_path])
    assert out.exit_code == 1 and "no results stored yet" in out.output


# -- end to end: real training (DeepSpeed) and real scoring (lmms-eval) of every arm ---------------------------------------


@pytest.mark.slow
def test_a_small_experiment_end_to_end_with_two_seeds(tmp_path, instance):
    from test_scores import BENCHMARK, LMMS_PYTHON

    from omnithought_dagster.defs import FILTER_JOB, SCORE_JOB, SUBSET_JOB, TRAIN_JOB

    from curation_data import build_store

    build_store(tmp_path / "store", n_samples=24)
    path = write_config(
        tmp_path,
        [{"name": "synthetic", "kind": "synthetic", "n_samples": 24}],
        recipes=[
            {"name": "even", "size": 8, "difficulty_mix": {"easy": 1, "medium": 1, "hard": 1}, "max_tag_share": 0.5, "controls": ["any"]},
            {"name": "any", "kind": "random", "seed": 0},
        ],
        benchmarks=[BENCHMARK],
        students=[{"name": "tiny", "model": "tiny:student"}],
        training={"micro_batch_size": 4, "learning_rate": 0.005, "max_steps": 4, "max_length": 1024},
        evaluation={"python": LMMS_PYTHON, "benchmarks": ["held"], "max_new_tokens": 8},
        experiments=[{"name": "small", "recipes": ["even"], "students": ["tiny"], "seeds": [0, 1]}],
    )
    config = load_config(path)
    keys = sorted({f"{a.recipe_key}|{a.student_key}" for a in config.arms("small")})
    assert keys == ["any-s1|tiny-s1", "any|tiny", "even|tiny", "even|tiny-s1"]
    assert run_job(config, instance, FILTER_JOB, "synthetic").success
    for recipe in ("even", "any", "any-s1"):
        assert run_job(config, instance, SUBSET_JOB, recipe).success, recipe
    for key in keys:
        assert run_job(config, instance, TRAIN_JOB, key).success, key
        assert run_job(config, instance, SCORE_JOB, key).success, key
    store = CorpusStore(config.store.root)
    seeds = {r["student"]: r["train_config_hash"] for r in store.read_table("student_checkpoints").to_pylist()}
    assert seeds["tiny"] != seeds["tiny-s1"]  # the replicate trained with its own seed
    draws = {
        p["subset"]: store.read_partition("subset_members", p).column("trace_id").to_pylist()
        for p in store.list_partitions("subset_members")
    }
    assert len(draws["any"]) == len(draws["any-s1"]) == len(draws["even"]) and draws["any"] != draws["any-s1"]
    result = run_job(config, instance, EXPERIMENT_JOB, "small")
    assert result.success
    assert {name: e.passed for name, e in check_evaluations(result).items()} == dict.fromkeys(CHECKS, True)
    rows = store.read_partition("experiment_results", {"experiment": "small"}).to_pylist()
    score = next(r for r in rows if r["row"] == "difference" and r["measure"] == "score")
    assert (score["items"], score["seeds"], score["control_seeds"]) == (6, 2, 2)
    con = store.catalog()
    assert con.execute(score["sql"]).fetchone() == pytest.approx((score["estimate"], score["low"], score["high"], score["replicates"]))
    costs = {(r["arm"], r["seed"]): r for r in store.read_partition("experiment_arms", {"experiment": "small"}).to_pylist()}
    assert all(c["training_tokens"] > 0 and c["teacher_tokens"] > 0 and c["subset_size"] == 8 for c in costs.values())


def test_an_arm_retrained_or_resampled_and_not_rescored_is_out_of_date_not_mixed_in(tmp_path):
    config = _config(tmp_path)
    store = _store_arms(config)
    # curated|tiny retrained (a new checkpoint) but not re-scored: its stored verdicts are the old checkpoint's
    rewrite_partition(
        store, "student_checkpoints", {"student": "tiny", "recipe": "curated"}, lambda rows: [{**r, "checkpoint_id": "new"} for r in rows]
    )
    # shuffled-s1 drawn again (a new subset version) but tiny-s1 not retrained on it
    rewrite_partition(store, "subset_members", {"subset": "shuffled-s1"}, lambda rows: [{**r, "subset_version": "v-again"} for r in rows])
    with pytest.raises(MissingArms, match="missing or out of date") as stale:
        collect(store, "balance", config.arms("balance"), ["held"], replicates=200)
    assert ("benchmark_scores", "curated|tiny") in stale.value.partitions
    assert ("student_checkpoints", "shuffled-s1|tiny-s1") in stale.value.partitions
    assert len(stale.value.partitions) == 2


def test_a_replicates_baseline_is_its_students_and_is_not_registered_or_scored_again(tmp_path):
    from omnithought_dagster.assets.scores import score_partition_keys
    from omnithought_dagster.stages import stage

    config = _config(tmp_path)
    assert stage("student_baselines").partition_keys(config) == ["tiny", "other"]
    keys = score_partition_keys(config)
    assert "base|tiny" in keys and "base|tiny-s1" not in keys and "curated|tiny-s1" in keys
    only = experiment_selection(config, "balance")
    from omnithought_dagster.assets.student import STUDENT_BASELINES_KEY

    assert only(STUDENT_BASELINES_KEY, "tiny") and not only(STUDENT_BASELINES_KEY, "tiny-s1")


def test_the_report_prints_dataset_text_as_text(tmp_path):
    config = _config(tmp_path)
    store = _store_arms(config)
    rewrite_partition(
        store,
        "benchmark_samples",
        {"student": "tiny-s2", "recipe": "shuffled-s2"},
        lambda rows: [*rows[:-1], {**rows[-1], "item_id": "[/bold] [red]x"}],
    )
    got = collect(store, "balance", config.arms("balance"), ["held"], replicates=200)
    for table in ("experiment_items", "experiment_arms", "experiment_results"):
        store.write_partition(table, {"experiment": "balance"}, getattr(got, table.removeprefix("experiment_")))
    row = next(r for r in got.results.to_pylist() if r["control"] == "shuffled" and r["measure"] == "score")
    assert row["verdict"] == "not comparable" and row["sql"] is None and "[/bold]" in row["problem"]
    out = runner.invoke(app, ["experiment", "report", "balance", "--config", config.config_path], terminal_width=250)
    assert out.exit_code == 0, out.output
    assert "[/bold][red]x" in out.output.replace("\n", "").replace("│", "").replace(" ", "")


def test_a_field_new_at_its_default_leaves_the_code_versions_as_they_were():
    from pathlib import Path

    from omnithought_dagster.assets.curate import filter_settings
    from omnithought_dagster.assets.scores import scores_settings

    config = load_config(Path(__file__).resolve().parents[1] / "omnithought.yaml")
    hashed = json.dumps([scores_settings(config), filter_settings(config), checkpoint_settings(config)])
    assert "question_text" not in hashed and '"seed": null' not in hashed
