"""Dagster resources: the project config and the corpus store (teacher, judge, trainer, evaluator come later)."""

from omnithought_dagster.resources.project import CorpusStoreResource, ProjectResource

__all__ = ["CorpusStoreResource", "ProjectResource"]
