"""The project file: one YAML that declares the store, the seed sources and later stages; `ProjectConfig` assembles the
sections each stage defines beside itself (see config/__init__.py) and checks what crosses them.

`load_config()` finds it ($OMNITHOUGHT_CONFIG, else ./omnithought.yaml), validates it and
resolves relative paths against the file's own folder, so a config means the same thing
whatever the working directory. A bad file fails here, at load, with the field named.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from omnithought_dagster.annotate.settings import AnnotationConfig
from omnithought_dagster.config.operations import OperationsConfig
from omnithought_dagster.curation.settings import CurationConfig, RecipeConfig
from omnithought_dagster.evaluation.settings import EvaluationConfig
from omnithought_dagster.experiment.settings import Arm, ExperimentConfig, replicate
from omnithought_dagster.ledger.settings import CostsConfig
from omnithought_dagster.llm.settings import LLMConfig, TeacherConfig
from omnithought_dagster.seed.settings import SeedSettings, SourceConfig
from omnithought_dagster.settings_model import SOURCE_NAME_PATTERN, ConfigError, SettingsModel, resolve_path
from omnithought_dagster.teacher.settings import GenerationConfig
from omnithought_dagster.train.methods import METHODS
from omnithought_dagster.train.settings import BASELINE_RECIPE, StudentConfig, TrainingConfig

CONFIG_ENV_VAR = "OMNITHOUGHT_CONFIG"
DEFAULT_CONFIG_NAME = "omnithought.yaml"

# The dynamic partitions of the sources when `operations.source_manifests` is set.
SOURCES_PARTITIONS = "sources"


class StoreConfig(SettingsModel):
    """Where the corpus store lives: a local folder or an s3:// URI."""

    root: str = ".omnithought"
    endpoint_url: str | None = Field(default=None, description="S3-compatible endpoint (MinIO, moto, ...); default AWS")
    region: str | None = None
    access_key_env: str | None = Field(default=None, description="env var with the access key id; default: the AWS credential chain")
    secret_key_env: str | None = Field(default=None, description="env var with the secret access key")

    _resolve = field_validator("root")(resolve_path)


