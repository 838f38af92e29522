"""The last lines of a tool's log: what a failing server, trainer or evaluator said last."""

from __future__ import annotations

from collections import deque
from pathlib import Path

TAIL_LINES = 40


def log_tail(path: str | Path | None, lines: int = TAIL_LINES) -> str:
    """The log's last `lines` lines (split on newlines only), or a note saying why there are none."""
    if path is None or not Path(path).exists():
        return f"(no log at {path})"
    with open(path, "rb") as handle:
        text = [line.decode("utf-8", "replace").rstrip() for line in deque(handle, maxlen=lines)]
    return "\n".join(text).strip("\n") or f"(the log {path} is empty)"
