"""Pool slots whose holder died: run liveness records, the reaper, and blocked steps that obey SIGTERM.

Dagster claims a `gpu` pool slot in the instance's storage for a step and frees it when the
step ends. A run worker that is SIGKILLed (OOM killer, preemption, `kill -9`) never frees it;
Dagster's run monitoring would, but only where the daemon runs *and* the run launcher can check a
worker's health - the default launcher of the CLI and `dagster dev` cannot. So the next GPU step
waits forever, and a step waiting in the in-process executor's loop never looks at SIGTERM.

Here, every process of a run that this project executes holds a shared `flock` on
`<DAGSTER_HOME>/run-workers/<run_id>.lock` for its life: the run worker (from the executor's
start to its end) and each step process the multiprocess executor spawns (through the project
resource). The kernel drops the locks of a dead process, so "nobody holds the lock" means every
process of the run is gone - a step process that outlives its killed run worker keeps the run
alive (and its slot held, the GPU being still in use) until it ends. The reaper then marks such a
run failed with the reason, frees its slots and pending claims in every pool, and removes the
record. It runs when a run starts, every few seconds while one of its steps waits for a slot, and
from the `dead_run_reaper` sensor where the daemon runs. A run without a record here (another
host's, or started outside these paths) is left alone unless it has ended.

The records are local to the machine, like the GPU leases (`gpu.py`); on Kubernetes and ECS the
daemon's run monitoring does this job.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import socket
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
from dagster._core.executor.base import Executor
from dagster._core.executor.in_process import InProcessExecutor

# Dagster turns SIGTERM/SIGINT into this flag during a run; the in-process executor reads it only when a step starts.
from dagster._utils.interrupts import check_captured_interrupt

RECORD_DIR = "run-workers"
REAP_INTERVAL_S = 5.0  # how often a waiting run looks for dead holders
WATCH_INTERVAL_S = 0.5  # how often it looks for a SIGTERM that Dagster captured
ENDED = {dg.DagsterRunStatus.SUCCESS, dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED}
# The signal the watcher sends the main thread to interrupt a blocked in-process run.
_INTERRUPT_SIGNAL = signal.SIGUSR1


def record_dir(instance: dg.DagsterInstance) -> Path | None:
    root = getattr(instance, "root_directory", None)
    return Path(root) / RECORD_DIR if root else None


def _record(instance: dg.DagsterInstance, run_id: str) -> Path | None:
    folder = record_dir(instance)
    return folder / f"{run_id}.lock" if folder else None


@contextlib.contextmanager
def run_worker_record(instance: dg.DagsterInstance, run_id: str) -> Iterator[None]:
    """The run worker's record of run `run_id`, held from here until the run has ended (or this process died).

    It appears already locked (written and locked under a temporary name, then renamed), so a reaper never sees
    it unheld while the run starts; and it is let go only once the run's status is final - the executor returns
    before Dagster writes the run's end - by a thread that waits for that.
    """
    path = _record(instance, run_id)
    if path is None:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{run_id}.{os.getpid()}.tmp")
    handle = temporary.open("w")
    fcntl.flock(handle, fcntl.LOCK_SH)
    handle.write(f"run worker pid {os.getpid()} on {socket.gethostname()}\n")
    handle.flush()
    os.replace(temporary, path)
    try:
        yield
    finally:
        if _ended(instance, run_id):
            _release(instance, run_id, path, handle)
        else:
            threading.Thread(
                target=_release_when_ended, args=(instance, run_id, path, handle), daemon=True, name=f"run-record-{run_id[:8]}"
            ).start()


def _ended(instance: dg.DagsterInstance, run_id: str) -> bool:
    try:
        run = instance.get_run_by_id(run_id)
    except Exception:  # the instance is closing (a test's, an ephemeral one): nothing to wait for
        return True
    return run is None or run.status in ENDED


def _release_when_ended(instance: dg.DagsterInstance, run_id: str, path: Path, handle, wait_s: float = 120.0) -> None:
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline and not _ended(instance, run_id):
        time.sleep(0.2)
    _release(instance, run_id, path, handle)


def _release(instance: dg.DagsterInstance, run_id: str, path: Path, handle) -> None:
    handle.close()
    if run_alive(instance, run_id) is False:
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def joining_run(instance: dg.DagsterInstance | None, run_id: str | None) -> Iterator[None]:
    """A step process keeps its run alive for the block: a shared lock on the run worker's record, if it has one
    (a run started outside the watched paths has none, and this adds none)."""
    path = _record(instance, run_id) if instance is not None and run_id else None
    try:
        handle = path.open("r") if path is not None else None
    except FileNotFoundError:
        handle = None
    if handle is None:
        yield
        return
    with handle:
        fcntl.flock(handle, fcntl.LOCK_SH)
        yield


def _unheld(path: Path) -> bool | None:
    """Whether no process holds a lock on the file (None: there is no file)."""
    try:
        handle = path.open("r")
    except FileNotFoundError:
        return None
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        fcntl.flock(handle, fcntl.LOCK_UN)
        return True


def run_alive(instance: dg.DagsterInstance, run_id: str) -> bool | None:
    """True while a process of the run holds its record, False once all have died, None without a record."""
    path = _record(instance, run_id)
    unheld = _unheld(path) if path is not None else None
    return None if unheld is None else not unheld


@dataclass(frozen=True)
class Freed:
    run_id: str
    reason: str
    slots: int  # slots and pending claims it held


def _pool_steps(instance: dg.DagsterInstance) -> set[tuple[str, str, str, bool]]:
    """(run id, pool, step key, claimed) of every step holding or waiting for a slot, over every pool."""
    storage = instance.event_log_storage
    if not storage.supports_global_concurrency_limits:
        return set()
    steps = set()
    for key in storage.get_concurrency_keys():
        info = storage.get_concurrency_info(key)
        claimed = {(slot.run_id, slot.step_key) for slot in info.claimed_slots}
        steps.update((run_id, key, step_key, True) for run_id, step_key in claimed)
        steps.update(
            (step.run_id, key, step.step_key, False) for step in info.pending_steps if (step.run_id, step.step_key) not in claimed
        )  # a claimed step is in both lists
    return steps


def _slot_holders(instance: dg.DagsterInstance) -> dict[str, int]:
    """run id -> number of slots it holds and claims it has pending, over every pool."""
    return dict(Counter(run_id for run_id, _, _, _ in _pool_steps(instance)))


def free_dead_runs(instance: dg.DagsterInstance, log=None) -> list[Freed]:
    """Mark runs whose every process died as failed and free their pool slots; free ended runs' leftovers."""
    holders = _slot_holders(instance)
    freed: list[Freed] = []
    folder = record_dir(instance)
    present = folder is not None and folder.is_dir()
    recorded = sorted(folder.glob("*.lock")) if present else []
    for temporary in folder.glob(".*.tmp") if present else []:  # a run worker killed between writing its record and naming it
        if _unheld(temporary):
            temporary.unlink(missing_ok=True)
    for path in recorded:
        run_id = path.stem
        if run_alive(instance, run_id) is not False:
            continue
        who = path.read_text().strip().split("\n")[:1]
        run = instance.get_run_by_id(run_id)
        died = run is not None and run.status not in ENDED
        reason = f"{who[0] if who else 'its run worker'} died without ending the run" if died else "the run had ended"
        if died:
            instance.report_run_failed(run, f"{reason}; marked failed and its pool slots freed by pid {os.getpid()}")
        if run_id in holders:
            instance.event_log_storage.free_concurrency_slots_for_run(run_id)
        if died or run_id in holders:
            freed.append(Freed(run_id, reason, holders.pop(run_id, 0)))
        path.unlink(missing_ok=True)  # an ended run's record its run worker had no time to remove: nothing to say
    for run_id, count in holders.items():
        if run_alive(instance, run_id):
            continue
        run = instance.get_run_by_id(run_id)
        if run is None or run.status in ENDED:
            instance.event_log_storage.free_concurrency_slots_for_run(run_id)
            freed.append(Freed(run_id, "the run had ended" if run else "the run no longer exists", count))
    for item in freed:
        if item.slots and log is not None:
            log.warning(f"freed {item.slots} pool slot(s) of run {item.run_id}: {item.reason}")
    return freed


