"""The `vllm` backend's batch mode: vLLM's offline engine in a process of the vLLM environment, fed by this step.

No HTTP server and no client compete with the engine: requests go to the worker (llm/vllm_worker.py) as JSON lines
on its standard input and join the running batch between engine steps; each reply comes back as soon as the engine
finishes it. The runner in front (llm.runner) is unchanged: the same cache (hits never reach the engine), the same
structured output, parsing and flushes, so a killed step resumes from its last flush like the server path. The
worker runs under the step's process guard (processes.guarded): a step that dies takes the engine with it.

Use it for a step's own bulk generation on the devices it leases; use the server (`mode: online`) for an endpoint
shared between steps or people. `mode: batch` with an `openai` backend is the provider's batch API (llm/batch_api.py).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

from omnithought_dagster.llm.backends import ChatRequest, Completion, _short
from omnithought_dagster.llm.settings import LLMConfig
from omnithought_dagster.llm.vllm_server import VLLMServer, VLLMStartError, stop_group
from omnithought_dagster.logtail import log_tail
from omnithought_dagster.markup import storable
from omnithought_dagster.processes import default_signals, guarded

WORKER = Path(__file__).with_name("vllm_worker.py")


class OfflineEngine:
    """The worker process: started, fed, read and stopped here. Replies are matched to requests by a sequence number."""

    def __init__(
        self,
        python: str,
        engine_arguments: list[str],
        *,
        environment: dict[str, str],
        startup_timeout_s: float,
        log_dir,
        log=None,
        stall_s: float = 600.0,
        worker: Path = WORKER,
    ):
        self.python = python
        self.engine_arguments = engine_arguments
        self.environment = environment
        self.startup_timeout_s = startup_timeout_s
        self.log_dir = Path(log_dir)
        self.log = log
        self.process: subprocess.Popen | None = None
        self.log_path: Path | None = None
        self._ids = itertools.count()
        self._waiting: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Future]] = {}
        self._lock = threading.Lock()  # _waiting and the writes to the worker
        self._ready = threading.Event()
        self._dead: str | None = None  # why the worker can take no more requests
        self.worker = worker
        self.stall_s = stall_s  # the longest the engine may hold requests without finishing any: then it is stopped
        self._last_reply = time.monotonic()

    def start(self) -> OfflineEngine:
        if not Path(self.python).exists():
            raise VLLMStartError(f"no vLLM interpreter at {self.python} (teacher.python); `make vllm-env` creates the CPU one")
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.log_dir / f"vllm-offline-{int(time.time() * 1000)}.log"
        with open(self.log_path, "wb") as handle:
            self.process = subprocess.Popen(
                guarded([self.python, str(self.worker), *self.engine_arguments]),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=handle,
                env=self.environment,
                start_new_session=True,
                preexec_fn=default_signals,
            )
        threading.Thread(target=self._read, daemon=True, name="vllm-offline-replies").start()
        self._say(f"vLLM offline engine starting (pid {self.process.pid}, log {self.log_path})")
        started = time.monotonic()
        try:
            while not self._ready.wait(1.0):
                if self._dead is not None:
                    raise VLLMStartError(f"the vLLM offline engine exited before it was ready:\n{self.tail()}")
                if time.monotonic() - started > self.startup_timeout_s:
                    raise VLLMStartError(f"the vLLM offline engine was not ready after {self.startup_timeout_s:.0f}s:\n{self.tail()}")
        except BaseException:
            self.stop()
            raise
        self._say(f"vLLM offline engine ready after {time.monotonic() - started:.1f}s")
        return self

    def _read(self) -> None:
        # Lines end at "\n" only (json.dumps escapes the rest); a line that is no reply is the worker's fault: skipped.
        # However this thread ends, nobody is left waiting for a reply that will not come.
        reason = "the vLLM offline engine's replies could not be read"
        try:
            for line in self.process.stdout:
                try:
                    message = json.loads(line)
                except ValueError:
                    continue
                if not isinstance(message, dict):
                    continue
                if message.get("ready"):
                    self._last_reply = time.monotonic()
                    self._ready.set()
                    continue
                with self._lock:
                    waiting = self._waiting.pop(message.get("id"), None)
                    self._last_reply = time.monotonic()
                if waiting is not None:
                    _hand_over(*waiting, message)
            reason = f"the vLLM offline engine exited (code {self.process.wait()}):\n{self.tail(12)}"
        finally:
            self._fail_all(reason)

    def _fail_all(self, reason: str) -> None:
        with self._lock:
            self._dead = reason
            waiting, self._waiting = list(self._waiting.values()), {}
        for loop, future in waiting:
            _hand_over(loop, future, {"error": reason})

    async def submit(self, payload: dict[str, Any]) -> dict[str, Any]:
        """The worker's reply to one request (`{"error": ...}` when the engine refused it or died)."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        request_id = next(self._ids)
        line = (json.dumps({"id": request_id, **payload}) + "\n").encode("utf-8")
        with self._lock:
            if self._dead is not None:
                return {"error": self._dead}
            self._waiting[request_id] = (loop, future)
        try:
            # In a thread: a full pipe (a worker busy rendering) must not stall the loop that receives replies.
            await asyncio.to_thread(self._write, line)
        except OSError as exc:  # the worker is gone (BrokenPipeError)
            with self._lock:
                self._waiting.pop(request_id, None)
            return {"error": f"the vLLM offline engine cannot take requests: {type(exc).__name__}"}
        while True:
            try:
                return await asyncio.wait_for(asyncio.shield(future), timeout=min(30.0, self.stall_s))
            except TimeoutError:
                with self._lock:
                    stalled = bool(self._waiting) and time.monotonic() - self._last_reply > self.stall_s
                if stalled:  # a hung engine step or collective: stop it, and every request waiting on it is an error
                    self._say(f"the vLLM offline engine finished nothing for {self.stall_s:.0f}s: stopping it")
                    self._fail_all(f"the vLLM offline engine finished nothing for {self.stall_s:.0f}s and was stopped")
                    await asyncio.to_thread(stop_group, self.process, 5.0)

    def _write(self, line: bytes) -> None:
        with self._lock:
            self.process.stdin.write(line)
            self.process.stdin.flush()

    def stop(self, grace_s: float = 30.0) -> None:
        """End of input, then SIGTERM and SIGKILL to the worker's process group (VLLMServer.stop's sequence)."""
        if self.process is None:
            return
        with self._lock:
            try:
                self.process.stdin.close()
            except OSError:
                pass
        try:
            self.process.wait(timeout=10)  # nothing left to do: it ends by itself
        except subprocess.TimeoutExpired:
            pass
        stop_group(self.process, grace_s)  # and whatever of its group is left
        if self.process.stdout is not None:
            self.process.stdout.close()
        self._say(f"vLLM offline engine stopped (pid {self.process.pid})")

    def tail(self, lines: int = 40) -> str:
        return log_tail(self.log_path, lines)

    def _say(self, message: str) -> None:
        if self.log is not None:
            self.log.info(message)