class ProjectConfig(SettingsModel):
    """The whole project file."""

    project: str = Field(default="omnithought", min_length=1)
    store: StoreConfig = StoreConfig()
    seed: SeedSettings = SeedSettings()
    sources: list[SourceConfig] = Field(default_factory=list, description="at least one, unless operations.source_manifests is set")
    models_dir: str = Field(default=".cache/models", description="where tiny:<name> models are built")
    teacher: TeacherConfig | None = Field(default=None, description="the one-teacher form of `teachers` (its first entry)")
    teachers: list[TeacherConfig] = Field(default_factory=list, description="every teacher; each writes its rollouts of every sample")
    generation: GenerationConfig = GenerationConfig()
    judge: LLMConfig | None = Field(
        default=None, description="the annotator; default: another teacher than the trace's own, else the teacher itself"
    )
    annotation: AnnotationConfig = AnnotationConfig()
    benchmarks: list[SourceConfig] = Field(default_factory=list, description="held-out evaluation items (any source kind)")
    curation: CurationConfig = CurationConfig()
    recipes: list[RecipeConfig] = Field(default_factory=list)
    students: list[StudentConfig] = Field(default_factory=list)
    training: TrainingConfig = TrainingConfig()
    evaluation: EvaluationConfig = EvaluationConfig()
    experiments: list[ExperimentConfig] = Field(
        default_factory=list, description="curated recipes against their controls x students x seeds (experiment/settings.py)"
    )
    costs: CostsConfig = CostsConfig()
    operations: OperationsConfig = Field(
        default_factory=OperationsConfig
    )  # a factory: its cron check imports dagster, which a seed worker process never needs
    config_path: str | None = Field(default=None, exclude=True, description="set by load_config")

    _resolve_models = field_validator("models_dir")(resolve_path)

    @model_validator(mode="before")
    @classmethod
    def _sections_present(cls, data: Any) -> Any:
        # Omitted sections are validated from {} (not taken as ready-made defaults), so their
        # relative paths are resolved against the config file too.
        if isinstance(data, dict):
            data = {
                **{section: {} for section in ("store", "seed", "generation", "annotation", "curation", "training", "evaluation")},
                **data,
            }
            if data.get("teachers") and data.get("teacher") is not None and data["teacher"] != data["teachers"][0]:
                raise ValueError("teacher and teachers: give the list `teachers`, or its one-entry form `teacher`, not both")
            if not data.get("teachers") and data.get("teacher") is None:
                data["teacher"] = {}
        return data

    @model_validator(mode="after")
    def _one_teacher_list(self) -> ProjectConfig:
        # A frozen model: its own validator completes it. `teachers` is the list; `teacher` stays its first entry.
        if not self.teachers:
            self.__dict__["teachers"] = [self.teacher]
        self.__dict__["teacher"] = self.teachers[0]
        seen: dict[str, int] = {}
        for index, teacher in enumerate(self.teachers):
            if teacher.label in seen:
                raise ValueError(
                    f"teachers[{index}].name: teachers[{seen[teacher.label]}] is also {teacher.label!r}; give each teacher its own name"
                )
            seen[teacher.label] = index
        return self

    @model_validator(mode="after")
    def _unique_source_names(self) -> ProjectConfig:
        if not self.sources and self.operations.source_manifests is None:
            raise ValueError("sources: at least one source, or operations.source_manifests to watch for them")
        seen: set[str] = set()
        for index, source in enumerate(self.sources):
            if source.name in seen:
                raise ValueError(f"sources[{index}].name: '{source.name}' is used by an earlier source; names must be unique")
            seen.add(source.name)
        return self

    @property
    def source_names(self) -> list[str]:
        """The project file's sources, in config order (config order decides which duplicate is kept).

        With `operations.source_manifests` set, the partitions are these followed by the sources
        the manifest sensor added (the instance's dynamic partitions, in the order they were added).
        """
        return [source.name for source in self.sources]

    @property
    def dynamic_sources(self) -> bool:
        return self.operations.source_manifests is not None

    @model_validator(mode="after")
    def _references(self) -> ProjectConfig:
        names = [b.name for b in self.benchmarks]
        for missing in sorted(set(self.curation.decontamination.benchmarks) - set(names)):
            raise ValueError(f"curation.decontamination.benchmarks: {missing!r} is not a configured benchmark ({names})")
        recipes = [r.name for r in self.recipes]
        if len(set(recipes)) != len(recipes):
            raise ValueError("recipes: names must be unique")
        for missing in sorted(set(self.evaluation.benchmarks) - set(names)):
            raise ValueError(f"evaluation.benchmarks: {missing!r} is not a configured benchmark ({names})")
        if BASELINE_RECIPE in recipes:
            raise ValueError(f"recipes: {BASELINE_RECIPE!r} is reserved for the students' untrained baselines")
        students = [s.name for s in self.students]
        if len(set(students)) != len(students):
            raise ValueError("students: names must be unique")
        for index, student in enumerate(self.students):
            for recipe in student.recipes or []:
                if recipe not in recipes:
                    raise ValueError(f"students[{index}] (name={student.name}).recipes: no recipe {recipe!r}")
            METHODS[student.method].check(self, index, student)
        labels = set(self.annotation.difficulty_labels)
        for index, recipe in enumerate(self.recipes):
            unknown = set(recipe.difficulty_mix) - labels
            if unknown:
                raise ValueError(
                    f"recipes[{index}] (name={recipe.name}).difficulty_mix: unknown labels {sorted(unknown)}; have {sorted(labels)}"
                )
            for source in recipe.sources or []:
                if source not in self.source_names:
                    raise ValueError(f"recipes[{index}] (name={recipe.name}).sources: no source {source!r}")
            teachers = [t.label for t in self.teachers]
            for teacher in recipe.teachers or []:
                if teacher not in teachers:
                    raise ValueError(f"recipes[{index}] (name={recipe.name}).teachers: no teacher {teacher!r} (teachers: {teachers})")
        self._check_controls()
        self._expand_experiments()
        return self

    def _check_controls(self) -> None:
        """A curated recipe's controls exist, belong to it alone and take its size, sources and traces_per_sample (a random or
        filtered control its teachers too; a curated control keeps its own teachers: the teacher arm); every other recipe has
        a size of its own."""
        by_name = {r.name: r for r in self.recipes}
        owner: dict[str, str] = {}
        for index, recipe in enumerate(self.recipes):
            where = f"recipes[{index}] (name={recipe.name}).controls"
            for name in recipe.controls:
                control = by_name.get(name)
                if control is None:
                    raise ValueError(f"{where}: no recipe {name!r}")
                if name == recipe.name:
                    raise ValueError(f"{where}: a recipe is not its own control")
                if control.controls:
                    raise ValueError(f"{where}: {name!r} names controls of its own; a control compares with one recipe")
                if name in owner:
                    raise ValueError(f"{where}: {name!r} is already the control of {owner[name]!r} (one curated recipe per control)")
                owner[name] = recipe.name
                taken = ("size", "sources") if not control.is_control else ("size", "sources", "teachers")
                given = [f for f in taken if getattr(control, f) is not None] + (
                    ["traces_per_sample"] if "traces_per_sample" in control.model_fields_set else []
                )
                if given:
                    raise ValueError(f"recipes (name={name}).{given[0]}: a control takes it from the recipe naming it ({recipe.name!r})")
        for index, recipe in enumerate(self.recipes):
            if recipe.name not in owner and recipe.size is None and recipe.replicate_of is None:
                what = "a control no curated recipe names" if recipe.is_control else "a curated recipe"
                raise ValueError(f"recipes[{index}] (name={recipe.name}).size: {what} needs its own size")

    def _expand_experiments(self) -> None:
        """Check the experiments and add the replicates their arms need: a student or control for each seed that is not its
        own (experiment/settings.py), and to each student the recipes its arms train it on."""
        recipes = {r.name: r for r in self.recipes}
        students = {s.name: s for s in self.students}
        names = [e.name for e in self.experiments]
        if len(set(names)) != len(names):
            raise ValueError("experiments: names must be unique")
        added_recipes: dict[str, RecipeConfig] = {}
        needs: dict[str, list[str]] = {}  # student partition -> the recipe partitions its arms train it on
        seeds: dict[str, tuple[str, int]] = {}  # a replicate student -> (its student, its seed)
        for index, experiment in enumerate(self.experiments):
            where = f"experiments[{index}] (name={experiment.name})"
            for name in experiment.recipes:
                recipe = recipes.get(name)
                if recipe is None:
                    raise ValueError(f"{where}.recipes: no recipe {name!r}")
                if recipe.is_control or not recipe.controls:
                    raise ValueError(f"{where}.recipes: {name!r} is not a curated recipe naming controls (recipes[].controls)")
            for name in experiment.students:
                student = students.get(name)
                if student is None:
                    raise ValueError(f"{where}.students: no student {name!r}")
                if METHODS[student.method].starts_from(student) is not None:
                    raise ValueError(
                        f"{where}.students: {name!r} starts from another student's checkpoint (method {student.method}); "
                        "experiments compare students trained from their base model"
                    )
            unknown = sorted(set(experiment.benchmarks or []) - set(self.evaluation.benchmarks))
            if unknown:
                raise ValueError(f"{where}.benchmarks: {unknown} are not among evaluation.benchmarks {self.evaluation.benchmarks}")
            if not (experiment.benchmarks or self.evaluation.benchmarks):
                raise ValueError(f"{where}.benchmarks: none (evaluation.benchmarks is empty): arms are compared item by item")
            for arm in self._arms(experiment, recipes, students):
                if arm.recipe_key != arm.arm and arm.recipe_key not in added_recipes:
                    if arm.recipe_key in recipes:
                        raise ValueError(f"{where}: the replicate {arm.recipe_key!r} of control {arm.arm!r} is the name of a recipe")
                    copy = recipes[arm.arm].model_copy(update={"name": arm.recipe_key, "seed": arm.seed})
                    copy._replicate_of = arm.arm
                    added_recipes[arm.recipe_key] = copy
                if arm.student_key != arm.student:
                    if arm.student_key in students:
                        raise ValueError(f"{where}: the replicate {arm.student_key!r} of student {arm.student!r} is the name of a student")
                    seeds[arm.student_key] = (arm.student, arm.seed)
                wanted = needs.setdefault(arm.student_key, [])
                if arm.recipe_key not in wanted:
                    wanted.append(arm.recipe_key)
        if not needs:
            return
        for name in [*added_recipes, *seeds]:
            if not re.fullmatch(SOURCE_NAME_PATTERN, name):
                raise ValueError(f"experiments: the replicate name {name!r} is not a valid name ({SOURCE_NAME_PATTERN}): shorten its base")
        order = [r.name for r in self.recipes] + list(added_recipes)
        kept = [r.name for r in self.recipes]
        updated = []
        for student in self.students:
            wanted = needs.get(student.name, [])
            have = student.recipes if student.recipes is not None else kept
            missing = [r for r in wanted if r not in have]
            updated.append(student.model_copy(update={"recipes": [*have, *missing]}) if missing else student)
        for name, (base, seed) in seeds.items():
            copy = students[base].model_copy(update={"name": name, "seed": seed, "recipes": sorted(needs[name], key=order.index)})
            copy._replicate_of = base
            updated.append(copy)
        self.__dict__["recipes"] = [*self.recipes, *added_recipes.values()]  # a frozen model: its own validator completes it
        self.__dict__["students"] = updated

    def _arms(self, experiment: ExperimentConfig, recipes: dict[str, RecipeConfig], students: dict[str, StudentConfig]) -> list[Arm]:
        arms = []
        for seed in experiment.seeds:
            for name in experiment.students:
                student = students[name]
                own = student.seed if student.seed is not None else self.training.seed
                student_key = name if seed == own else replicate(name, seed)
                for curated in experiment.recipes:
                    arms.append(Arm(experiment.name, curated, "curated", curated, name, seed, student_key, curated))
                    for control in recipes[curated].controls:
                        kind, own_draw = recipes[control].kind, recipes[control].seed
                        key = control if seed == own_draw else replicate(control, seed)
                        arms.append(Arm(experiment.name, control, kind, curated, name, seed, student_key, key))
        return arms

    def experiment(self, name: str) -> ExperimentConfig:
        return _named(self.experiments, name, "experiment")

    def arms(self, name: str) -> list[Arm]:
        """The experiment's arms: seed by seed, student by student, each curated recipe then its controls."""
        return self._arms(self.experiment(name), {r.name: r for r in self.recipes}, {s.name: s for s in self.students})

    def experiment_benchmarks(self, name: str) -> list[str]:
        return self.experiment(name).benchmarks or list(self.evaluation.benchmarks)

    def training_for(self, student: StudentConfig) -> TrainingConfig:
        """The training settings a student trains with: `training`, with the student's own seed when it has one."""
        if student.seed is None or student.seed == self.training.seed:
            return self.training
        return self.training.model_copy(update={"seed": student.seed})

    def recipe(self, name: str) -> RecipeConfig:
        return _named(self.recipes, name, "recipe")

    def controlled_by(self, name: str) -> RecipeConfig | None:
        """The curated recipe that names this control (or the control this one replicates), if one does."""
        base = next((r.replicate_of for r in self.recipes if r.name == name and r.replicate_of), name)
        return next((r for r in self.recipes if base in r.controls), None)

    def teacher_named(self, label: str) -> TeacherConfig:
        """The teacher the project file calls `label` (its name, else its model)."""
        for teacher in self.teachers:
            if teacher.label == label:
                return teacher
        raise KeyError(f"no teacher named {label!r}; the project file has {[t.label for t in self.teachers]}")

    def student(self, name: str) -> StudentConfig:
        return _named(self.students, name, "student")

    def student_recipes(self, student: str) -> list[str]:
        """The baseline, then the recipes this student is trained on."""
        chosen = self.student(student).recipes
        if chosen is None:  # every recipe of the project file (not the replicates experiments add)
            return [BASELINE_RECIPE] + [r.name for r in self.recipes if r.replicate_of is None]
        return [BASELINE_RECIPE] + [r.name for r in self.recipes if r.name in chosen]

    def benchmark(self, name: str) -> SourceConfig:
        return _named(self.benchmarks, name, "benchmark")

    @property
    def annotator(self) -> LLMConfig:
        """The judge's model config: `judge`, or the (first) teacher's when none is given."""
        return self.judge or self.teacher

    def judge_for(self, teacher: str) -> LLMConfig:
        """Who judges the traces of the teacher labelled `teacher`: `judge` when one is configured, else the next teacher in the
        list (a model never grades its own traces when another is there), else the one teacher itself."""
        if self.judge is not None:
            return self.judge
        labels = [t.label for t in self.teachers]
        index = labels.index(teacher) if teacher in labels else 0
        own = self.teachers[index]
        others = [self.teachers[(index + step) % len(self.teachers)] for step in range(1, len(self.teachers))]
        # Another model first (two names for one served model would grade their own traces), else the next teacher.
        different = [
            t for t in others if (t.backend, frozenset(t.base_urls), t.model) != (own.backend, frozenset(own.base_urls), own.model)
        ]
        return (different or others or [own])[0]

    @property
    def judges(self) -> list[LLMConfig]:
        """Every model that judges some teacher's traces, in teacher order, each once."""
        out: list[LLMConfig] = []
        for teacher in self.teachers:
            judge = self.judge_for(teacher.label)
            if all(j.label != judge.label for j in out):
                out.append(judge)
        return out

    def rollouts_of(self, teacher: TeacherConfig) -> int:
        return teacher.rollouts if teacher.rollouts is not None else self.generation.rollouts

    def source(self, name: str) -> SourceConfig:
        return _named(self.sources, name, "source")


