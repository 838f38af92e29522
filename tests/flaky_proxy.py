"""A real HTTP server on loopback in front of an OpenAI-compatible upstream that fails on a script.

Each distinct request body is one logical request; its attempts are counted, and the script
decides per attempt: answer with an error status, stall past the client's timeout, or forward
to the upstream (the vLLM server) and relay its reply. Nothing is mocked on the client side.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

# ("status", 500) | ("sleep", seconds) | ("forward", 0) | ("retry_after", (429, "3")) | ("body", (content_type, bytes))
# | ("reset", 0): close the connection without a reply | ("truncate", 0): forward, then cut the reply's body in half
Action = tuple[str, object]


class FlakyProxy:
    def __init__(self, upstream: str, script: Callable[[int], Action]):
        self.upstream = upstream.rstrip("/")
        self.script = script
        self.attempts: Counter[str] = Counter()
        self.attempt_times: dict[str, list[float]] = {}  # when each attempt of each logical request arrived
        self.forwarded = 0
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep test output clean
                pass

            def do_GET(self):
                self._relay(urllib.request.Request(proxy.upstream + self.path.removeprefix("/v1")))

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                key = hashlib.sha1(body).hexdigest()
                with proxy._lock:
                    proxy.attempts[key] += 1
                    attempt = proxy.attempts[key]
                    proxy.attempt_times.setdefault(key, []).append(time.monotonic())
                kind, value = proxy.script(attempt)
                if kind == "status":
                    self._send(int(value), json.dumps({"error": {"message": f"injected {int(value)} on attempt {attempt}"}}).encode())
                    return
                if kind == "retry_after":
                    status, after = value
                    self._send(status, json.dumps({"error": {"message": f"slow down ({after})"}}).encode(), {"Retry-After": after})
                    return
                if kind == "body":
                    content_type, payload = value
                    self._send(200, payload, content_type=content_type)
                    return
                if kind == "reset":
                    self.close_connection = True
                    self.connection.shutdown(2)  # no status line, no body: the client sees the connection drop
                    return
                if kind == "sleep":
                    time.sleep(value)
                with proxy._lock:
                    proxy.forwarded += 1
                self._relay(
                    urllib.request.Request(
                        proxy.upstream + self.path.removeprefix("/v1"), data=body, headers={"Content-Type": "application/json"}
                    ),
                    truncate=kind == "truncate",
                )

            def _relay(self, request, truncate: bool = False):
                try:
                    with urllib.request.urlopen(request, timeout=120) as response:
                        payload = response.read()
                        self._send(response.status, payload[: len(payload) // 2] if truncate else payload)
                except urllib.error.HTTPError as exc:
                    self._send(exc.code, exc.read())
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def _send(self, status: int, payload: bytes, headers: dict | None = None, content_type: str = "application/json"):
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", content_type)
                    for name, value in (headers or {}).items():
                        self.send_header(name, value)
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout)
                    pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def __enter__(self) -> FlakyProxy:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
