"""The project file: one YAML that declares the store, the seed sources and later stages.

`load_config()` finds it ($OMNITHOUGHT_CONFIG, else ./omnithought.yaml), validates it and
resolves relative paths against the file's own folder, so a config means the same thing
whatever the working directory. A bad file fails here, at load, with the field named.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import ConfigDict, Field, PrivateAttr, ValidationError, ValidationInfo, field_validator, model_validator

from omnithought_dagster.settings_model import SettingsModel
from omnithought_dagster.train.methods import METHODS
from omnithought_dagster.train.methods.grpo import GRPOSettings
from omnithought_dagster.train.methods.kd import DistillSettings
from omnithought_dagster.train.methods.opsd import OPSDSettings
from omnithought_dagster.train.methods.prefix_mask_kd import PrefixMaskSettings

__all__ = ["DistillSettings", "GRPOSettings", "OPSDSettings", "PrefixMaskSettings"]  # each method's settings, where they were

CONFIG_ENV_VAR = "OMNITHOUGHT_CONFIG"
DEFAULT_CONFIG_NAME = "omnithought.yaml"

# The dynamic partitions of the sources when `operations.source_manifests` is set.
SOURCES_PARTITIONS = "sources"

# Partition keys become folder names in the store and Dagster partition keys: keep them tame.
SOURCE_NAME_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,63}$"


class ConfigError(ValueError):
    """A project file that cannot be used; the message names the file, the field and the problem."""


_Model = SettingsModel  # every section's base (settings_model.py)


def _resolve_path(value: str | None, info: ValidationInfo) -> str | None:
    """Relative local paths are relative to the config file; URIs (s3://...) pass through."""
    if value is None or "://" in value:
        return value
    base = (info.context or {}).get("base_dir")
    path = Path(value).expanduser()
    if not path.is_absolute() and base is not None:
        path = Path(base) / path
    # abspath, not resolve(): a virtualenv's bin/python is a symlink that must stay one.
    return os.path.abspath(path) if base is not None else str(path)


class StoreConfig(_Model):
    """Where the corpus store lives: a local folder or an s3:// URI."""

    root: str = ".omnithought"
    endpoint_url: str | None = Field(default=None, description="S3-compatible endpoint (MinIO, moto, ...); default AWS")
    region: str | None = None
    access_key_env: str | None = Field(default=None, description="env var with the access key id; default: the AWS credential chain")
    secret_key_env: str | None = Field(default=None, description="env var with the secret access key")

    _resolve = field_validator("root")(_resolve_path)


class SeedSettings(_Model):
    """Limits applied to every seed record; a record over a limit is quarantined with a reason."""

    max_image_pixels: int = Field(default=40_000_000, gt=0, description="width x height above this is oversized_image")
    max_image_bytes: int = Field(default=50 * 1024 * 1024, gt=0)
    max_question_chars: int = Field(default=8000, gt=0)
    max_images_per_sample: int = Field(default=16, gt=0)
    require_image: bool = Field(default=True, description="a record with no image is quarantined (no_image)")
    near_duplicate_max_distance: int = Field(
        default=4, ge=-1, le=32, description="perceptual-hash Hamming distance marking near duplicates; -1 turns marking off"
    )
    workers: int = Field(
        default=0,
        ge=0,
        le=1024,
        description=(
            "processes that read, decode and hash a source's images: 0 = one per CPU core the step may use; 1 = the step's "
            "own process. A source under 256 records per worker uses fewer (starting a process costs ~1-2 s)"
        ),
    )

    def output_settings(self) -> dict[str, Any]:
        """What changes seed_pool's rows (hashed into its code version): how many processes read them does not."""
        return self.model_dump(mode="json", exclude={"workers"})


class FieldMap(_Model):
    """Where a record keeps each field: a dotted path into nested objects (`meta.id`), or a JMESPath
    expression for lists and filters (`texts[0].user`, `conversations[?from=='human'] | [0].value`)."""

    id: str | None = "id"
    question: str = "question"
    answer: str = "answer"
    image: str = "image"
    choices: str | None = "choices"
    answer_type: str | None = "answer_type"
    question_type: str | None = "question_type"  # MathVista's multi_choice / free_form; multi_choice wins over answer_type
    tags: str | None = "tags"
    difficulty: str | None = "difficulty"

    @field_validator("*")
    @classmethod
    def _valid_path(cls, value: str | None) -> str | None:
        if value:
            from omnithought_dagster.fieldpath import get_path

            try:
                get_path({}, value)
            except Exception as exc:  # jmespath's ParseError / LexerError name the position
                raise ValueError(f"{value!r} is neither a dotted path nor a valid JMESPath expression: {exc}") from None
        return value


class _SourceBase(_Model):
    name: str = Field(pattern=SOURCE_NAME_PATTERN, description="partition key of this source")
    description: str = ""


# The synthetic source's task families (sources/synthetic.py draws each; a test holds the two together).
SYNTHETIC_FAMILIES = ("counting", "bar_chart", "arithmetic", "geometry", "table", "spatial")


class SyntheticSourceConfig(_SourceBase):
    """Procedural visual reasoning questions rendered with PIL: the embedded default."""

    kind: Literal["synthetic"]
    n_samples: int = Field(default=400, gt=0, le=10_000_000)
    seed: int = 0
    start_index: int = Field(default=0, ge=0, description="first sample index (held-out benchmarks use a range of their own)")
    image_size: int = Field(default=320, ge=128, le=2048)
    families: list[str] | None = Field(default=None, description="task families to draw from; default all")

    @field_validator("families")
    @classmethod
    def _known_families(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return value
        unknown = sorted(set(value) - set(SYNTHETIC_FAMILIES))
        if unknown or not value:
            raise ValueError(f"unknown task families {unknown}; choose from {sorted(SYNTHETIC_FAMILIES)}")
        return value


MultiTurn = Literal["first", "each"]
MULTI_TURN_DESCRIPTION = (
    "conversations with several user turns: `first` keeps the first question/answer pair (later turns go to "
    "metadata), `each` makes every user turn its own sample; either way a turn gets only the images its own <image> "
    "placeholders reference (a turn without any refers to the images shown before it)"
)


class _FileSourceBase(_SourceBase):
    """Sources read from files, whose records name image files."""

    @model_validator(mode="after")
    def _multi_turn_needs_conversations(self):
        if getattr(self, "multi_turn", "first") == "each" and getattr(self, "format", "llava") == "flat":
            raise ValueError("multi_turn: each splits conversations; a flat source has none (use format: llava)")
        return self

    # The folders a manifest's source may read (set by sources/manifests.py, never from a file; None: anywhere).
    _read_roots: tuple[str, ...] | None = PrivateAttr(default=None)

    allowed_image_roots: list[str] = Field(
        default_factory=list,
        description=(
            "folders besides image_root that image paths may point into (absolute paths, e.g. those "
            "`datasets` writes into Parquet); any other path outside image_root is path_escape"
        ),
    )

    @field_validator("allowed_image_roots")
    @classmethod
    def _resolve_roots(cls, value: list[str], info: ValidationInfo) -> list[str]:
        return [_resolve_path(root, info) for root in value]


class JsonSourceConfig(_FileSourceBase):
    """JSON (an array of records) or JSONL; `flat` question/answer/image records or LLaVA conversations."""

    kind: Literal["json"]
    path: str
    image_root: str | None = Field(default=None, description="folder image paths are relative to; default the file's folder")
    format: Literal["flat", "llava"] = "flat"
    fields: FieldMap = FieldMap()
    multi_turn: MultiTurn = Field(default="first", description=MULTI_TURN_DESCRIPTION + " (format: llava)")

    _resolve = field_validator("path", "image_root")(_resolve_path)


class HFSourceConfig(_FileSourceBase):
    """Parquet files / HF `datasets.save_to_disk` folders; the image column is the HF Image struct."""

    kind: Literal["hf"]
    path: str
    split: str | None = Field(default=None, description="for a DatasetDict folder: which split; default all")
    image_root: str | None = Field(default=None, description="where Image structs with only a path look; default the data folder")
    format: Literal["flat", "llava"] = Field(
        default="flat",
        description=(
            "flat: one question/answer per row through `fields`; llava: a `conversations` column of {from, value} turns "
            "(LLaVA-OneVision's parquet), the id and image columns from `fields`"
        ),
    )
    fields: FieldMap = FieldMap()
    multi_turn: MultiTurn = Field(default="first", description=MULTI_TURN_DESCRIPTION + " (format: llava)")

    _resolve = field_validator("path", "image_root")(_resolve_path)


class ShareGPTSourceConfig(_FileSourceBase):
    """ShareGPT / LLaMA-Factory records: a message list plus an images list (JSON or JSONL)."""

    kind: Literal["sharegpt"]
    path: str
    image_root: str | None = None
    messages_key: str = "messages"
    images_key: str = "images"
    role_key: str = "role"
    content_key: str = "content"
    user_role: str = "user"
    assistant_role: str = "assistant"
    system_role: str = "system"
    id_key: str | None = "id"
    multi_turn: MultiTurn = Field(default="first", description=MULTI_TURN_DESCRIPTION)

    _resolve = field_validator("path", "image_root")(_resolve_path)


class LLMConfig(_Model):
    """A model behind one of three backends; the teacher now, the judge later.

    - vllm: the pipeline starts `python -m vllm.entrypoints.openai.api_server` from `python`
      (an interpreter of a vLLM environment), waits for it, talks to it as `openai`, and stops
      it when the step ends;
    - openai: any OpenAI-compatible chat endpoint at `base_url` (key from the env var named
      by `api_key_env`, never from this file);
    - transformers: in-process generation from a local model folder (small runs).
    `model` is a local folder, a hub id the serving side can load, or `tiny:<name>` for a tiny
    random-weight model this project builds offline (see omnithought_dagster.models.tiny).
    """

    backend: Literal["vllm", "openai", "transformers"] = "vllm"
    model: str = "tiny:teacher"
    name: str | None = Field(default=None, description="identity in trace ids; default the model (tiny models add their fingerprint)")
    base_url: str | None = None
    api_key_env: str | None = Field(default=None, description="name of the env var holding the API key (openai)")
    python: str = Field(default=".venv-vllm/bin/python", description="interpreter of the vLLM environment (vllm)")
    gpus: str | None = Field(default=None, description="CUDA_VISIBLE_DEVICES for the server; default: inherited")
    tensor_parallel_size: int = Field(default=1, ge=1)
    data_parallel_size: int = Field(default=1, ge=1)
    max_model_len: int = Field(default=4096, ge=256)
    enforce_eager: bool = True
    dtype: str = "auto"
    extra_args: list[str] = Field(default_factory=list, description="more `vllm serve` arguments, passed through")
    env: dict[str, str] = Field(default_factory=dict, description="more environment variables for the server")
    startup_timeout_s: float = Field(default=900, gt=0)
    request_timeout_s: float = Field(default=300, gt=0)
    max_retries: int = Field(default=4, ge=0, le=20)
    max_concurrency: int = Field(default=32, ge=1, le=4096)
    structured_output: Literal["json", "regex", "none"] = Field(
        default="json", description="constrain replies with vLLM structured outputs (json schema or regex); none for free text"
    )
    send_seed: bool = Field(default=True, description="send a per-rollout seed (reproducible sampling where the server honours it)")

    _resolve = field_validator("python")(_resolve_path)

    @model_validator(mode="after")
    def _backend_fields(self) -> LLMConfig:
        if self.backend == "openai" and not self.base_url:
            raise ValueError("base_url: required when backend is openai")
        return self

    def output_settings(self) -> dict[str, Any]:
        """What changes the model's replies (hashed into the code version of the stage it serves); where it runs, how it is
        reached and how long it is waited for do not."""
        return self.model_dump(
            mode="json", include={"backend", "model", "name", "max_model_len", "dtype", "extra_args", "structured_output", "send_seed"}
        )


class ThresholdConfig(_Model):
    warn: float = Field(ge=0, le=1)
    fail: float = Field(ge=0, le=1)

    @model_validator(mode="after")
    def _ordered(self) -> ThresholdConfig:
        if self.warn > self.fail:
            raise ValueError(f"warn ({self.warn}) must not exceed fail ({self.fail})")
        return self


class PromptConfig(_Model):
    """A teacher prompt. Its version (and a hash of its text) is part of every trace id."""

    version: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.+-]+$")
    system: str
    user: str = Field(description="template with {question} and {choices}")


class GenerationConfig(_Model):
    """How the teacher is sampled for cot_traces."""

    rollouts: int = Field(default=4, ge=1, le=64, description="traces per sample (>= 4 so pass rates mean something)")
    shards: int = Field(default=8, ge=1, le=4096, description="cot_traces partitions per source; samples hash into shards")
    temperature: float = Field(default=0.8, ge=0)
    top_p: float = Field(default=0.95, gt=0, le=1)
    max_tokens: int = Field(default=2048, ge=8)
    seed: int = 0
    flush_every: int = Field(default=32, ge=1, description="results per cache flush: a killed step loses at most this many")
    prompt: PromptConfig | None = Field(default=None, description="default: the built-in cot-v1 prompt")
    answer_pattern: str = Field(
        default=r"(?is)(?:final answer|answer)\s*(?:is\b|[:：])\s*(.+?)[\s.]*$",
        description="regex whose group 1 is the final answer in free text (after </think>)",
    )
    reasoning_max_chars: int = Field(default=8000, ge=16, description="JSON-schema bound on the reasoning field")
    answer_max_chars: int = Field(default=256, ge=1)
    error_rate: ThresholdConfig = ThresholdConfig(warn=0.01, fail=0.05)
    truncation_rate: ThresholdConfig = ThresholdConfig(warn=0.05, fail=0.25)
    missing_answer_rate: ThresholdConfig = ThresholdConfig(warn=0.0, fail=0.05)

    @field_validator("answer_pattern")
    @classmethod
    def _compiles(cls, value: str) -> str:
        try:
            if re.compile(value).groups < 1:
                raise ValueError("needs a capturing group for the answer")
        except re.error as exc:
            raise ValueError(f"not a valid regex: {exc}") from None
        return value

    def output_settings(self) -> dict[str, Any]:
        """What changes cot_traces' rows (hashed into its code version); flush size and the checks' thresholds do not."""
        return self.model_dump(mode="json", exclude={"flush_every", "error_rate", "truncation_rate", "missing_answer_rate"})


class AnnotationConfig(_Model):
    """How cot_traces are annotated: verifier tolerances, the judge's prompt and taxonomy, difficulty bins."""

    prompt: PromptConfig | None = Field(default=None, description="default: the built-in judge-v1 prompt")
    with_images: bool = Field(default=True, description="show the judge the image(s), not just the text")
    taxonomy: str = Field(default="builtin:tags-v1", description="builtin:<name> or a path to a taxonomy YAML")
    tag_min_similarity: float = Field(default=85.0, ge=0, le=100, description="below this, a tag outside the taxonomy is rejected")
    max_tags: int = Field(default=3, ge=1, le=10)
    temperature: float = Field(default=0.0, ge=0)
    top_p: float = Field(default=1.0, gt=0, le=1)
    max_tokens: int = Field(default=256, ge=16)
    reasoning_max_chars: int = Field(default=6000, ge=100, description="the trace's reasoning is cut to this for the judge")
    flush_every: int = Field(default=32, ge=1)
    numeric_rel_tol: float = Field(default=1e-4, ge=0)
    numeric_abs_tol: float = Field(default=1e-6, ge=0)
    free_form_judge_fallback: bool = Field(default=True, description="the judge decides free-form answers that do not match exactly")
    difficulty_bins: list[float] = Field(default_factory=lambda: [3.5, 6.5], description="edges over a 0-9 difficulty score")
    difficulty_labels: list[str] = Field(default_factory=lambda: ["easy", "medium", "hard"])
    pass_rate_weight: float = Field(default=0.0, ge=0, le=1, description="blend of 9*(1 - pass_rate) into the difficulty score")
    parse_failure_rate: ThresholdConfig = ThresholdConfig(warn=0.02, fail=0.10)

    @model_validator(mode="after")
    def _bins(self) -> AnnotationConfig:
        if sorted(self.difficulty_bins) != list(self.difficulty_bins) or any(not 0 <= e <= 9 for e in self.difficulty_bins):
            raise ValueError("difficulty_bins: edges must be increasing and within 0-9")
        if len(self.difficulty_labels) != len(self.difficulty_bins) + 1:
            raise ValueError(f"difficulty_labels: {len(self.difficulty_bins) + 1} labels are needed for {len(self.difficulty_bins)} edges")
        return self

    def output_settings(self) -> dict[str, Any]:
        """What changes annotations' rows (hashed into its code version); flush size and the check's threshold do not."""
        return self.model_dump(mode="json", exclude={"flush_every", "parse_failure_rate"})


class RulesConfig(_Model):
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


class DecontaminationConfig(_Model):
    benchmarks: list[str] = Field(default_factory=list, description="names of `benchmarks` entries whose items must not be trained on")
    question_ngram: int = Field(default=8, ge=2, description="word n-grams compared (shorter questions compare whole)")
    min_question_overlap: float = Field(default=0.5, gt=0, le=1, description="share of a question's n-grams found in a benchmark")
    image_max_distance: int = Field(default=4, ge=-1, le=32, description="pHash Hamming distance to a benchmark image; -1 = off")
    require: Literal["any", "both"] = Field(
        default="any",
        description="any: a question or an image match contaminates; both: only a question and an image match of the "
        "same item (for benchmarks whose question texts are templates)",
    )


class SelectionConfig(_Model):
    """Difficulty-aware selection on top of the rules."""

    drop_unsolvable: bool = Field(default=True, description="unsolvable_sample: pass_rate 0")
    trivial_min_pass_rate: float = Field(default=1.0, ge=0, le=1, description="trivial_sample: pass_rate at least this ...")
    trivial_max_difficulty_bin: int = Field(default=0, ge=-1, description="... and difficulty_bin at most this (-1 = off)")
    max_traces_per_sample: int = Field(default=2, ge=1)
    verbosity_targets: dict[str, float] = Field(default_factory=dict, description="difficulty label -> preferred verbosity (0-9)")


class CurationConfig(_Model):
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


class RecipeConfig(_Model):
    """One controllable subset: how many traces, which difficulty mix, how tag-diverse."""

    name: str = Field(pattern=SOURCE_NAME_PATTERN)
    size: int = Field(gt=0)
    difficulty_mix: dict[str, float] = Field(description="difficulty label -> share of the subset (normalised)")
    max_tag_share: float = Field(default=0.5, gt=0, le=1, description="cap: no primary tag above this share of a stratum")
    tag_caps: dict[str, int] = Field(default_factory=dict, description="per-tag maximum number of members")
    verbosity_targets: dict[str, float] = Field(default_factory=dict, description="difficulty label -> preferred verbosity")
    traces_per_sample: int = Field(default=1, ge=1)
    sources: list[str] | None = Field(default=None, description="only these sources; default all")
    seed: int = 0
    tolerance: float = Field(default=0.05, ge=0, le=1, description="allowed deviation of a stratum's share from the mix")

    @field_validator("difficulty_mix")
    @classmethod
    def _mix(cls, value: dict[str, float]) -> dict[str, float]:
        if not value or any(v < 0 for v in value.values()) or sum(value.values()) <= 0:
            raise ValueError("needs at least one difficulty label with a positive share")
        total = sum(value.values())
        return {k: v / total for k, v in value.items()}

    def output_settings(self) -> dict[str, Any]:
        """What changes the recipe's members (hashed into sampled_subsets' code version); the check's tolerance does not."""
        return self.model_dump(mode="json", exclude={"tolerance"})


BASELINE_RECIPE = "base"  # the recipe-dimension key of a student's untrained baseline


class StudentConfig(_Model):
    """A student model to fine-tune: a local folder, a hub id the trainer can load, or tiny:<name>, and how (`method`).

    `method` names one of the registered methods (train/methods/: sft, kd, prefix_mask_kd, opsd, grpo, and any a plug-in
    registers); its settings are the field named like it (`kd:`, `grpo:` ...), validated by the method's settings model.
    """

    model_config = ConfigDict(extra="allow", frozen=True, validate_default=True)  # the method's settings: checked below

    name: str = Field(pattern=SOURCE_NAME_PATTERN)
    model: str = "tiny:student"
    recipes: list[str] | None = Field(default=None, description="train on these recipes only; default all")
    method: str = Field(
        default="sft",
        description=(
            "sft: the teacher's traces as targets (long-CoT SFT); kd: also match a teacher model's token distribution (`kd`); "
            "prefix_mask_kd: kd with the student's most salient earlier reasoning tokens hidden from it (`prefix_mask_kd`); "
            "opsd: on-policy self-distillation with privileged context (`opsd`); "
            "grpo: RL with the answer verifier's reward, from another student's checkpoint (`grpo`)"
        ),
    )

    @field_validator("method")
    @classmethod
    def _known_method(cls, value: str) -> str:
        if value not in METHODS:
            raise ValueError(f"unknown method {value!r}; methods: {', '.join(METHODS)}")
        return value

    @model_validator(mode="after")
    def _method_settings(self) -> StudentConfig:
        given = self.__pydantic_extra__ if self.__pydantic_extra__ is not None else {}
        for key in list(given):
            if key not in METHODS or METHODS[key].settings_model is None:
                raise ValueError(f"{key}: unknown field (check the spelling; see README 'Configuration')")
            if key != self.method:
                raise ValueError(f"students[{self.name}]: `{key}:` settings are given but method is {self.method!r}")
        how = METHODS[self.method]
        if how.settings_model is None:
            return self
        raw = given.get(self.method)
        if raw is None and how.settings_needed:
            raise ValueError(f"students[{self.name}]: method {self.method} needs `{self.method}:` settings ({how.settings_needed})")
        try:
            given[self.method] = how.settings_model.model_validate({} if raw is None else raw)
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, (self.method, *e['loc'])))}: {e['msg']}" for e in exc.errors())
            raise ValueError(problems) from None
        return self

    @property
    def settings(self) -> SettingsModel | None:
        """The method's settings (None for a method without any: sft)."""
        return (self.__pydantic_extra__ or {}).get(self.method)


