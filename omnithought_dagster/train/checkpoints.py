"""Training checkpoints of a run in progress: on the trainer's disk, and mirrored into the store.

The trainer (transformers' Trainer) writes `checkpoint-<step>/` folders (model, optimizer,
scheduler, RNG, data position) under `<run>/checkpoints/`; once every rank has written one, rank
0 adds a `COMPLETE` file (the step, and the examples and tokens seen so far). Only complete
checkpoints are ever resumed from.

`RunCheckpoints` mirrors them into the store under `runs/<checkpoint_id>/checkpoint-<step>/`, so
a run whose machine is gone (a preempted pod, a lost node) resumes elsewhere: `uploading()` is a
thread that copies each new complete checkpoint while training goes on - its files first, the
`COMPLETE` marker last, so an interrupted upload is never taken for a checkpoint - and keeps the
newest `keep`; `restore()` puts the store's newest complete checkpoint into the local run
folder when it is newer than what the disk holds; `delete()` drops the run's checkpoints once its
model is stored. Multi-node runs need the run folder on a filesystem every node writes to (as
the Trainer's own checkpointing does). No Dagster, no torch.
"""

from __future__ import annotations

import re
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

COMPLETE = "COMPLETE"
CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
POLL_S = 1.0  # how often the uploader looks for a new complete checkpoint


def step_of(checkpoint: Path | str) -> int:
    return int(CHECKPOINT.match(Path(checkpoint).name).group(1))


def complete_steps(folder: Path) -> list[int]:
    """The steps of the complete checkpoints in a local run's checkpoints folder, oldest first."""
    if not folder.is_dir():
        return []
    return sorted(step_of(p) for p in folder.iterdir() if CHECKPOINT.match(p.name) and (p / COMPLETE).is_file())


def latest_complete(folder: Path) -> Path | None:
    """The newest training checkpoint every rank finished writing (one marked COMPLETE), or None."""
    steps = complete_steps(folder)
    return folder / f"checkpoint-{steps[-1]}" if steps else None


def remove_incomplete(folder: Path) -> list[str]:
    """Delete what a killed save left: checkpoint folders without COMPLETE, and temporaries. Their names."""
    removed = []
    if folder.is_dir():
        for path in folder.iterdir():
            if (CHECKPOINT.match(path.name) and not (path / COMPLETE).is_file()) or path.name.startswith(".restore-"):
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path.name)
    return removed


