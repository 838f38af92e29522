"""The project file's `evaluation:` section: benchmarks, lmms-eval tasks, generation limits."""

from __future__ import annotations

from typing import Any

from pydantic import Field, field_validator

from omnithought_dagster.settings_model import SettingsModel, interpreter, resolve_path


class EvaluationConfig(SettingsModel):
    """Scoring with lmms-eval, run from its own environment as a process (see omnithought_dagster.evaluation).

    `benchmarks` names entries of the top-level `benchmarks` list, each written as a local
    lmms-eval task (no hub needed); `lmms_tasks` are lmms-eval's own task names (mathverse_testmini,
    mmmu_pro, mathvista_testmini, ...), which download their data from the hub: configuration
    for a connected machine, none here.
    """

    python: str | None = Field(
        default=None, description="interpreter of the lmms-eval environment; default: .venv-lmms of the project ($OMNITHOUGHT_ROOT)"
    )
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

    _resolve = field_validator("work_dir")(resolve_path)
    _python = field_validator("python")(interpreter(".venv-lmms"))

    def run_settings(self) -> dict[str, Any]:
        """What changes the scores (hashed into eval_config_hash)."""
        return self.model_dump(mode="json", include={"lmms_model", "model_args", "max_new_tokens", "limit", "seed", "lmms_tasks"})
