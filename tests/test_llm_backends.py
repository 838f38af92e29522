"""Backends against real servers: the tiny teacher on vLLM, a loopback proxy that really fails, transformers."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from omnithought_dagster.llm.backends import ChatRequest, OpenAIBackend, TransformersBackend, image_data_url
from omnithought_dagster.llm.vllm_server import VLLMServer, VLLMStartError
from omnithought_dagster.seed.sources.synthetic import SyntheticReader
from omnithought_dagster.teacher.prompt import parse_reply

from conftest import SERVED_NAME, requests_served
from flaky_proxy import FlakyProxy

pytestmark = pytest.mark.slow
SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "required": ["reasoning", "final_answer"],
    "properties": {
        "reasoning": {"type": "string", "minLength": 1, "maxLength": 120},
        "final_answer": {"type": "string", "minLength": 1, "maxLength": 16},
    },
}


def _request(key: str = "k", **overrides) -> ChatRequest:
    sample = SyntheticReader(1, seed=5).sample(0)
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": image_data_url(sample.images[0].data)}},
                {"type": "text", "text": sample.question},
            ],
        }
    ]
    fields = {"key": key, "messages": messages, "max_tokens": 96, "temperature": 0.8, "top_p": 0.95, "seed": 7, "json_schema": SCHEMA}
    return ChatRequest(**{**fields, **overrides})


def _complete(backend, *requests):
    async def run():
        try:
            return await asyncio.gather(*(backend.complete(r) for r in requests))
        finally:
            await backend.aclose()

    return asyncio.run(run())


def _backend(base_url: str, **kwargs) -> OpenAIBackend:
    defaults = {"identity": "tiny", "timeout_s": 60, "max_retries": 3, "retry_wait_s": (0.01, 0.05)}
    return OpenAIBackend(base_url, SERVED_NAME, **{**defaults, **kwargs})


def test_structured_json_replies_from_vllm(vllm_server):
    before = requests_served(vllm_server)
    completions = _complete(_backend(vllm_server.base_url), *(_request(f"k{i}", seed=i) for i in range(6)))
    assert requests_served(vllm_server) - before == 6
    for completion in completions:
        assert completion.finish_reason == "stop" and completion.error is None and completion.attempts == 1
        assert completion.n_prompt_tokens > 64  # the image's visual tokens are in the prompt
        reply = json.loads(completion.text, strict=False)
        assert set(reply) == {"reasoning", "final_answer"} and len(reply["final_answer"]) <= 16
        assert parse_reply(completion.text, r"Answer: (.+)").form == "json"


def test_regex_constraint_and_truncation(vllm_server):
    regex = r"<think>[a-z ]{1,60}</think>\nAnswer: [0-9]{1,3}"
    (done,) = _complete(_backend(vllm_server.base_url), _request(json_schema=None, regex=regex))
    parsed = parse_reply(done.text, r"Answer: (\d+)")
    assert done.finish_reason == "stop" and parsed.form == "think" and parsed.final_answer.isdigit()
    (cut,) = _complete(_backend(vllm_server.base_url), _request(json_schema=None, max_tokens=8))
    assert cut.finish_reason == "length" and cut.n_tokens == 8


def test_same_seed_same_reply(vllm_server):
    a, b = _complete(_backend(vllm_server.base_url), _request("a", seed=11), _request("b", seed=11))
    assert a.text == b.text


def test_retries_500_then_429_then_succeeds(vllm_server):
    script = {1: ("status", 500), 2: ("status", 429)}
    with FlakyProxy(vllm_server.base_url, lambda attempt: script.get(attempt, ("forward", 0))) as proxy:
        completions = _complete(_backend(proxy.base_url), _request("r1", seed=1), _request("r2", seed=2))
    assert [c.attempts for c in completions] == [3, 3]
    assert all(c.finish_reason == "stop" for c in completions)
    assert sorted(proxy.attempts.values()) == [3, 3] and proxy.forwarded == 2


def test_gives_up_after_max_retries_and_records_the_error(vllm_server):
    with FlakyProxy(vllm_server.base_url, lambda attempt: ("status", 503)) as proxy:
        (failed,) = _complete(_backend(proxy.base_url, max_retries=2), _request())
    assert failed.finish_reason == "error" and failed.text is None and failed.attempts == 3
    assert "503" in failed.error and "InternalServerError" in failed.error
    assert sum(proxy.attempts.values()) == 3


def test_client_errors_are_not_retried(vllm_server):
    with FlakyProxy(vllm_server.base_url, lambda attempt: ("status", 400)) as proxy:
        (failed,) = _complete(_backend(proxy.base_url), _request())
    assert failed.finish_reason == "error" and failed.attempts == 1 and "BadRequestError" in failed.error
    assert sum(proxy.attempts.values()) == 1


def test_timeout_is_retried(vllm_server):
    # The first attempt stalls past the client's timeout; the retry goes through.
    with FlakyProxy(vllm_server.base_url, lambda attempt: ("sleep", 4.0) if attempt == 1 else ("forward", 0)) as proxy:
        (done,) = _complete(_backend(proxy.base_url, timeout_s=1.5), _request())
    assert done.finish_reason == "stop" and done.attempts == 2 and done.latency_s >= 1.5


def test_transformers_backend_generates_in_process(tiny_teacher):
    backend = TransformersBackend(tiny_teacher, identity="tiny-tf")
    a, b, c = _complete(
        backend,
        _request("a", json_schema=None, max_tokens=12, seed=3),
        _request("b", json_schema=None, max_tokens=12, seed=3),
        _request("c", json_schema=None, max_tokens=12, seed=4),
    )
    assert a.text == b.text != c.text  # seeded sampling is reproducible
    assert a.n_tokens <= 12 and a.finish_reason in ("stop", "length") and a.n_prompt_tokens > 64


def test_server_that_cannot_start_reports_why(tmp_path, tiny_teacher):
    with pytest.raises(VLLMStartError, match="no vLLM interpreter"):
        VLLMServer(str(tmp_path / "nope/python"), str(tiny_teacher), served_model_name="x").start()
    # The main environment has no vLLM: the process exits at once and its log says why.
    server = VLLMServer(sys.executable, str(tiny_teacher), served_model_name="x", log_dir=tmp_path, startup_timeout_s=60)
    with pytest.raises(VLLMStartError, match="No module named 'vllm'"):
        server.start()
    assert server.process.poll() is not None


def test_server_stops_its_whole_process_group(tiny_teacher, tmp_path):
    """Started with SIGTERM ignored (as from a backgrounded shell), stop() still ends it and its workers."""
    from conftest import VLLM_PYTHON

    code = (
        "import signal, sys; signal.signal(signal.SIGTERM, signal.SIG_IGN); signal.signal(signal.SIGINT, signal.SIG_IGN)\n"
        "from omnithought_dagster.llm.vllm_server import VLLMServer\n"
        f"s = VLLMServer({str(VLLM_PYTHON)!r}, {str(tiny_teacher)!r}, served_model_name='g', max_model_len=1024, "
        f"log_dir={str(tmp_path)!r})\n"
        "s.start(); print(s.process.pid, flush=True); s.stop(); print('stopped', s.process.poll(), flush=True)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    pid, state = done.stdout.split("\n")[:2]
    assert state.startswith("stopped") and state != "stopped None"
    alive = subprocess.run(["pgrep", "-g", pid.strip()], capture_output=True, text=True)
    assert alive.stdout.strip() == ""  # nothing left in the server's process group


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_every_tiny_family_builds_deterministically_and_generates(family, tmp_path):
    from omnithought_dagster.models.tiny import TinySpec, build_tiny_model, is_built

    spec = TinySpec(name=f"tiny-{family}", family=family, seed=2)
    first = build_tiny_model(spec, tmp_path / "a")
    second = build_tiny_model(spec, tmp_path / "b")
    assert (first / "model.safetensors").read_bytes() == (second / "model.safetensors").read_bytes()
    assert (first / "tokenizer.json").read_bytes() == (second / "tokenizer.json").read_bytes()
    mtime = (first / "model.safetensors").stat().st_mtime_ns
    assert is_built(spec, first) and build_tiny_model(spec, first) == first  # idempotent: not rebuilt
    assert (first / "model.safetensors").stat().st_mtime_ns == mtime
    assert (first / "model.safetensors").stat().st_size < 3_000_000
    (done,) = _complete(TransformersBackend(first, identity=family), _request(json_schema=None, max_tokens=8))
    assert done.error is None and done.n_tokens <= 8 and done.n_prompt_tokens > 64


FAKE_SERVER = '''#!{python}
"""Stands in for `python -m vllm.entrypoints.openai.api_server`: lists the served model at /v1/models."""
import http.server, json, sys
args = sys.argv
port, name = int(args[args.index("--port") + 1]), args[args.index("--served-model-name") + 1]
class Models(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = json.dumps({{"data": [{{"id": name}}]}}).encode()
        self.send_response(200); self.send_header("Content-Length", str(len(body))); self.end_headers(); self.wfile.write(body)
    def log_message(self, *a): pass
http.server.HTTPServer(("127.0.0.1", port), Models).serve_forever()
'''


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_kept_servers_are_reused_by_later_steps_and_stopped_with_the_block(tmp_path):
    """Inside keep_servers() (the demo) a second ask for the same server gets the running one; outside, each ask its own."""
    from omnithought_dagster.config import LLMConfig
    from omnithought_dagster.llm.vllm_server import keep_servers, serving, stop_kept_servers

    fake = tmp_path / "python"
    fake.write_text(FAKE_SERVER.format(python=sys.executable))
    fake.chmod(0o755)
    config = LLMConfig(python=str(fake), startup_timeout_s=30, extra_args=["--no-enable-chunked-prefill"])
    kw = {"model": "m", "served_model_name": "tiny", "log_dir": tmp_path}
    with serving(config, **kw) as own:
        first = own.process.pid
    assert not _alive(first)  # a step's own server stops with the step
    with keep_servers():
        with serving(config, **kw) as a:
            pid = a.process.pid
        assert _alive(pid)  # kept for the next step
        with serving(config, **kw) as b:
            assert b.process.pid == pid
        with serving(config.model_copy(update={"max_model_len": 1024}), **kw) as other:
            assert other.process.pid != pid  # another configuration is another server
            other_pid = other.process.pid
        with serving(config, **kw, keep=False) as leased:  # e.g. on leased GPUs
            leased_pid = leased.process.pid
        assert not _alive(leased_pid)
        stop_kept_servers()
        assert not _alive(pid) and not _alive(other_pid)
        with serving(config, **kw) as again:
            last = again.process.pid
        assert last != pid and _alive(last)
    assert not _alive(last)


# -- replies of every shape become rows; Retry-After is honoured (issue 13) --------------------------------------------

MALFORMED = {
    "no choices": (
        "application/json",
        json.dumps({"id": "x", "object": "chat.completion", "created": 0, "model": SERVED_NAME, "choices": []}).encode(),
    ),
    "a body that is not JSON": ("text/html", b"<html><body>502 Bad Gateway (but sent as 200)</body></html>"),
    "JSON cut short": ("application/json", b'{"id": "x", "object": "chat.completion", "choices": [{"index": 0, "mess'),
    "a choice without text": (
        "application/json",
        json.dumps(
            {
                "id": "x",
                "object": "chat.completion",
                "created": 0,
                "model": SERVED_NAME,
                "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": None}}],
            }
        ).encode(),
    ),
    "an empty body": ("application/json", b""),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_a_malformed_200_reply_is_retried_then_recorded_never_raised(vllm_server, case):
    """Before: an empty `choices` or a non-JSON body raised out of the backend and took the step (and its in-flight
    requests) down. Now each is retried like a 5xx, and a request that only ever gets such replies is an error row."""
    with FlakyProxy(vllm_server.base_url, lambda attempt: ("body", MALFORMED[case])) as proxy:
        (failed,) = _complete(_backend(proxy.base_url, max_retries=1), _request())
    assert failed.finish_reason == "error" and failed.text is None and failed.error
    with FlakyProxy(vllm_server.base_url, lambda attempt: ("body", MALFORMED[case]) if attempt == 1 else ("forward", 0)) as proxy:
        (done,) = _complete(_backend(proxy.base_url, max_retries=1), _request("again"))
    assert done.finish_reason == "stop" and done.attempts == 2


def test_a_reset_connection_and_a_truncated_reply_are_retried(vllm_server):
    faults = {1: ("reset", 0), 2: ("truncate", 0)}
    with FlakyProxy(vllm_server.base_url, lambda attempt: faults.get(attempt, ("forward", 0))) as proxy:
        (done,) = _complete(_backend(proxy.base_url, max_retries=3), _request())
    assert done.finish_reason == "stop" and done.attempts == 3 and json.loads(done.text, strict=False)


def test_retry_after_is_honoured_up_to_the_cap(vllm_server):
    """Before: a 429 asking for 3 s was retried after ~0.6 s (the backoff). Now the wait is the server's, capped."""
    with FlakyProxy(vllm_server.base_url, lambda attempt: ("retry_after", (429, "2")) if attempt == 1 else ("forward", 0)) as proxy:
        (done,) = _complete(_backend(proxy.base_url), _request("polite"))
    (times,) = proxy.attempt_times.values()
    assert done.finish_reason == "stop" and done.attempts == 2 and times[1] - times[0] >= 2.0
    with FlakyProxy(vllm_server.base_url, lambda attempt: ("retry_after", (503, "3600")) if attempt == 1 else ("forward", 0)) as proxy:
        (done,) = _complete(_backend(proxy.base_url, retry_after_cap_s=1.0), _request("capped"))
    (times,) = proxy.attempt_times.values()
    assert done.finish_reason == "stop" and 1.0 <= times[1] - times[0] < 10


