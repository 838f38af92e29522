"""Run many chat requests through a backend with a result cache in front of it.

Keys found in the cache are not sent again; the rest are sent with at most `in_flight`
requests pending (requests are built lazily, so a large shard's images are never all in
memory), and successful results are flushed to the cache every `flush_every`, so a killed
process loses at most one batch. Failed requests are returned (finish_reason "error") but not
cached: the next run retries them.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field

from omnithought_dagster.llm.backends import Backend, ChatRequest, Completion


@dataclass
class RunStats:
    total: int = 0
    cache_hits: int = 0
    sent: int = 0  # requests that reached the backend (first attempts)
    attempts: int = 0  # including retries
    failed: int = 0
    truncated: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    seconds: float = 0.0
    flushes: int = 0
    devices: int = 0  # GPUs the engine held while this run sent

    def add(self, other: RunStats) -> RunStats:
        """This run and `other` added up (several models served one after the other in a step)."""
        for name in ("total", "cache_hits", "sent", "attempts", "failed", "truncated", "prompt_tokens", "generated_tokens", "flushes"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.seconds += other.seconds
        self.devices = max(self.devices, other.devices)
        return self

    @property
    def tokens_per_s(self) -> float:
        return self.generated_tokens / self.seconds if self.seconds > 0 else 0.0

    def as_metadata(self) -> dict[str, float | int]:
        return {
            "requests_total": self.total,
            "cache_hits": self.cache_hits,
            "requests_sent": self.sent,
            "request_attempts": self.attempts,
            "failures": self.failed,
            "truncated": self.truncated,
            "prompt_tokens": self.prompt_tokens,
            "generated_tokens": self.generated_tokens,
            "generation_seconds": round(self.seconds, 3),
            "tokens_per_s": round(self.tokens_per_s, 1),
            "cache_flushes": self.flushes,
        }


@dataclass
class CacheView:
    """The slice of a ResultCache one run reads and appends to."""

    load: Callable[[], dict[str, dict]]
    append: Callable[[list[tuple[str, dict]]], int]
    batches: CacheView | None = None  # the partition's journal of provider batches (llm.batch_api), where a backend keeps one


@dataclass
class PendingRequest:
    key: str
    build: Callable[[], ChatRequest]  # built only when it is about to be sent


@dataclass
class RunResult:
    completions: dict[str, Completion] = field(default_factory=dict)
    stats: RunStats = field(default_factory=RunStats)


def run_cached(
    pending: list[PendingRequest],
    open_backend: Callable[[], AbstractContextManager[Backend]],
    cache: CacheView,
    *,
    flush_every: int = 32,
    in_flight: int | None = None,
    progress: Callable[[RunStats], None] | None = None,
    progress_every: int = 100,
    run_label: str | None = None,
) -> RunResult:
    """Serve every key from the cache or the backend; see the module docstring.

    The backend is opened only when something misses the cache: a fully cached run starts no
    server and sends nothing.
    """
    result = RunResult()
    result.stats.total = len(pending)
    cached = cache.load()
    misses = []
    for item in pending:
        payload = cached.get(item.key)
        if payload is not None:
            result.completions[item.key] = Completion.from_payload(item.key, payload)
            result.stats.cache_hits += 1
        else:
            misses.append(item)
    if misses:
        with open_backend() as backend:
            result.stats.devices = int(getattr(backend, "devices", 0) or 0)
            if cache.batches is not None and hasattr(backend, "attach_journal"):
                backend.attach_journal(cache.batches)
            asyncio.run(_send(misses, backend, cache, result, flush_every, in_flight, progress, progress_every, run_label))
    return result


@contextlib.contextmanager
def given(backend: Backend):
    """An already-open backend as the context manager run_cached expects."""
    yield backend


async def _send(misses, backend, cache, result, flush_every, in_flight, progress, progress_every, run_label) -> None:
    stats = result.stats
    limit = in_flight or 2 * getattr(backend, "max_concurrency", 8)
    buffer: list[str] = []  # keys of the successful replies since the last flush (cached at the next)
    since_flush: list[Completion] = []  # every reply since the last flush, failed ones too: they share its engine time
    started = time.monotonic()
    last_flush = [started]

    def flush() -> None:
        now = time.monotonic()
        if since_flush:
            share = (now - last_flush[0]) / len(since_flush)
            for completion in since_flush:
                completion.paid_by = run_label
                completion.engine_s = round(share, 6)
                completion.gpu_s = round(share * stats.devices, 6)
            since_flush.clear()
        last_flush[0] = now
        if buffer:
            cache.append([(key, result.completions[key].to_payload()) for key in buffer])
            buffer.clear()
            stats.flushes += 1

    async def one(item: PendingRequest) -> Completion:
        return await backend.complete(item.build())

    try:
        queue = iter(misses)
        tasks: set[asyncio.Task] = set()
        while True:
            while len(tasks) < limit:
                item = next(queue, None)
                if item is None:
                    break
                tasks.add(asyncio.create_task(one(item)))
            if not tasks:
                break
            done, tasks = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                completion = task.result()
                result.completions[completion.key] = completion
                since_flush.append(completion)
                stats.sent += 1
                stats.attempts += completion.attempts
                stats.prompt_tokens += completion.n_prompt_tokens or 0
                stats.generated_tokens += completion.n_tokens or 0
                if completion.finish_reason == "error":
                    stats.failed += 1
                else:
                    stats.truncated += completion.finish_reason == "length"
                    buffer.append(completion.key)  # its payload is made at the flush, once stamped
                    if len(buffer) >= flush_every:
                        flush()
                if progress is not None and stats.sent % progress_every == 0:
                    stats.seconds = time.monotonic() - started
                    progress(stats)
    finally:
        flush()
        stats.seconds = time.monotonic() - started
        await backend.aclose()
