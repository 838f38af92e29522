"""Everything about a training run that is decided before it starts: ids, the spec, the launcher line.

No Dagster here: the student_checkpoints asset calls these and hands the command to Pipes.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from omnithought_dagster.config import StudentConfig, TrainingConfig
from omnithought_dagster.ids import content_id
from omnithought_dagster.llm.vllm_server import free_port

TRAIN_MODULE = "omnithought_dagster.train.sft"
TRAINER_VERSION = "sft-v2"  # bump when the trainer changes what a checkpoint contains (v2: transformers' Trainer)


def resolve_student(student: StudentConfig, models_dir: str | Path) -> tuple[str, str]:
    """(local folder or hub id of the base model, its fingerprint); tiny:<name> is built when missing."""
    from omnithought_dagster.llm.backends import resolve_model

    path, fingerprint = resolve_model(student.model, models_dir)
    return path, fingerprint or content_id("base-model", {"model": student.model})


def train_config_hash(training: TrainingConfig) -> str:
    return content_id("train-config", {**training.run_settings(), "trainer": TRAINER_VERSION})


def checkpoint_id(base_fingerprint: str, subset_version: str | None, config_hash: str | None) -> str:
    """The baseline's id names only the base model; a trained checkpoint's adds what it learned from and how."""
    if subset_version is None:
        return content_id("checkpoint", {"base": base_fingerprint, "baseline": True})
    return content_id("checkpoint", {"base": base_fingerprint, "subset_version": subset_version, "train_config": config_hash})


def training_spec(model_dir: str, data_dir: Path, output_dir: Path, training: TrainingConfig, run_dir: Path | None = None) -> dict[str, Any]:
    """What the training process reads: the model, the exported subset, where the model goes, and `run_dir`, where it keeps
    its example index and training checkpoints (kept across a kill; default: beside the output)."""
    return {"model_dir": str(model_dir), "data_dir": str(data_dir), "output_dir": str(output_dir),
            "run_dir": str(run_dir or Path(output_dir).parent / "run"),
            "training": {**training.run_settings(), **training.process_settings()}}


def launcher_command(training: TrainingConfig, spec_path: Path) -> list[str]:
    """The command line that starts every rank of the run (deepspeed or torchrun, from the training interpreter)."""
    python = training.python or sys.executable
    port = str(training.master_port or free_port())
    script = ["--spec", str(spec_path)]
    if training.launcher == "torchrun":
        command = [python, "-m", "torch.distributed.run", "--nproc_per_node", str(training.nproc_per_node), "--nnodes", str(training.nnodes),
                   "--master_addr", training.master_addr, "--master_port", port, *training.launcher_args, "-m", TRAIN_MODULE]
        return command + script
    command = [python, "-m", "deepspeed.launcher.runner", "--num_gpus", str(training.nproc_per_node), "--master_addr", training.master_addr,
               "--master_port", port]
    if training.nnodes > 1 or training.hostfile:
        command += ["--num_nodes", str(training.nnodes)]
    if training.hostfile:
        command += ["--hostfile", training.hostfile]
    return command + [*training.launcher_args, "--module", TRAIN_MODULE] + script
