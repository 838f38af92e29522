"""The project file's `generation:` section (rollouts, shards, prompt, sampling) and the check thresholds it shares."""

from __future__ import annotations

import re
from typing import Any

from pydantic import Field, field_validator, model_validator

from omnithought_dagster.settings_model import SettingsModel


class ThresholdConfig(SettingsModel):
    warn: float = Field(ge=0, le=1)
    fail: float = Field(ge=0, le=1)

    @model_validator(mode="after")
    def _ordered(self) -> ThresholdConfig:
        if self.warn > self.fail:
            raise ValueError(f"warn ({self.warn}) must not exceed fail ({self.fail})")
        return self


class PromptConfig(SettingsModel):
    """A teacher prompt. Its version (and a hash of its text) is part of every trace id."""

    version: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.+-]+$")
    system: str
    user: str = Field(description="template with {question} and {choices}")


class GenerationConfig(SettingsModel):
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