def test_retry_after_forms():
    import httpx
    import openai

    from omnithought_dagster.llm.backends import retry_after_s

    def error(headers):
        response = httpx.Response(429, headers=headers, request=httpx.Request("POST", "http://x"))
        return openai.RateLimitError("slow down", response=response, body=None)

    assert retry_after_s(error({"retry-after": "3"})) == 3.0
    assert retry_after_s(error({"retry-after-ms": "1500"})) == 1.5
    assert (
        9
        <= retry_after_s(error({"retry-after": __import__("email.utils").utils.formatdate(__import__("time").time() + 10, usegmt=True)}))
        <= 11
    )
    assert retry_after_s(error({"retry-after": "soon"})) is None and retry_after_s(error({})) is None
    assert retry_after_s(ValueError("no response")) is None


# -- a server dies with its step and sees only what it needs (issue 13) ------------------------------------------------

FAKE_SERVER_WITH_ENGINE = FAKE_SERVER.replace(
    "http.server.HTTPServer(",
    """import os, subprocess, pathlib
engine = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])  # stands in for vLLM's engine process
pathlib.Path(os.environ["FAKE_SERVER_REPORT"]).write_text(json.dumps({{"pid": os.getpid(), "engine": engine.pid, "env": dict(os.environ)}}))
http.server.HTTPServer(""",
)


