"""The project file's `curation:` section (rules, decontamination, selection) and its `recipes:`."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, PrivateAttr, field_validator, model_validator

from omnithought_dagster.settings_model import SOURCE_NAME_PATTERN, SettingsModel


class RulesConfig(SettingsModel):
    """Rule filters: each trips with a reason code, the measured value and this threshold."""

    require_reasoning: bool = True
    require_final_answer: bool = True
    drop_wrong_answers: bool = True
    drop_truncated: bool = True
    drop_generation_errors: bool = True
    drop_annotation_errors: bool = True
    min_tokens: int = Field(default=16, ge=0, description="too_short: fewer generated tokens than this")
    max_total_tokens: int = Field(default=8192, ge=1, description="too_long: prompt + reply tokens above the student's context")
    max_line_repeat_ratio: float = Field(default=0.5, ge=0, le=1, description="repetitive_lines: share of repeated lines (4+ lines)")
    loop_tail_chars: int = Field(default=64, ge=0, description="repetitive_loop: the reasoning's last N chars occur earlier; 0 = off")
    expected_script: Literal["latin", "any"] = "latin"
    max_foreign_share: float = Field(default=0.2, ge=0, le=1, description="script_mismatch: share of non-ASCII characters (latin)")
    min_quality: int = Field(default=0, ge=0, le=9, description="low_quality: judge quality below this")
    drop_duplicate_traces: bool = True
    near_duplicate_question_similarity: float = Field(
        default=90.0,
        ge=0,
        le=101,
        description="near_duplicate_sample: image near-duplicate (seed pHash) and question similarity >= this; 101 = off",
    )
    markup: Literal["drop", "clean"] = Field(
        default="drop",
        description="a reasoning or final answer holding markup (special tokens, media placeholders, <think> delimiters, control "
        "characters; markup.py): drop: set aside with the kind as reason code and the string as detail; clean: keep it, "
        "and delete the markup where the text is exported (training data)",
    )


class DecontaminationConfig(SettingsModel):
    benchmarks: list[str] = Field(default_factory=list, description="names of `benchmarks` entries whose items must not be trained on")
    question_ngram: int = Field(default=8, ge=2, description="word n-grams compared (shorter questions compare whole)")
    min_question_overlap: float = Field(default=0.5, gt=0, le=1, description="share of a question's n-grams found in a benchmark")
    image_max_distance: int = Field(default=4, ge=-1, le=32, description="pHash Hamming distance to a benchmark image; -1 = off")
    require: Literal["any", "both"] = Field(
        default="any",
        description="any: a question or an image match contaminates; both: only a question and an image match of the "
        "same item (for benchmarks whose question texts are templates)",
    )


class SelectionConfig(SettingsModel):
    """Difficulty-aware selection on top of the rules."""

    drop_unsolvable: bool = Field(default=True, description="unsolvable_sample: pass_rate 0")
    trivial_min_pass_rate: float = Field(default=1.0, ge=0, le=1, description="trivial_sample: pass_rate at least this ...")
    trivial_max_difficulty_bin: int = Field(default=0, ge=-1, description="... and difficulty_bin at most this (-1 = off)")
    max_traces_per_sample: int = Field(default=2, ge=1)
    verbosity_targets: dict[str, float] = Field(default_factory=dict, description="difficulty label -> preferred verbosity (0-9)")


class CurationConfig(SettingsModel):
    rules: RulesConfig = RulesConfig()
    decontamination: DecontaminationConfig = DecontaminationConfig()
    selection: SelectionConfig = SelectionConfig()
    check_sample_limit: int = Field(
        default=200_000, ge=1, description="kept traces re-checked in Python per partition (a deterministic sample above this)"
    )
    max_set_aside_share: float = Field(
        default=0.05,
        ge=0,
        le=1,
        description="sampled_subsets' check `exportable`: a subset whose export pre-flight sets aside up to this share "
        "of its traces warns; more fails the check (and blocks training on it)",
    )
    duckdb_memory_limit: str = "3GB"
    duckdb_threads: int | None = None

    def output_settings(self) -> dict[str, Any]:
        """What changes filtered_set's decisions (hashed into its code version); the checks' settings and DuckDB's resources do not."""
        return self.model_dump(mode="json", exclude={"check_sample_limit", "max_set_aside_share", "duckdb_memory_limit", "duckdb_threads"})


