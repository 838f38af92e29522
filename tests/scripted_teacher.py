"""A scripted OpenAI-compatible teacher and judge on loopback: no model, replies chosen by a script.

Teacher requests (any system prompt but the judge's) get a JSON reply {"reasoning", "final_answer"}: the answer is
`answers[item]` for the `item N` the question names, the reasoning one of `reasonings` picked by the request's seed (so
each rollout of a sample may get another). Judge requests get a valid judgement whose difficulty and tag follow the item.
Every request's texts are kept (`texts`), to check what reached the model. The body is written with JSON escapes for
everything outside ASCII, so a lone surrogate in a script reaches the client as a `\\ud800` escape, as a broken server
would send it.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from omnithought_dagster.annotate.judge import JUDGE_V1

ITEM = re.compile(r"item (\d+)")


class _Server(ThreadingHTTPServer):
    request_queue_size = 256  # the client opens up to max_concurrency connections at once
    daemon_threads = True


def send(handler: BaseHTTPRequestHandler, status: int, data: bytes, kind: str = "application/json") -> None:
    """One whole reply on a keep-alive connection (the stand-in servers' common way to answer)."""
    handler.send_response(status)
    handler.send_header("content-type", kind)
    handler.send_header("content-length", str(len(data)))
    handler.end_headers()
    handler.wfile.write(data)


class ScriptedTeacher:
    def __init__(self, answers: dict[int, str], reasonings: list[Callable[[int], str]], model: str = "scripted", delay_s: float = 0.0):
        self.answers, self.reasonings, self.model, self.delay_s = answers, reasonings, model, delay_s
        self.texts: list[str] = []
        self.requests = {"teacher": 0, "judge": 0}
        self._lock = threading.Lock()
        teacher = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):  # noqa: N802
                self._send({"object": "list", "data": [{"id": teacher.model, "object": "model"}]})

            def do_POST(self):  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers.get("content-length", 0))))
                time.sleep(teacher.delay_s)  # a server that takes its time: requests stay in flight
                self._send(teacher.reply(body))

            def _send(self, payload: dict) -> None:
                send(self, 200, json.dumps(payload).encode())  # ensure_ascii: every non-ASCII character as an escape

        self.server = _Server(("127.0.0.1", 0), Handler)
        self.base_url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> ScriptedTeacher:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def reply(self, body: dict) -> dict:
        texts = []
        for message in body["messages"]:
            content = message["content"]
            texts += [content] if isinstance(content, str) else [part.get("text", "") for part in content if part.get("type") == "text"]
        user = " ".join(t for t in texts if t)
        match = ITEM.search(user)
        item = int(match.group(1)) if match else 0
        judge = body["messages"][0]["content"] == JUDGE_V1.system
        with self._lock:
            self.texts += [t for t in texts if t]
            self.requests["judge" if judge else "teacher"] += 1
        if judge:
            content = json.dumps(
                {
                    "difficulty": (2, 5, 8)[item % 3],
                    "verbosity": 4,
                    "quality": 7,
                    "answer_correct": True,
                    "tags": [("counting", "table", "chart/bar", "math/geometry")[(item // 3) % 4]],
                }
            )
        else:
            script = self.reasonings[(body.get("seed") or 0) % len(self.reasonings)]
            content = json.dumps({"reasoning": script(item), "final_answer": self.answers.get(item, "0")})
        return {
            "id": "scripted",
            "object": "chat.completion",
            "created": 0,
            "model": self.model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 120, "completion_tokens": 80, "total_tokens": 200},
        }


if __name__ == "__main__":  # a server in a process of its own (a test SIGKILLs it): prints its base URL, serves until killed
    import sys

    with ScriptedTeacher({}, [lambda item: f"counted {item}"], delay_s=float(sys.argv[1]) if len(sys.argv) > 1 else 0.0) as served:
        print(served.base_url, flush=True)
        threading.Event().wait()
