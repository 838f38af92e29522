"""Reading a source's files only inside the folders it was granted (a manifest's source: manifests.py).

A source from the project file is trusted and reads anywhere (`roots` None). A source from a manifest carries its
granted roots, resolved; its reader checks every file it lists (a glob's matches, a folder's files, the data files a
`datasets` folder's state.json or dataset_dict.json names) and opens each through `open_data`, which checks the file it
actually opened, on its descriptor (/proc/self/fd: where the kernel says it is), so a symlink swapped in between a
check and the read is caught; a FIFO or device swapped in is refused without blocking.
No Dagster here.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import IO


class OutsideRoots(PermissionError):
    """A source's file resolves outside the folders it may read. Nothing of it was read."""


def source_roots(source) -> tuple[str, ...] | None:
    """The folders a source may read (None: anywhere - a project-file source)."""
    return getattr(source, "_read_roots", None)


def inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def check(path: str | Path, roots: tuple[str, ...] | None) -> str:
    """The resolved path; OutsideRoots when it lies under none of `roots` (the message names the path as given, not
    where it leads)."""
    real = os.path.realpath(path)
    if roots is not None and not any(inside(real, root) for root in roots):
        raise OutsideRoots(f"{path} resolves outside the folders this source may read")
    return real


def check_all(paths: list[Path], roots: tuple[str, ...] | None) -> list[Path]:
    for path in paths:
        check(path, roots)
    return paths


def opened_path(fd: int, path: str | Path) -> str:
    """Where an open descriptor's file is (Linux: the kernel's own record of it, so no swap of a name can fool it);
    elsewhere the name resolved now."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return os.path.realpath(path)


def open_regular(path: str | Path, roots: tuple[str, ...] | list | None) -> IO[bytes]:
    """`path` opened for reading, binary, only if the file actually opened is a regular file lying inside `roots`
    (checked on the descriptor: a symlink or folder swapped in at any moment is caught). Opened without blocking, so a
    FIFO swapped in cannot stall the step. OutsideRoots, or OSError for a file that is not regular."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise IsADirectoryError(f"{path} is not a regular file (a folder, pipe or device); not read")
        if roots is not None:
            real = opened_path(fd, path)
            if not any(inside(real, str(root)) for root in roots):
                raise OutsideRoots(f"{path} resolves outside the folders this source may read; not read")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def open_data(path: str | Path, roots: tuple[str, ...] | None) -> IO[bytes]:
    """A source's data file opened for reading in binary; with roots (a manifest's source), through open_regular."""
    return open(path, "rb") if roots is None else open_regular(path, roots)
