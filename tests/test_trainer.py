"""The training process's parts: the lazy example index and its over-length policy, what freezing and LoRA train
(a real run of the trainer), and the settings' coherence. Training checkpoints and the store: test_run_checkpoints.py."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest
from PIL import Image
from pydantic import ValidationError

from omnithought_dagster.config import StudentConfig, TrainingConfig
from omnithought_dagster.train.launch import launcher_command, master_port, resolve_student, training_spec
from omnithought_dagster.train.trainer import part_of, shm_buffers

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def student():
    from omnithought_dagster.models.vl_chat import VLTokenizer

    model_dir, _ = resolve_student(StudentConfig(name="t", model="tiny:student"), REPO / ".cache" / "models")
    return model_dir, VLTokenizer.load(model_dir)


def _export(folder: Path, replies: list[str], size=(64, 64), missing_image: int | None = None) -> Path:
    (folder / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for i, reply in enumerate(replies):
        if i != missing_image:
            Image.new("RGB", size, (20 * i % 255, 90, 160)).save(folder / f"images/{i}.png")
        records.append(
            {
                "id": f"e{i}",
                "images": [f"images/{i}.png"],
                "messages": [{"role": "user", "content": f"<image>\nHow many blocks? ({i})"}, {"role": "assistant", "content": reply}],
            }
        )
    (folder / "data.json").write_text(json.dumps(records))
    return folder


def test_the_index_keeps_what_fits_and_counts_what_it_sets_aside(student, tmp_path):
    from omnithought_dagster.train.data import ExampleIndex, LazyExamples, build_index

    _, vl = student
    replies = ["<think>short</think>\nAnswer: 1", "<think>" + "long reasoning " * 60 + "</think>\nAnswer: 2", "<think>x</think>\nAnswer: 3"]
    data = _export(tmp_path / "data", replies, missing_image=2)
    skip = build_index(data, tmp_path / "skip", vl, max_length=120, overlong="skip")
    assert len(skip.offsets) == 1 and dict(skip.skipped) == {"over_max_length": 1, "unreadable_record": 1} and skip.records == 3
    cut = build_index(data, tmp_path / "cut", vl, max_length=120, overlong="truncate_reply")
    assert len(cut.offsets) == 2 and dict(cut.skipped) == {"unreadable_record": 1} and list(cut.lengths)[1] == 120
    tiny = build_index(data, tmp_path / "tiny", vl, max_length=40, overlong="truncate_reply")  # the image alone does not fit
    assert not tiny.offsets and tiny.skipped["prompt_over_max_length"] == 2

    examples = LazyExamples(ExampleIndex.load(tmp_path / "cut"), vl, 120)
    first, second = examples[0], examples[1]
    assert len(second["input_ids"]) == 120 and second["vision"]["image_grid_thw"].shape[0] == 1  # reply cut, image whole
    assert len(first["input_ids"]) == list(cut.lengths)[0] and first["labels"][-1] != -100


def test_model_parts_for_freezing(student):
    assert part_of("model.visual.blocks.0.attn.qkv.weight") == "vision_tower"
    assert part_of("model.visual.patch_embed.proj.weight") == "vision_tower"
    assert part_of("model.visual.merger.mlp.0.weight") == "projector"
    assert part_of("model.visual.deepstack_merger_list.0.norm.weight") == "projector"
    assert part_of("model.language_model.layers.0.mlp.up_proj.weight") == part_of("lm_head.weight") == "language_model"


def test_incoherent_settings_are_refused():
    with pytest.raises(ValidationError, match="nothing to train"):
        TrainingConfig(freeze_vision_tower=True, freeze_projector=True, freeze_language_model=True)
    with pytest.raises(ValidationError, match="lora with zero_stage 3"):
        TrainingConfig(lora={"r": 4}, zero_stage=3)
    with pytest.raises(ValidationError, match="eval_steps needs eval_share"):
        TrainingConfig(eval_steps=5)
    with pytest.raises(ValidationError, match="engine torch runs under launcher torchrun"):
        TrainingConfig(engine="torch")  # the deepspeed launcher
    with pytest.raises(ValidationError, match="without offload_optimizer"):
        TrainingConfig(engine="torch", launcher="torchrun", offload_optimizer=True)
    assert TrainingConfig(engine="torch", launcher="torchrun").process_settings()["engine"] == "torch"


@pytest.mark.slow
def test_lora_and_a_frozen_vision_tower_train_only_what_they_should(student, tmp_path):
    """A real run: LoRA on the language model, vision tower frozen, held-out loss. The saved model is the merged one (and the
    adapter beside it); the vision tower's weights did not move, the language model's did; the schedule decayed."""
    import torch
    from safetensors.torch import load_file

    model_dir, _ = student
    data = _export(tmp_path / "data", [f"<think>I count {i} blocks.</think>\nAnswer: {i}" for i in range(10)])
    settings = TrainingConfig(
        max_steps=6,
        micro_batch_size=2,
        learning_rate=0.05,
        max_length=256,
        warmup_steps=2,
        lr_scheduler="linear",
        freeze_vision_tower=True,
        lora={"r": 4, "alpha": 8, "dropout": 0.0},
        eval_share=0.2,
        eval_steps=3,
    )
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps(training_spec(model_dir, data, tmp_path / "out", settings, run_dir=tmp_path / "run")))
    command = launcher_command(settings, spec)
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "rank 0/1: 8 examples, 2 held out" in done.stdout
    # DeepSpeed's CPU allreduce buffer (66 MB of /dev/shm) went with the run: DeepSpeed itself never unlinks it
    assert shm_buffers(settings.master_addr, master_port(command)) == []
    log = json.loads((tmp_path / "out/train_log.json").read_text())
    assert log["frozen"] == ["vision_tower"] and log["lora"]["r"] == 4 and [e["step"] for e in log["eval"]] == [3, 6]
    rates = log["learning_rates"]
    assert rates[0] < rates[1] and rates[-1] < rates[1]  # warmup, then linear decay
    assert (tmp_path / "out/adapter/adapter_config.json").is_file()
    before, after = load_file(Path(model_dir) / "model.safetensors"), load_file(tmp_path / "out/model.safetensors")
    assert set(before) == set(after)  # merged: the base's own tensors, no adapter tensors
    moved = {part_of(name) for name in before if not torch.equal(before[name], after[name])}
    assert moved == {"language_model"}


def test_deepspeeds_shared_memory_buffers_of_killed_runs_are_swept_and_live_ones_kept(monkeypatch, tmp_path):
    """A run SIGKILLed with its step leaves its ranks' buffers behind (nobody is left to unlink them): the next training
    step sweeps those that are old and that no live process maps; a run still starting (young) or running (mapped) keeps
    its own."""
    import mmap

    from omnithought_dagster.train import trainer

    monkeypatch.setattr(trainer, "SHM_DIR", tmp_path)  # a folder of our own, named like /dev/shm's files
    monkeypatch.setattr(trainer, "_mapped_shm", lambda: {str(tmp_path / f"{trainer.SHM_PREFIX}_{os.getuid()}_127.0.0.1_2_0")})

    def buffer(port: int, rank: int, age_s: float, uid: int = os.getuid()) -> Path:
        path = tmp_path / f"{trainer.SHM_PREFIX}_{uid}_127.0.0.1_{port}_{rank}"
        path.write_bytes(b"\0" * mmap.PAGESIZE)
        os.utime(path, (time.time() - age_s, time.time() - age_s))
        return path

    killed = [buffer(1, 0, 3600), buffer(1, 1, 3600)]
    live = buffer(2, 0, 3600)  # mapped by a running rank
    starting = buffer(3, 0, 5)  # created, not mapped yet
    other_user = buffer(4, 0, 3600, uid=os.getuid() + 1)
    assert trainer.shm_buffers("127.0.0.1", 1) == killed and trainer.shm_buffers("127.0.0.1", 1, rank=1) == killed[1:]
    assert trainer.sweep_shm_buffers() == 2
    assert [p.exists() for p in (*killed, live, starting, other_user)] == [False, False, True, True, True]
    assert trainer.remove_shm_buffers("127.0.0.1", 2) == 1 and not live.exists()


def test_the_shared_memory_a_process_maps_is_seen():
    from multiprocessing import shared_memory

    from omnithought_dagster.train.trainer import _mapped_shm

    segment = shared_memory.SharedMemory(create=True, size=4096)
    try:
        assert f"/dev/shm/{segment.name}" in _mapped_shm()
    finally:
        segment.close()
        segment.unlink()
