"""Dagster resources built from the project file: project config, corpus store, teacher."""

from omnithought_dagster.resources.llm import LLMResource
from omnithought_dagster.resources.project import CorpusStoreResource, ProjectResource

__all__ = ["CorpusStoreResource", "LLMResource", "ProjectResource"]
