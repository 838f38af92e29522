"""Local file housekeeping shared by the store and the result cache (below both: neither imports the other for it)."""

from __future__ import annotations

import contextlib
import os
import time

# A hidden temporary file (".<name>.tmp") not written to for this long belongs to no live writer (writers flush every
# few seconds): one killed mid-write left it, and the next writer in that folder removes it.
STALE_TEMPORARY_S = 3600.0


def sweep_temporaries(directory: str, max_age_s: float = STALE_TEMPORARY_S) -> int:
    """Remove the stale hidden temporary files (".*.tmp") directly in a local folder; returns how many went."""
    removed, cutoff = 0, time.time() - max_age_s
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return 0
    for entry in entries:
        if entry.name.startswith(".") and entry.name.endswith(".tmp"):
            with contextlib.suppress(OSError):
                if entry.is_file(follow_symlinks=False) and entry.stat(follow_symlinks=False).st_mtime < cutoff:
                    os.unlink(entry.path)
                    removed += 1
    return removed
