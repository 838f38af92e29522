"""The `openai` backend's batch mode: a provider's batch API (OpenAI's format; vLLM's own batch runner reads the same JSONL).

The runner (llm.runner) hands requests over one by one as usual; this backend gathers those that arrive together (up to
`batch_max_requests`), writes them as one JSONL file of `/v1/chat/completions` bodies (custom_id = the request's key),
uploads it, creates a batch, polls it, reads its output and error files and answers each request from them. Hosted
teachers price batch requests lower (the ledger applies `costs.prices.<model>.batch_discount`; BackendPlan.batched).

Nothing is paid twice across a kill: every batch is written to a journal in the store (the cache's `<name>-batches`
view) - first its uploaded input file and keys, before the batch is created, then the batch id. A resumed step finds a
key's batch in the journal and collects it (waiting while it runs) instead of sending the key again; a batch created but
not yet journaled when the step died is found by its input file among the provider's batches. A key its batch failed is
answered as an error (not cached): the next run sends it in a new batch.
Tested against a local stand-in of the API (tests/batch_standin.py); the real service is untested here.
"""

from __future__ import annotations

import asyncio
import io
import json
import time
from collections.abc import Callable

from omnithought_dagster.llm.backends import ChatRequest, Completion, MalformedReply, _read_reply, _short, chat_body
from omnithought_dagster.llm.settings import LLMConfig

DONE = {"completed", "failed", "expired", "cancelled"}


