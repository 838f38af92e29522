"""Process helpers with no Dagster in them: how many cores a step may use, and children that die with it."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys

_PR_SET_PDEATHSIG = 1


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask, which containers and taskset narrow), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def die_with_parent(parent_pid: int) -> None:
    """In a child process: be killed (SIGKILL) the moment the parent dies, however it dies - a SIGKILLed step
    leaves no child running. Linux only (prctl); elsewhere a no-op. Exits at once when the parent is already gone."""
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)


@contextlib.contextmanager
def main_module_hidden():
    """While spawning worker processes: multiprocessing's spawn (and forkserver) re-runs the parent's `__main__`
    in every child - a Dagster CLI script, a notebook, a user's script that starts ingestion again on import.
    Workers that need only importable functions start faster and safer without it; hiding the main module's file
    and spec for the moment of the spawn makes the children skip it."""
    main = sys.modules.get("__main__")
    saved = {name: getattr(main, name) for name in ("__file__", "__spec__") if hasattr(main, name)}
    try:
        if "__file__" in saved:
            del main.__file__
        if "__spec__" in saved:
            main.__spec__ = None
        yield
    finally:
        for name, value in saved.items():
            setattr(main, name, value)
