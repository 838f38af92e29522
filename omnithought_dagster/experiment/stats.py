"""The arithmetic of an experiment: the paired difference of two arms' scores with a bootstrap interval over items and seeds.

Every arm is scored on the same items, each trained with one or more seeds; an arm's score is the mean over its seeds of
the mean over the items. The interval is a percentile interval of a Poisson bootstrap (each replicate weighs every item,
shared by both arms - the pairing - and every seed of each arm by a Poisson(1) count) whose weights come from a hash, not
a generator: replicate r weighs item i by the Poisson(1) quantile of md5("<r>:item:<i>") and seed s of arm a by that of
md5("<r>:seed:<a>:<s>") (the first 13 hex digits as a fraction of 16^13); an arm trained with one seed has no seed
variance to resample, and its seed weighs 1. So the interval is a function of the stored
per-item rows alone: `interval_sql` writes the DuckDB query that recomputes it from a table of (arm, seed, item, score).
A replicate whose weights leave an arm empty (every seed or item weighed 0) is left out, here and in the SQL.
"""

from __future__ import annotations

import functools
import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

REPLICATES = 2000
LEVEL = 0.95
HEX_DIGITS = 13  # of the md5, read as a fraction: 52 bits, exact in a double and in DuckDB's UBIGINT
# Poisson(1)'s cumulative distribution, P(X <= k) for k = 0..12 (P(X > 12) < 1e-10): a weight is how many of these u passes.
POISSON_CDF = tuple(math.exp(-1) * sum(1 / math.factorial(j) for j in range(k + 1)) for k in range(13))


@dataclass(frozen=True)
class Interval:
    estimate: float  # the difference of the arms' scores (first minus second)
    low: float
    high: float
    level: float
    replicates: int  # the replicates that weighed both arms (the interval's quantiles are taken over them)
    items: int
    seeds: tuple[int, int]  # of each arm

    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0


def unit(key: str) -> float:
    """A uniform [0, 1) number from a key: the first HEX_DIGITS hex digits of its md5 over 16^HEX_DIGITS."""
    return int(hashlib.md5(key.encode()).hexdigest()[:HEX_DIGITS], 16) / 16**HEX_DIGITS


def poisson_weight(u: float) -> int:
    """Poisson(1)'s quantile at u: the number of cumulative probabilities u reaches."""
    return sum(u >= p for p in POISSON_CDF)


@functools.lru_cache(maxsize=64)
def _weights(replicates: int, keys: tuple[str, ...]) -> np.ndarray:
    return np.array([[poisson_weight(unit(f"{r}:{key}")) for key in keys] for r in range(replicates)], dtype=float)


def paired_difference(
    first: Mapping[tuple[str, int], float],
    second: Mapping[tuple[str, int], float],
    *,
    arms: tuple[str, str] = ("first", "second"),
    replicates: int = REPLICATES,
    level: float = LEVEL,
) -> Interval:
    """first - second, each a {(item, seed): score} scored on the same items for every one of its seeds; `arms` names them
    in the seed weights' keys (what the SQL's `arm` column holds)."""
    if arms[0] == arms[1]:
        raise ValueError(f"two arms named {arms[0]!r}: the arms' names must differ (they key the seed weights)")
    if not first or not second:
        raise ValueError("an arm without scores: nothing to compare")
    items = sorted({item for item, _ in first})
    if items != sorted({item for item, _ in second}):
        missing = sorted({item for item, _ in first} ^ {item for item, _ in second})
        raise ValueError(f"the arms were scored on different items ({len(missing)} in one only, e.g. {missing[:3]})")
    a, seeds_a = _matrix(first, items)
    b, seeds_b = _matrix(second, items)
    item_weights = _weights(replicates, tuple(f"item:{item}" for item in items))
    weights_a = _seed_weights(replicates, arms[0], seeds_a)
    weights_b = _seed_weights(replicates, arms[1], seeds_b)
    mean_a, used_a = _weighted_means(a, item_weights, weights_a)
    mean_b, used_b = _weighted_means(b, item_weights, weights_b)
    used = used_a & used_b
    differences = mean_a[used] - mean_b[used]
    low, high = np.quantile(differences, [(1 - level) / 2, 1 - (1 - level) / 2]) if used.any() else (math.nan, math.nan)
    return Interval(float(a.mean() - b.mean()), float(low), float(high), level, int(used.sum()), len(items), (len(seeds_a), len(seeds_b)))


def arm_interval(
    scores: Mapping[tuple[str, int], float], *, arm: str = "arm", replicates: int = REPLICATES, level: float = LEVEL
) -> Interval:
    """One arm's score (mean over its seeds of the mean over the items) with its percentile interval, from the same
    weights as `paired_difference` (items keyed "<r>:item:<i>", seeds "<r>:seed:<arm>:<s>"); `seeds` is (its seeds, 0)."""
    if not scores:
        raise ValueError("an arm without scores")
    items = sorted({item for item, _ in scores})
    matrix, seeds = _matrix(scores, items)
    means, used = _weighted_means(
        matrix, _weights(replicates, tuple(f"item:{item}" for item in items)), _seed_weights(replicates, arm, seeds)
    )
    low, high = np.quantile(means[used], [(1 - level) / 2, 1 - (1 - level) / 2]) if used.any() else (math.nan, math.nan)
    return Interval(float(matrix.mean()), float(low), float(high), level, int(used.sum()), len(items), (len(seeds), 0))


