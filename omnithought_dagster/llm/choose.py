"""Choosing and opening a backend from an LLMConfig: the identity in trace ids, and the backend itself, started and
stopped around its use (a vLLM server or several, vLLM's offline engine, a provider's batch API, an endpoint list, or
in-process transformers). Apart from llm.backends because the batch backends build on its types.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from omnithought_dagster.llm.backends import Backend, OpenAIBackend, TransformersBackend
from omnithought_dagster.llm.settings import LLMConfig
from omnithought_dagster.models.resolve import TINY_PREFIX, resolve_model


def backend_identity(config: LLMConfig, fingerprint: str | None) -> str:
    """The teacher's name in trace ids: the configured name, else the model (+ a tiny model's fingerprint)."""
    if config.name:
        return config.name
    if config.model.startswith(TINY_PREFIX):
        from omnithought_dagster.models.resolve import built_model

        return f"{built_model(config.model).name}@{fingerprint[:8]}"
    return config.model


def describe_backend(config: LLMConfig, *, models_dir: str | Path) -> tuple[str, bool]:
    """(identity, supports structured output) without starting anything; builds a tiny model if needed."""
    fingerprint = resolve_model(config.model, models_dir)[1] if config.backend != "openai" else None
    return backend_identity(config, fingerprint), config.backend != "transformers"


@contextlib.contextmanager
def open_backend(
    config: LLMConfig, *, models_dir: str | Path, api_key: str | None = None, log_dir: str | Path | None = None, log=None, gpu_slots=None
) -> Iterator[Backend]:
    """The configured backend, ready to use; a vLLM server it started is stopped on exit.

    A vLLM server without explicit `gpus` leases tensor x data parallel devices from gpu_slots
    (omnithought_dagster.gpu) for its lifetime, so concurrent steps never share a GPU.
    """
    if config.backend == "openai" and config.mode == "batch":
        from omnithought_dagster.llm.batch_api import BatchAPIBackend

        yield BatchAPIBackend(config, identity=backend_identity(config, None), api_key=api_key, log=log)
        return
    if config.backend == "openai":
        yield OpenAIBackend(
            config.base_urls,
            config.model,
            identity=backend_identity(config, None),
            api_key=api_key,
            timeout_s=config.request_timeout_s,
            max_retries=config.max_retries,
            max_concurrency=config.max_concurrency,
        )
        return
    model, fingerprint = resolve_model(config.model, models_dir)
    identity = backend_identity(config, fingerprint)
    if config.backend == "transformers":
        yield TransformersBackend(model, identity=identity)
        return
    from omnithought_dagster.llm.vllm_server import VLLMServer, VLLMStartError, is_cpu_build, serving

    served_name = identity.replace("@", "-")
    needed = 0 if config.gpus is not None or gpu_slots is None else config.gpus_needed
    with contextlib.ExitStack() as stack:
        devices = stack.enter_context(gpu_slots.lease(needed, holder=f"vllm {served_name}")) if needed else []
        if devices:
            config = config.model_copy(update={"gpus": ",".join(devices)})
        held = len(devices) if devices else len([d for d in (config.gpus or "").split(",") if d.strip()])
        if config.mode == "batch":
            from omnithought_dagster.llm.vllm_offline import VLLMOfflineBackend, offline_engine

            engine = offline_engine(config, model=model, log_dir=log_dir, log=log).start()
            stack.callback(engine.stop)
            offline = VLLMOfflineBackend(engine, identity=identity, window=config.batch_window)
            offline.devices = held
            yield offline
            return
        if config.replicas == 1:
            urls = [
                stack.enter_context(
                    serving(config, model=model, served_model_name=served_name, log_dir=log_dir, log=log, keep=not devices)
                ).base_url
            ]
        else:
            # Several servers of the step's own, each on its share of the devices, started side by side; never kept.
            listed = [d.strip() for d in (config.gpus or "").split(",") if d.strip()]
            if not listed and not is_cpu_build(config.python):
                raise VLLMStartError(
                    f"replicas: {config.replicas} servers need their own devices: list them in `gpus` or give the project GPU devices "
                    "to lease (without, every server would start on the same GPUs)"
                )
            share = len(listed) // config.replicas
            servers = []
            for replica in range(config.replicas):
                own = config.model_copy(update={"gpus": ",".join(listed[replica * share : (replica + 1) * share])}) if listed else config
                server = VLLMServer.from_config(own, model=model, served_model_name=served_name, log_dir=log_dir, log=log)
                stack.callback(server.stop)
                servers.append(server.launch())
            urls = [server.wait_ready().base_url for server in servers]
        backend = OpenAIBackend(
            urls,
            served_name,
            identity=identity,
            timeout_s=config.request_timeout_s,
            max_retries=config.max_retries,
            max_concurrency=config.max_concurrency,
        )
        backend.devices = held
        yield backend
