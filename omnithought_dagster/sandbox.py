"""`omnithought sandbox-teacher`: train the sandbox teacher (models/sandbox.py) with the project's own trainer - the
tiny base model, the worked solutions, train/sft.py under DeepSpeed as a student is trained, in a process group that
dies with this one - into the models folder, where `tiny:sandbox-teacher` then resolves."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from omnithought_dagster.models.sandbox import SANDBOX_BASE, SandboxRecipe, is_built, training_records
from omnithought_dagster.models.tiny import MANIFEST, build_tiny_model, swap_into_place
from omnithought_dagster.processes import guarded
from omnithought_dagster.train.launch import launcher_command, training_spec
from omnithought_dagster.train.settings import TrainingConfig


def build_sandbox_teacher(recipe: SandboxRecipe, folder: str | Path, say: Callable[[str], None] = lambda line: None) -> Path:
    """Train the sandbox teacher into `folder` unless a build of the same recipe is there (minutes on 2 CPU cores)."""
    folder = Path(folder)
    if is_built(recipe, folder):
        return folder
    base = build_tiny_model(SANDBOX_BASE, folder.parent / SANDBOX_BASE.name)
    staging = folder.parent / f".{folder.name}.{uuid.uuid4().hex}.tmp"
    try:
        data = staging / "data"
        records = training_records(recipe, data / "images")
        (data / "data.json").write_text(json.dumps(records, ensure_ascii=False))
        training = TrainingConfig(
            python=sys.executable,
            micro_batch_size=recipe.micro_batch_size,
            learning_rate=recipe.learning_rate,
            warmup_steps=recipe.warmup_steps,
            lr_scheduler="cosine",
            max_steps=recipe.max_steps,
            max_length=recipe.max_length,
            zero_stage=0,
            seed=recipe.seed,
            work_dir=str(staging / "work"),
        )
        spec_path = staging / "spec.json"
        out = staging / "model"
        spec_path.write_text(json.dumps(training_spec(str(base), data, out, training, run_dir=staging / "run")))
        say(f"sandbox teacher: training {recipe.name} on {len(records)} worked solutions, {recipe.max_steps} steps")
        log = staging / "train.log"
        with log.open("w") as sink:
            done = subprocess.run(
                guarded(launcher_command(training, spec_path)),
                stdout=sink,
                stderr=subprocess.STDOUT,
                env={**os.environ, "OMP_NUM_THREADS": "2", "TOKENIZERS_PARALLELISM": "false"},
                start_new_session=True,
                check=False,
            )
        if done.returncode != 0 or not any(out.glob("*.safetensors")):
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
            raise RuntimeError(f"the sandbox teacher's training failed (exit {done.returncode}):\n{tail}")
        for name in ("chat_template.json", "preprocessor_config.json"):  # what the trainer's save may leave out
            if (base / name).exists() and not (out / name).exists():
                shutil.copy(base / name, out / name)
        (out / MANIFEST).write_text(json.dumps({"recipe": asdict(recipe), "fingerprint": recipe.fingerprint}, indent=2))
        swap_into_place(out, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder
