"""What Dagster says of a partition: fresh, stale (and why) or missing, as the UI shows it.

The UI's `staleStatus` and `staleCauses` come from Dagster's CachingStaleStatusResolver over the code
location's asset graph; this asks the same resolver over a Definitions built here. A partition is stale when
its asset's code version changed since it was materialised (each asset's code version hashes the project
file's settings that change its output: `ids.code_version`) or when an upstream it read has a newer data
version; "missing" when it was never materialised.
"""

from __future__ import annotations

from dataclasses import dataclass

import dagster as dg
from dagster._core.definitions.data_version import CachingStaleStatusResolver, StaleStatus  # the resolver the UI's GraphQL uses
from dagster._core.loader import LoadingContext

FRESH, STALE, MISSING = StaleStatus.FRESH.value, StaleStatus.STALE.value, StaleStatus.MISSING.value


class _Loading(LoadingContext):
    """The loader cache the resolver wants (the webserver's request context is one)."""

    def __init__(self, instance: dg.DagsterInstance):
        self._instance = instance
        self._loaders: dict = {}

    @property
    def instance(self) -> dg.DagsterInstance:
        return self._instance

    @property
    def loaders(self) -> dict:
        return self._loaders


@dataclass(frozen=True)
class PartitionStatus:
    status: str  # FRESH | STALE | MISSING
    causes: tuple[str, ...]  # why it is stale, as the UI words it: "<asset>[<partition>]: <reason> (<the dependency it names>)"

    @property
    def fresh(self) -> bool:
        return self.status == FRESH


class Staleness:
    """Asks Dagster about the partitions of one Definitions on one instance (one resolver: its reads are cached)."""

    def __init__(self, instance: dg.DagsterInstance, defs: dg.Definitions):
        self._resolver = CachingStaleStatusResolver(instance, defs.resolve_asset_graph(), _Loading(instance))

    def of(self, key: dg.AssetKey, partition: str | None = None) -> PartitionStatus:
        status = self._resolver.get_status(key, partition)
        causes = self._resolver.get_stale_causes(key, partition) if status == StaleStatus.STALE else []
        return PartitionStatus(
            status.value, tuple(f"{_where(c.key)}: {c.reason}" + (f" ({_where(c.dependency)})" if c.dependency else "") for c in causes)
        )


def _where(asset_key_partition) -> str:
    name = asset_key_partition.asset_key.to_user_string()
    return f"{name}[{asset_key_partition.partition_key}]" if asset_key_partition.partition_key else name
