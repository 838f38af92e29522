"""Chat backends: an OpenAI-compatible endpoint (a vLLM server or any other) and in-process transformers.

A backend turns a `ChatRequest` into a `Completion` and never raises for a failed request:
after its retries a failure is a Completion with finish_reason "error" and the reason, so the
caller records it instead of losing it. `llm.choose.open_backend` picks the backend from an
LLMConfig, starting and stopping what it needs around it.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from omnithought_dagster.markup import storable

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
    batched: bool = False  # paid through a provider's batch API (the ledger applies the batch discount to it)

    def to_payload(self) -> dict[str, Any]:
        extra = {"batched": True} if self.batched else {}  # absent otherwise: payloads stay as they were
        return {
            **extra,
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
        known["batched"] = bool(payload.get("batched"))
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


@dataclass
class Endpoint:
    """One server behind an OpenAIBackend: its client (made inside the running event loop), its load, and whether it is
    resting after a connection failure."""

    base_url: str
    client: Any = None
    in_flight: int = 0
    down_until: float = 0.0  # monotonic time before which it gets no request (another endpoint is up)
    probing: bool = False  # back from a rest: one request at a time until one succeeds
    sent: int = 0  # attempts sent to it
    failed_connections: int = 0


class OpenAIBackend:
    """Async client with bounded concurrency, per-request timeout and retries with backoff, over one or several endpoints.

    Retried: timeouts, connection errors, 408/409/425/429, 5xx and malformed 200 replies (no choices, no text, a
    body that is not JSON); waits follow the server's Retry-After up to a cap, else exponential backoff. The
    client's own retries are off so every attempt is counted here (Completion.attempts).

    With several `base_url`s (servers of one model) each attempt goes to the least loaded endpoint that is up. An endpoint
    that cannot be reached (refused, reset, gone mid-reply) rests for `rest_s` and the attempt is retried on another at
    once: a server that dies mid-shard costs the requests it held one attempt each. After its rest it gets one request at a
    time until one succeeds (a restarted server comes back). `max_concurrency` x the endpoints are in flight in all.
    """

    supports_structured_output = True

    def __init__(
        self,
        base_url: str | list[str],
        model: str,
        *,
        identity: str,
        api_key: str | None = None,
        timeout_s: float = 300,
        max_retries: int = 4,
        max_concurrency: int = 32,
        retry_wait_s: tuple[float, float] = (0.5, 20.0),
        retry_after_cap_s: float = RETRY_AFTER_CAP_S,
        rest_s: float = 30.0,
    ):
        urls = [base_url] if isinstance(base_url, str) else list(base_url)
        if not urls:
            raise ValueError("OpenAIBackend needs at least one base_url")
        self.endpoints = [Endpoint(url.rstrip("/")) for url in urls]
        self.base_url = self.endpoints[0].base_url
        self.model = model
        self.identity = identity
        self.api_key = api_key or "EMPTY"
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.max_concurrency = max_concurrency * len(self.endpoints)
        self.retry_wait_s = retry_wait_s
        self.retry_after_cap_s = retry_after_cap_s
        self.rest_s = rest_s
        self._semaphore: asyncio.Semaphore | None = None
        self.devices = 0  # GPUs behind the endpoints that this run holds (vLLM servers it started); 0 for remote ones

    def _ensure_clients(self) -> None:
        # Created inside the running event loop: each asyncio.run gets its own clients.
        if self._semaphore is None:
            from openai import AsyncOpenAI

            for endpoint in self.endpoints:
                endpoint.client = AsyncOpenAI(base_url=endpoint.base_url, api_key=self.api_key, timeout=self.timeout_s, max_retries=0)
            self._semaphore = asyncio.Semaphore(self.max_concurrency)

    def _pick(self) -> Endpoint:
        """The least loaded endpoint that is up; when all rest, the one whose rest ends first."""
        now = time.monotonic()
        up = [e for e in self.endpoints if e.down_until <= now and not (e.probing and e.in_flight)]
        if not up:
            return min(self.endpoints, key=lambda e: (e.down_until, e.in_flight))
        return min(up, key=lambda e: (e.in_flight, e.sent))

    def _any_up(self) -> bool:
        now = time.monotonic()
        return any(e.down_until <= now for e in self.endpoints)

    async def aclose(self) -> None:
        for endpoint in self.endpoints:
            if endpoint.client is not None:
                await endpoint.client.close()
            endpoint.client = None
        self._semaphore = None

    async def complete(self, request: ChatRequest) -> Completion:
        from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt, wait_exponential_jitter

        self._ensure_clients()
        kwargs = chat_body(self.model, request)
        if "structured_outputs" in kwargs:  # not a parameter the client knows: sent as part of the body
            kwargs["extra_body"] = {"structured_outputs": kwargs.pop("structured_outputs")}
        attempts = 0
        start = time.monotonic()
        async with self._semaphore:
            try:
                async for attempt in AsyncRetrying(
                    stop=stop_after_attempt(self.max_retries + 1),
                    wait=WaitRetryAfter(
                        wait_exponential_jitter(initial=self.retry_wait_s[0], max=self.retry_wait_s[1]),
                        self.retry_after_cap_s,
                        failover=self._any_up if len(self.endpoints) > 1 else None,
                    ),
                    retry=retry_if_exception(_retryable),
                    reraise=True,
                ):
                    with attempt:
                        attempts += 1
                        endpoint = self._pick()
                        endpoint.in_flight += 1
                        endpoint.sent += 1
                        try:
                            # The reply is read inside the attempt: a 200 whose body is no chat completion (no choices,
                            # not JSON, cut short) is a MalformedReply, retried like a 5xx and then recorded, never raised.
                            text, finish_reason, usage = _read_reply(await endpoint.client.chat.completions.create(**kwargs))
                            endpoint.probing = False
                        except Exception as exc:
                            if _unreachable(exc) and len(self.endpoints) > 1:
                                endpoint.down_until = time.monotonic() + self.rest_s
                                endpoint.probing = True
                                endpoint.failed_connections += 1
                            raise
                        finally:
                            endpoint.in_flight -= 1
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


def chat_body(model: str, request: ChatRequest) -> dict[str, Any]:
    """The `/v1/chat/completions` body of a request (the online client's arguments, a batch file's line)."""
    body: dict[str, Any] = {
        "model": model,
        "messages": request.messages,
        "max_tokens": request.max_tokens,
        "temperature": request.temperature,
        "top_p": request.top_p,
    }
    if request.seed is not None:
        body["seed"] = request.seed
    if request.json_schema is not None:
        body["response_format"] = {"type": "json_schema", "json_schema": {"name": "reply", "schema": request.json_schema, "strict": True}}
    elif request.regex is not None:  # a vLLM extension; other servers answer 400, recorded as an error
        body["structured_outputs"] = {"regex": request.regex}
    return body


def _unreachable(exc: BaseException) -> bool:
    """A failure of the endpoint itself (refused, reset, gone mid-reply, no connection within the timeout), not of the
    request: another endpoint may serve it. A request that timed out on an open connection is the request's (a long
    generation), not the endpoint's."""
    import httpx
    import openai

    if isinstance(exc, openai.APITimeoutError):
        return isinstance(exc.__cause__, httpx.ConnectTimeout)
    return isinstance(exc, openai.APIConnectionError)


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
    up to `cap_s`; otherwise the fallback (exponential backoff with jitter). With `failover` (whether another endpoint is
    up: several endpoints), an attempt that found its endpoint unreachable is retried at once."""

    def __init__(self, fallback, cap_s: float, failover=None):
        self.fallback, self.cap_s, self.failover = fallback, cap_s, failover

    def __call__(self, retry_state) -> float:
        exc = retry_state.outcome.exception() if retry_state.outcome else None
        if exc is not None and self.failover is not None and _unreachable(exc) and self.failover():
            return 0.0  # the endpoint is gone, another is up: no reason to wait
        hinted = retry_after_s(exc)
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
