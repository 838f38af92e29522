"""student_checkpoints: the SFT trainer really stepping under DeepSpeed, launched through Pipes; ids, reuse, checks."""

from __future__ import annotations

import json

import pytest

from omnithought_dagster.config import TrainingConfig, load_config
from omnithought_dagster.defs import BASELINE_JOB, FILTER_JOB, SUBSET_JOB, TRAIN_JOB
from omnithought_dagster.store import CorpusStore
from omnithought_dagster.train.launch import checkpoint_id, launcher_command, train_config_hash
from omnithought_dagster.train.trainer import deepspeed_config

from conftest import check_evaluations, materializations, plot_image, rewrite_partition, run_job, run_partition_checks, write_config
from curation_data import build_store

RECIPE = {"name": "even", "size": 12, "difficulty_mix": {"easy": 1, "medium": 1, "hard": 1}, "max_tag_share": 0.5}
TRAINING = {"launcher": "deepspeed", "zero_stage": 2, "micro_batch_size": 4, "learning_rate": 0.005, "max_steps": 8, "max_length": 1024}


SOURCES = [{"name": "synthetic", "kind": "synthetic", "n_samples": 24}]
SFT_STUDENT = {"name": "sft", "model": "tiny:student"}


def sft_first(tmp_path, instance, training: dict, reasoning=None):
    """A small curated project (recipe `even` over 24 synthetic samples; `reasoning` as build_store's) and the sft student
    trained on it - the teacher or the start of the methods built on it: that run's student_checkpoints metadata and the
    checkpoint's local folder."""
    build_store(tmp_path / "store", n_samples=24, reasoning=reasoning)
    config = load_config(write_config(tmp_path, SOURCES, recipes=[RECIPE], students=[SFT_STUDENT], training=training))
    assert run_job(config, instance, FILTER_JOB, "synthetic").success
    assert run_job(config, instance, SUBSET_JOB, "even").success
    first = run_job(config, instance, TRAIN_JOB, "even|sft")
    assert first.success
    sft = materializations(first)["student_checkpoints"]
    return sft, CorpusStore(config.store.root).checkpoints.local_dir(sft["checkpoint_id"], tmp_path / "sft")


def _project(tmp_path, **training):
    build_store(tmp_path / "store", n_samples=24)
    path = write_config(
        tmp_path,
        [{"name": "synthetic", "kind": "synthetic", "n_samples": 24}],
        recipes=[RECIPE],
        students=[{"name": "tiny", "model": "tiny:student"}],
        training={**TRAINING, **training},
    )
    return load_config(path)


@pytest.fixture
def trained(tmp_path, instance):
    """The base and one fine-tuned student of a small curated project."""
    config = _project(tmp_path)
    assert run_job(config, instance, FILTER_JOB, "synthetic").success
    assert run_job(config, instance, SUBSET_JOB, "even").success
    base = run_job(config, instance, BASELINE_JOB, "tiny")
    even = run_job(config, instance, TRAIN_JOB, "even|tiny")
    return config, CorpusStore(config.store.root), base, even


