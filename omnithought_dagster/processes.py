"""Process helpers with no Dagster in them: how many cores a step may use, and children that die with it."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
from collections import deque
from pathlib import Path

_PR_SET_PDEATHSIG = 1


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask, which containers and taskset narrow), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def die_with_parent(parent_pid: int, signum: int = signal.SIGKILL) -> None:
    """In a child process: get `signum` (SIGKILL: die) the moment the parent dies, however it dies - a SIGKILLed step
    leaves no child running. Linux only (prctl); elsewhere a no-op. Exits at once when the parent is already gone."""
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signum, 0, 0, 0)
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)


# What a child process (a vLLM server, a trainer, an evaluator) gets of the step's environment: locale, paths and
# temp folders, proxies and certificates, the accelerator's and the ML libraries' own variables, thread counts. Not
# the rest - the store's keys, other services' API keys, whatever else a step holds.
INHERITED_ENV_NAMES = {
    "PATH",
    "HOME",
    "USER",
    "LOGNAME",
    "SHELL",
    "LANG",
    "LANGUAGE",
    "TZ",
    "TERM",
    "TMPDIR",
    "TEMP",
    "TMP",
    "LD_LIBRARY_PATH",
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
    "REQUESTS_CA_BUNDLE",
    "CURL_CA_BUNDLE",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "NO_PROXY",
    "http_proxy",
    "https_proxy",
    "no_proxy",
    "CC",
    "CXX",
    "PYTHONUNBUFFERED",
    "PYTHONHASHSEED",
    "PYTHONDONTWRITEBYTECODE",
}
INHERITED_ENV_PREFIXES = (
    "LC_",
    "XDG_",
    "CUDA_",
    "NVIDIA_",
    "NCCL_",
    "CUBLAS_",
    "CUDNN_",
    "TORCH",
    "TRITON_",
    "VLLM_",
    "HF_",
    "HUGGINGFACE_",
    "TRANSFORMERS_",
    "TOKENIZERS_",
    "DS_",
    "DEEPSPEED_",
    "OMP_",
    "MKL_",
    "OPENBLAS_",
    "KMP_",
    "GOMP_",
    "ROCR_",
    "HIP_",
    "MASTER_",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "RANK",
    "DAGSTER_PIPES_",
)


def child_environment(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment a child process is started with: the step's variables it needs (INHERITED_ENV_*), plus `extra`."""
    env = {name: value for name, value in os.environ.items() if name in INHERITED_ENV_NAMES or name.startswith(INHERITED_ENV_PREFIXES)}
    env.update(extra or {})
    return env


def guarded(
    command: list[str], grace_s: float = 20.0, keep_env: list[str] | None = None, stderr_tail: str | os.PathLike | None = None
) -> list[str]:
    """`command` run under a guard that dies with this process and takes the command's whole process group with it.

    Start the result with `start_new_session=True`: the guard leads a process group that holds the command and
    everything it starts (a vLLM server's engine processes, a launcher's ranks). When the process that started it
    dies - a SIGKILL, the OOM killer, a cancelled pod - the guard gets SIGTERM (parent-death signal), passes it to
    the group, waits `grace_s` for the command to end, then SIGKILLs the group. `os.killpg(guard.pid, ...)` reaches
    them all, as before. The command's own exit ends the guard with its exit code. A guard not started in a session
    of its own (Dagster's Pipes client starts the trainer) makes one. With `keep_env` the command gets
    `child_environment()` plus those names only, whatever environment the guard was given. With `stderr_tail` the
    command's standard error still reaches the guard's, and its last lines are also written to that file when the command
    ends: what a caller puts in its error when the command failed (a Pipes client reports only the exit code).
    """
    keep = ["--keep-env", ",".join(keep_env)] if keep_env is not None else []
    tail = ["--stderr-tail", str(stderr_tail)] if stderr_tail is not None else []
    return [sys.executable, "-m", "omnithought_dagster.processes", "guard", *keep, *tail, str(os.getpid()), str(grace_s), "--", *command]


def _guard(parent_pid: int, grace_s: float, command: list[str], keep_env: list[str] | None = None, stderr_tail: str | None = None) -> int:
    import subprocess
    import threading
    import time

    with contextlib.suppress(OSError):
        os.setsid()  # lead a process group of our own (fails, harmlessly, when already a session leader)
    env = None
    if keep_env is not None:
        env = child_environment({name: os.environ[name] for name in keep_env if name in os.environ})

    child: subprocess.Popen | None = None

    def end_group(signum=None, frame=None) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the group's SIGTERM below is not for the guard
        with contextlib.suppress(ProcessLookupError):
            os.killpg(0, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while child is not None and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        os.killpg(0, signal.SIGKILL)  # what is left, the guard too

    signal.signal(signal.SIGTERM, end_group)
    signal.signal(signal.SIGINT, end_group)
    signal.signal(signal.SIGHUP, end_group)
    die_with_parent(parent_pid, signal.SIGTERM)
    child = subprocess.Popen(command, preexec_fn=default_signals, env=env, stderr=subprocess.PIPE if stderr_tail else None)
    copier = None
    if stderr_tail:
        lines: deque[bytes] = deque(maxlen=STDERR_TAIL_LINES)
        copier = threading.Thread(target=_copy_stderr, args=(child.stderr, lines), daemon=True)
        copier.start()
    code = child.wait()
    # The command ended by itself: what it started and left behind goes too (the guard ignores this SIGTERM).
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(0, signal.SIGTERM)
    if copier is not None:
        copier.join(timeout=5)  # a process that ignored the SIGTERM may still hold the pipe: what came until now is enough
        with contextlib.suppress(OSError, RuntimeError):  # RuntimeError: the copier appended while this read
            Path(stderr_tail).write_bytes(b"".join(list(lines)))
    return code


STDERR_TAIL_LINES = 200


def _copy_stderr(pipe, lines) -> None:
    """The command's standard error, line by line, to the guard's own and into `lines` (the last ones kept)."""
    out = sys.stderr.buffer
    for line in iter(pipe.readline, b""):
        lines.append(line)
        with contextlib.suppress(OSError, ValueError):
            out.write(line)
            out.flush()


def default_signals() -> None:
    """For preexec_fn (in a child between fork and exec): SIGINT/SIGTERM back to their defaults - a process started from
    a backgrounded shell inherits them ignored and would never stop."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


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


def main(argv: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m omnithought_dagster.processes")
    commands = parser.add_subparsers(dest="verb", required=True)
    guard = commands.add_parser("guard", help="run COMMAND in a process group that ends when PARENT_PID dies")
    guard.add_argument("parent_pid", type=int)
    guard.add_argument("grace_s", type=float)
    guard.add_argument("--keep-env", help="comma-separated names the command gets besides child_environment()")
    guard.add_argument("--stderr-tail", help="a file that gets the last lines of the command's standard error when it ends")
    guard.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("guard needs a command after --")
    keep = None if args.keep_env is None else [name for name in args.keep_env.split(",") if name]
    return _guard(args.parent_pid, args.grace_s, command, keep, args.stderr_tail)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
