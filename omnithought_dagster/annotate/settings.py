"""The project file's `annotation:` section: the judge's prompt, taxonomy, sampling and thresholds."""

from __future__ import annotations

from typing import Any

from pydantic import Field, model_validator

from omnithought_dagster.settings_model import SettingsModel
from omnithought_dagster.teacher.settings import PromptConfig, ThresholdConfig


class AnnotationConfig(SettingsModel):
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
