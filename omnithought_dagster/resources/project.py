"""Resources built from the project file.

Secrets never sit in the project file: a resource that needs one takes it as an `EnvVar`,
so it is read from the environment of the process that runs the step and never shown in the
UI: the teacher's and judge's API keys, and the S3 keys of the store.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import dagster as dg
from pydantic import PrivateAttr

from omnithought_dagster.config import ProjectConfig, SourceConfig, StoreConfig, load_config
from omnithought_dagster.manifests import resolve_source
from omnithought_dagster.pools import joining_run
from omnithought_dagster.store import CorpusStore, open_store


class ProjectResource(dg.ConfigurableResource):
    """The validated project file (sources, limits, later-stage settings)."""

    config_path: str

    _config: ProjectConfig | None = PrivateAttr(default=None)

    @property
    def config(self) -> ProjectConfig:
        if self._config is None:
            self._config = load_config(self.config_path)
        return self._config

    @contextmanager
    def yield_for_execution(self, context: dg.InitResourceContext) -> Iterator[ProjectResource]:
        # Every step uses this resource, so every step process keeps its run alive while it works: a step the
        # multiprocess executor spawned holds its run's pool slot until it ends, even if its run worker was killed.
        with joining_run(context.instance, context.run_id):
            yield self


class CorpusStoreResource(dg.ConfigurableResource):
    """The corpus store under one root URI: a local folder, or s3:// (Arrow's S3 filesystem; keys through EnvVar)."""

    root_uri: str
    endpoint_url: str | None = None
    region: str | None = None
    access_key: str | None = None  # from EnvVar(store.access_key_env), never from the project file
    secret_key: str | None = None

    def open(self) -> CorpusStore:
        return open_store(
            StoreConfig(root=self.root_uri, endpoint_url=self.endpoint_url, region=self.region),
            access_key=self.access_key,
            secret_key=self.secret_key,
        )

    def source(self, config: ProjectConfig, name: str) -> SourceConfig:
        """A seed source: the project file's, else its manifest (an S3 manifest is read with this store's keys)."""
        return resolve_source(config, name, access_key=self.access_key, secret_key=self.secret_key)
