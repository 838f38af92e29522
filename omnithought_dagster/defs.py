"""Assembles the one Definitions from a project config: each stage contributes, nothing else lives here."""

from __future__ import annotations

import warnings

import dagster as dg

from omnithought_dagster.assets import build_seed_assets
from omnithought_dagster.assets.annotate import build_annotate_assets
from omnithought_dagster.assets.curate import FILTERED_SET_KEY, SAMPLED_SUBSETS_KEY, build_curate_assets, recipe_partitions
from omnithought_dagster.assets.scores import BENCHMARK_SCORES_KEY, build_score_assets, score_partitions
from omnithought_dagster.assets.seed import seed_partitions
from omnithought_dagster.assets.student import (STUDENT_BASELINES_KEY, STUDENT_CHECKPOINTS_KEY, baseline_partitions, build_student_assets,
                                                student_partitions)
from omnithought_dagster.assets.teacher import build_teacher_assets, traces_partitions
from omnithought_dagster.automation import build_schedules
from omnithought_dagster.checks import build_seed_checks
from omnithought_dagster.checks.annotate import build_annotate_checks
from omnithought_dagster.checks.curate import build_curate_checks
from omnithought_dagster.checks.scores import build_score_checks
from omnithought_dagster.checks.student import build_student_checks
from omnithought_dagster.checks.teacher import build_teacher_checks
from omnithought_dagster.config import ProjectConfig
from omnithought_dagster.placement import executor
from omnithought_dagster.resources import CorpusStoreResource, LLMResource, ProjectResource
from omnithought_dagster.sensors import build_sensors

SEED_JOB = "ingest_seeds"
TEACHER_JOB = "generate_traces"
ANNOTATE_JOB = "annotate_traces"
FILTER_JOB = "filter_traces"
SUBSET_JOB = "sample_subsets"
BASELINE_JOB = "register_baselines"
TRAIN_JOB = "train_students"
SCORE_JOB = "score_students"

# Checks are per partition (one source's rows at a time). Dagster 1.13 marks partitioned checks
# as preview; the version is pinned in pyproject.toml, so the warning says nothing new.
warnings.filterwarnings("ignore", message="Specifying a partitions_def on an AssetCheckSpec", category=dg.PreviewWarning)
# cot_traces (source x shard) depends on seed_pool (source) through this beta mapping; pinned too.
warnings.filterwarnings("ignore", message="Class `MultiToSingleDimensionPartitionMapping` is currently in beta", category=dg.BetaWarning)
# benchmark_scores (student x base+recipes) reads student_checkpoints (student x recipes) through this one.
warnings.filterwarnings("ignore", message="Class `MultiPartitionMapping` is currently in beta", category=dg.BetaWarning)
# Dagster's own Pipes client calls a preview API of itself on every run; nothing for users to act on.
warnings.filterwarnings("ignore", message="Function `PipesMessageReader.expected_writer_count` is currently in preview", category=dg.PreviewWarning)


def build_definitions(config: ProjectConfig) -> dg.Definitions:
    if config.config_path is None:
        raise ValueError("build_definitions needs a config loaded from a file (load_config), so runs can reload it")
    seed = dg.Definitions.merge(
        _stage(build_seed_assets(config), build_seed_checks(config), SEED_JOB, "seed", seed_partitions(config),
               "Ingest one seed source: seed_pool, quarantine and images, with their checks."),
        dg.Definitions(sensors=build_sensors(config, SEED_JOB)))
    teacher = _stage(build_teacher_assets(config), build_teacher_checks(config), TEACHER_JOB, "teacher", traces_partitions(config),
                     "Generate one (source, shard) partition of cot_traces on the teacher (a GPU step), with its checks.")
    annotate = _stage(build_annotate_assets(config), build_annotate_checks(config), ANNOTATE_JOB, "annotate", traces_partitions(config),
                      "Annotate one (source, shard) partition of cot_traces: verifier, pass rates and the judge (a GPU step).")
    curate_jobs = [dg.define_asset_job(FILTER_JOB, selection=dg.AssetSelection.assets(FILTERED_SET_KEY), partitions_def=seed_partitions(config),
                                       description="Rule filters, decontamination and difficulty-aware selection for one source, with checks.")]
    if config.recipes:
        curate_jobs.append(dg.define_asset_job(SUBSET_JOB, selection=dg.AssetSelection.assets(SAMPLED_SUBSETS_KEY),
                                               partitions_def=recipe_partitions(config),
                                               description="Draw one recipe's tag-diverse subset from the filtered set, with checks."))
    curate = dg.Definitions(assets=build_curate_assets(config), asset_checks=build_curate_checks(config), jobs=curate_jobs,
                            schedules=build_schedules(config, FILTER_JOB))
    students = dg.Definitions()
    if config.students:
        student_jobs = [dg.define_asset_job(BASELINE_JOB, selection=dg.AssetSelection.assets(STUDENT_BASELINES_KEY),
                                            partitions_def=baseline_partitions(config),
                                            description="Register one student's untrained base model (the baseline of its scores), with checks.")]
        if config.recipes:
            student_jobs.append(dg.define_asset_job(
                TRAIN_JOB, selection=dg.AssetSelection.assets(STUDENT_CHECKPOINTS_KEY), partitions_def=student_partitions(config),
                description="Fine-tune one student on one recipe's subset (DeepSpeed in its own process, via Pipes), with checks."))
        score_assets = build_score_assets(config)
        if score_assets:
            student_jobs.append(dg.define_asset_job(
                SCORE_JOB, selection=dg.AssetSelection.assets(BENCHMARK_SCORES_KEY), partitions_def=score_partitions(config),
                description="Score one checkpoint (or `base`: the baseline) with lmms-eval in its own environment, with checks."))
        students = dg.Definitions(assets=[*build_student_assets(config), *score_assets], jobs=student_jobs,
                                  asset_checks=[*build_student_checks(config), *(build_score_checks(config) if score_assets else [])])
    judge_key = config.annotator.api_key_env
    resources = dg.Definitions(
        resources={
            "project": ProjectResource(config_path=config.config_path),
            "store": _store_resource(config),
            # The key is read from the environment of the step, never from the project file.
            "teacher": LLMResource(api_key=dg.EnvVar(config.teacher.api_key_env)) if config.teacher.api_key_env else LLMResource(),
            "judge": LLMResource(api_key=dg.EnvVar(judge_key)) if judge_key else LLMResource(),
            # Training and evaluation run as their own processes, reporting back through Pipes.
            "pipes_subprocess_client": dg.PipesSubprocessClient(),
        }
    )
    return dg.Definitions.merge(seed, teacher, annotate, curate, students, resources, dg.Definitions(executor=executor(config)))


def _store_resource(config: ProjectConfig) -> CorpusStoreResource:
    """The store resource; S3 keys (when the project file names their env vars) are EnvVars, read where the step runs."""
    store = config.store
    keys = {}
    if store.access_key_env and store.secret_key_env:
        keys = {"access_key": dg.EnvVar(store.access_key_env), "secret_key": dg.EnvVar(store.secret_key_env)}
    return CorpusStoreResource(root_uri=store.root, endpoint_url=store.endpoint_url, region=store.region, **keys)


def _stage(assets, checks, job: str, group: str, partitions, description: str) -> dg.Definitions:
    """A stage's assets and checks, and the partitioned job that materialises one of its partitions."""
    return dg.Definitions(
        assets=assets,
        asset_checks=checks,
        jobs=[dg.define_asset_job(job, selection=dg.AssetSelection.groups(group), partitions_def=partitions, description=description)],
    )
