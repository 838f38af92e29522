"""A model the pipeline talks to (`teacher:`, `judge:`): backend, serving and sampling settings."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from omnithought_dagster.settings_model import SettingsModel, interpreter


class LLMConfig(SettingsModel):
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
    mode: Literal["online", "batch"] = Field(
        default="online",
        description="online: a server (vllm) or chat completions (openai), request by request; batch: vLLM's offline engine in the "
        "step's own process group (vllm), or the provider's batch API (openai) - throughput over latency, same replies",
    )
    model: str = "tiny:teacher"
    name: str | None = Field(default=None, description="identity in trace ids; default the model (tiny models add their fingerprint)")
    base_url: str | list[str] | None = Field(
        default=None, description="openai: the endpoint, or a list of endpoints serving the model (requests spread over them)"
    )
    api_key_env: str | None = Field(default=None, description="name of the env var holding the API key (openai)")
    python: str | None = Field(
        default=None, description="interpreter of the vLLM environment (vllm); default: .venv-vllm of the project ($OMNITHOUGHT_ROOT)"
    )
    gpus: str | None = Field(default=None, description="CUDA_VISIBLE_DEVICES for the server; default: inherited")
    tensor_parallel_size: int = Field(default=1, ge=1)
    data_parallel_size: int = Field(default=1, ge=1)
    replicas: int = Field(
        default=1, ge=1, le=64, description="vllm online: servers started for the step, each on its own devices; requests spread over them"
    )
    max_model_len: int = Field(default=4096, ge=256)
    enforce_eager: bool = True
    dtype: str = "auto"
    extra_args: list[str] = Field(default_factory=list, description="more `vllm serve` arguments, passed through")
    env: dict[str, str] = Field(default_factory=dict, description="more environment variables for the server")
    startup_timeout_s: float = Field(default=900, gt=0)
    request_timeout_s: float = Field(default=300, gt=0)
    max_retries: int = Field(default=4, ge=0, le=20)
    max_concurrency: int = Field(
        default=32, ge=1, le=4096, description="requests in flight per endpoint (several endpoints: this x their number in all)"
    )
    batch_max_requests: int = Field(default=50_000, ge=1, le=1_000_000, description="openai batch mode: requests per batch at most")
    batch_max_bytes: int = Field(
        default=190_000_000, ge=1_000, description="openai batch mode: bytes per batch file at most (images travel inline)"
    )
    batch_completion_window: str = Field(default="24h", description="openai batch mode: the completion_window asked of the provider")
    batch_poll_s: float = Field(default=30.0, gt=0, description="openai batch mode: seconds between polls of a running batch")
    batch_timeout_s: float = Field(
        default=90_000.0, gt=0, description="openai batch mode: the step stops waiting for a batch after this (a rerun collects it)"
    )
    batch_window: int = Field(
        default=1024,
        ge=2,
        le=65536,
        description="vllm batch mode: requests handed to the offline engine at once (above its --max-num-seqs)",
    )
    structured_output: Literal["json", "regex", "none"] = Field(
        default="json", description="constrain replies with vLLM structured outputs (json schema or regex); none for free text"
    )
    send_seed: bool = Field(default=True, description="send a per-rollout seed (reproducible sampling where the server honours it)")

    _python = field_validator("python")(interpreter(".venv-vllm"))

    @model_validator(mode="after")
    def _backend_fields(self) -> LLMConfig:
        if self.backend == "openai" and not self.base_url:
            raise ValueError("base_url: required when backend is openai")
        if self.mode == "batch" and self.backend == "transformers":
            raise ValueError("mode: batch needs backend vllm (the offline engine) or openai (a batch API); transformers runs online")
        if isinstance(self.base_url, list) and (not self.base_url or not all(url.strip() for url in self.base_url)):
            raise ValueError("base_url: an empty list, or an empty endpoint in it")
        if self.backend == "openai" and self.mode == "batch" and len(self.base_urls) > 1:
            raise ValueError("base_url: a batch API is one endpoint (one provider's files and batches)")
        if self.replicas > 1 and (self.backend != "vllm" or self.mode != "online"):
            raise ValueError("replicas: several servers are started for backend vllm, mode online (openai: list the base_urls)")
        if self.replicas > 1 and self.gpus is not None and len(_devices(self.gpus)) != self.gpus_needed:
            raise ValueError(
                f"gpus: {len(_devices(self.gpus))} listed, {self.gpus_needed} needed (replicas x tensor_parallel_size x data_parallel_size)"
            )
        if self.mode == "batch" and self.backend == "vllm" and self.data_parallel_size > 1:
            raise ValueError("data_parallel_size: vLLM's offline engine runs one data-parallel rank; use mode online for several")
        return self

    def output_settings(self) -> dict[str, Any]:
        """What changes the model's replies (hashed into the code version of the stage it serves); where it runs, how it is
        reached and how long it is waited for do not."""
        return self.model_dump(
            mode="json", include={"backend", "model", "name", "max_model_len", "dtype", "extra_args", "structured_output", "send_seed"}
        )

    @property
    def gpus_needed(self) -> int:
        """GPUs the step leases to serve this model: each vLLM server (or offline engine) tensor x data parallel, per replica."""
        return self.tensor_parallel_size * self.data_parallel_size * self.replicas if self.backend == "vllm" else 0

    @property
    def base_urls(self) -> list[str]:
        return [self.base_url] if isinstance(self.base_url, str) else list(self.base_url or [])

    @property
    def label(self) -> str:
        """How the project file names this model elsewhere (recipes, prices, reports): `name`, else `model`."""
        return self.name or self.model


def _devices(gpus: str) -> list[str]:
    return [device.strip() for device in gpus.split(",") if device.strip()]


class TeacherConfig(LLMConfig):
    """One teacher of `teachers:` (or the one `teacher:`): a model as above, and how many rollouts it writes per sample."""

    rollouts: int | None = Field(default=None, ge=1, le=64, description="traces per sample from this teacher; default generation.rollouts")

    def output_settings(self) -> dict[str, Any]:
        settings = super().output_settings()
        if self.rollouts is not None:  # unset, it leaves the one-teacher form's code version as it was
            settings["rollouts"] = self.rollouts
        return settings
