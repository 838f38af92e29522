"""The teacher (and later the judge) as a Dagster resource: the model config comes from the
project file, the API key only from the environment (EnvVar), never from the file."""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from pathlib import Path

import dagster as dg

from omnithought_dagster.config import LLMConfig
from omnithought_dagster.gpu import GPUSlots
from omnithought_dagster.llm.backends import Backend, describe_backend, open_backend
from omnithought_dagster.teacher.traces import BackendPlan


class LLMResource(dg.ConfigurableResource):
    """Opens the configured backend; a vLLM server it starts lives exactly as long as the step."""

    api_key: str | None = None
    log_dir: str = str(Path(tempfile.gettempdir()) / "omnithought-vllm")

    def plan(self, config: LLMConfig, *, models_dir: str, log=None, gpu_slots: GPUSlots | None = None) -> BackendPlan:
        identity, structured = describe_backend(config, models_dir=models_dir)
        return BackendPlan(identity, structured, lambda: self.open(config, models_dir=models_dir, log=log, gpu_slots=gpu_slots))

    @contextlib.contextmanager
    def open(self, config: LLMConfig, *, models_dir: str, log=None, gpu_slots: GPUSlots | None = None) -> Iterator[Backend]:
        with open_backend(
            config, models_dir=models_dir, api_key=self.api_key, log_dir=self.log_dir, log=log, gpu_slots=gpu_slots
        ) as backend:
            yield backend