class BatchAPIBackend:
    supports_structured_output = True

    def __init__(self, config: LLMConfig, *, identity: str, api_key: str | None = None, log=None, client_factory: Callable | None = None):
        self.config = config
        self.identity = identity
        self.api_key = api_key or "EMPTY"
        self.log = log
        self.max_concurrency = config.batch_max_requests  # the runner keeps up to twice this in flight: whole batches form
        self.devices = 0
        self.journal = None  # a CacheView of this partition's batches (runner.run_cached attaches it)
        self._client_factory = client_factory
        self._client = None
        self._waiting: dict[str, tuple[ChatRequest, asyncio.Future]] = {}
        self._gatherer: asyncio.Task | None = None  # the task gathering requests now (None: the next request starts one)
        self._tasks: set[asyncio.Task] = set()  # every gatherer still serving (held: the loop keeps weak references only)
        self._records: dict[str, dict] | None = None  # input file id -> the journal's newest record of it
        self.submitted: list[str] = []  # batch ids this backend created (for the run's log)

    def attach_journal(self, journal) -> None:
        self.journal = journal

    # -- the Backend protocol ---------------------------------------------------------------------------------------

    async def complete(self, request: ChatRequest) -> Completion:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._waiting[request.key] = (request, future)
        if self._gatherer is None:
            self._gatherer = asyncio.create_task(self._gather())
            self._tasks.add(self._gatherer)
            self._gatherer.add_done_callback(self._tasks.discard)
        return await future

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.close()
        self._client = None
        self._gatherer = None

    # -- gathering, submitting, collecting ----------------------------------------------------------------------------

    async def _gather(self) -> None:
        """Requests handed over together form batches: wait until no new one arrived for a moment, then send them."""
        await asyncio.sleep(0)
        seen = -1
        while seen != len(self._waiting) and len(self._waiting) < self.config.batch_max_requests:
            seen = len(self._waiting)
            await asyncio.sleep(0.05)
        taken, self._waiting = self._waiting, {}
        self._gatherer = None  # requests from now on gather for the next batch while these are served
        try:
            await self._serve(taken)
        except Exception as exc:  # the API itself failed (upload, create, poll): every request of these answers an error
            reason = f"batch API: {type(exc).__name__}: {_short(str(exc))}"
            self._say(reason)
            for request, future in taken.values():
                if not future.done():
                    future.set_result(Completion(request.key, None, "error", error=reason))

    async def _serve(self, taken: dict[str, tuple[ChatRequest, asyncio.Future]]) -> None:
        records = self._load_journal()
        by_file: dict[str, list[str]] = {}
        fresh: list[str] = []
        newest: dict[str, tuple[float, str]] = {}  # key -> (when, input file id) of the newest batch holding it
        for file_id, record in records.items():
            for key in record["keys"]:
                if key in taken and (key not in newest or record["created_at"] >= newest[key][0]):
                    newest[key] = (record["created_at"], file_id)
        for key in taken:
            if key in newest and not records[newest[key][1]].get("spent", {}).get(key):
                by_file.setdefault(newest[key][1], []).append(key)
            else:
                fresh.append(key)
        jobs = [self._collect(records[file_id], keys, taken) for file_id, keys in by_file.items()]
        # New batches: at most batch_max_requests lines and batch_max_bytes each (a provider refuses larger files).
        chunk: list[tuple[str, bytes]] = []
        size = 0
        for key in fresh:
            line = json.dumps(
                {"custom_id": key, "method": "POST", "url": "/v1/chat/completions", "body": chat_body(self.config.model, taken[key][0])}
            )
            data = line.encode("utf-8") + b"\n"
            if chunk and (len(chunk) >= self.config.batch_max_requests or size + len(data) > self.config.batch_max_bytes):
                jobs.append(self._submit_and_collect(chunk, taken))
                chunk, size = [], 0
            chunk.append((key, data))
            size += len(data)
        if chunk:
            jobs.append(self._submit_and_collect(chunk, taken))
        results = await asyncio.gather(*jobs, return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result

    async def _submit_and_collect(self, lines: list[tuple[str, bytes]], taken) -> None:
        client = self._ensure_client()
        uploaded = await client.files.create(file=("requests.jsonl", io.BytesIO(b"".join(data for _, data in lines))), purpose="batch")
        record = {"input_file_id": uploaded.id, "keys": [key for key, _ in lines], "created_at": time.time(), "batch_id": None}
        self._journal(record)  # before the batch exists: a step killed after creating it finds it by this file
        await self._collect(record, record["keys"], taken)

    async def _collect(self, record: dict, keys: list[str], taken) -> None:
        client = self._ensure_client()
        if record.get("batch_id") is None:
            found = await self._find_batch(record["input_file_id"])
            if found is None:
                batch = await client.batches.create(
                    input_file_id=record["input_file_id"],
                    endpoint="/v1/chat/completions",
                    completion_window=self.config.batch_completion_window,
                    metadata={"omnithought_teacher": self.identity[:500]},
                )
                self.submitted.append(batch.id)
                self._say(f"batch {batch.id} created ({len(record['keys'])} requests)")
            else:
                batch = found
                self._say(f"batch {batch.id} found by its input file {record['input_file_id']} (created before a stop)")
            record = {**record, "batch_id": batch.id}
            self._journal(record)
        else:
            self._say(f"batch {record['batch_id']} resumed from the journal ({len(keys)} requests waiting on it)")
        batch = await self._wait(record["batch_id"])
        replies = {}
        for file_id in (getattr(batch, "output_file_id", None), getattr(batch, "error_file_id", None)):
            if file_id:
                content = await client.files.content(file_id)
                for line in content.content.split(b"\n"):
                    if line.strip():
                        try:
                            item = json.loads(line)
                        except ValueError:
                            continue
                        if isinstance(item, dict) and isinstance(item.get("custom_id"), str):
                            replies.setdefault(item["custom_id"], item)
        spent = {}
        for key in keys:
            request, future = taken[key]
            completion = self._completion(request, replies.get(key), batch)
            if completion.finish_reason == "error":
                spent[key] = True  # this batch will not serve it again: the next run sends it anew
            if not future.done():
                future.set_result(completion)
        if spent:
            self._journal({**record, "spent": {**record.get("spent", {}), **spent}})

    async def _wait(self, batch_id: str):
        client = self._ensure_client()
        started = time.monotonic()
        while True:
            batch = await client.batches.retrieve(batch_id)
            if batch.status in DONE:
                return batch
            if time.monotonic() - started > self.config.batch_timeout_s:
                raise TimeoutError(
                    f"batch {batch_id} still {batch.status} after {self.config.batch_timeout_s:.0f}s (it goes on; a rerun collects it)"
                )
            await asyncio.sleep(self.config.batch_poll_s)

    async def _find_batch(self, input_file_id: str):
        client = self._ensure_client()
        async for batch in client.batches.list(limit=100):
            if batch.input_file_id == input_file_id:
                return batch
        return None

    def _completion(self, request: ChatRequest, item: dict | None, batch) -> Completion:
        if item is None:
            return Completion(request.key, None, "error", error=f"batch {batch.id} ({batch.status}) returned nothing for this request")
        response = item.get("response") or {}
        if item.get("error") or response.get("status_code") != 200:
            detail = item.get("error") or response.get("body")
            return Completion(
                request.key, None, "error", error=f"batch {batch.id}: status {response.get('status_code')}: {_short(json.dumps(detail))}"
            )
        from openai.types.chat import ChatCompletion

        try:
            text, finish_reason, usage = _read_reply(ChatCompletion.model_validate(response.get("body")))
        except (MalformedReply, ValueError) as exc:
            return Completion(request.key, None, "error", error=f"batch {batch.id}: {type(exc).__name__}: {_short(str(exc))}")
        return Completion(
            key=request.key,
            text=text,
            finish_reason="length" if finish_reason == "length" else "stop",
            n_prompt_tokens=getattr(usage, "prompt_tokens", None),
            n_tokens=getattr(usage, "completion_tokens", None),
        )

    # -- helpers --------------------------------------------------------------------------------------------------------

    def _ensure_client(self):
        if self._client is None:
            if self._client_factory is not None:
                self._client = self._client_factory()
            else:
                from openai import AsyncOpenAI

                self._client = AsyncOpenAI(
                    base_url=self.config.base_urls[0],
                    api_key=self.api_key,
                    timeout=self.config.request_timeout_s,
                    max_retries=self.config.max_retries,
                )
        return self._client

    def _load_journal(self) -> dict[str, dict]:
        if self._records is None:
            self._records = dict(self.journal.load()) if self.journal is not None else {}
        return self._records

    def _journal(self, record: dict) -> None:
        self._load_journal()[record["input_file_id"]] = record
        if self.journal is not None:
            self.journal.append([(record["input_file_id"], record)])

    def _say(self, message: str) -> None:
        if self.log is not None:
            self.log.info(message)