CONTROL_KINDS = ("random", "filtered")


class RecipeConfig(SettingsModel):
    """One controllable subset: how many traces, which difficulty mix, how tag-diverse - or a control to compare one with.

    `kind: curated` (the default) is the recipe: difficulty-stratified, tag-diverse selection from the filtered set.
    The controls draw uniformly at random, with the recipe's seed: `random` from every annotated trace that is not
    contaminated (no rule, no selection: what curation is measured against; a benchmark item is never a training example),
    `filtered` from the filtered set without difficulty or tag balancing. A curated recipe names its controls
    (`controls:`); a named control takes that recipe's realised size, its sources and its traces_per_sample (and a random
    or filtered one its teachers). A curated recipe may be another's control too - the same selection from other
    teachers' traces (`teachers:`), say: the teacher arm of an experiment.
    """

    name: str = Field(pattern=SOURCE_NAME_PATTERN)
    kind: Literal["curated", "random", "filtered"] = "curated"
    size: int | None = Field(default=None, gt=0, description="members; a control named by a curated recipe takes that recipe's size")
    difficulty_mix: dict[str, float] = Field(
        default_factory=dict, description="difficulty label -> share of the subset (normalised); curated recipes only"
    )
    controls: list[str] = Field(
        default_factory=list, description="recipes of kind random / filtered drawn at this recipe's size: the arms it is compared with"
    )
    max_tag_share: float = Field(default=0.5, gt=0, le=1, description="cap: no primary tag above this share of a stratum")
    tag_caps: dict[str, int] = Field(default_factory=dict, description="per-tag maximum number of members")
    verbosity_targets: dict[str, float] = Field(default_factory=dict, description="difficulty label -> preferred verbosity")
    traces_per_sample: int = Field(default=1, ge=1)
    sources: list[str] | None = Field(default=None, description="only these sources; default all")
    teachers: list[str] | None = Field(
        default=None, min_length=1, description="only traces of these teachers (their names in `teachers:`); default every teacher's"
    )
    seed: int = 0
    tolerance: float = Field(default=0.05, ge=0, le=1, description="allowed deviation of a stratum's share from the mix")
    _replicate_of: str | None = PrivateAttr(default=None)  # set on the controls an experiment adds for its other seeds

    @property
    def replicate_of(self) -> str | None:
        """The control this one replicates with another seed (experiment/settings.py); None for the project file's own."""
        return self._replicate_of

    @field_validator("difficulty_mix")
    @classmethod
    def _mix(cls, value: dict[str, float]) -> dict[str, float]:
        if not value:
            return value  # a control's (a curated recipe without one is refused below)
        if any(v < 0 for v in value.values()) or sum(value.values()) <= 0:
            raise ValueError("needs at least one difficulty label with a positive share")
        total = sum(value.values())
        return {k: v / total for k, v in value.items()}

    @model_validator(mode="after")
    def _kind(self) -> RecipeConfig:
        if self.kind == "curated":
            if not self.difficulty_mix:
                raise ValueError("difficulty_mix: a curated recipe needs at least one difficulty label with a positive share")
            return self  # its size: its own, or the recipe's it is a control of (checked with the other recipes)
        balancing = [f for f in ("difficulty_mix", "verbosity_targets", "tag_caps", "controls") if getattr(self, f)]
        if balancing:
            raise ValueError(f"{', '.join(balancing)}: a {self.kind} control draws uniformly at random; these are a curated recipe's")
        return self

    @property
    def is_control(self) -> bool:
        return self.kind in CONTROL_KINDS

    def output_settings(self) -> dict[str, Any]:
        """What changes the recipe's members (hashed into sampled_subsets' code version); the check's tolerance does not."""
        # `teachers` unset stays out: a recipe's hash is the one it had before teachers could be chosen.
        return self.model_dump(mode="json", exclude={"tolerance"} | ({"teachers"} if self.teachers is None else set()))
