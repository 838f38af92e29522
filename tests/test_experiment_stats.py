"""The experiment's arithmetic against hand-computed cases, a simulated known effect, and DuckDB recomputing it."""

from __future__ import annotations

import math

import duckdb
import numpy as np
import pytest

from omnithought_dagster.experiment.stats import POISSON_CDF, interval_sql, paired_difference, poisson_weight, unit


def _arm(matrix: np.ndarray, items: list[str]) -> dict[tuple[str, int], float]:
    return {(item, seed): float(matrix[i, seed]) for i, item in enumerate(items) for seed in range(matrix.shape[1])}


def test_the_weights_are_poisson_one_from_a_hash():
    assert POISSON_CDF[0] == pytest.approx(math.exp(-1)) and POISSON_CDF[-1] > 1 - 1e-9
    assert [poisson_weight(u) for u in (0.0, 0.3678, 0.3679, 0.7357, 0.7358, 0.99)] == [0, 0, 1, 1, 2, 4]
    assert unit("0:item:a") == unit("0:item:a") != unit("1:item:a")
    draws = np.array([poisson_weight(unit(f"{r}:item:x")) for r in range(20_000)])
    assert abs(draws.mean() - 1) < 0.03 and abs(draws.var() - 1) < 0.05 and abs((draws == 0).mean() - math.exp(-1)) < 0.01


def test_one_replicate_by_hand():
    """Replicate 0 recomputed with loops from the documented keys: the vectorised means are the formula's."""
    items = ["q1", "q2", "q3", "q4"]
    first = {("q1", 0): 1, ("q2", 0): 0, ("q3", 0): 1, ("q4", 0): 1, ("q1", 1): 0, ("q2", 1): 0, ("q3", 1): 1, ("q4", 1): 1}
    second = {(item, 0): score for item, score in zip(items, [0, 0, 1, 0], strict=True)}
    result = paired_difference(first, second, arms=("a", "b"), replicates=1, level=0.5)
    assert result.estimate == pytest.approx(5 / 8 - 1 / 4) and result.items == 4 and result.seeds == (2, 1)
    w = {item: poisson_weight(unit(f"0:item:{item}")) for item in items}
    va = {seed: poisson_weight(unit(f"0:seed:a:{seed}")) for seed in (0, 1)}
    vb = 1  # one seed: not resampled
    den_a = sum(w[i] * va[s] for i in items for s in (0, 1))
    if den_a and vb and sum(w.values()):
        mean_a = sum(w[i] * va[s] * first[(i, s)] for i in items for s in (0, 1)) / den_a
        mean_b = sum(w[i] * vb * second[(i, 0)] for i in items) / (sum(w.values()) * vb)
        assert result.replicates == 1 and result.low == pytest.approx(mean_a - mean_b) == result.high
    else:
        assert result.replicates == 0 and math.isnan(result.low)


def test_identical_single_seed_arms_differ_by_exactly_nothing_and_a_constant_shift_by_exactly_it():
    items = [f"q{i}" for i in range(30)]
    scores = np.random.default_rng(0).random((30, 1))
    same = paired_difference(_arm(scores, items), _arm(scores, items), replicates=300)
    assert same.replicates == 300  # one seed an arm: nothing to resample there, no replicate left out
    assert same.estimate == 0 and same.low == pytest.approx(0, abs=1e-12) and same.high == pytest.approx(0, abs=1e-12)  # paired
    shifted = paired_difference(_arm(scores + 0.1, items), _arm(scores, items), replicates=300)
    assert shifted.estimate == pytest.approx(0.1) and shifted.low == pytest.approx(0.1) and shifted.high == pytest.approx(0.1)


def test_pairing_narrows_the_interval_where_items_differ_more_than_arms():
    rng = np.random.default_rng(1)
    items = [f"q{i}" for i in range(200)]
    difficulty = rng.random((200, 1))
    first = (rng.random((200, 3)) < np.clip(difficulty + 0.05, 0, 1)).astype(float)
    second = (rng.random((200, 3)) < difficulty).astype(float)
    paired = paired_difference(_arm(first, items), _arm(second, items), replicates=500)
    shuffled = paired_difference(_arm(first, items), _arm(second[rng.permutation(200)], items), replicates=500)
    assert paired.high - paired.low < shuffled.high - shuffled.low