@pytest.mark.slow
def test_training_steps_lowers_the_loss_and_stores_a_loadable_checkpoint(trained, instance):
    config, store, base, even = trained
    assert base.success and even.success
    meta = materializations(even)["student_checkpoints"]
    assert meta["steps"] == 8 and meta["examples"] == 12 and meta["samples_seen"] == 32 and meta["reused"] is False
    assert meta["final_loss"] < meta["initial_loss"] and meta["tokens_per_s"] > 0 and "| step | loss |" in meta["loss_curve"]
    assert plot_image(meta["plot/loss_curve"]) and "training loss" in meta["plot/loss_curve"]
    assert {name: c.passed for name, c in check_evaluations(even).items()} == {"loss_decreased": True, "loads_and_generates": True}
    assert {name: c.passed for name, c in check_evaluations(base).items()} == {"loads_and_generates": True}

    (row,) = store.read_partition("student_checkpoints", {"student": "tiny", "recipe": "even"}).to_pylist()
    subset_version = store.read_partition("subset_members", "even").column("subset_version")[0].as_py()
    assert row["subset_version"] == subset_version and not row["baseline"] and row["launcher"] == "deepspeed x1"
    assert row["checkpoint_id"] == checkpoint_id(row["base_fingerprint"], subset_version, train_config_hash(config.training))
    manifest = store.checkpoints.manifest(row["checkpoint_id"])
    assert manifest["row"]["checkpoint_id"] == row["checkpoint_id"] and manifest["export"]["examples"] == 12
    folder = store.checkpoints.local_dir(row["checkpoint_id"], config.training.work_dir)
    log = json.loads((folder / "train_log.json").read_text())
    assert len(log["losses"]) == 8 and log["deepspeed"]["zero_optimization"]["stage"] == 2
    assert log["steady_tokens_per_s"] > 0 and log["tokens_seen"] > 0  # the rate after the first step, beside the whole loop's

    # The checkpoint round-trips: from_pretrained loads the weights the trainer wrote, and they differ from the base.
    import torch
    from transformers import AutoModelForImageTextToText

    (base_row,) = store.read_partition("student_checkpoints", {"student": "tiny", "recipe": "base"}).to_pylist()
    assert base_row["baseline"] and base_row["subset_version"] is None
    tuned = AutoModelForImageTextToText.from_pretrained(folder).state_dict()
    untrained = AutoModelForImageTextToText.from_pretrained(base_row["uri"]).state_dict()
    assert tuned.keys() == untrained.keys() and any(not torch.equal(tuned[k], untrained[k]) for k in tuned)

    # vLLM serves the checkpoint as it is (the same CPU build that serves the teacher).
    from openai import OpenAI

    from omnithought_dagster.llm.vllm_server import VLLMServer

    from conftest import VLLM_PYTHON

    with VLLMServer(
        str(VLLM_PYTHON),
        str(folder),
        served_model_name="student",
        max_model_len=1024,
        log_dir=folder.parent / "vllm-logs",
        startup_timeout_s=300,
    ) as server:
        reply = OpenAI(base_url=server.base_url, api_key="none").chat.completions.create(
            model="student", messages=[{"role": "user", "content": "How many blocks?"}], max_tokens=8, temperature=0
        )
    assert reply.usage.completion_tokens > 0

    # Same base, subset and settings: nothing is trained again, the stored checkpoint is reported.
    again = run_job(config, instance, TRAIN_JOB, "even|tiny")
    meta = materializations(again)["student_checkpoints"]
    assert again.success and meta["reused"] is True and meta["checkpoint_id"] == row["checkpoint_id"]


@pytest.mark.slow
def test_checks_fail_on_a_rising_loss_and_a_broken_checkpoint(trained, instance):
    config, store, _, even = trained
    assert even.success
    partition = {"student": "tiny", "recipe": "even"}
    rewrite_partition(store, "student_checkpoints", partition, lambda rows: [{**rows[0], "final_loss": rows[0]["initial_loss"] + 1}])
    (row,) = store.read_partition("student_checkpoints", partition).to_pylist()
    weights = store.checkpoints.local_dir(row["checkpoint_id"], config.training.work_dir) / "model.safetensors"
    weights.write_bytes(b"not a safetensors file")
    checks = run_partition_checks(config, instance, "student_checkpoints", "even|tiny")
    assert not checks["loss_decreased"].passed and "loss did not decrease" in checks["loss_decreased"].description
    assert not checks["loads_and_generates"].passed and checks["loads_and_generates"].description
    store.delete_partition("student_checkpoints", partition)
    missing = run_partition_checks(config, instance, "student_checkpoints", "even|tiny")
    assert not missing["loss_decreased"].passed and "missing" in missing["loss_decreased"].description


def test_a_recipe_without_a_subset_fails_clearly(tmp_path, instance):
    config = _project(tmp_path)
    result = run_job(config, instance, TRAIN_JOB, "even|tiny")
    assert not result.success
    failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE")
    assert "materialise sampled_subsets[even] first" in str(failure.event_specific_data.error)


@pytest.mark.slow
def test_a_failing_trainer_fails_the_step_with_its_own_last_lines(tmp_path, instance):
    """Pipes reports only "External execution process failed with code 1": the step's error carries what the trainer said."""
    config = _project(tmp_path, max_length=16)  # every example's prompt is longer: nothing to train on
    assert run_job(config, instance, FILTER_JOB, "synthetic").success and run_job(config, instance, SUBSET_JOB, "even").success
    result = run_job(config, instance, TRAIN_JOB, "even|tiny")
    failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE")
    message = failure.event_specific_data.error.message
    assert "the trainer failed" in message and "no trainable examples" in message and "'prompt_over_max_length': 12" in message


