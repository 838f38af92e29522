"""Reading a source's files only inside the folders it was granted (a manifest's source: sources/manifests.py).

A source from the project file is trusted and reads anywhere (`roots` None). A source from a manifest carries its
granted roots, resolved; its reader checks every file it lists (a glob's matches, a folder's files, the data files a
`datasets` folder's state.json or dataset_dict.json names) and opens each through `open_data`, which checks the file it
actually opened: the name is resolved (symlinks followed) and must lie inside a root, and the opened file must be the
one that name resolves to (same device and inode), so a symlink swapped in between a check and the read is caught.
No Dagster here.
"""

from __future__ import annotations

import os
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
    """The resolved path; OutsideRoots when it lies under none of `roots`."""
    real = os.path.realpath(path)
    if roots is not None and not any(inside(real, root) for root in roots):
        raise OutsideRoots(f"{path} resolves to {real}, outside the folders this source may read ({', '.join(roots) or 'none'})")
    return real


def check_all(paths: list[Path], roots: tuple[str, ...] | None) -> list[Path]:
    for path in paths:
        check(path, roots)
    return paths


def open_data(path: str | Path, roots: tuple[str, ...] | None) -> IO[bytes]:
    """`path` opened for reading in binary; with roots, only if what was opened lies inside them."""
    handle = open(path, "rb")
    if roots is None:
        return handle
    try:
        real = check(path, roots)
        opened, named = os.fstat(handle.fileno()), os.stat(real)
        if (opened.st_dev, opened.st_ino) != (named.st_dev, named.st_ino):
            raise OutsideRoots(f"{path} changed while it was opened (a symlink swapped?); not read")
    except BaseException:
        handle.close()
        raise
    return handle
