"""Checking records in a pool of processes over batches, merged back in record order (`checked_records`)."""

from __future__ import annotations

import itertools
import multiprocessing
import os
import signal
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from omnithought_dagster.processes import available_cores, die_with_parent, main_module_hidden
from omnithought_dagster.seed.settings import SeedSettings
from omnithought_dagster.seed.sources.base import (
    QuarantineReason,
    SeedRecord,
)
from omnithought_dagster.seed.validate import Accepted, Context, SetAside, check_record

# Records a worker checks per task: large enough to amortise the round trip, small enough to keep every worker busy.
BATCH_RECORDS = 32


# A source this small per worker is checked in the step's own process: starting a process costs ~1-2 s.
MIN_RECORDS_PER_WORKER = 256


# While the workers start, the step's process checks the first batches itself (tests turn this off to make every
# batch go through the pool).
CHECK_WHILE_WORKERS_START = True


def ingest_workers(settings: SeedSettings, records: int) -> int:
    """Processes that check a source of `records` records: `seed.workers`, or one per core the step may use
    (0, the default); one - the step's own process, no pool - when the source is too small to pay for starting them."""
    wanted = settings.workers or available_cores()
    return max(1, min(wanted, records // MIN_RECORDS_PER_WORKER))


def checked_records(
    records: Iterable[SeedRecord], context: Context, workers: int, notes: list[str], put_image: Callable[[str, bytes], bool] | None = None
) -> Iterator[tuple[SeedRecord, Accepted | SetAside]]:
    """(record, verdict) in record order; with workers > 1 the verdicts come from a pool of processes (what went
    wrong with the pool itself is added to `notes`). Workers also store accepted images when `put_image` can be
    sent to them (the store's own method can; a lambda cannot): the bytes then never travel back."""
    if workers <= 1:
        for record in records:
            yield record, check_record(record, context)
        return
    pool = _CheckPool(workers, context, put_image if _picklable(put_image) else None)
    finished = False
    try:
        window: deque = deque()  # batches in flight, oldest first: results are taken in order
        for batch in _batches(records, BATCH_RECORDS):
            # While the workers start (an interpreter and its imports, ~0.5-1 s) this process checks batches itself.
            window.append((batch, pool.submit(batch) if pool.ready() or not CHECK_WHILE_WORKERS_START else _done(batch, context)))
            if len(window) > 2 * workers:
                yield from pool.collect(*window.popleft())
        while window:
            yield from pool.collect(*window.popleft())
        finished = True
    finally:
        pool.close(terminate=not finished)
        if pool.fell_back:
            notes.append(pool.fell_back)


def _batches(items: Iterable, size: int) -> Iterator[list]:
    iterator = iter(items)
    while batch := list(itertools.islice(iterator, size)):
        yield batch


class _CheckPool:
    """Worker processes that check batches of records. They die with the step (parent-death signal). A record
    that kills its worker is retried alone in a fresh pool and, if the fresh pool itself is sound, set aside as
    record_error: the source goes on. A pool that cannot run at all (a main module that starts ingestion again
    on import, no /dev/shm, ...) is given up: the records are checked in this process, and `fell_back` says why."""

    def __init__(self, workers: int, context: Context, put_image: Callable[[str, bytes], bool] | None = None):
        self.workers, self.context, self.put_image = workers, context, put_image
        self.fell_back: str | None = None
        # spawn: a fresh interpreter, not a fork of a step that may hold threads and locks (Dagster's, Arrow's).
        self._mp = multiprocessing.get_context("spawn")
        self._start()

    def _start(self) -> None:
        self._executor = ProcessPoolExecutor(
            self.workers, mp_context=self._mp, initializer=_start_worker, initargs=(self.context, os.getpid(), self.put_image)
        )
        with main_module_hidden():  # every worker is spawned here, by these first submits (one each), never later
            self._warming = [self._executor.submit(_check_batch, []) for _ in range(self.workers)]

    def ready(self) -> bool:
        """Whether a worker has started (or the pool has failed: then submit() finds out and falls back)."""
        if self._warming and any(future.done() for future in self._warming):
            self._warming = []
        return not self._warming

    def submit(self, batch: list[SeedRecord]) -> Future:
        if self.fell_back:
            return _done(batch, self.context)
        try:
            return self._executor.submit(_check_batch, batch)
        except BrokenProcessPool:  # an earlier batch killed a worker: the pool is gone, start another
            self._restart()
            return self.submit(batch)

    def collect(self, batch: list[SeedRecord], future: Future) -> Iterator[tuple[SeedRecord, Accepted | SetAside]]:
        try:
            verdicts = future.result()
        except BrokenProcessPool:
            verdicts = [self._alone(record) for record in batch]
        return zip(batch, verdicts, strict=True)  # a verdict per record, or the pool is broken

    def _alone(self, record: SeedRecord) -> Accepted | SetAside:
        try:
            return self.submit([record]).result()[0]
        except BrokenProcessPool as exc:
            self._restart()
            if not self._sound():
                self.fell_back = f"the worker pool cannot run ({exc}); records are checked in the step's process"
                self._executor.shutdown(wait=False, cancel_futures=True)
                return check_record(record, self.context)
            return SetAside(
                QuarantineReason.RECORD_ERROR,
                "checking the record killed its worker process (a crashing image decoder, or "
                "memory); retried alone in a fresh process, it did so again",
            )

    def _restart(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._start()

    def _sound(self) -> bool:
        """Whether a fresh pool checks an empty batch: a pool that cannot even do that is not the record's fault."""
        try:
            return self._executor.submit(_check_batch, []).result(timeout=120) == []
        except Exception:  # noqa: BLE001 - broken, timed out, unpicklable: not sound
            return False

    def close(self, terminate: bool = False) -> None:
        if terminate:  # the step is failing or being stopped: no worker outlives it
            for process in list((getattr(self._executor, "_processes", None) or {}).values()):
                process.terminate()
        self._executor.shutdown(wait=True, cancel_futures=True)


def _done(batch: list[SeedRecord], context: Context) -> Future:
    future: Future = Future()
    future.set_result([check_record(record, context) for record in batch])
    return future


_WORKER_CONTEXT: Context | None = None


_WORKER_PUT: Callable[[str, bytes], bool] | None = None


def _start_worker(context: Context, parent_pid: int, put_image: Callable[[str, bytes], bool] | None) -> None:
    global _WORKER_CONTEXT, _WORKER_PUT
    die_with_parent(parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the step's to handle; it stops the pool
    _WORKER_CONTEXT, _WORKER_PUT = context, put_image
    import imagehash  # noqa: F401 - imported now, not inside the first batch
    from PIL import Image  # noqa: F401


def _check_batch(batch: list[SeedRecord]) -> list[Accepted | SetAside]:
    assert _WORKER_CONTEXT is not None, "worker started without its context"
    verdicts = [check_record(record, _WORKER_CONTEXT) for record in batch]
    if _WORKER_PUT is not None:
        for verdict in verdicts:
            if isinstance(verdict, Accepted):
                for image in verdict.images:
                    image.stored, image.data = _WORKER_PUT(image.image_id, image.data), None
    return verdicts


def _picklable(value: Any) -> bool:
    import pickle

    try:
        pickle.dumps(value)
    except Exception:  # noqa: BLE001 - lambdas, closures, open handles: not sendable
        return False
    return True
