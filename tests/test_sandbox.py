"""The sandbox teacher (models/sandbox.py): its training records are asked exactly as the teacher stage asks and answered in
the reply form the teacher stage parses; a build with the project's trainer is cached by its recipe; `tiny:sandbox-teacher`
resolves like the tiny models."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from omnithought_dagster.curation.export import conversation
from omnithought_dagster.models.resolve import SANDBOX_TEACHER_KEY, built_model, resolve_model
from omnithought_dagster.models.sandbox import SANDBOX_TEACHER, SandboxTeacherMissing, is_built, training_records
from omnithought_dagster.sandbox import build_sandbox_teacher
from omnithought_dagster.teacher.prompt import parse_reply, teacher_prompt
from omnithought_dagster.teacher.settings import GenerationConfig


def test_the_records_ask_as_the_teacher_stage_asks_and_answer_in_its_reply_form(tmp_path):
    recipe = replace(SANDBOX_TEACHER, samples=24)
    records = training_records(recipe, tmp_path / "images")
    prompt = teacher_prompt(GenerationConfig(), "json")
    assert len(records) == 24 and len({r["id"] for r in records}) == 24
    for record in records:
        system, user, reply = record["messages"]
        assert system == {"role": "system", "content": prompt.config.system}
        assert user["content"].startswith("<image>") and "Reply with a JSON object" in user["content"]
        parsed = parse_reply(reply["content"], GenerationConfig().answer_pattern)
        assert parsed.form == "json" and parsed.final_answer and parsed.reasoning
        assert (tmp_path / "images" / f"{record['id']}.png").exists()
        messages, images = conversation(record)  # what the trainer reads: the system turn kept
        assert [m["role"] for m in messages] == ["system", "user", "assistant"] and len(images) == 1
    # the worked solutions come from the with_content variant, with a seed no sandbox source uses by default
    assert all(r["id"].split("-")[-2] == str(recipe.data_seed) for r in records)
    assert any("The table's rows" in r["messages"][1]["content"] for r in records)


def test_the_sandbox_teacher_resolves_like_a_tiny_model(tmp_path):
    built = built_model(f"tiny:{SANDBOX_TEACHER_KEY}")
    assert built.name == SANDBOX_TEACHER.name and built.fingerprint == SANDBOX_TEACHER.fingerprint
    assert replace(SANDBOX_TEACHER, max_steps=10).fingerprint != SANDBOX_TEACHER.fingerprint
    with pytest.raises(ValueError, match="sandbox-teacher"):
        resolve_model("tiny:nope", tmp_path)
    with pytest.raises(SandboxTeacherMissing, match="omnithought sandbox-teacher"):  # resolving never trains
        resolve_model("tiny:sandbox-teacher", tmp_path)


@pytest.mark.slow
def test_a_short_build_trains_with_the_projects_trainer_and_is_reused(tmp_path):
    recipe = replace(SANDBOX_TEACHER, samples=48, max_steps=6, micro_batch_size=8, name="sandbox-short")
    said = []
    folder = build_sandbox_teacher(recipe, tmp_path / recipe.name, say=said.append)
    assert is_built(recipe, folder) and said
    log = json.loads((folder / "train_log.json").read_text())
    assert log["steps"] == 6 and log["final_loss"] < log["initial_loss"]
    assert (folder / "chat_template.json").exists() and (folder / "preprocessor_config.json").exists()
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    said.clear()
    assert build_sandbox_teacher(recipe, folder, say=said.append) == folder and not said  # the same recipe: reused
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp
    assert not is_built(replace(recipe, max_steps=7), folder)  # another recipe: rebuilt
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert leftovers == []  # the staging folder is gone