def _waiting(instance: dg.DagsterInstance, run_id: str) -> bool:
    """Whether a step of the run waits for a pool slot (queued, or assigned but not yet taken)."""
    return any(run == run_id and not claimed for run, _, _, claimed in _pool_steps(instance))


class _Watcher(threading.Thread):
    """While the run executes: frees dead holders when one of its steps waits for a slot, and (in-process
    executor) turns a SIGTERM/SIGINT that arrives while a step waits into an interruption of the run."""

    def __init__(self, instance: dg.DagsterInstance, run_id: str, interrupt_main: bool, log=None):
        super().__init__(name=f"pool-watch-{run_id[:8]}", daemon=True)
        self.instance, self.run_id, self.interrupt_main, self.log = instance, run_id, interrupt_main, log
        self.stop = threading.Event()

    def run(self) -> None:
        next_reap = time.monotonic() + REAP_INTERVAL_S
        while not self.stop.wait(WATCH_INTERVAL_S):
            try:
                interrupted = self.interrupt_main and check_captured_interrupt()
                if not interrupted and time.monotonic() < next_reap:
                    continue
                if not _waiting(self.instance, self.run_id):
                    next_reap = time.monotonic() + REAP_INTERVAL_S
                    continue
                if interrupted:
                    signal.pthread_kill(threading.main_thread().ident, _INTERRUPT_SIGNAL)
                    return
                free_dead_runs(self.instance, self.log)
                next_reap = time.monotonic() + REAP_INTERVAL_S
            except Exception as error:  # storage hiccup: the run goes on, the next look may succeed
                if self.log is not None:
                    self.log.debug(f"pool watcher: {error!r}")


