"""Everything about a training run that is decided before it starts: ids, the spec, the launcher line.

No Dagster here: the student_checkpoints asset calls these and hands the command to Pipes.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from omnithought_dagster.ids import content_id
from omnithought_dagster.llm.vllm_server import free_port
from omnithought_dagster.train.methods import BUILT_IN, METHODS
from omnithought_dagster.train.settings import StudentConfig, TrainingConfig

TRAIN_MODULE = "omnithought_dagster.train.sft"
TRAINER_VERSION = "sft-v2"  # bump when the trainer changes what a checkpoint contains (v2: transformers' Trainer)


def resolve_student(student: StudentConfig, models_dir: str | Path) -> tuple[str, str]:
    """(local folder or hub id of the base model, its fingerprint); tiny:<name> is built when missing."""
    from omnithought_dagster.models.resolve import resolve_model

    path, fingerprint = resolve_model(student.model, models_dir)
    return path, fingerprint or content_id("base-model", {"model": student.model})


def train_config_hash(training: TrainingConfig) -> str:
    return content_id("train-config", {**training.run_settings(), "trainer": TRAINER_VERSION})


def run_method(
    student: StudentConfig, models_dir: str | Path, *, start_checkpoint: str | None = None, answer_pattern: str | None = None
) -> dict[str, Any] | None:
    """What the student's method adds to its runs (its `spec`, train/methods/): None for sft; the settings, and the teacher's
    folder and fingerprint (kd, prefix_mask_kd) or the checkpoint it starts from and the answer pattern (grpo)."""
    method = METHODS[student.method]
    spec = method.spec(student, models_dir, start_checkpoint=start_checkpoint, answer_pattern=answer_pattern)
    if spec is not None and student.method not in BUILT_IN:  # a plug-in: the training process imports its module
        spec["module"] = type(method).__module__
    return spec


def method_identity(method: dict[str, Any] | None) -> dict[str, Any]:
    """What a method is: its name, settings and the teacher's fingerprint or the checkpoint it starts from - not where the
    teacher lies ({"name": "sft"} for sft). Hashed into the checkpoint id, shown by lineage."""
    return {"name": "sft"} if method is None else {k: v for k, v in method.items() if k not in ("teacher_dir", "module")}


def method_hash(method: dict[str, Any] | None) -> str | None:
    """What of a method changes the weights (None for sft, whose checkpoint ids stay what they were)."""
    return None if method is None else content_id("method", method_identity(method))


def checkpoint_id(base_fingerprint: str, subset_version: str | None, config_hash: str | None, method: str | None = None) -> str:
    """The baseline's id names only the base model; a trained checkpoint's adds what it learned from and how (the training
    settings, and the method's hash for any method but sft, whose ids stay what they were)."""
    if subset_version is None:
        return content_id("checkpoint", {"base": base_fingerprint, "baseline": True})
    how = {"train_config": config_hash} if method is None else {"train_config": config_hash, "method": method}
    return content_id("checkpoint", {"base": base_fingerprint, "subset_version": subset_version, **how})


def training_spec(
    model_dir: str,
    data_dir: Path,
    output_dir: Path,
    training: TrainingConfig,
    run_dir: Path | None = None,
    method: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """What the training process reads: the model, the exported subset, where the model goes, `run_dir`, where it keeps
    its example index and training checkpoints (kept across a kill; default: beside the output), and the method (None: sft)."""
    return {
        "model_dir": str(model_dir),
        "data_dir": str(data_dir),
        "output_dir": str(output_dir),
        "run_dir": str(run_dir or Path(output_dir).parent / "run"),
        "training": {**training.run_settings(), **training.process_settings()},
        "method": method,
    }


def launcher_command(training: TrainingConfig, spec_path: Path) -> list[str]:
    """The command line that starts every rank of the run (deepspeed or torchrun, from the training interpreter)."""
    python = training.python or sys.executable
    port = str(training.master_port or free_port())
    script = ["--spec", str(spec_path)]
    if training.launcher == "torchrun":
        command = [
            python,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            str(training.nproc_per_node),
            "--nnodes",
            str(training.nnodes),
            "--master_addr",
            training.master_addr,
            "--master_port",
            port,
            *training.launcher_args,
            "-m",
            TRAIN_MODULE,
        ]
        return command + script
    command = [
        python,
        "-m",
        "deepspeed.launcher.runner",
        "--num_gpus",
        str(training.nproc_per_node),
        "--master_addr",
        training.master_addr,
        "--master_port",
        port,
    ]
    if training.nnodes > 1 or training.hostfile:
        command += ["--num_nodes", str(training.nnodes)]
    if training.hostfile:
        command += ["--hostfile", training.hostfile]
    return command + [*training.launcher_args, "--module", TRAIN_MODULE] + script


def master_port(command: list[str]) -> str:
    """The master port a launcher command gives its ranks (both launchers take `--master_port`)."""
    return command[command.index("--master_port") + 1]