def _hand_over(loop: asyncio.AbstractEventLoop, future: asyncio.Future, message: dict) -> None:
    """A reply to the loop that waits for it; a loop that has ended (nobody waits any more) is no error of the reader's."""
    try:
        loop.call_soon_threadsafe(_settle, future, message)
    except RuntimeError:
        pass


def _settle(future: asyncio.Future, message: dict) -> None:
    if not future.done():
        future.set_result(message)


class VLLMOfflineBackend:
    """A Backend over an OfflineEngine. `window` requests are handed to the engine at once (the runner keeps twice
    `max_concurrency` in flight): it must exceed the engine's batch (`--max-num-seqs`) for the engine to run full."""

    supports_structured_output = True

    def __init__(self, engine: OfflineEngine, *, identity: str, window: int):
        self.engine = engine
        self.identity = identity
        self.max_concurrency = max(1, window // 2)
        self.devices = 0

    async def complete(self, request: ChatRequest) -> Completion:
        start = time.monotonic()
        reply = await self.engine.submit(
            {
                "key": request.key,
                "messages": request.messages,
                "max_tokens": request.max_tokens,
                "temperature": request.temperature,
                "top_p": request.top_p,
                "seed": request.seed,
                "json_schema": request.json_schema,
                "regex": request.regex,
            }
        )
        latency = time.monotonic() - start
        if "error" in reply or not isinstance(reply.get("text"), str):
            return Completion(request.key, None, "error", latency_s=latency, error=_short(str(reply.get("error", "no text in the reply"))))
        return Completion(
            key=request.key,
            text=storable(reply["text"]),
            finish_reason="length" if reply.get("finish_reason") == "length" else "stop",
            n_prompt_tokens=reply.get("n_prompt_tokens"),
            n_tokens=reply.get("n_tokens"),
            latency_s=latency,
        )

    async def aclose(self) -> None:
        return None  # the engine belongs to the block that opened it (open_backend)


def offline_engine(config: LLMConfig, *, model: str, log_dir=None, log=None) -> OfflineEngine:
    """The engine for `config` (the same engine flags and environment as its server would get)."""
    twin = VLLMServer.from_config(config, model=model, served_model_name="offline", log_dir=log_dir, log=log)
    return OfflineEngine(
        config.python,
        twin.engine_arguments(),
        environment=twin.environment(),
        startup_timeout_s=config.startup_timeout_s,
        log_dir=twin.log_dir,
        log=log,
        stall_s=2 * config.request_timeout_s,
    )
