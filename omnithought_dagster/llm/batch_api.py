"""The `openai` backend's batch mode: a provider's batch API (OpenAI's format; vLLM's own batch runner reads the same JSONL).

The runner (llm.runner) hands requests over one by one as usual; this backend gathers those that arrive together (up to
`batch_max_requests`), writes them as one JSONL file of `/v1/chat/completions` bodies (custom_id = the request's key),
uploads it, creates a batch, polls it, reads its output and error files and answers each request from them. Hosted
teachers price batch requests lower: each reply is marked `batched` and the ledger takes
`costs.prices.<model>.batch_discount` off its tokens.

Nothing is paid twice across a kill: every batch is written to a journal in the store (the cache's `<name>-batches`
view) - first its uploaded input file and keys, before the batch is created, then the batch id. A resumed step finds a
key's batch in the journal and collects it (waiting while it runs) instead of sending the key again; a batch created but
not yet journaled when the step died is found by its input file among the provider's batches, and a create whose reply
was lost is looked up before it is sent again (the client's own retries are off for it). A key its batch failed, or a
batch the provider refuses (4xx), is answered as an error (not cached) and given up in the journal: the next run sends
it in a new batch.
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


def _answer(futures: dict[str, list], completion: Completion) -> None:
    for future in futures.get(completion.key, ()):
        if not future.done():
            future.set_result(completion)


def _transient(exc: BaseException) -> bool:
    import openai

    if isinstance(exc, (openai.APIConnectionError, openai.APITimeoutError)):
        return True
    return isinstance(exc, openai.APIStatusError) and (exc.status_code in (408, 409, 425, 429) or exc.status_code >= 500)


class BatchAPIBackend:
    supports_structured_output = True

    def __init__(self, config: LLMConfig, *, identity: str, api_key: str | None = None, log=None, client_factory: Callable | None = None):
        self.config = config
        self.identity = identity
        self.api_key = api_key or "EMPTY"
        self.log = log
        # The runner keeps up to twice this in flight: whole batches form. Those requests (their images inline) are in
        # memory together until each is written to its batch file; then only its key is kept.
        self.max_concurrency = config.batch_max_requests
        self.devices = 0
        self.journal = None  # a CacheView of this partition's batches (runner.run_cached attaches it)
        self._client_factory = client_factory
        self._client = None
        self._waiting: dict[str, tuple[ChatRequest, list[asyncio.Future]]] = {}
        self._gatherer: asyncio.Task | None = None  # the task gathering requests now (None: the next request starts one)
        self._tasks: set[asyncio.Task] = set()  # every gatherer still serving (held: the loop keeps weak references only)
        self._records: dict[str, dict] | None = None  # input file id -> the journal's newest record of it
        self.submitted: list[str] = []  # batch ids this backend created (for the run's log)

    def attach_journal(self, journal) -> None:
        self.journal = journal

    # -- the Backend protocol ---------------------------------------------------------------------------------------

    async def complete(self, request: ChatRequest) -> Completion:
        future = asyncio.get_running_loop().create_future()
        if request.key in self._waiting:  # the same key twice at once: one line in the batch, one reply for both
            self._waiting[request.key][1].append(future)
        else:
            self._waiting[request.key] = (request, [future])
        del request  # from here only the gatherer holds it, until it is written to a batch file
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
        futures = {key: waiters for key, (_, waiters) in taken.items()}
        try:
            await self._serve(taken, futures)
        except Exception as exc:  # the API itself failed (upload, create, poll): every request of these answers an error
            reason = f"batch API: {type(exc).__name__}: {_short(str(exc))}"
            self._say(reason)
            for key in futures:
                _answer(futures, Completion(key, None, "error", error=reason))

    async def _serve(self, taken: dict[str, tuple[ChatRequest, list]], futures: dict[str, list]) -> None:
        records = self._load_journal()
        # A key goes back to the newest batch holding it that has not given it up (failed it, or could not run): that batch
        # is collected, not sent again. The others are new.
        holder: dict[str, tuple[float, str]] = {}
        for file_id, record in records.items():
            spent = record.get("spent", {})
            for key in record["keys"]:
                if key in taken and not spent.get(key) and (key not in holder or record["created_at"] >= holder[key][0]):
                    holder[key] = (record["created_at"], file_id)
        by_file: dict[str, list[str]] = {}
        for key, (_, file_id) in holder.items():
            by_file.setdefault(file_id, []).append(key)
        jobs = [self._collect(records[file_id], keys, futures) for file_id, keys in by_file.items()]
        fresh = [key for key in taken if key not in holder]
        for key in holder:
            del taken[key]  # served by a batch that exists: its request is not needed again
        # New batches: at most batch_max_requests lines and batch_max_bytes each (a provider refuses larger files). Each file
        # is written and uploaded before the next is made, and a request leaves memory once its line is written.
        chunk: list[tuple[str, bytes]] = []
        size = 0
        for key in fresh:
            request, _ = taken.pop(key)
            line = json.dumps(
                {"custom_id": key, "method": "POST", "url": "/v1/chat/completions", "body": chat_body(self.config.model, request)}
            )
            data = line.encode("utf-8") + b"\n"
            del request, line
            if chunk and (len(chunk) >= self.config.batch_max_requests or size + len(data) > self.config.batch_max_bytes):
                jobs.append(asyncio.ensure_future(self._collect(await self._upload(chunk), None, futures)))
                chunk, size = [], 0
            chunk.append((key, data))
            size += len(data)
        if chunk:
            jobs.append(asyncio.ensure_future(self._collect(await self._upload(chunk), None, futures)))
        del chunk
        results = await asyncio.gather(*jobs, return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result

    async def _upload(self, lines: list[tuple[str, bytes]]) -> dict:
        """The batch's input file uploaded and journaled (before the batch exists: a step killed after creating it finds it
        by this file)."""
        client = self._ensure_client()
        uploaded = await client.files.create(file=("requests.jsonl", io.BytesIO(b"".join(data for _, data in lines))), purpose="batch")
        record = {"input_file_id": uploaded.id, "keys": [key for key, _ in lines], "created_at": time.time(), "batch_id": None}
        self._journal(record)
        return record

    async def _collect(self, record: dict, keys: list[str] | None, futures: dict[str, list]) -> None:
        """Create the record's batch if it has none (or find it), wait for it, answer `keys` (default: all of it) from it.
        A batch the provider cannot run or return (a 4xx: its file or the batch unknown, refused) gives its keys up: they
        are errors now and go out in a new batch on the next run."""
        import openai

        keys = record["keys"] if keys is None else keys
        try:
            if record.get("batch_id") is None:
                record = await self._create(record)
            else:
                self._say(f"batch {record['batch_id']} resumed from the journal ({len(keys)} requests waiting on it)")
            batch = await self._wait(record["batch_id"])
            replies = await self._replies(batch)
        except openai.APIStatusError as exc:
            if not 400 <= exc.status_code < 500 or exc.status_code in (408, 409, 425, 429):
                raise
            reason = f"batch API refused {record.get('batch_id') or record['input_file_id']}: {exc.status_code} {_short(str(exc))}"
            self._say(reason)
            self._give_up(record, keys)
            for key in keys:
                _answer(futures, Completion(key, None, "error", error=reason))
            return
        failed = []
        for key in keys:
            completion = self._completion(key, replies.get(key), batch)
            if completion.finish_reason == "error":
                failed.append(key)
            _answer(futures, completion)
        if failed:
            self._give_up(record, failed)

    async def _create(self, record: dict) -> dict:
        """The record's batch: found by its input file among the provider's (created before a stop), else created - by one
        request without the client's own retries: a create whose reply was lost is looked up before it is sent again."""
        client = self._ensure_client()
        batch = await self._find_batch(record["input_file_id"])
        attempt = 0
        while batch is None:
            try:
                batch = await client.with_options(max_retries=0).batches.create(
                    input_file_id=record["input_file_id"],
                    endpoint="/v1/chat/completions",
                    completion_window=self.config.batch_completion_window,
                    metadata={"omnithought_teacher": self.identity[:500]},
                )
                self.submitted.append(batch.id)
                self._say(f"batch {batch.id} created ({len(record['keys'])} requests)")
            except Exception as exc:
                if not _transient(exc) or attempt >= self.config.max_retries:
                    raise
                attempt += 1
                await asyncio.sleep(min(2.0**attempt, 30.0))
                batch = await self._find_batch(record["input_file_id"])  # it may exist: the reply was what got lost
                if batch is not None:
                    self._say(f"batch {batch.id} found by its input file {record['input_file_id']}")
        record = {**self._records.get(record["input_file_id"], record), "batch_id": batch.id}
        self._journal(record)
        return record

    async def _replies(self, batch) -> dict[str, dict]:
        """The output and error files' lines by custom_id (the first line of an id wins; lines that are no object are skipped)."""
        client = self._ensure_client()
        replies: dict[str, dict] = {}
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
        return replies

    def _give_up(self, record: dict, keys: list[str]) -> None:
        """Journal that this batch will not serve `keys` (merged into the newest record of it)."""
        current = self._load_journal().get(record["input_file_id"], record)
        self._journal({**current, "spent": {**current.get("spent", {}), **dict.fromkeys(keys, True)}})

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

    def _completion(self, key: str, item: dict | None, batch) -> Completion:
        if item is None:
            return Completion(key, None, "error", error=f"batch {batch.id} ({batch.status}) returned nothing for this request")
        response = item.get("response") or {}
        if item.get("error") or not isinstance(response, dict) or response.get("status_code") != 200:
            detail = item.get("error") or (response.get("body") if isinstance(response, dict) else response)
            status = response.get("status_code") if isinstance(response, dict) else None
            return Completion(key, None, "error", error=f"batch {batch.id}: status {status}: {_short(json.dumps(detail))}")
        from openai.types.chat import ChatCompletion

        try:
            text, finish_reason, usage = _read_reply(ChatCompletion.model_validate(response.get("body")))
        except (MalformedReply, ValueError) as exc:
            return Completion(key, None, "error", error=f"batch {batch.id}: {type(exc).__name__}: {_short(str(exc))}")
        return Completion(
            key=key,
            text=text,
            finish_reason="length" if finish_reason == "length" else "stop",
            n_prompt_tokens=getattr(usage, "prompt_tokens", None),
            n_tokens=getattr(usage, "completion_tokens", None),
            batched=True,
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
