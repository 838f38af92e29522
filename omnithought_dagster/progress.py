"""Progress lines for long steps: done / total, rate and ETA. No Dagster here."""

from __future__ import annotations


def progress_line(label: str, done: int, total: int, seconds: float, unit: str, *, rate_done: int | None = None) -> str:
    """`label: 120/400 traces (30%), 8.0 traces/s, ETA 35 s`.

    `rate_done` is the part of `done` that took the time (e.g. requests sent, not cache hits);
    the rate and the ETA are taken from it. No rate yet -> no ETA.
    """
    worked = done if rate_done is None else rate_done
    share = f" ({100 * done / total:.0f}%)" if total else ""
    line = f"{label}: {done}/{total} {unit}{share}"
    if seconds <= 0 or worked <= 0:
        return line
    rate = worked / seconds
    remaining = max(0, total - done)
    return f"{line}, {rate:.1f} {unit}/s, ETA {format_seconds(remaining / rate)}"


def format_seconds(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"
