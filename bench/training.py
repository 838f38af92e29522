"""SFT throughput of the trainer the student_checkpoints asset launches (no Dagster, same command line).

    .venv/bin/python bench/training.py [--data .omnithought/exports/balanced] [--steps 40] [--zero-stage 2]
                                       [--launcher deepspeed|torchrun] [--nproc 1] [--micro-batch 4] [--model tiny:student]

Trains the student on an exported subset (`make demo` writes .omnithought/exports/balanced) and
prints one JSON object: the trainer's own numbers (tokens/s over the training loop, samples
seen, loss at start and end) and the wall time of the whole launch (launcher, process start,
model load, save). Peak RSS is the largest of the launched processes.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from omnithought_dagster.config import StudentConfig, TrainingConfig  # noqa: E402
from omnithought_dagster.train.launch import launcher_command, resolve_student, training_spec  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", default=str(REPO / ".omnithought/exports/balanced"))
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--zero-stage", type=int, default=2)
    parser.add_argument("--launcher", default="deepspeed")
    parser.add_argument("--nproc", type=int, default=1)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--model", default="tiny:student")
    args = parser.parse_args()
    data = Path(args.data)
    if not (data / "data.json").is_file():
        raise SystemExit(f"{data}/data.json not found: run `make demo` (it exports the first recipe) or pass --data")
    model_dir, _ = resolve_student(StudentConfig(name="bench", model=args.model), REPO / ".cache/models")
    settings = TrainingConfig(launcher=args.launcher, nproc_per_node=args.nproc, zero_stage=args.zero_stage,
                              micro_batch_size=args.micro_batch, max_steps=args.steps, learning_rate=0.005)
    with tempfile.TemporaryDirectory() as tmp:
        spec = Path(tmp) / "spec.json"
        spec.write_text(json.dumps(training_spec(model_dir, data, Path(tmp) / "out", settings)))
        started = time.monotonic()
        done = subprocess.run(launcher_command(settings, spec), capture_output=True, text=True, cwd=tmp,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
        wall = time.monotonic() - started
        if done.returncode != 0:
            raise SystemExit(done.stdout[-2000:] + done.stderr[-3000:])
        log = json.loads((Path(tmp) / "out/train_log.json").read_text())
    print(json.dumps({
        "model": args.model, "launcher": args.launcher, "processes": args.nproc, "zero_stage": args.zero_stage,
        "micro_batch_size": args.micro_batch, "steps": log["steps"], "examples": log["examples"], "samples_seen": log["samples_seen"],
        "tokens_seen": log["tokens_seen"], "tokens_per_s": log["tokens_per_s"],
        "samples_per_s": round(log["samples_seen"] / log["train_seconds"], 1), "train_seconds": log["train_seconds"],
        "wall_seconds": round(wall, 1), "initial_loss": log["initial_loss"], "final_loss": log["final_loss"],
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024),
    }, indent=2))


if __name__ == "__main__":
    main()
