"""A local stand-in of OpenAI's Files and Batches API (what moto is to S3): the parts the batch backend uses.

POST /v1/files (multipart upload, purpose batch), GET /v1/files/{id}/content, POST /v1/batches, GET /v1/batches/{id},
GET /v1/batches (list). A batch answers every line of its input file with `answer(body)` (a chat completion) when it
runs; `hold` keeps new batches in progress until `release()`; `fail(custom_id)` makes that line an error line of the
batch's error file. `processed` counts the requests answered - what a provider would bill - so tests count payment at
the stand-in, apart from anything the client records.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Callable
from email.parser import BytesParser
from email.policy import HTTP
from http.server import BaseHTTPRequestHandler

from scripted_teacher import _Server, send


class BatchStandIn:
    def __init__(
        self, answer: Callable[[dict], dict], *, hold: bool = False, fail: Callable[[str], bool] | None = None, lose_creates: int = 0
    ):
        self.answer, self.fail = answer, fail or (lambda custom_id: False)
        self.lose_creates = lose_creates  # this many batch creations succeed but answer 502 (the reply lost on the way)
        self.files: dict[str, bytes] = {}
        self.batches: dict[str, dict] = {}
        self.processed = 0  # request lines answered (billed)
        self.created = 0  # batches created
        self._held = threading.Event()
        if not hold:
            self._held.set()
        self._lock = threading.Lock()
        standin = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):  # noqa: N802
                path = self.path.split("?", 1)[0]
                if match := re.fullmatch(r"/v1/files/([\w-]+)/content", path):
                    data = standin.files.get(match.group(1))
                    return self._send(200, data, "application/octet-stream") if data is not None else self._missing()
                if match := re.fullmatch(r"/v1/batches/([\w-]+)", path):
                    batch = standin.batches.get(match.group(1))
                    return self._json(standin._view(batch)) if batch else self._missing()
                if path == "/v1/batches":
                    data = [standin._view(b) for b in reversed(list(standin.batches.values()))]
                    return self._json({"object": "list", "data": data, "has_more": False})
                return self._missing()

            def do_POST(self):  # noqa: N802
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                if self.path == "/v1/files":
                    message = BytesParser(policy=HTTP).parsebytes(
                        b"content-type: " + self.headers["content-type"].encode() + b"\r\n\r\n" + body
                    )
                    parts = {
                        part.get_param("name", header="content-disposition"): part.get_payload(decode=True) for part in message.iter_parts()
                    }
                    file_id = standin._store(parts["file"])
                    return self._json(
                        {
                            "id": file_id,
                            "object": "file",
                            "bytes": len(parts["file"]),
                            "created_at": int(time.time()),
                            "filename": "input.jsonl",
                            "purpose": "batch",
                            "status": "processed",
                        }
                    )
                if self.path == "/v1/batches":
                    request = json.loads(body)
                    if request.get("input_file_id") not in standin.files:
                        return self._send(400, json.dumps({"error": {"message": "no such file"}}).encode(), "application/json")
                    batch = standin._view(standin._create(request))
                    if standin.lose_creates > 0:
                        standin.lose_creates -= 1
                        return self._send(502, b"bad gateway", "text/plain")
                    return self._json(batch)
                return self._missing()

            def _missing(self):
                self._send(404, json.dumps({"error": {"message": "not found"}}).encode(), "application/json")

            def _json(self, payload):
                self._send(200, json.dumps(payload).encode(), "application/json")

            def _send(self, status: int, data: bytes, kind: str) -> None:
                send(self, status, data, kind)

        self.server = _Server(("127.0.0.1", 0), Handler)
        self.base_url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def release(self) -> None:
        """Let held batches run."""
        self._held.set()

    def _store(self, data: bytes) -> str:
        with self._lock:
            file_id = f"file-{len(self.files) + 1}"
            self.files[file_id] = data
        return file_id

    def _create(self, request: dict) -> dict:
        with self._lock:
            self.created += 1
            batch = {
                "id": f"batch-{self.created}",
                "object": "batch",
                "endpoint": request["endpoint"],
                "input_file_id": request["input_file_id"],
                "completion_window": request["completion_window"],
                "metadata": request.get("metadata"),
                "status": "in_progress",
                "created_at": int(time.time()),
            }
            self.batches[batch["id"]] = batch
        threading.Thread(target=self._run, args=(batch,), daemon=True).start()
        return batch

    def _run(self, batch: dict) -> None:
        self._held.wait()
        out, errors = [], []
        for line in self.files[batch["input_file_id"]].split(b"\n"):
            if not line.strip():
                continue
            item = json.loads(line)
            with self._lock:
                self.processed += 1
            if self.fail(item["custom_id"]):
                errors.append(
                    {
                        "id": "r",
                        "custom_id": item["custom_id"],
                        "response": None,
                        "error": {"code": "server_error", "message": "scripted failure"},
                    }
                )
            else:
                out.append(
                    {
                        "id": "r",
                        "custom_id": item["custom_id"],
                        "response": {"status_code": 200, "body": self.answer(item["body"])},
                        "error": None,
                    }
                )
        updates = {"status": "completed", "request_counts": {"total": len(out) + len(errors), "completed": len(out), "failed": len(errors)}}
        if out:
            updates["output_file_id"] = self._store(b"".join(json.dumps(o).encode() + b"\n" for o in out))
        if errors:
            updates["error_file_id"] = self._store(b"".join(json.dumps(e).encode() + b"\n" for e in errors))
        with self._lock:
            batch.update(updates)

    def _view(self, batch: dict) -> dict:
        with self._lock:
            return dict(batch)

    def __enter__(self) -> BatchStandIn:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._held.set()
        self.server.shutdown()
        self.server.server_close()
