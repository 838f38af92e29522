"""Asset checks on experiments (one per experiment); each re-reads the stored rows (experiment_items, experiment_arms,
experiment_results)."""

import math
from collections import defaultdict

import dagster as dg

from omnithought_dagster.assets.experiment import EXPERIMENTS_KEY, experiment_partitions
from omnithought_dagster.config import ProjectConfig
from omnithought_dagster.resources import CorpusStoreResource

ARMS_EQUAL_SIZE = "arms_equal_size"
ARMS_SAME_ITEMS = "arms_same_items"
INTERVALS_FINITE = "intervals_finite"


def _rows(store: CorpusStoreResource, table: str, experiment: str) -> list[dict]:
    found = store.open().read_partition(table, {"experiment": experiment})
    return found.to_pylist() if found is not None else []


def _missing(table: str, experiment: str) -> dg.AssetCheckResult:
    return dg.AssetCheckResult(passed=False, description=f"{table}[{experiment}] is missing or empty")


def build_experiment_checks(config: ProjectConfig) -> list[dg.AssetChecksDefinition]:
    if not config.experiments:
        return []
    partitions = experiment_partitions(config)

    @dg.asset_check(asset=EXPERIMENTS_KEY, name=ARMS_EQUAL_SIZE, partitions_def=partitions, blocking=True)
    def arms_equal_size(context: dg.AssetCheckExecutionContext, store: CorpusStoreResource) -> dg.AssetCheckResult:
        """Within each (student, curated recipe, seed), every arm's subset has as many traces as the curated arm's."""
        rows = _rows(store, "experiment_arms", context.partition_key)
        if not rows:
            return _missing("experiment_arms", context.partition_key)
        sizes: dict[tuple, dict[str, int]] = defaultdict(dict)
        for r in rows:
            sizes[(r["student"], r["curated"], r["seed"])][r["arm"]] = r["subset_size"]
        problems = [
            f"{student}/{curated} seed {seed}: " + ", ".join(f"{arm} {n}" for arm, n in arms.items())
            for (student, curated, seed), arms in sizes.items()
            if len(set(arms.values())) > 1
        ]
        return dg.AssetCheckResult(
            passed=not problems,
            metadata={"groups": len(sizes), "unequal": len(problems)},
            description=("arms differ in size: " + "; ".join(problems[:5])) if problems else None,
        )

    @dg.asset_check(asset=EXPERIMENTS_KEY, name=ARMS_SAME_ITEMS, partitions_def=partitions, blocking=True)
    def arms_same_items(context: dg.AssetCheckExecutionContext, store: CorpusStoreResource) -> dg.AssetCheckResult:
        """Within each (student, benchmark), every arm and seed is scored on the same items, each once."""
        rows = _rows(store, "experiment_items", context.partition_key)
        if not rows:
            return _missing("experiment_items", context.partition_key)
        items: dict[tuple, dict[tuple, list[str]]] = defaultdict(lambda: defaultdict(list))
        for r in rows:
            items[(r["student"], r["benchmark"])][(r["arm"], r["seed"])].append(r["item"])
        problems = []
        for (student, benchmark), arms in items.items():
            repeated = [f"{arm} seed {seed}" for (arm, seed), got in arms.items() if len(got) != len(set(got))]
            if repeated:
                problems.append(f"{student}/{benchmark}: an item scored twice in {', '.join(repeated[:3])}")
            sets = {key: frozenset(got) for key, got in arms.items()}
            first = next(iter(sets.values()))
            other = [f"{arm} seed {seed} ({len(s)} items)" for (arm, seed), s in sets.items() if s != first]
            if other:
                problems.append(f"{student}/{benchmark}: {len(first)} items in the first arm, other items in {', '.join(other[:3])}")
        return dg.AssetCheckResult(
            passed=not problems,
            metadata={"groups": len(items), "problems": len(problems)},
            description="; ".join(problems[:5]) or None,
        )

    @dg.asset_check(asset=EXPERIMENTS_KEY, name=INTERVALS_FINITE, partitions_def=partitions, blocking=True)
    def intervals_finite(context: dg.AssetCheckExecutionContext, store: CorpusStoreResource) -> dg.AssetCheckResult:
        """Every difference has an estimate and a finite interval around it (none is `not comparable`)."""
        rows = [r for r in _rows(store, "experiment_results", context.partition_key) if r["row"] == "difference"]
        if not rows:
            return _missing("experiment_results", context.partition_key)

        def finite(r: dict) -> bool:
            values = (r["estimate"], r["low"], r["high"])
            return all(v is not None and math.isfinite(v) for v in values)

        bad = [r for r in rows if not finite(r)]
        reasons = [
            f"{r['student']}/{r['benchmark']} {r['measure']} {r['curated']} - {r['control']}: {r['problem'] or 'not finite'}" for r in bad
        ]
        return dg.AssetCheckResult(
            passed=not bad,
            metadata={"differences": len(rows), "without_interval": len(bad)},
            description="; ".join(reasons[:5]) or None,
        )

    return [arms_equal_size, arms_same_items, intervals_finite]
