"""The trainer the student_checkpoints asset launches (no Dagster, the same command line): speed and memory.

    .venv/bin/python bench/training.py [--steps 20] [--examples 200] [--sizes 1000,20000] [--memory-steps 5]
                                       [--micro-batch 4] [--image-size 320] [--repeats 2] [--model tiny:student]
                                       [--kd-teacher tiny:teacher]

Prints one JSON object:
- `throughput`: tokens/s of the trainer (transformers' Trainer, `train/sft.py`) and of the
  hand-written DeepSpeed loop it replaced (`bench/reference_sft_loop.py`, kept as the peer), run
  alternately `--repeats` times each on the same generated export and steps; medians and their
  ratio. `steady`: after each run's first optimizer step (whose time holds one-off costs - loader
  workers starting, the first batch, first allocations - in both); the target (>= 0.90) is on it.
  `whole_loop`: from the loop's start. The peer encodes every example before its loop starts (the
  memory growth the trainer removes), so neither of its rates includes decoding; the trainer's do.
- `memory`: peak RSS of the training process for exports of each `--sizes` examples (`--memory-steps`
  steps each); the ratio of the largest to the smallest (target: <= 1.15 - examples are read lazily,
  so memory does not grow with the subset), and the wall time of building the example index.

- `distillation` (with `--kd-teacher`): steady tokens/s of method kd (a teacher forward per micro-batch),
  of prefix_mask_kd at its full budget (plus a saliency pass and masked attention) and of sft, alternated
  on the same export; the step-cost ratios kd / sft and prefix_mask_kd / kd.

The exports are generated (`--image-size` px images, a pool of 64 distinct ones; reasoning replies of
~100 tokens), so the bench needs no `make demo` first.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from omnithought_dagster.config import StudentConfig, TrainingConfig  # noqa: E402
from omnithought_dagster.train.launch import launcher_command, resolve_student, run_method, training_spec  # noqa: E402

IMAGE_POOL = 64
# The launched command under a parent that reports the peak RSS of its whole tree (the launcher and the rank).
MEASURED = (
    "import resource, subprocess, sys; code = subprocess.run(sys.argv[1:]).returncode; "
    "print('PEAK_RSS_KB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, flush=True); sys.exit(code)"
)


def export(folder: Path, examples: int, image_size: int) -> Path:
    from PIL import Image, ImageDraw

    (folder / "images").mkdir(parents=True)
    for i in range(IMAGE_POOL):
        image = Image.new("RGB", (image_size, image_size), (255, 255, 255))
        ImageDraw.Draw(image).rectangle([i % 50, i % 30, image_size // 2 + i, image_size // 3 + i], fill=(i * 4 % 256, 90, 200))
        image.save(folder / f"images/{i}.png")
    with (folder / "data.json").open("w") as out:
        out.write("[")
        for i in range(examples):
            reasoning = " ".join(f"step {j}: the block at {i % 7},{j} is counted" for j in range(8))
            record = {
                "id": f"e{i}",
                "images": [f"images/{i % IMAGE_POOL}.png"],
                "messages": [
                    {"role": "user", "content": f"<image>\nHow many blocks are there? ({i})"},
                    {"role": "assistant", "content": f"<think>\n{reasoning}\n</think>\n\nAnswer: {i % 9}"},
                ],
            }
            out.write(("," if i else "") + json.dumps(record))
        out.write("]")
    return folder


def run(kind: str, model_dir: str, data: Path, work: Path, settings: TrainingConfig, method: dict | None = None) -> dict:
    """One training run (kind: trainer | reference; method: None for sft); its log, wall time and peak RSS."""
    work.mkdir(parents=True)
    spec = work / "spec.json"
    spec.write_text(json.dumps(training_spec(model_dir, data, work / "out", settings, run_dir=work / "run", method=method)))
    command = launcher_command(settings, spec)
    if kind == "reference":
        command = command[: command.index("--module")] + [str(REPO / "bench/reference_sft_loop.py"), "--spec", str(spec)]
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-c", MEASURED, *command],
        capture_output=True,
        text=True,
        cwd=work,
        env={**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"},
    )
    wall = time.monotonic() - started
    if done.returncode != 0:
        raise SystemExit(f"{kind} failed:\n{done.stdout[-2000:]}{done.stderr[-3000:]}")
    log = json.loads((work / "out/train_log.json").read_text())
    peak = int(done.stdout.rsplit("PEAK_RSS_KB", 1)[1].split()[0])
    return {"log": log, "wall": wall, "peak_rss_mb": round(peak / 1024)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--examples", type=int, default=200)
    parser.add_argument("--sizes", default="1000,20000")
    parser.add_argument("--memory-steps", type=int, default=5)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--image-size", type=int, default=320)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--model", default="tiny:student")
    parser.add_argument("--workers", type=int, default=1, help="processes decoding examples ahead of the trainer")
    parser.add_argument("--kd-teacher", default=None, help="also time method kd with this teacher against sft (e.g. tiny:teacher)")
    args = parser.parse_args()
    model_dir, _ = resolve_student(StudentConfig(name="bench", model=args.model), REPO / ".cache/models")
    sizes = [int(size) for size in args.sizes.split(",") if size]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = export(tmp / "speed", args.examples, args.image_size)
        settings = TrainingConfig(
            micro_batch_size=args.micro_batch, max_steps=args.steps, learning_rate=0.005, max_length=2048, dataloader_workers=args.workers
        )
        speed = {"trainer": [], "reference": []}
        steady = {"trainer": [], "reference": []}
        for repeat in range(args.repeats):  # alternated, so drift in the machine's speed hits both alike
            for kind in ("reference", "trainer"):
                log = run(kind, model_dir, data, tmp / f"{kind}-{repeat}", settings)["log"]
                speed[kind].append(log["tokens_per_s"])
                steady[kind].append(log["steady_tokens_per_s"])
        ratio = {
            name: round(statistics.median(rates["trainer"]) / statistics.median(rates["reference"]), 3)
            for name, rates in (("steady", steady), ("whole_loop", speed))
        }

        memory = {}
        for size in sizes:
            sized = export(tmp / f"size-{size}", size, args.image_size)
            measured = run(
                "trainer", model_dir, sized, tmp / f"memory-{size}", settings.model_copy(update={"max_steps": args.memory_steps})
            )
            memory[str(size)] = {
                "peak_rss_mb": measured["peak_rss_mb"],
                "wall_seconds": round(measured["wall"], 1),
                "examples": measured["log"]["examples"],
            }
        distill = None
        if args.kd_teacher:  # the cost of a teacher forward per micro-batch, and of the masks on top, against sft on the same data
            # prefix_mask_kd at its full budget from the second step on (the steady rate leaves the first out): the saliency
            # pass, the masks' ranking and SDPA with an explicit mask, at their most.
            masked = {"teacher": args.kd_teacher, "warmup_steps": 0, "growth": 0.3, "max_budget": 0.3, "tolerance": 1e9}
            methods = {
                "sft": None,
                "kd": run_method(
                    StudentConfig(name="bench", model=args.model, method="kd", kd={"teacher": args.kd_teacher}), REPO / ".cache/models"
                ),
                "prefix_mask_kd": run_method(
                    StudentConfig(name="bench", model=args.model, method="prefix_mask_kd", prefix_mask_kd=masked), REPO / ".cache/models"
                ),
            }
            rates = {name: [] for name in methods}
            for repeat in range(args.repeats):
                for name, method in methods.items():
                    log = run("trainer", model_dir, data, tmp / f"method-{name}-{repeat}", settings, method)["log"]
                    rates[name].append(log["steady_tokens_per_s"])
            median = {name: statistics.median(values) for name, values in rates.items()}
            distill = {
                "teacher": args.kd_teacher,
                **{f"{name}_steady_tokens_per_s": values for name, values in rates.items()},
                "kd_step_cost_vs_sft": round(median["sft"] / median["kd"], 3),
                "prefix_mask_kd_step_cost_vs_kd": round(median["kd"] / median["prefix_mask_kd"], 3),
            }
    peaks = [memory[str(size)]["peak_rss_mb"] for size in sizes]
    print(
        json.dumps(
            {
                "model": args.model,
                "micro_batch_size": args.micro_batch,
                "image_size": args.image_size,
                "throughput": {
                    "steps": args.steps,
                    "examples": args.examples,
                    "dataloader_workers": args.workers,
                    "trainer_steady_tokens_per_s": steady["trainer"],
                    "reference_steady_tokens_per_s": steady["reference"],
                    "steady_median_ratio": ratio["steady"],
                    "target_ratio_at_least": 0.90,
                    "trainer_whole_loop_tokens_per_s": speed["trainer"],
                    "reference_whole_loop_tokens_per_s": speed["reference"],
                    "whole_loop_median_ratio": ratio["whole_loop"],
                },
                "memory": {
                    **memory,
                    "largest_to_smallest_peak_ratio": round(max(peaks) / min(peaks), 3) if peaks else None,
                    "target_ratio_at_most": 1.15,
                },
                "distillation": distill,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
