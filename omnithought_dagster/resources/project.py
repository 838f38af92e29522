"""Resources built from the project file.

Secrets never sit in the project file: a resource that needs one takes it as an `EnvVar`,
so it is read from the environment of the process that runs the step and never shown in the
UI. (The teacher's API key and the S3 credentials arrive this way in later stages.)
"""

from __future__ import annotations

import dagster as dg
from pydantic import PrivateAttr

from omnithought_dagster.config import ProjectConfig, load_config
from omnithought_dagster.store import CorpusStore


class ProjectResource(dg.ConfigurableResource):
    """The validated project file (sources, limits, later-stage settings)."""

    config_path: str

    _config: ProjectConfig | None = PrivateAttr(default=None)

    @property
    def config(self) -> ProjectConfig:
        if self._config is None:
            self._config = load_config(self.config_path)
        return self._config


class CorpusStoreResource(dg.ConfigurableResource):
    """The corpus store under one root URI (a local folder; object stores through pyarrow.fs)."""

    root_uri: str

    def open(self) -> CorpusStore:
        return CorpusStore(self.root_uri)