class LoraSettings(_Model):
    """LoRA adapters (peft) instead of training the whole model; the checkpoint holds the merged weights and the adapter."""

    r: int = Field(default=16, ge=1)
    alpha: int = Field(default=32, ge=1)
    dropout: float = Field(default=0.05, ge=0, lt=1)
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"], description="module names of the language model that get adapters"
    )


class TrainingConfig(_Model):
    """Supervised fine-tuning on transformers' Trainer with DeepSpeed ZeRO, launched as its own process through Dagster Pipes.

    The same settings run 1 CPU process here and N GPUs x M nodes elsewhere: the launcher
    gets nproc_per_node / nnodes / hostfile, the DeepSpeed config gets the rest.
    """

    launcher: Literal["deepspeed", "torchrun"] = "deepspeed"
    engine: Literal["deepspeed", "torch"] = Field(
        default="deepspeed",
        description=(
            "deepspeed: the Trainer drives DeepSpeed ZeRO (zero_stage, offload_optimizer); torch: plain torch (DDP across "
            "processes), for a machine without DeepSpeed - launched by torchrun"
        ),
    )
    python: str | None = Field(default=None, description="interpreter of the training environment; default: this one")
    nproc_per_node: int = Field(default=1, ge=1, description="processes (GPUs) per node; 1 on CPU")
    nnodes: int = Field(default=1, ge=1)
    hostfile: str | None = Field(default=None, description="deepspeed hostfile for multi-node runs")
    master_addr: str = "127.0.0.1"
    master_port: int | None = Field(default=None, ge=1024, le=65535, description="default: a free port")
    launcher_args: list[str] = Field(default_factory=list, description="more launcher arguments, passed through")
    gpus: str | None = Field(default=None, description="CUDA_VISIBLE_DEVICES for the training process; default: inherited")
    zero_stage: Literal[0, 1, 2, 3] = 2
    offload_optimizer: bool = Field(default=False, description="ZeRO-Offload of optimizer states to CPU (DeepSpeedCPUAdam)")
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    micro_batch_size: int = Field(default=4, ge=1, description="examples per process per forward")
    gradient_accumulation_steps: int = Field(default=1, ge=1)
    learning_rate: float = Field(default=1e-3, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    warmup_steps: int = Field(default=0, ge=0)
    lr_scheduler: Literal["linear", "cosine", "constant_with_warmup", "constant"] = Field(
        default="cosine", description="the learning rate after warmup: decays to 0 (linear, cosine) or stays"
    )
    gradient_clipping: float = Field(default=1.0, ge=0)
    max_steps: int = Field(default=30, ge=1, description="optimizer steps (epochs repeat the subset until reached); unused with epochs")
    epochs: float | None = Field(default=None, gt=0, description="passes over the subset instead of max_steps")
    max_length: int = Field(default=2048, ge=16, description="tokens per example, images included")
    overlong: Literal["skip", "truncate_reply"] = Field(
        default="skip",
        description=(
            "an example over max_length: skip it (counted), or cut its reply (an example whose prompt and images do not fit is "
            "skipped either way: images are never cut)"
        ),
    )
    gradient_checkpointing: bool = Field(default=False, description="recompute activations in the backward pass (less memory)")
    freeze_vision_tower: bool = False
    freeze_projector: bool = Field(default=False, description="the vision-to-language merger")
    freeze_language_model: bool = False
    lora: LoraSettings | None = Field(default=None, description="train LoRA adapters on the language model instead")
    eval_share: float = Field(default=0.0, ge=0, le=0.5, description="share of the subset held out for the evaluation loss")
    eval_steps: int = Field(default=0, ge=0, description="evaluation loss every N steps (0: once, at the end); needs eval_share")
    save_steps: int = Field(
        default=0,
        ge=0,
        description=(
            "a resumable training checkpoint (model, optimizer, scheduler, data position, RNG) every N optimizer steps, copied "
            "to the store under runs/<checkpoint_id>/; a rerun after a kill resumes from the newest complete one (this disk's or "
            "the store's). 0: none"
        ),
    )
    save_total_limit: int = Field(default=2, ge=1, description="training checkpoints kept (the newest), on disk and in the store")
    dataloader_workers: int = Field(
        default=1,
        ge=0,
        description=("processes per rank decoding examples ahead of the trainer (0: threads of the rank decode each batch)"),
    )
    seed: int = 0
    work_dir: str = Field(
        default=".cache/train",
        description=("local scratch: the exported subset, the example index, training checkpoints, the model before upload"),
    )
    env: dict[str, str] = Field(default_factory=dict, description="more environment variables for the training processes")

    _resolve = field_validator("python", "hostfile", "work_dir")(_resolve_path)

    def run_settings(self) -> dict[str, Any]:
        """What changes the trained weights (hashed into checkpoint ids); placement and timeouts do not."""
        return self.model_dump(
            mode="json",
            include={
                "zero_stage",
                "offload_optimizer",
                "precision",
                "micro_batch_size",
                "gradient_accumulation_steps",
                "learning_rate",
                "weight_decay",
                "warmup_steps",
                "lr_scheduler",
                "gradient_clipping",
                "max_steps",
                "epochs",
                "max_length",
                "overlong",
                "freeze_vision_tower",
                "freeze_projector",
                "freeze_language_model",
                "lora",
                "eval_share",
                "seed",
            },
        )

    @model_validator(mode="after")
    def _coherent(self) -> TrainingConfig:
        if self.freeze_vision_tower and self.freeze_projector and self.freeze_language_model:
            raise ValueError(
                "training: every part is frozen (freeze_vision_tower, freeze_projector, freeze_language_model): nothing to train"
            )
        if self.lora is not None and self.zero_stage == 3:
            raise ValueError("training: lora with zero_stage 3 is not supported (use ZeRO 0-2: adapters are small)")
        if self.lora is not None and self.freeze_language_model:
            raise ValueError("training: lora puts adapters on the language model, which freeze_language_model freezes")
        if self.eval_steps and not self.eval_share:
            raise ValueError("training: eval_steps needs eval_share (the held-out part it evaluates on)")
        if self.engine == "torch" and (self.launcher != "torchrun" or self.offload_optimizer):
            raise ValueError("training: engine torch runs under launcher torchrun, without offload_optimizer (DeepSpeed's)")
        return self

    def process_settings(self) -> dict[str, Any]:
        """What the training process needs besides run_settings: how it saves, evaluates and reads (not the weights)."""
        return self.model_dump(
            mode="json", include={"gradient_checkpointing", "eval_steps", "save_steps", "save_total_limit", "dataloader_workers", "engine"}
        )


class EvaluationConfig(_Model):
    """Scoring with lmms-eval, run from its own environment as a process (see omnithought_dagster.evaluation).

    `benchmarks` names entries of the top-level `benchmarks` list, each written as a local
    lmms-eval task (no hub needed); `lmms_tasks` are lmms-eval's own task names (mathverse_testmini,
    mmmu_pro, mathvista_testmini, ...), which download their data from the hub: configuration
    for a connected machine, none here.
    """

    python: str = Field(default=".venv-lmms/bin/python", description="interpreter of the lmms-eval environment")
    benchmarks: list[str] = Field(default_factory=list, description="names of `benchmarks` entries scored as local tasks")
    lmms_tasks: list[str] = Field(default_factory=list, description="standard lmms-eval tasks (need the hub)")
    lmms_model: str = Field(default="omnithought_vl", description="lmms-eval model: omnithought_vl (ours), or qwen2_5_vl, qwen3_vl, ...")
    model_args: dict[str, str] = Field(default_factory=dict, description="more --model_args (pretrained= is the checkpoint)")
    device: str = "cpu"
    batch_size: int = Field(default=1, ge=1)
    max_new_tokens: int = Field(default=64, ge=1)
    limit: int | None = Field(default=None, ge=1, description="items per task (smoke runs); scores then cover only these")
    seed: int = 0
    regression_margin: float = Field(default=0.05, ge=0, le=1, description="a score below the baseline by more than this warns")
    timeout_s: float = Field(default=3600, gt=0)
    work_dir: str = Field(default=".cache/eval", description="local scratch for tasks and lmms-eval output")
    env: dict[str, str] = Field(default_factory=dict)

    _resolve = field_validator("python", "work_dir")(_resolve_path)

    def run_settings(self) -> dict[str, Any]:
        """What changes the scores (hashed into eval_config_hash)."""
        return self.model_dump(mode="json", include={"lmms_model", "model_args", "max_new_tokens", "limit", "seed", "lmms_tasks"})


class K8sPlacement(_Model):
    job_namespace: str | None = Field(default=None, description="namespace of the step pods (k8s executor)")
    gpu_image: str | None = Field(
        default=None, description="image of GPU step pods (deploy/docker/Dockerfile.gpu); default the code location's"
    )
    gpu_node_selector: dict[str, str] = Field(default_factory=dict, description="node selector of GPU step pods")
    gpu_tolerations: list[dict[str, Any]] = Field(default_factory=list, description="tolerations of GPU step pods")


class EcsPlacement(_Model):
    gpu_cpu: str | None = Field(default=None, description="CPU units of a GPU step's task (ecs/cpu), e.g. '8192'")
    gpu_memory: str | None = Field(default=None, description="memory (MiB) of a GPU step's task (ecs/memory)")


class OperationsConfig(_Model):
    """Running it unattended: the re-curation schedule, the executor, GPU placement."""

    executor: Literal["multiprocess", "in_process", "k8s", "ecs"] = Field(
        default="multiprocess", description="multiprocess here; k8s (dagster-k8s) or ecs (dagster-aws) on a cluster"
    )
    max_concurrent: int | None = Field(default=None, ge=1, description="steps at once (default: CPU count / unlimited)")
    k8s: K8sPlacement = K8sPlacement()
    ecs: EcsPlacement = EcsPlacement()

    recuration_cron: str = Field(default="0 3 * * *", description="when the recuration schedule re-runs the CPU curation stages")
    timezone: str = "UTC"
    recuration_running: bool = Field(default=False, description="start the schedule running (else turn it on in the UI)")
    gpu_devices: list[str] = Field(default_factory=list, description="GPUs GPU steps lease from (CUDA indices); empty on CPU machines")
    gpu_lock_dir: str = Field(default=".cache/gpu-locks", description="lock files of the leases (local to the machine)")
    gpu_wait_s: float = Field(default=3600, gt=0, description="how long a GPU step waits for free devices")
    source_manifests: str | None = Field(
        default=None, description="folder or s3:// prefix watched for source manifests (<name>.yaml); set -> sources are dynamic partitions"
    )
    manifest_roots: list[str] | None = Field(
        default=None,
        description=(
            "the folders a manifest may read: its paths (path, image_root, allowed_image_roots) and every file its reader "
            "lists or opens must resolve there, symlinks followed; default: the manifest folder itself. A manifest in S3 "
            "reads no worker's local file"
        ),
    )
    manifest_sensor_interval_s: int = Field(default=60, ge=5, description="how often the source_manifests sensor looks")
    manifest_sensor_running: bool = Field(
        default=False, description="start the source_manifests sensor running (else turn it on in the UI)"
    )
    partition_lock_wait_s: float = Field(
        default=3600,
        ge=0,
        description=(
            "a model stage's run waits this long for another run of the same partition to finish (then reuses its cached "
            "results) before it fails; 0 fails at once"
        ),
    )

    _resolve = field_validator("gpu_lock_dir", "source_manifests")(_resolve_path)

    @field_validator("manifest_roots")
    @classmethod
    def _resolve_roots(cls, value: list[str] | None, info: ValidationInfo) -> list[str] | None:
        return None if value is None else [_resolve_path(root, info) for root in value]

    @field_validator("recuration_cron")
    @classmethod
    def _cron(cls, value: str) -> str:
        from dagster._utils.schedules import is_valid_cron_string

        if not is_valid_cron_string(value):
            raise ValueError(f"{value!r} is not a cron expression (5 fields, e.g. '0 3 * * *')")
        return value


SourceConfig = Annotated[
    SyntheticSourceConfig | JsonSourceConfig | HFSourceConfig | ShareGPTSourceConfig,
    Field(discriminator="kind"),
]


class ProjectConfig(_Model):
    """The whole project file."""

    project: str = Field(default="omnithought", min_length=1)
    store: StoreConfig = StoreConfig()
    seed: SeedSettings = SeedSettings()
    sources: list[SourceConfig] = Field(default_factory=list, description="at least one, unless operations.source_manifests is set")
    models_dir: str = Field(default=".cache/models", description="where tiny:<name> models are built")
    teacher: LLMConfig = LLMConfig()
    generation: GenerationConfig = GenerationConfig()
    judge: LLMConfig | None = Field(default=None, description="the annotator; default: the teacher's model and backend")
    annotation: AnnotationConfig = AnnotationConfig()
    benchmarks: list[SourceConfig] = Field(default_factory=list, description="held-out evaluation items (any source kind)")
    curation: CurationConfig = CurationConfig()
    recipes: list[RecipeConfig] = Field(default_factory=list)
    students: list[StudentConfig] = Field(default_factory=list)
    training: TrainingConfig = TrainingConfig()
    evaluation: EvaluationConfig = EvaluationConfig()
    operations: OperationsConfig = Field(
        default_factory=OperationsConfig
    )  # a factory: its cron check imports dagster, which a seed worker process never needs
    config_path: str | None = Field(default=None, exclude=True, description="set by load_config")

    _resolve_models = field_validator("models_dir")(_resolve_path)

    @model_validator(mode="before")
    @classmethod
    def _sections_present(cls, data: Any) -> Any:
        # Omitted sections are validated from {} (not taken as ready-made defaults), so their
        # relative paths are resolved against the config file too.
        if isinstance(data, dict):
            data = {
                **{
                    section: {}
                    for section in ("store", "seed", "teacher", "generation", "annotation", "curation", "training", "evaluation")
                },
                **data,
            }
        return data

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
        return self

    def student(self, name: str) -> StudentConfig:
        for student in self.students:
            if student.name == name:
                return student
        raise KeyError(f"no student named {name!r}")

    def student_recipes(self, student: str) -> list[str]:
        """The baseline, then the recipes this student is trained on."""
        chosen = self.student(student).recipes
        return [BASELINE_RECIPE] + [r.name for r in self.recipes if chosen is None or r.name in chosen]

    def benchmark(self, name: str) -> SourceConfig:
        for benchmark in self.benchmarks:
            if benchmark.name == name:
                return benchmark
        raise KeyError(f"no benchmark named {name!r}")

    @property
    def annotator(self) -> LLMConfig:
        """The judge's model config: `judge`, or the teacher's when none is given."""
        return self.judge or self.teacher

    def source(self, name: str) -> SourceConfig:
        for source in self.sources:
            if source.name == name:
                return source
        raise KeyError(f"no source named {name!r}; configured: {self.source_names}")


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