def test_the_interval_covers_a_simulated_known_effect_about_as_often_as_it_says():
    rng = np.random.default_rng(7)
    n, seeds, effect, runs = 60, 3, 0.1, 120
    items = [f"q{i}" for i in range(n)]
    covered = 0
    for _ in range(runs):
        difficulty = rng.uniform(0.2, 0.7, size=(n, 1))
        first = (rng.random((n, seeds)) < difficulty + effect + rng.normal(0, 0.02, size=(1, seeds))).astype(float)
        second = (rng.random((n, seeds)) < difficulty + rng.normal(0, 0.02, size=(1, seeds))).astype(float)
        result = paired_difference(_arm(first, items), _arm(second, items), replicates=400)
        covered += result.low <= effect <= result.high
    assert 0.85 <= covered / runs <= 1.0, covered / runs  # a 95% interval; percentile bootstraps run a little narrow


@pytest.mark.parametrize("seeds", [(3, 2), (1, 2)])
def test_duckdb_recomputes_the_interval_from_the_per_item_rows(seeds):
    rng = np.random.default_rng(3)
    items = [f"item-{i}" for i in range(40)]
    first, second = (rng.random((40, seeds[0])) < 0.6).astype(float), (rng.random((40, seeds[1])) < 0.5).astype(float)
    result = paired_difference(_arm(first, items), _arm(second, items), arms=("curated", "random"), replicates=250)
    rows = [("curated", s, item, score) for (item, s), score in _arm(first, items).items()]
    rows += [("random", s, item, score) for (item, s), score in _arm(second, items).items()]
    con = duckdb.connect()
    con.execute("CREATE TABLE item_scores (arm VARCHAR, seed INTEGER, item VARCHAR, score DOUBLE)")
    con.executemany("INSERT INTO item_scores VALUES (?, ?, ?, ?)", rows)
    estimate, low, high, replicates = con.execute(interval_sql("item_scores", "curated", "random", replicates=250)).fetchone()
    assert replicates == result.replicates and replicates > 200 and result.seeds == seeds
    assert (estimate, low, high) == pytest.approx((result.estimate, result.low, result.high), abs=1e-12)


def test_arms_on_different_items_or_with_a_missing_score_are_refused():
    with pytest.raises(ValueError, match="names must differ"):
        paired_difference({("a", 0): 1.0}, {("a", 0): 0.0}, arms=("x", "x"))
    with pytest.raises(ValueError, match="names must differ"):
        interval_sql("t", "x", "x")
    with pytest.raises(ValueError, match="nothing to compare"):
        paired_difference({}, {})
    with pytest.raises(ValueError, match="different items"):
        paired_difference({("a", 0): 1.0}, {("b", 0): 1.0})
    with pytest.raises(ValueError, match=r"1 \(item, seed\) scores missing"):
        paired_difference({("a", 0): 1.0, ("b", 0): 0.0, ("a", 1): 1.0}, {("a", 0): 1.0, ("b", 0): 1.0})


def test_an_arms_interval_is_its_bootstrap_and_the_sql_recomputes_it():
    import duckdb

    from omnithought_dagster.experiment.stats import arm_interval, arm_interval_sql

    constant = {(f"i{i}", s): 0.5 for i in range(10) for s in range(2)}
    flat = arm_interval(constant, arm="a", replicates=200)
    assert (flat.estimate, flat.low, flat.high) == (0.5, 0.5, 0.5) and flat.seeds == (2, 0)
    scores = {(f"i{i}", s): float((i + s) % 3 == 0) for i in range(30) for s in range(3)}
    got = arm_interval(scores, arm="a", replicates=300)
    assert got.low < got.estimate < got.high and got.items == 30
    con = duckdb.connect()
    con.execute(
        "CREATE TABLE t AS SELECT * FROM (VALUES "
        + ", ".join(f"('a', {s}, '{i}', {v})" for (i, s), v in scores.items())
        + ") v(arm, seed, item, score)"
    )
    assert con.execute(arm_interval_sql("t", "a", replicates=300)).fetchone() == pytest.approx(
        (got.estimate, got.low, got.high, got.replicates)
    )