def _named(entries: list, name: str, what: str):
    """The entry of a project file's list called `name` (KeyError naming the ones there are)."""
    for entry in entries:
        if entry.name == name:
            return entry
    raise KeyError(f"no {what} named {name!r}; the project file has {[e.name for e in entries]}")


def find_config_path(explicit: str | os.PathLike | None = None) -> Path:
    """The project file to use: explicit, else $OMNITHOUGHT_CONFIG, else ./omnithought.yaml."""
    candidate = explicit or os.environ.get(CONFIG_ENV_VAR)
    if candidate:
        path = Path(candidate).expanduser()
        if not path.is_file():
            raise ConfigError(f"{path}: no such config file (from {'argument' if explicit else CONFIG_ENV_VAR})")
        return path.resolve()
    path = Path.cwd() / DEFAULT_CONFIG_NAME
    if not path.is_file():
        raise ConfigError(f"no config: set {CONFIG_ENV_VAR} or create {DEFAULT_CONFIG_NAME} in {Path.cwd()}")
    return path.resolve()


def load_config(path: str | os.PathLike | None = None) -> ProjectConfig:
    """Read, validate and resolve the project file; raise ConfigError naming the field on problems."""
    config_path = find_config_path(path)
    try:
        raw = yaml.safe_load(config_path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{config_path}: not valid YAML: {exc}") from exc
    return parse_config(raw, base_dir=config_path.parent, origin=str(config_path))


def parse_config(raw: Any, *, base_dir: str | os.PathLike, origin: str = "<config>") -> ProjectConfig:
    """Validate an already-parsed mapping (tests and tools build configs in memory)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{origin}: the top level must be a mapping, got {type(raw).__name__}")
    try:
        config = ProjectConfig.model_validate(raw, context={"base_dir": str(base_dir)})
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc, raw, origin)) from None
    return config.model_copy(update={"config_path": origin})


def _format_validation_error(exc: ValidationError, raw: dict, origin: str) -> str:
    lines = [f"{origin}: invalid config ({exc.error_count()} problem{'s' if exc.error_count() != 1 else ''})"]
    for error in exc.errors():
        loc = _loc_to_path(error["loc"], raw)
        message = error["msg"]
        if error["type"] == "extra_forbidden":
            message = "unknown field (check the spelling; see README 'Configuration')"
        elif error["type"] == "union_tag_invalid":
            message = f"unknown kind {error.get('input', {}).get('kind')!r}; expected one of synthetic, json, hf, sharegpt"
        lines.append(f"  - {loc or '(top level)'}: {message}")
    return "\n".join(lines)


def _loc_to_path(loc: tuple, raw: dict) -> str:
    """('sources', 1, 'json', 'path') -> 'sources[1] (name=foo).path'. Drops pydantic's union tags."""
    parts: list[str] = []
    node: Any = raw
    tags = {"synthetic", "json", "hf", "sharegpt"}
    for item in loc:
        if isinstance(item, int):
            label = f"[{item}]"
            node = node[item] if isinstance(node, list) and item < len(node) else None
            if isinstance(node, dict) and isinstance(node.get("name"), str):
                label += f" (name={node['name']})"
            parts.append(label)
            continue
        if item in tags and isinstance(node, dict) and node.get("kind") == item:
            continue
        if item.startswith("function-") or item.startswith("value_error"):
            continue
        parts.append(("." if parts else "") + str(item))
        node = node.get(item) if isinstance(node, dict) else None
    return re.sub(r"\.\[", "[", "".join(parts))
