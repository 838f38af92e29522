"""Assembles the one Definitions from a project config: each stage contributes, nothing else lives here."""

from __future__ import annotations

import warnings

import dagster as dg

from omnithought_dagster.config import ProjectConfig
from omnithought_dagster.placement import executor
from omnithought_dagster.resources import CorpusStoreResource, LLMResource, ProjectResource
from omnithought_dagster.sensors import dead_run_reaper
from omnithought_dagster.stages import (  # noqa: F401 - the job names, where they were always imported from
    ANNOTATE_JOB,
    BASELINE_JOB,
    EXPERIMENT_JOB,
    FILTER_JOB,
    SCORE_JOB,
    SEED_JOB,
    STAGES,
    SUBSET_JOB,
    TEACHER_JOB,
    TRAIN_JOB,
)

# Checks are per partition (one source's rows at a time). Dagster 1.13 marks partitioned checks
# as preview; the version is pinned in pyproject.toml, so the warning says nothing new.
warnings.filterwarnings("ignore", message="Specifying a partitions_def on an AssetCheckSpec", category=dg.PreviewWarning)
# cot_traces (source x shard) depends on seed_pool (source) through this beta mapping; pinned too.
warnings.filterwarnings("ignore", message="Class `MultiToSingleDimensionPartitionMapping` is currently in beta", category=dg.BetaWarning)
# benchmark_scores (student x base+recipes) reads student_checkpoints (student x recipes) through this one.
warnings.filterwarnings("ignore", message="Class `MultiPartitionMapping` is currently in beta", category=dg.BetaWarning)
# The files the pipeline reads are observable source assets (assets/inputs.py), a beta decorator; pinned too.
warnings.filterwarnings("ignore", message="Function `observable_source_asset` is currently in beta", category=dg.BetaWarning)
warnings.filterwarnings("ignore", message="Class `DataVersionsByPartition` is currently in beta", category=dg.BetaWarning)
# Dagster's own Pipes client calls a preview API of itself on every run; nothing for users to act on.
warnings.filterwarnings(
    "ignore", message="Function `PipesMessageReader.expected_writer_count` is currently in preview", category=dg.PreviewWarning
)


def _llm_resource(env: str | None) -> LLMResource:
    return LLMResource(api_key=dg.EnvVar(env), api_key_env=env) if env else LLMResource()


def build_definitions(config: ProjectConfig) -> dg.Definitions:
    if config.config_path is None:
        raise ValueError("build_definitions needs a config loaded from a file (load_config), so runs can reload it")
    stages = [stage.definitions(config) for stage in STAGES if stage.enabled(config)]
    judge_key = config.annotator.api_key_env
    resources = dg.Definitions(
        resources={
            "project": ProjectResource(config_path=config.config_path),
            "store": _store_resource(config),
            # The key is read from the environment of the step, never from the project file.
            # Other teachers and judges that name their own env var read it in the step (LLMResource.key_for).
            "teacher": _llm_resource(config.teacher.api_key_env),
            "judge": _llm_resource(judge_key),
            # Training and evaluation run as their own processes, reporting back through Pipes.
            "pipes_subprocess_client": dg.PipesSubprocessClient(),
        }
    )
    project = dg.Definitions(sensors=[dead_run_reaper], executor=executor(config))
    return dg.Definitions.merge(*stages, resources, project)


def _store_resource(config: ProjectConfig) -> CorpusStoreResource:
    """The store resource; S3 keys (when the project file names their env vars) are EnvVars, read where the step runs."""
    store = config.store
    keys = {}
    if store.access_key_env and store.secret_key_env:
        keys = {"access_key": dg.EnvVar(store.access_key_env), "secret_key": dg.EnvVar(store.secret_key_env)}
    return CorpusStoreResource(root_uri=store.root, endpoint_url=store.endpoint_url, region=store.region, **keys)