def test_checkpoint_ids_name_what_the_weights_depend_on():
    settings = TrainingConfig()
    assert checkpoint_id("base", "v1", train_config_hash(settings)) != checkpoint_id("base", "v2", train_config_hash(settings))
    assert train_config_hash(settings) != train_config_hash(settings.model_copy(update={"learning_rate": 0.1}))
    # Placement is not part of the id: the same run on more GPUs or another port is the same checkpoint.
    assert train_config_hash(settings) == train_config_hash(settings.model_copy(update={"nproc_per_node": 8, "master_port": 2000}))
    assert checkpoint_id("base", None, None) != checkpoint_id("base", "v1", train_config_hash(settings))


def test_launcher_commands_for_one_process_gpus_and_nodes(tmp_path):
    spec = tmp_path / "spec.json"
    one = launcher_command(TrainingConfig(master_port=29600), spec)
    assert one[1:] == [
        "-m",
        "deepspeed.launcher.runner",
        "--num_gpus",
        "1",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        "29600",
        "--module",
        "omnithought_dagster.train.sft",
        "--spec",
        str(spec),
    ]
    nodes = launcher_command(TrainingConfig(nproc_per_node=8, nnodes=4, hostfile=str(tmp_path / "hosts"), master_port=29600), spec)
    assert nodes[nodes.index("--num_gpus") + 1] == "8" and nodes[nodes.index("--num_nodes") + 1] == "4" and "--hostfile" in nodes
    torchrun = launcher_command(TrainingConfig(launcher="torchrun", nproc_per_node=2, master_port=29600, python="/env/bin/python"), spec)
    assert torchrun[:3] == ["/env/bin/python", "-m", "torch.distributed.run"] and torchrun[torchrun.index("--nproc_per_node") + 1] == "2"


def test_deepspeed_config_follows_the_settings():
    """ZeRO and offload are DeepSpeed's; batch sizes, clipping, precision and the schedule are the Trainer's ("auto")."""
    settings = TrainingConfig(
        zero_stage=3, offload_optimizer=True, precision="bf16", micro_batch_size=2, gradient_accumulation_steps=4, warmup_steps=5
    ).run_settings()
    config = deepspeed_config(settings)
    assert config["zero_optimization"]["stage"] == 3 and config["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"]
    assert config["train_micro_batch_size_per_gpu"] == config["gradient_accumulation_steps"] == config["bf16"]["enabled"] == "auto"
    assert config["optimizer"]["type"] == "AdamW" and "scheduler" not in config  # DeepSpeed's CPU Adam, the Trainer's schedule
    plain = deepspeed_config(TrainingConfig().run_settings())
    assert "optimizer" not in plain and "offload_optimizer" not in plain["zero_optimization"]


@pytest.mark.slow
def test_trainer_runs_zero3_over_two_processes_with_torchrun(tmp_path):
    """The trainer alone (no Dagster): two ranks, ZeRO-3, weights gathered for saving; run by hand it prints instead of reporting."""
    import os
    import subprocess

    from PIL import Image

    from omnithought_dagster.models.tiny import TINY_STUDENT, build_tiny_model
    from omnithought_dagster.train.launch import training_spec

    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    records = []
    for i in range(8):
        Image.new("RGB", (56 + 8 * i, 56), (30 * i, 100, 200)).save(data / f"images/{i}.png")
        records.append(
            {
                "id": f"e{i}",
                "images": [f"images/{i}.png"],
                "messages": [
                    {"role": "user", "content": f"<image>\nHow many blocks are there? ({i})"},
                    {"role": "assistant", "content": f"<think>\nI count {i} blocks.\n</think>\n\nAnswer: {i}"},
                ],
            }
        )
    (data / "data.json").write_text(json.dumps(records))
    model = build_tiny_model(TINY_STUDENT, tmp_path / "student")
    settings = TrainingConfig(launcher="torchrun", nproc_per_node=2, zero_stage=3, micro_batch_size=2, max_steps=6, learning_rate=0.01)
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps(training_spec(str(model), data, tmp_path / "out", settings)))
    done = subprocess.run(
        launcher_command(settings, spec),
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "rank 0/2: 8 examples" in done.stdout and "training: 6/6 steps (100%)" in done.stdout
    log = json.loads((tmp_path / "out/train_log.json").read_text())
    assert log["world_size"] == 2 and log["samples_seen"] == 6 * 2 * 2 and log["deepspeed"]["zero_optimization"]["stage"] == 3
    from transformers import AutoModelForImageTextToText

    assert AutoModelForImageTextToText.from_pretrained(tmp_path / "out").num_parameters() > 0
