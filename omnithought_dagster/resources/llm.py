"""The teacher (and later the judge) as a Dagster resource: the model config comes from the
project file, the API key only from the environment (EnvVar), never from the file."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import dagster as dg

from omnithought_dagster.config import LLMConfig
from omnithought_dagster.gpu import GPUSlots
from omnithought_dagster.llm.backends import Backend
from omnithought_dagster.llm.choose import describe_backend, open_backend
from omnithought_dagster.teacher.traces import BackendPlan


class LLMResource(dg.ConfigurableResource):
    """Opens the configured backend; a vLLM server it starts lives exactly as long as the step."""

    api_key: str | None = None
    api_key_env: str | None = None  # the env var `api_key` was read from (EnvVar); a model naming another reads its own
    log_dir: str = str(Path(tempfile.gettempdir()) / "omnithought-vllm")

    def key_for(self, config: LLMConfig) -> str | None:
        """The API key of the model `config` names: this resource's when it was read from the env var the model names, else
        that env var's value in the step's environment (several teachers, several keys); none for a model naming no env
        var. Never from the project file."""
        if config.api_key_env is None:
            return None  # a model that names no key gets none (never another model's)
        if config.api_key_env == self.api_key_env:
            return self.api_key
        return os.environ.get(config.api_key_env)

    def plan(self, config: LLMConfig, *, models_dir: str, log=None, gpu_slots: GPUSlots | None = None) -> BackendPlan:
        identity, structured = describe_backend(config, models_dir=models_dir)
        return BackendPlan(
            identity,
            structured,
            lambda: self.open(config, models_dir=models_dir, log=log, gpu_slots=gpu_slots),
            names=(config.label, config.model),
            token_source="counted" if config.backend == "transformers" else "provider",
            batched=config.backend == "openai" and config.mode == "batch",
            send_seed=config.send_seed,
        )

    @contextlib.contextmanager
    def open(self, config: LLMConfig, *, models_dir: str, log=None, gpu_slots: GPUSlots | None = None) -> Iterator[Backend]:
        with open_backend(
            config, models_dir=models_dir, api_key=self.key_for(config), log_dir=self.log_dir, log=log, gpu_slots=gpu_slots
        ) as backend:
            yield backend
