"""The pipeline's stages, in order: one `Stage` entry each, and nothing else names them.

`defs.py` builds the Definitions from this list (each enabled stage's assets, checks, job and automation)
and `demo.py` runs it (each stage's partitions in its order, its skip key and its summary line). A stage's
code lives in its own modules (`assets/<stage>.py`, `checks/<stage>.py` and its domain package); adding a
stage is those modules plus one entry here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import dagster as dg

from omnithought_dagster.assets import annotate, curate, experiment, scores, seed, student, teacher
from omnithought_dagster.assets.inputs import BENCHMARK_ITEMS_KEY, SEED_SOURCES_KEY, observe_job_name
from omnithought_dagster.automation import build_schedules
from omnithought_dagster.checks import annotate as annotate_checks
from omnithought_dagster.checks import curate as curate_checks
from omnithought_dagster.checks import experiment as experiment_checks
from omnithought_dagster.checks import scores as score_checks
from omnithought_dagster.checks import seed as seed_checks
from omnithought_dagster.checks import student as student_checks
from omnithought_dagster.checks import teacher as teacher_checks
from omnithought_dagster.config import BASELINE_RECIPE, ProjectConfig
from omnithought_dagster.sensors import build_manifest_sensors
from omnithought_dagster.store import CorpusStore

SEED_JOB = "ingest_seeds"
TEACHER_JOB = "generate_traces"
ANNOTATE_JOB = "annotate_traces"
FILTER_JOB = "filter_traces"
SUBSET_JOB = "sample_subsets"
BASELINE_JOB = "register_baselines"
TRAIN_JOB = "train_students"
SCORE_JOB = "score_students"
EXPERIMENT_JOB = "compare_arms"


def _always(config: ProjectConfig) -> bool:
    return True


@dataclass(frozen=True)
class Stage:
    """One stage: what it defines in Dagster, and how the demo runs and reports it."""

    name: str  # the demo's name for it: its main asset's
    job: str  # the partitioned job that materialises one of its partitions (with its checks)
    description: str  # the job's, as the UI shows it
    keys: tuple[dg.AssetKey, ...]  # the assets its job materialises; the first is its main asset
    table: str  # the store table its main asset writes
    assets: Callable[[ProjectConfig], Sequence[dg.AssetsDefinition]]
    checks: Callable[[ProjectConfig], Sequence[dg.AssetChecksDefinition]]
    partitions: Callable[[ProjectConfig], dg.PartitionsDefinition]
    partition_keys: Callable[[ProjectConfig], list[str]]  # the project file's partitions, in the order the demo runs them
    summary: Callable[[CorpusStore, str, dict], dict[str, Any]]  # the demo's counts: input, output, flagged, reasons, detail
    enabled: Callable[[ProjectConfig], bool] = _always  # whether the project file asks for it
    automation: Callable[[ProjectConfig, str], dg.Definitions] | None = None  # its sensors and schedules, given its job's name
    store_key: Callable[[str], Any] | None = None  # the table partition a Dagster partition writes, when not that partition's keys
    uses_llm: bool = False  # its steps talk to the teacher or the judge (a kept vLLM server)
    observes: tuple[dg.AssetKey, ...] = ()  # the observable inputs its assets define (assets/inputs.py): observed before it runs

    @property
    def key(self) -> dg.AssetKey:
        return self.keys[0]

    def definitions(self, config: ProjectConfig) -> dg.Definitions:
        """Its assets, checks, job and automation for this project file."""
        job = dg.define_asset_job(
            self.job, selection=dg.AssetSelection.assets(*self.keys), partitions_def=self.partitions(config), description=self.description
        )
        assets = list(self.assets(config))
        defined = {key for asset in assets for key in (asset.keys if isinstance(asset, dg.AssetsDefinition) else [asset.key])}
        observes = [
            dg.define_asset_job(observe_job_name(key), selection=dg.AssetSelection.assets(key)) for key in self.observes if key in defined
        ]
        own = dg.Definitions(assets=assets, asset_checks=list(self.checks(config)), jobs=[job, *observes])
        return dg.Definitions.merge(own, self.automation(config, self.job)) if self.automation else own


def _sources(config: ProjectConfig) -> list[str]:
    return config.source_names


def _recipes(config: ProjectConfig) -> list[str]:
    return [recipe.name for recipe in config.recipes]


def _students(config: ProjectConfig) -> list[str]:
    """The students whose baselines are registered (a replicate's is its student's)."""
    return [s.name for s in config.students if s.replicate_of is None]


def _scored(config: ProjectConfig) -> bool:
    return bool(config.students) and bool(config.evaluation.benchmarks or config.evaluation.lmms_tasks)


STAGES: list[Stage] = [
    Stage(
        "seed_pool",
        SEED_JOB,
        "Ingest one seed source: seed_pool, quarantine and images, with their checks.",
        (seed.SEED_POOL_KEY, seed.QUARANTINE_KEY, seed.IMAGES_KEY),
        "seed_pool",
        seed.build_seed_assets,
        seed_checks.build_seed_checks,
        seed.seed_partitions,
        _sources,
        seed.seed_summary,
        automation=lambda config, job: dg.Definitions(sensors=build_manifest_sensors(config, job)),
        observes=(SEED_SOURCES_KEY,),
    ),
    Stage(
        "cot_traces",
        TEACHER_JOB,
        "Generate one (source, shard) partition of cot_traces on the teacher (a GPU step), with its checks.",
        (teacher.COT_TRACES_KEY,),
        "cot_traces",
        teacher.build_teacher_assets,
        teacher_checks.build_teacher_checks,
        teacher.traces_partitions,
        teacher.traces_partition_keys,
        teacher.traces_summary,
        uses_llm=True,
    ),
    Stage(
        "annotations",
        ANNOTATE_JOB,
        "Annotate one (source, shard) partition of cot_traces: verifier, pass rates and the judge (a GPU step).",
        (annotate.ANNOTATIONS_KEY,),
        "annotations",
        annotate.build_annotate_assets,
        annotate_checks.build_annotate_checks,
        teacher.traces_partitions,
        teacher.traces_partition_keys,
        annotate.annotations_summary,
        uses_llm=True,
    ),
    Stage(
        "filtered_set",
        FILTER_JOB,
        "Rule filters, decontamination and difficulty-aware selection for one source, with checks.",
        (curate.FILTERED_SET_KEY,),
        "filter_decisions",
        curate.build_filter_assets,
        curate_checks.build_filter_checks,
        seed.seed_partitions,
        _sources,
        curate.filter_summary,
        automation=lambda config, job: dg.Definitions(schedules=build_schedules(config, job)),
        observes=(BENCHMARK_ITEMS_KEY,),
    ),
    Stage(
        "sampled_subsets",
        SUBSET_JOB,
        "Draw one recipe's tag-diverse subset from the filtered set, with checks.",
        (curate.SAMPLED_SUBSETS_KEY,),
        "subset_members",
        curate.build_subset_assets,
        curate_checks.build_subset_checks,
        curate.recipe_partitions,
        _recipes,
        curate.subset_summary,
        enabled=lambda config: bool(config.recipes),
    ),
    Stage(
        "student_baselines",
        BASELINE_JOB,
        "Register one student's untrained base model (the baseline of its scores), with checks.",
        (student.STUDENT_BASELINES_KEY,),
        "student_checkpoints",
        student.build_baseline_assets,
        student_checks.build_baseline_checks,
        student.baseline_partitions,
        _students,
        student.baseline_summary,
        enabled=lambda config: bool(config.students),
        store_key=lambda name: {"student": name, "recipe": BASELINE_RECIPE},
    ),
    Stage(
        "student_checkpoints",
        TRAIN_JOB,
        "Fine-tune one student on one recipe's subset (DeepSpeed in its own process, via Pipes), with checks.",
        (student.STUDENT_CHECKPOINTS_KEY,),
        "student_checkpoints",
        student.build_checkpoint_assets,
        student_checks.build_checkpoint_checks,
        student.student_partitions,
        student.student_partition_keys,
        student.checkpoint_summary,
        enabled=lambda config: bool(config.students and config.recipes),
    ),
    Stage(
        "benchmark_scores",
        SCORE_JOB,
        "Score one checkpoint (or `base`: the baseline) with lmms-eval in its own environment, with checks.",
        (scores.BENCHMARK_SCORES_KEY,),
        "benchmark_scores",
        scores.build_score_assets,
        score_checks.build_score_checks,
        scores.score_partitions,
        scores.score_partition_keys,
        scores.scores_summary,
        enabled=_scored,
    ),
    Stage(
        "experiments",
        EXPERIMENT_JOB,
        "Compare one experiment's arms (a curated recipe against its controls, over seeds) from their stored verdicts, with checks.",
        (experiment.EXPERIMENTS_KEY,),
        "experiment_results",
        experiment.build_experiment_assets,
        experiment_checks.build_experiment_checks,
        experiment.experiment_partitions,
        experiment.experiment_partition_keys,
        experiment.experiment_summary,
        enabled=lambda config: bool(config.experiments),
        store_key=lambda name: {"experiment": name},
    ),
]


def stage(name: str) -> Stage:
    """The registry entry called `name` (KeyError naming the stages there are)."""
    for entry in STAGES:
        if entry.name == name:
            return entry
    raise KeyError(f"no stage {name!r}; stages: {', '.join(s.name for s in STAGES)}")
