"""Every stage that runs a model or a subprocess, SIGKILLed mid-work and run again: judging (annotations),
training (student_checkpoints, sft and a distillation method) and evaluation (benchmark_scores).
(Generation: test_teacher_asset.py; the vLLM
server a step starts: test_llm_backends.py.)

The run is killed as the OOM killer or a preempted machine would: SIGKILL of the process that runs the step, no
cleanup code of it runs. Then nothing it started is left running, nothing half-written is visible, and a rerun
writes exactly the rows an uninterrupted run writes, none twice, redoing at most the unflushed work."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
from test_scores import _project as scores_project
from test_student import RECIPE, SOURCES, TRAINING
from test_student import _project as student_project

from omnithought_dagster.annotate.annotations import ANNOTATION_CACHE
from omnithought_dagster.assets.student import expected_checkpoint_id
from omnithought_dagster.config import load_config
from omnithought_dagster.defs import ANNOTATE_JOB, BASELINE_JOB, FILTER_JOB, SCORE_JOB, SEED_JOB, SUBSET_JOB, TEACHER_JOB, TRAIN_JOB
from omnithought_dagster.store import CorpusStore
from omnithought_dagster.train.checkpoints import RunCheckpoints
from omnithought_dagster.train.launch import TRAIN_MODULE

from conftest import assert_none_left, materializations, requests_served, run_job, served_config, start_run, wait_for_process, write_config
from curation_data import build_store

pytestmark = pytest.mark.slow
PARTITION = "000|synthetic"


def _kill(run) -> None:
    run.kill()  # SIGKILL of the step's process alone: what it started must end by itself
    run.wait(timeout=30)


def test_judging_killed_mid_shard_resumes_from_its_cache(vllm_server, instance, tmp_path):
    flush, concurrency = 4, 2
    judge = {
        "backend": "openai",
        "base_url": vllm_server.base_url,
        "model": "tiny-teacher-test",
        "name": "tiny-judge",
        "max_retries": 1,
        "max_concurrency": concurrency,
    }
    config = served_config(
        tmp_path,
        vllm_server.base_url,
        n_samples=12,
        generation={"shards": 1},
        judge=judge,
        annotation={"max_tokens": 160, "temperature": 1.0, "flush_every": flush},
    )
    assert run_job(config, instance, SEED_JOB, "synthetic").success
    assert run_job(config, instance, TEACHER_JOB, PARTITION).success
    store = CorpusStore(config.store.root)
    traces = store.read_partition("cot_traces", {"source": "synthetic", "shard": "000"}).num_rows
    assert traces == 48
    cache = store.cache(ANNOTATION_CACHE)
    partition = {"source": "synthetic", "shard": "000"}

    before = requests_served(vllm_server)
    run = start_run(config, instance, ANNOTATE_JOB, PARTITION)
    deadline = time.monotonic() + 300
    while cache.batch_count(partition) < 3:
        assert run.poll() is None, "the run ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.05)
    _kill(run)
    time.sleep(1)  # requests the server was still answering finish
    answered = requests_served(vllm_server) - before
    cached = len(cache.load(partition))
    assert 3 * flush <= cached < traces and cached % flush == 0  # whole flush batches survived, the shard was not done
    assert answered - cached <= flush + concurrency  # what was answered but not flushed: under a batch and the requests in flight
    assert not store.has_partition("annotations", partition)

    before = requests_served(vllm_server)
    result = run_job(config, instance, ANNOTATE_JOB, PARTITION)
    assert result.success
    assert requests_served(vllm_server) - before == traces - cached  # only what the killed run had not flushed
    meta = materializations(result)["annotations"]
    assert meta["cache_hits"] == cached and meta["requests_sent"] == traces - cached
    rows = store.read_partition("annotations", partition)
    assert rows.num_rows == traces and len(set(rows.column("annotation_id").to_pylist())) == traces
    assert set(rows.column("trace_id").to_pylist()) == set(store.read_partition("cot_traces", partition).column("trace_id").to_pylist())


def _train_until_a_checkpoint_is_stored_then_kill(config, instance, student: str):
    """Curate recipe `even`, start training `student` on it, SIGKILL the step once a training checkpoint is in the store;
    nothing it started may be left. Returns (store, the checkpoint id, its stored training checkpoints)."""
    assert run_job(config, instance, FILTER_JOB, "synthetic").success
    assert run_job(config, instance, SUBSET_JOB, "even").success
    store = CorpusStore(config.store.root)
    ckpt = expected_checkpoint_id(config, store, student, "even")
    stored = RunCheckpoints(store, ckpt)
    run = start_run(config, instance, TRAIN_JOB, f"even|{student}")
    wait_for_process(TRAIN_MODULE, str(config.training.work_dir), run=run)  # the trainer started
    deadline = time.monotonic() + 300
    while not stored.steps():  # ... saved a complete training checkpoint, and the step copied it to the store
        assert run.poll() is None, "the run ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.05)
    _kill(run)
    assert_none_left(str(config.training.work_dir))  # launcher and ranks went with the step
    return store, ckpt, stored


def test_training_killed_mid_run_leaves_no_trainer_and_resumes_on_another_machine_from_the_stored_checkpoint(tmp_path, instance):
    config = student_project(tmp_path, max_steps=120, save_steps=10)
    store, ckpt, stored = _train_until_a_checkpoint_is_stored_then_kill(config, instance, "tiny")
    assert not store.has_partition("student_checkpoints", {"student": "tiny", "recipe": "even"})
    assert store.checkpoints.manifest(ckpt) is None and not store.checkpoints.exists(ckpt)
    last = stored.steps()[-1]
    assert 10 <= last < 120 and last % 10 == 0
    shutil.rmtree(config.training.work_dir)  # the rerun lands on a machine without the killed run's disk

    result = run_job(config, instance, TRAIN_JOB, "even|tiny")
    assert result.success
    meta = materializations(result)["student_checkpoints"]
    assert meta["resumed_from_step"] >= last and meta["steps"] == 120 and meta["reused"] is False  # as many steps as one whole run
    log = json.loads((store.checkpoints.local_dir(ckpt, tmp_path / "fetched") / "train_log.json").read_text())
    assert len(log["losses"]) == 120 and log["samples_seen"] == 120 * config.training.micro_batch_size
    rows = store.read_partition("student_checkpoints", {"student": "tiny", "recipe": "even"}).to_pylist()
    assert [row["checkpoint_id"] for row in rows] == [ckpt] and store.checkpoints.manifest(ckpt)["row"]["checkpoint_id"] == ckpt
    assert not (Path(config.training.work_dir) / ckpt).exists() and stored.steps() == []  # nothing stays after success


def test_a_distillation_run_killed_mid_run_leaves_no_trainer_and_resumes_its_masking_budget(tmp_path, instance):
    """prefix_mask_kd (a teacher model beside the student, a budget paced step by step): SIGKILLed once a training
    checkpoint is stored, nothing it started is left; the rerun on a clean disk goes on with the budget where it was (a
    fresh schedule would warm up again from 0)."""
    build_store(tmp_path / "store", n_samples=24)
    student = {
        "name": "masked",
        "model": "tiny:student",
        "method": "prefix_mask_kd",
        "prefix_mask_kd": {"teacher": "tiny:teacher", "warmup_steps": 2, "growth": 0.05, "tolerance": 2.0},
    }
    config = load_config(
        write_config(tmp_path, SOURCES, recipes=[RECIPE], students=[student], training={**TRAINING, "max_steps": 80, "save_steps": 10})
    )
    store, ckpt, stored = _train_until_a_checkpoint_is_stored_then_kill(config, instance, "masked")
    assert store.checkpoints.manifest(ckpt) is None
    last = stored.steps()[-1]
    shutil.rmtree(config.training.work_dir)

    result = run_job(config, instance, TRAIN_JOB, "even|masked")
    assert result.success
    meta = materializations(result)["student_checkpoints"]
    assert meta["resumed_from_step"] >= last and meta["steps"] == 80
    budgets = json.loads((store.checkpoints.local_dir(ckpt, tmp_path / "fetched") / "train_log.json").read_text())["mask_budgets"]
    assert len(budgets) == 80 and budgets[last - 1] > 0  # the killed run had started masking
    assert all(a <= b for a, b in zip(budgets, budgets[1:], strict=False))  # and the rerun did not start again from 0


def test_evaluation_killed_mid_run_leaves_no_evaluator_and_no_scores_then_scores_again(tmp_path, instance):
    config = scores_project(tmp_path)
    for job, partition in [(FILTER_JOB, "synthetic"), (SUBSET_JOB, "even"), (BASELINE_JOB, "tiny")]:
        assert run_job(config, instance, job, partition).success, (job, partition)
    store = CorpusStore(config.store.root)
    run = start_run(config, instance, SCORE_JOB, "base|tiny")
    wait_for_process("lmms_eval", str(config.evaluation.work_dir), run=run)
    time.sleep(3)
    _kill(run)
    assert_none_left(str(config.evaluation.work_dir))
    partition = {"student": "tiny", "recipe": "base"}
    assert not store.has_partition("benchmark_scores", partition)

    result = run_job(config, instance, SCORE_JOB, "base|tiny")
    assert result.success
    rows = store.read_partition("benchmark_scores", partition).to_pylist()
    keys = [(row["checkpoint_id"], row["benchmark"], row["metric"], row["slice"]) for row in rows]
    assert rows and len(keys) == len(set(keys))
    assert {row["benchmark"] for row in rows} == {"held"}
