"""Training checkpoints mirrored into the store (train/checkpoints.py): what counts as a checkpoint, which one a rerun
resumes from (the disk's or the store's), the uploader beside a running trainer. On S3: test_s3.py."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from omnithought_dagster.store import CorpusStore
from omnithought_dagster.train.checkpoints import COMPLETE, RunCheckpoints, complete_steps, latest_complete, remove_incomplete


def _checkpoint(folder: Path, step: int, complete: bool = True, payload: str = "weights") -> Path:
    """A training checkpoint as the trainer leaves it (a nested folder, like DeepSpeed's global_step<N>/)."""
    path = folder / f"checkpoint-{step}"
    (path / f"global_step{step}").mkdir(parents=True)
    (path / "model.safetensors").write_text(f"{payload} {step}")
    (path / f"global_step{step}" / "optim_states.pt").write_text(f"optimizer {step}")
    if complete:
        (path / COMPLETE).write_text(json.dumps({"step": step, "samples": 4 * step, "tokens": 100 * step}))
    return path


@pytest.fixture
def run(tmp_path):
    return RunCheckpoints(CorpusStore(str(tmp_path / "store")), "c" * 32)


def test_only_checkpoints_every_rank_finished_count(tmp_path):
    folder = tmp_path / "checkpoints"
    assert latest_complete(folder) is None
    for step, complete in [(4, True), (8, True), (12, False)]:
        _checkpoint(folder, step, complete)
    (folder / "checkpoint-x").mkdir()
    (folder / "tmp-checkpoint-16").mkdir()
    assert latest_complete(folder).name == "checkpoint-8" and complete_steps(folder) == [4, 8]
    assert remove_incomplete(folder) == ["checkpoint-12"] and not (folder / "checkpoint-12").exists()


def test_an_upload_without_its_marker_is_no_checkpoint(run, tmp_path):
    local = tmp_path / "local"
    run.upload(_checkpoint(local, 5))
    assert run.steps() == [5]
    stored = Path(run.root)
    assert (stored / "checkpoint-5/global_step5/optim_states.pt").read_text() == "optimizer 5"
    assert json.loads((stored / "checkpoint-5" / COMPLETE).read_text())["samples"] == 20
    # An upload interrupted before its marker (the step was killed mid-copy): files there, no marker.
    (stored / "checkpoint-10").mkdir()
    (stored / "checkpoint-10/model.safetensors").write_text("half")
    assert run.steps() == [5]
    fresh = tmp_path / "fresh"
    assert run.restore(fresh, log=lambda m: None) == 5 and complete_steps(fresh) == [5]
    run.prune(keep=2)  # interrupted uploads go, complete ones stay
    assert sorted(p.name for p in stored.iterdir()) == ["checkpoint-5"]


def test_a_rerun_resumes_from_the_newer_of_the_disk_and_the_store(run, tmp_path):
    messages = []
    local = tmp_path / "run" / "checkpoints"
    assert run.restore(local, log=messages.append) is None  # nothing anywhere: a fresh start
    for step in (10, 20):
        run.upload(_checkpoint(tmp_path / "elsewhere", step))
    _checkpoint(local, 10)
    _checkpoint(local, 30, complete=False)  # a save the kill cut short
    assert run.restore(local, log=messages.append) == 20  # the store's is newer
    assert complete_steps(local) == [10, 20] and not (local / "checkpoint-30").exists()
    assert (local / "checkpoint-20/global_step20/optim_states.pt").read_text() == "optimizer 20"
    assert not [p for p in local.iterdir() if p.name.startswith(".restore-")]
    assert any("incomplete" in m and "checkpoint-30" in m for m in messages) and any(
        "restored training checkpoint 20" in m for m in messages
    )
    _checkpoint(local, 40)
    assert run.restore(local, log=messages.append) == 40  # the disk's is newer: nothing fetched
    assert complete_steps(local) == [10, 20, 40]
    run.delete()
    assert run.steps() == [] and not Path(run.root).exists()


def test_the_uploader_copies_each_new_complete_checkpoint_and_keeps_the_newest(run, tmp_path):
    local = tmp_path / "checkpoints"
    local.mkdir()
    messages = []
    with run.uploading(local, keep=2, log=messages.append, poll_s=0.02) as uploader:
        for step in (5, 10, 15):
            _checkpoint(local, step, complete=False)
            time.sleep(0.1)
            assert step not in run.steps()  # not before every rank wrote it
            (local / f"checkpoint-{step}" / COMPLETE).write_text(json.dumps({"step": step}))
            _wait(lambda step=step: step in run.steps())
    assert run.steps() == [10, 15] and uploader.uploaded == [5, 10, 15]
    assert sum("copied to" in m for m in messages) == 3


def test_a_failed_block_uploads_the_newest_checkpoint_before_failing(run, tmp_path):
    local = tmp_path / "checkpoints"
    with pytest.raises(RuntimeError, match="trainer crashed"):
        with run.uploading(local, log=lambda m: None, poll_s=3600):  # the thread never gets to it
            _checkpoint(local, 7)
            raise RuntimeError("trainer crashed")
    assert run.steps() == [7]


def test_a_checkpoint_rotated_away_mid_upload_is_skipped_not_fatal(run, tmp_path, monkeypatch):
    local = tmp_path / "checkpoints"
    _checkpoint(local, 3)
    messages = []
    real_upload = RunCheckpoints.upload

    def rotated(self, checkpoint):
        import shutil

        shutil.rmtree(checkpoint)  # the trainer's save_total_limit deleted it meanwhile
        return real_upload(self, checkpoint)

    monkeypatch.setattr(RunCheckpoints, "upload", rotated)
    with run.uploading(local, log=messages.append, poll_s=3600) as uploader:
        uploader.sync()
    assert run.steps() == [] and any("not copied to the store" in m for m in messages)


def _wait(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)
