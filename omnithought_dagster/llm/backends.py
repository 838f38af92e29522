"""Chat backends: an OpenAI-compatible endpoint (a vLLM server or any other) and in-process transformers.

A backend turns a `ChatRequest` into a `Completion` and never raises for a failed request:
after its retries a failure is a Completion with finish_reason "error" and the reason, so the
caller records it instead of losing it. `open_backend` picks the backend from an LLMConfig,
starting and stopping a vLLM server around it when the config says so.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from omnithought_dagster.llm.settings import LLMConfig
from omnithought_dagster.markup import storable
from omnithought_dagster.models.resolve import TINY_PREFIX, resolve_model  # noqa: F401 - resolve_model: where it was imported from

# The longest wait a server's Retry-After gets: past it the request is retried anyway (and, after the retries, recorded).
RETRY_AFTER_CAP_S = 60.0


@dataclass(frozen=True)
class ChatRequest:
    key: str  # the id of what this request produces (a trace id)
    messages: list[dict[str, Any]]  # OpenAI chat format; images as data URLs
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None = None
    json_schema: dict[str, Any] | None = None  # constrain to this JSON schema
    regex: str | None = None  # or to this regex (vLLM structured outputs)


@dataclass
class Completion:
    key: str
    text: str | None
    finish_reason: str  # stop | length | error
    n_prompt_tokens: int | None = None
    n_tokens: int | None = None
    latency_s: float = 0.0
    attempts: int = 1
    error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    # What it cost, for the ledger (llm.runner stamps them; replies cached before the ledger existed have none):
    paid_by: str | None = None  # the run that sent it
    engine_s: float | None = None  # its share of the engine's time while the run sent (seconds between flushes / replies)
    gpu_s: float | None = None  # engine_s x the GPUs the engine held

    def to_payload(self) -> dict[str, Any]:
        return {
            "text": self.text,
            "finish_reason": self.finish_reason,
            "n_prompt_tokens": self.n_prompt_tokens,
            "n_tokens": self.n_tokens,
            "latency_s": self.latency_s,
            "attempts": self.attempts,
            "paid_by": self.paid_by,
            "engine_s": self.engine_s,
            "gpu_s": self.gpu_s,
        }

    @classmethod
    def from_payload(cls, key: str, payload: dict[str, Any]) -> Completion:
        known = {k: payload.get(k) for k in ("paid_by", "engine_s", "gpu_s")}
        rest = {k: v for k, v in payload.items() if k not in known}
        return cls(key=key, error=None, **rest, **known)


class Backend(Protocol):
    identity: str
    supports_structured_output: bool

    async def complete(self, request: ChatRequest) -> Completion: ...

    async def aclose(self) -> None: ...


def image_data_url(data: bytes) -> str:
    """Images travel inline as base64 data URLs (the media type sniffed from the bytes)."""
    kind = (
        "png"
        if data[:8] == b"\x89PNG\r\n\x1a\n"
        else "jpeg"
        if data[:3] == b"\xff\xd8\xff"
        else "gif"
        if data[:4] == b"GIF8"
        else "webp"
        if data[8:12] == b"WEBP"
        else "png"
    )
    return f"data:image/{kind};base64,{base64.b64encode(data).decode('ascii')}"


# -- OpenAI-compatible endpoints -------------------------------------------------------------------


class OpenAIBackend:
    """Async client with bounded concurrency, per-request timeout and retries with backoff.

    Retried: timeouts, connection errors, 408/409/425/429, 5xx and malformed 200 replies (no choices, no text, a
    body that is not JSON); waits follow the server's Retry-After up to a cap, else exponential backoff. The
    client's own retries are off so every attempt is counted here (Completion.attempts).
    """

    supports_structured_output = True

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        identity: str,
        api_key: str | None = None,
        timeout_s: float = 300,
        max_retries: int = 4,
        max_concurrency: int = 32,
        retry_wait_s: tuple[float, float] = (0.5, 20.0),
        retry_after_cap_s: float = RETRY_AFTER_CAP_S,
    ):
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.identity = identity
        self.api_key = api_key or "EMPTY"
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.max_concurrency = max_concurrency
        self.retry_wait_s = retry_wait_s
        self.retry_after_cap_s = retry_after_cap_s
        self._client = None
        self._semaphore: asyncio.Semaphore | None = None
        self.devices = 0  # GPUs behind the endpoint that this run holds (a vLLM server it started); 0 for a remote one

    def _ensure_client(self):
        # Created inside the running event loop: each asyncio.run gets its own client.
        if self._client is None:
            from openai import AsyncOpenAI

            self._client = AsyncOpenAI(base_url=self.base_url, api_key=self.api_key, timeout=self.timeout_s, max_retries=0)
            self._semaphore = asyncio.Semaphore(self.max_concurrency)
        return self._client

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.close()
        self._client, self._semaphore = None, None

    async def complete(self, request: ChatRequest) -> Completion:
        from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt, wait_exponential_jitter

        client = self._ensure_client()
        kwargs: dict[str, Any] = {
            "model": self.model,
            "messages": request.messages,
            "max_tokens": request.max_tokens,
            "temperature": request.temperature,
            "top_p": request.top_p,
        }
        if request.seed is not None:
            kwargs["seed"] = request.seed
        if request.json_schema is not None:
            kwargs["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": "reply", "schema": request.json_schema, "strict": True},
            }
        elif request.regex is not None:  # a vLLM extension; other servers answer 400, recorded as an error
            kwargs["extra_body"] = {"structured_outputs": {"regex": request.regex}}
        attempts = 0
        start = time.monotonic()
        async with self._semaphore:
            try:
                async for attempt in AsyncRetrying(
                    stop=stop_after_attempt(self.max_retries + 1),
                    wait=WaitRetryAfter(
                        wait_exponential_jitter(initial=self.retry_wait_s[0], max=self.retry_wait_s[1]), self.retry_after_cap_s
                    ),
                    retry=retry_if_exception(_retryable),
                    reraise=True,
                ):
                    with attempt:
                        attempts += 1
                        # The reply is read inside the attempt: a 200 whose body is no chat completion (no choices, not
                        # JSON, cut short) is a MalformedReply, retried like a 5xx and then recorded, never raised.
                        text, finish_reason, usage = _read_reply(await client.chat.completions.create(**kwargs))
            except Exception as exc:  # after the retries: record, never raise
                return Completion(
                    request.key,
                    None,
                    "error",
                    latency_s=time.monotonic() - start,
                    attempts=attempts,
                    error=f"{type(exc).__name__}: {_short(str(exc))}",
                )
        return Completion(
            key=request.key,
            text=text,
            finish_reason="length" if finish_reason == "length" else "stop",
            n_prompt_tokens=getattr(usage, "prompt_tokens", None),
            n_tokens=getattr(usage, "completion_tokens", None),
            latency_s=time.monotonic() - start,
            attempts=attempts,
        )


class MalformedReply(Exception):
    """An HTTP 200 whose body is not a usable chat completion."""


def _read_reply(response: Any) -> tuple[str, str | None, Any]:
    """(text, finish_reason, usage) of a chat completion, or MalformedReply saying what is wrong with it."""
    choices = getattr(response, "choices", None)
    if not isinstance(choices, list):
        raise MalformedReply(f"the reply is no chat completion: {_short(repr(response), 200)}")
    if not choices:
        raise MalformedReply("the reply has no choices")
    message = getattr(choices[0], "message", None)
    text = getattr(message, "content", None)
    if not isinstance(text, str):
        raise MalformedReply(f"the reply's first choice has no text content (finish_reason {getattr(choices[0], 'finish_reason', None)!r})")
    # A reply is data: a lone surrogate (a `\ud800` escape in its JSON) would make the cache and the partition unwritable.
    return storable(text), getattr(choices[0], "finish_reason", None), getattr(response, "usage", None)


class WaitRetryAfter:
    """tenacity wait: the server's Retry-After (seconds or an HTTP date; `retry-after-ms` too) when it sends one,
    up to `cap_s`; otherwise the fallback (exponential backoff with jitter)."""

    def __init__(self, fallback, cap_s: float):
        self.fallback, self.cap_s = fallback, cap_s

    def __call__(self, retry_state) -> float:
        hinted = retry_after_s(retry_state.outcome.exception() if retry_state.outcome else None)
        return min(hinted, self.cap_s) if hinted is not None else self.fallback(retry_state)


def retry_after_s(exc: BaseException | None) -> float | None:
    response = getattr(exc, "response", None)
    headers = getattr(response, "headers", None)
    if headers is None:
        return None
    try:
        if headers.get("retry-after-ms"):
            return max(0.0, float(headers["retry-after-ms"]) / 1000)
        value = headers.get("retry-after")
        if not value:
            return None
        try:
            return max(0.0, float(value))
        except ValueError:
            from email.utils import parsedate_to_datetime

            return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError, OverflowError):
        return None  # a hint we cannot read: back off as usual


def _retryable(exc: BaseException) -> bool:
    import openai

    # A body that does not parse (cut short, not JSON) reaches us as the client's JSONDecodeError or validation error.
    if isinstance(
        exc, (openai.APITimeoutError, openai.APIConnectionError, openai.APIResponseValidationError, MalformedReply, json.JSONDecodeError)
    ):
        return True
    if isinstance(exc, openai.APIStatusError):
        return exc.status_code in (408, 409, 425, 429) or exc.status_code >= 500
    return False


def _short(text: str, limit: int = 300) -> str:
    text = " ".join(storable(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


# -- in-process transformers -------------------------------------------------------------------------


class TransformersBackend:
    """Generation from a local Qwen-VL model folder in this process, one request at a time.

    No torchvision is needed: images go through the PIL image processor and the image
    placeholder is expanded to the model's visual token count by hand (with mm_token_type_ids,
    without which Qwen2.5-VL silently skips M-RoPE). No constrained decoding: replies are
    parsed as free text.
    """

    supports_structured_output = False

    def __init__(self, model_dir: str | Path, *, identity: str, device: str = "cpu"):
        self.model_dir = str(model_dir)
        self.identity = identity
        self.device = device
        self.devices = 1 if device.startswith("cuda") else 0
        self._loaded = None
        self._lock = asyncio.Lock()

    def _load(self):
        if self._loaded is None:
            from omnithought_dagster.models.vl_chat import load_vl_model

            self._loaded = load_vl_model(self.model_dir, self.device)
        return self._loaded

    async def aclose(self) -> None:
        return None

    async def complete(self, request: ChatRequest) -> Completion:
        async with self._lock:
            start = time.monotonic()
            try:
                return await asyncio.to_thread(self._generate, request, start)
            except Exception as exc:
                return Completion(
                    request.key, None, "error", latency_s=time.monotonic() - start, error=f"{type(exc).__name__}: {_short(str(exc))}"
                )

    def _generate(self, request: ChatRequest, start: float) -> Completion:
        import torch
        from PIL import Image

        vl, model = self._load()
        images, messages = [], []
        for message in request.messages:
            content = message["content"]
            if isinstance(content, list):
                parts = []
                for part in content:
                    if part.get("type") == "image_url":
                        data = base64.b64decode(part["image_url"]["url"].split(",", 1)[1])
                        images.append(Image.open(io.BytesIO(data)).convert("RGB"))
                        parts.append({"type": "image"})
                    else:
                        parts.append(part)
                content = parts
            messages.append({"role": message["role"], "content": content})
        inputs = {k: v.to(self.device) for k, v in vl.encode_prompt(messages, images).items()}
        if request.seed is not None:
            torch.manual_seed(request.seed)
        with torch.no_grad():
            output = model.generate(
                **inputs,
                max_new_tokens=request.max_tokens,
                do_sample=request.temperature > 0,
                temperature=max(request.temperature, 1e-5),
                top_p=request.top_p,
            )
        prompt_tokens = int(inputs["input_ids"].shape[1])
        generated = output[0, prompt_tokens:]
        eos = set(
            model.generation_config.eos_token_id
            if isinstance(model.generation_config.eos_token_id, list)
            else [model.generation_config.eos_token_id]
        )
        stopped = len(generated) > 0 and int(generated[-1]) in eos
        return Completion(
            key=request.key,
            text=vl.tokenizer.decode(generated, skip_special_tokens=True),
            finish_reason="stop" if stopped or len(generated) < request.max_tokens else "length",
            n_prompt_tokens=prompt_tokens,
            n_tokens=int(len(generated)),
            latency_s=time.monotonic() - start,
        )


# -- choosing and opening a backend --------------------------------------------------------------------


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
    if config.backend == "openai":
        yield OpenAIBackend(
            config.base_url,
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
    from omnithought_dagster.llm.vllm_server import serving

    served_name = identity.replace("@", "-")
    needed = 0 if config.gpus is not None or gpu_slots is None else config.tensor_parallel_size * config.data_parallel_size
    with contextlib.ExitStack() as stack:
        devices = stack.enter_context(gpu_slots.lease(needed, holder=f"vllm {served_name}")) if needed else []
        if devices:
            config = config.model_copy(update={"gpus": ",".join(devices)})
        server = stack.enter_context(
            serving(config, model=model, served_model_name=served_name, log_dir=log_dir, log=log, keep=not devices)
        )
        backend = OpenAIBackend(
            server.base_url,
            served_name,
            identity=identity,
            timeout_s=config.request_timeout_s,
            max_retries=config.max_retries,
            max_concurrency=config.max_concurrency,
        )
        backend.devices = len(devices) if devices else len([d for d in (config.gpus or "").split(",") if d.strip()])
        yield backend