class RunCheckpoints:
    """One run's training checkpoints in the store (`store`: a CorpusStore), under runs/<checkpoint_id>/."""

    def __init__(self, store, checkpoint_id: str):
        self.fs = store.fs  # a pyarrow FileSystem
        self.root = store.path("runs", checkpoint_id)
        self.uri = store._uri(self.root)

    def steps(self) -> list[int]:
        """Steps of the complete checkpoints in the store, oldest first (an upload without its marker is not one)."""
        import pyarrow.fs as pafs

        infos = self.fs.get_file_info(pafs.FileSelector(self.root, allow_not_found=True))
        names = [Path(info.path).name for info in infos if info.type == pafs.FileType.Directory and CHECKPOINT.match(Path(info.path).name)]
        complete = self.fs.get_file_info([f"{self.root}/{name}/{COMPLETE}" for name in names])
        return sorted(step_of(name) for name, info in zip(names, complete, strict=True) if info.type == pafs.FileType.File)

    def upload(self, checkpoint: Path) -> int:
        """Copy a complete local checkpoint into the store, its marker last; its size in bytes."""
        import pyarrow.fs as pafs

        target = f"{self.root}/{checkpoint.name}"
        if self.fs.get_file_info(target).type != pafs.FileType.NotFound:
            self.fs.delete_dir(target)  # an interrupted upload of the same step
        local = pafs.LocalFileSystem()
        files = sorted(p for p in checkpoint.rglob("*") if p.is_file() and p.name != COMPLETE)
        for folder in sorted({path.parent.relative_to(checkpoint).as_posix() for path in files} | {"."}):
            self.fs.create_dir(target if folder == "." else f"{target}/{folder}", recursive=True)  # each once
        size = 0
        for path in [*files, checkpoint / COMPLETE]:
            pafs.copy_files(
                str(path.resolve()),
                f"{target}/{path.relative_to(checkpoint).as_posix()}",
                source_filesystem=local,
                destination_filesystem=self.fs,
            )
            size += path.stat().st_size
        return size

    def restore(self, folder: Path, log: Callable[[str], None] = print) -> int | None:
        """Make `folder` (a local run's checkpoints folder) hold the newest complete checkpoint there is, the store's if it
        is newer than the disk's: the step the trainer will resume from, or None. Leftovers of a killed save go first."""
        import pyarrow.fs as pafs

        folder.mkdir(parents=True, exist_ok=True)
        removed = remove_incomplete(folder)
        if removed:
            log(f"removed incomplete training checkpoints {', '.join(sorted(removed))} (a save that did not finish)")
        local = complete_steps(folder)
        stored = self.steps()
        if stored and (not local or stored[-1] > local[-1]):
            step = stored[-1]
            partial = folder / f".restore-{uuid.uuid4().hex[:8]}"
            started = time.monotonic()
            pafs.copy_files(
                f"{self.root}/checkpoint-{step}", str(partial), source_filesystem=self.fs, destination_filesystem=pafs.LocalFileSystem()
            )
            partial.rename(folder / f"checkpoint-{step}")  # whole or not there
            log(f"restored training checkpoint {step} from {self.uri} in {time.monotonic() - started:.1f} s")
            return step
        return local[-1] if local else None

    def prune(self, keep: int | None) -> None:
        """Keep the newest `keep` complete checkpoints in the store (all with None); interrupted uploads go."""
        import pyarrow.fs as pafs

        complete = self.steps()
        kept = set(complete if keep is None else complete[-max(1, keep) :])
        for info in self.fs.get_file_info(pafs.FileSelector(self.root, allow_not_found=True)):
            name = Path(info.path).name
            if info.type == pafs.FileType.Directory and CHECKPOINT.match(name) and step_of(name) not in kept:
                self.fs.delete_dir(info.path)

    def delete(self) -> None:
        import pyarrow.fs as pafs

        if self.fs.get_file_info(self.root).type != pafs.FileType.NotFound:
            self.fs.delete_dir(self.root)

    @contextmanager
    def uploading(
        self, folder: Path, *, keep: int | None = None, log: Callable[[str], None] = print, poll_s: float = POLL_S
    ) -> Iterator[_Uploader]:
        """While the block runs, copy each new complete checkpoint of `folder` into the store (the newest only, when
        several are waiting). If the block fails (the trainer crashed, the step was asked to stop), the newest one is
        copied before the failure goes on, so a rerun anywhere resumes from it."""
        uploader = _Uploader(self, folder, keep, log, poll_s)
        uploader.start()
        try:
            yield uploader
        except BaseException:
            uploader.stop()
            uploader.sync()
            raise
        uploader.stop()


class _Uploader(threading.Thread):
    def __init__(self, run: RunCheckpoints, folder: Path, keep: int | None, log: Callable[[str], None], poll_s: float):
        super().__init__(name="checkpoint-upload", daemon=True)
        self.run_store, self.folder, self.keep, self.log, self.poll_s = run, folder, keep, log, poll_s
        self.uploaded: list[int] = []
        self._halt = threading.Event()
        self._known = set(run.steps())

    def run(self) -> None:
        while not self._halt.wait(self.poll_s):
            self.sync()

    def stop(self) -> None:
        self._halt.set()
        self.join()

    def sync(self) -> None:
        """Upload the newest complete local checkpoint if the store lacks it. An upload that fails (the trainer rotated the
        checkpoint away, the store hiccuped) is logged and retried at the next newer one. Called by the thread, or after
        it stopped: never by both at once."""
        steps = complete_steps(self.folder)
        if not steps or steps[-1] in self._known:
            return
        step = steps[-1]
        started = time.monotonic()
        try:
            size = self.run_store.upload(self.folder / f"checkpoint-{step}")
            self.run_store.prune(self.keep)
        except OSError as exc:  # FileNotFoundError among them
            self.log(f"training checkpoint {step} not copied to the store: {exc}")
            return
        self._known.add(step)
        self.uploaded.append(step)
        self.log(
            f"training checkpoint {step} copied to {self.run_store.uri} ({size / 2**20:.1f} MiB in {time.monotonic() - started:.1f} s)"
        )