def test_a_killed_step_takes_its_server_and_engine_with_it(tmp_path):
    """Before: the server ran in its own session and outlived a SIGKILLed step (holding the GPU). Now a guard leads
    the server's process group and ends it when the step dies."""
    fake = tmp_path / "python"
    fake.write_text(FAKE_SERVER_WITH_ENGINE.format(python=sys.executable))
    fake.chmod(0o755)
    report = tmp_path / "server.json"
    step = tmp_path / "step.py"
    step.write_text(
        "import time\nfrom omnithought_dagster.llm.vllm_server import VLLMServer\n"
        f"s = VLLMServer({str(fake)!r}, 'm', served_model_name='tiny', log_dir={str(tmp_path)!r}, startup_timeout_s=60,\n"
        f"               extra_args=['--no-enable-chunked-prefill'], env={{'FAKE_SERVER_REPORT': {str(report)!r}}}).start()\n"
        "print(s.process.pid, flush=True)\ntime.sleep(600)\n"
    )
    env = {
        **os.environ,
        "AWS_SECRET_ACCESS_KEY": "do-not-pass-me",
        "OPENAI_API_KEY": "nor-me",
        "HF_HOME": str(tmp_path / "hf"),
        "VLLM_LOGGING_LEVEL": "DEBUG",
    }
    process = subprocess.Popen([sys.executable, str(step)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        guard = int(process.stdout.readline())
        server = json.loads(report.read_text())
        assert _alive(server["pid"]) and _alive(server["engine"])
        # The server's environment: what it needs and the config's env, none of the step's other secrets.
        assert "AWS_SECRET_ACCESS_KEY" not in server["env"] and "OPENAI_API_KEY" not in server["env"]
        assert server["env"]["HF_HOME"] == str(tmp_path / "hf") and server["env"]["VLLM_LOGGING_LEVEL"] == "DEBUG"
        process.kill()  # SIGKILL: no cleanup code of the step runs
        process.wait(timeout=10)
        deadline = time.monotonic() + 30
        while any(_alive(pid) for pid in (guard, server["pid"], server["engine"])) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not [pid for pid in (guard, server["pid"], server["engine"]) if _alive(pid)], "a server process outlived its step"
    finally:
        if process.poll() is None:
            process.kill()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(guard, signal.SIGKILL)