def _seed_weights(replicates: int, arm: str, seeds: list[int]) -> np.ndarray:
    if len(seeds) == 1:
        return np.ones((replicates, 1))
    return _weights(replicates, tuple(f"seed:{arm}:{seed}" for seed in seeds))


def _matrix(scores: Mapping[tuple[str, int], float], items: list[str]) -> tuple[np.ndarray, list[int]]:
    """items x seeds; every item must be scored for every seed."""
    seeds = sorted({seed for _, seed in scores})
    missing = [(item, seed) for item in items for seed in seeds if (item, seed) not in scores]
    if missing:
        raise ValueError(f"{len(missing)} (item, seed) scores missing, e.g. {missing[:3]}: every seed is scored on every item")
    return np.array([[scores[(item, seed)] for seed in seeds] for item in items], dtype=float), seeds


def _weighted_means(scores: np.ndarray, item_weights: np.ndarray, seed_weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per replicate, sum w_i v_s x_is / sum w_i v_s; and which replicates have a positive denominator."""
    numerator = ((item_weights @ scores) * seed_weights).sum(axis=1)
    denominator = item_weights.sum(axis=1) * seed_weights.sum(axis=1)
    used = denominator > 0
    return np.divide(numerator, denominator, out=np.zeros_like(numerator), where=used), used


def literal(value: str) -> str:
    """A SQL string literal (quotes doubled)."""
    return "'" + str(value).replace("'", "''") + "'"


def arm_interval_sql(table: str, arm: str, replicates: int = REPLICATES, level: float = LEVEL) -> str:
    """The DuckDB query that recomputes `arm_interval` from `table`(arm, seed, item, score): one row (estimate, low, high,
    replicates), under `interval_sql`'s assumptions."""
    low, high = (1 - level) / 2, 1 - (1 - level) / 2
    return f"""
WITH {_means_sql(table, f"({literal(arm)})", replicates)}
SELECT (SELECT avg(score) FROM scores) AS estimate, quantile_cont(mean, {low!r}) AS low, quantile_cont(mean, {high!r}) AS high,
       count(*) AS replicates
FROM arm_means
"""


def _weight_sql(key: str) -> str:
    u = f"('0x' || md5({key})[1:{HEX_DIGITS}])::UBIGINT / {16**HEX_DIGITS}.0"
    return " + ".join(f"({u} >= {p!r})::INT" for p in POISSON_CDF)


def _means_sql(table: str, arms: str, replicates: int) -> str:
    """The CTEs both queries share: the arms' rows, the replicates' item and seed weights, each arm's weighted mean."""
    return f"""scores AS (SELECT arm, seed, item, score::DOUBLE AS score FROM {table} WHERE arm IN {arms}),
replicates AS (SELECT range AS r FROM range({replicates})),
item_weights AS (
    SELECT r, item, {_weight_sql("r::VARCHAR || ':item:' || item")} AS w FROM replicates, (SELECT DISTINCT item FROM scores)
),
seed_weights AS (
    SELECT r, arm, seed, CASE WHEN seeds = 1 THEN 1 ELSE {_weight_sql("r::VARCHAR || ':seed:' || arm || ':' || seed::VARCHAR")} END AS v
    FROM replicates, (SELECT DISTINCT arm, seed, count(DISTINCT seed) OVER (PARTITION BY arm) AS seeds FROM scores)
),
arm_means AS (
    SELECT r, arm, sum(w * v * score) / sum(w * v) AS mean
    FROM scores JOIN item_weights USING (item) JOIN seed_weights USING (r, arm, seed)
    GROUP BY r, arm HAVING sum(w * v) > 0
)"""


def interval_sql(table: str, first: str, second: str, replicates: int = REPLICATES, level: float = LEVEL) -> str:
    """The DuckDB query that recomputes `paired_difference` from `table`(arm, seed, item, score) - a table's name or a
    parenthesised query, written in as given - as one row (estimate, low, high, replicates). Like `paired_difference` it
    assumes one row per (arm, seed, item) and every item scored for every seed of both arms; it does not check that."""
    if first == second:
        raise ValueError(f"two arms named {first!r}: the arms' names must differ")

    arms = f"({literal(first)}, {literal(second)})"
    low, high = (1 - level) / 2, 1 - (1 - level) / 2
    return f"""
WITH {_means_sql(table, arms, replicates)},
differences AS (
    SELECT f.mean - s.mean AS difference FROM arm_means f JOIN arm_means s USING (r)
    WHERE f.arm = {literal(first)} AND s.arm = {literal(second)}
),
estimate AS (
    SELECT avg(score) FILTER (arm = {literal(first)}) - avg(score) FILTER (arm = {literal(second)}) AS estimate FROM scores
)
SELECT (SELECT estimate FROM estimate) AS estimate, quantile_cont(difference, {low!r}) AS low,
       quantile_cont(difference, {high!r}) AS high, count(*) AS replicates
FROM differences
"""