@contextlib.contextmanager
def watched_run(instance: dg.DagsterInstance, run_id: str, *, in_process: bool, log=None) -> Iterator[None]:
    """The run worker's side: holds the run's record, frees dead holders first, watches while the run executes."""
    with run_worker_record(instance, run_id):
        try:
            free_dead_runs(instance, log)
        except Exception as error:
            if log is not None:
                log.warning(f"could not look for dead pool holders: {error!r}")
        interrupt = in_process and threading.current_thread() is threading.main_thread()
        previous = None
        if interrupt:
            fired = []

            def _interrupt(_signo, _frame):
                if not fired:  # once: the run's own cleanup must not be interrupted again
                    fired.append(True)
                    raise dg.DagsterExecutionInterruptedError("interrupted while waiting for a pool slot")

            previous = signal.signal(_INTERRUPT_SIGNAL, _interrupt)
        watcher = _Watcher(instance, run_id, interrupt, log)
        watcher.start()
        try:
            yield
        finally:
            watcher.stop.set()
            watcher.join()
            if interrupt:
                signal.signal(_INTERRUPT_SIGNAL, previous)


def run_in_process(job: dg.JobDefinition, instance: dg.DagsterInstance, **kwargs) -> dg.ExecuteInProcessResult:
    """`job.execute_in_process` as a watched run (what the `omnithought` commands use): ``execute_in_process``
    replaces the job's executor with Dagster's own, so the watch goes around it."""
    run_id = kwargs.pop("run_id", None) or str(uuid.uuid4())
    with watched_run(instance, run_id, in_process=True):
        return job.execute_in_process(instance=instance, run_id=run_id, **kwargs)


class WrappedExecutor(Executor):
    """An executor around another: its retries and step dependencies, `execute` wrapped by the subclass."""

    def __init__(self, inner: Executor):
        self.inner = inner

    @property
    def retries(self):
        return self.inner.retries

    @property
    def step_dependency_config(self):
        return self.inner.step_dependency_config


class WatchedExecutor(WrappedExecutor):
    """Dagster's executor, run as a watched run (see the module's docstring)."""

    def execute(self, plan_context, execution_plan):
        with watched_run(
            plan_context.instance, plan_context.run_id, in_process=isinstance(self.inner, InProcessExecutor), log=plan_context.log
        ):
            yield from self.inner.execute(plan_context, execution_plan)


def watched(executor_def: dg.ExecutorDefinition) -> dg.ExecutorDefinition:
    """`executor_def` (multiprocess or in-process) whose runs are watched."""
    create = executor_def.executor_creation_fn
    return dg.ExecutorDefinition(
        name=executor_def.name,
        config_schema=executor_def.config_schema,
        requirements=executor_def.get_requirements,
        description=executor_def.description,
        executor_creation_fn=lambda init_context: WatchedExecutor(create(init_context)),
    )
