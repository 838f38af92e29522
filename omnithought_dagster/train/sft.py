"""Supervised fine-tuning of a Qwen-VL student on transformers' Trainer with DeepSpeed ZeRO: the training process.

Launched by the student_checkpoints asset through Dagster Pipes, under the `deepspeed` or
`torchrun` launcher, never inside the Dagster process:

    deepspeed --num_gpus N [--num_nodes M --hostfile H] --module omnithought_dagster.train.sft --spec spec.json

`spec.json` names the base model folder, the exported subset (LLaMA-Factory format: data.json +
images/), the output folder, the run folder (example index and training checkpoints, kept
across a kill) and the training settings. The Trainer brings the optimizer, the LR schedule
(warmup then linear / cosine decay), gradient accumulation and checkpointing, mixed precision,
DeepSpeed through its config, evaluation, and checkpoints with resume (model, optimizer,
scheduler, RNG, data position); this module brings the data (read lazily: `train/data.py`), the
collator (loss only on the assistant's reply - the teacher's `<think>...</think>` reasoning and
answer line, end-of-turn token included - images expanded as the model expects), freezing and
LoRA, and the reporting: only rank 0 opens the Pipes channel (progress lines with ETA, then the
loss / learning-rate curves, tokens/s, examples seen and skipped, the step it resumed from).

A training checkpoint counts once every rank has written it: a `COMPLETE` file is added after a
barrier, and only checkpoints holding one are resumed from. The output is an HF model folder
(from_pretrained and vLLM load it; with LoRA the merged weights, the adapter in `adapter/`) plus
train_log.json.

Imports only torch, transformers, deepspeed, peft, dagster-pipes and this package's Dagster-free
modules, so it runs from any environment that has those.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from omnithought_dagster.train.checkpoints import COMPLETE, latest_complete, step_of
from omnithought_dagster.train.methods import method_of
from omnithought_dagster.train.report import MarkComplete, Progress, Reporter, loss_table, open_pipes
from omnithought_dagster.train.trainer import (
    LOSS_WINDOW,
    counting_trainer,
    engine,
    freeze,
    mean,
    remove_shm_buffers,
    run_environment,
    training_kwargs,
    with_lora,
)

# What a base folder may hold besides weights that is not the tokenizer's or processor's: a tiny model's manifest, and when
# the base is a stored checkpoint (grpo starts from one) the store's manifest, its training log and its LoRA adapter.
NOT_PROCESSOR_FILES = {"omnithought_tiny_model.json", "omnithought_checkpoint.json", "train_log.json", "adapter"}


def main(argv: list[str] | None = None, train_fn=None) -> int:
    """The process's entry: read the spec, train (`train_fn`, default `train`), report the result through Pipes on rank 0."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--spec", required=True, help="the run's JSON spec (written by the asset)")
    parser.add_argument("--local_rank", type=int, default=None, help="set by the deepspeed launcher")
    args = parser.parse_args(argv)
    spec = json.loads(Path(args.spec).read_text())
    _default_single_process_env()
    rank = int(os.environ["RANK"])
    pipes = open_pipes() if rank == 0 else nullcontext(None)
    try:
        with pipes as channel:
            report = Reporter(channel)
            result = (train_fn or train)(spec, report)
            if channel is not None:
                channel.report_asset_materialization(metadata=result["metadata"])
    finally:  # DeepSpeed never unlinks its CPU allreduce buffer: each rank takes its own away (the others have it mapped)
        remove_shm_buffers(os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"], rank)
    return 0


def train(spec: dict[str, Any], report: Reporter) -> dict[str, Any]:
    """One run, whatever its method: the method (`train/methods/`) gives its arguments, datasets, Trainer and what it
    adds to the log; this gives the rest (the example index, the model, freezing and LoRA, resuming, saving, reporting)."""
    import torch
    from transformers import AutoModelForImageTextToText, PrinterCallback
    from transformers.utils import logging as hf_logging

    from omnithought_dagster.models.vl_chat import VLTokenizer
    from omnithought_dagster.train.data import ExampleIndex, build_index
    from omnithought_dagster.train.distill import load_teacher

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    settings = spec["training"]
    model_dir, data_dir, out_dir = Path(spec["model_dir"]), Path(spec["data_dir"]), Path(spec["output_dir"])
    run_dir = Path(spec.get("run_dir") or out_dir.parent / "run")
    if engine(settings) == "deepspeed":  # DeepSpeed's process group first (gloo on CPU): its config reads the world size from it
        import deepspeed

        deepspeed.init_distributed(dist_backend=spec.get("dist_backend") or ("nccl" if torch.cuda.is_available() else "gloo"))
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    method = spec.get("method")
    how = method_of(method)
    args = how.arguments(training_kwargs(settings, run_dir / "checkpoints"), method)
    rank, world = args.process_index, args.world_size

    vl = VLTokenizer.load(model_dir)
    how.prepare(args, vl)
    with args.main_process_first(local=True, desc="example index"):  # one rank per machine reads the export
        index_dir = run_dir / "index"
        if args.local_process_index == 0:
            index = build_index(data_dir, index_dir, vl, settings["max_length"], settings["overlong"])
        else:
            index = ExampleIndex.load(index_dir)
    skipped = dict(index.skipped)
    if not index.offsets:
        raise SystemExit(f"no trainable examples in {data_dir} (set aside: {skipped or 'none'}; max_length {settings['max_length']})")
    train_set, eval_set, set_aside = how.datasets(index, vl, settings, method, args, run_dir, data_dir)
    skipped.update(set_aside)
    report.log(
        f"rank {rank}/{world}: {len(train_set)} examples"
        + (f", {len(eval_set)} held out" if eval_set else "")
        + (f" ({sum(skipped.values())} set aside: {', '.join(f'{k} {v}' for k, v in sorted(skipped.items()))})" if skipped else "")
    )

    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32)
    model.config.use_cache = how.keeps_cache  # a method that samples through its own code asks for the cache when it does
    frozen = freeze(model, settings)
    if settings.get("lora"):
        model = with_lora(model, settings["lora"])
    teacher = load_teacher(method, vl, settings["precision"], args.device) if how.teacher_model else None
    resume = latest_complete(run_dir / "checkpoints")
    marker, progress = MarkComplete(), Progress(report)
    trainer = how.trainer(
        counting_trainer,
        model=model,
        teacher=teacher,
        method=method,
        vl=vl,
        args=args,
        train_set=train_set,
        eval_set=eval_set,
        callbacks=[progress, marker],
        model_dir=model_dir,
    )
    marker.trainer = progress.trainer = trainer
    trainer.distill = (teacher, method) if teacher is not None else None
    trainer.remove_callback(PrinterCallback)  # it prints every log dict; Progress reports what matters
    if resume is not None:
        trainer.resumed = json.loads((resume / COMPLETE).read_text())
        report.log(f"resuming from {resume.name} (step {step_of(resume)} of {args.max_steps if args.max_steps > 0 else '?'})")
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    seconds = progress.seconds()  # the training loop's, as the tokens counted: not the engine's set-up nor loading a checkpoint
    if eval_set is not None and not settings["eval_steps"]:
        trainer.evaluate()

    _save(trainer, settings, model_dir, out_dir)
    history = trainer.state.log_history
    losses = [entry["loss"] for entry in history if "loss" in entry]
    rates = [entry["learning_rate"] for entry in history if "learning_rate" in entry]
    evals = [{"step": entry["step"], "eval_loss": entry["eval_loss"]} for entry in history if "eval_loss" in entry]
    logged = {name: [entry[name] for entry in history if name in entry] for name in how.logged}
    counted = trainer.totals()
    initial, final = mean(losses[:LOSS_WINDOW]), mean(losses[-LOSS_WINDOW:])
    run_tokens = counted["tokens"] - trainer.resumed["tokens"]
    steady = progress.steady_tokens_per_s()  # a collective too
    log = {
        "losses": losses,
        "learning_rates": rates,
        "eval": evals,
        "initial_loss": initial,
        "final_loss": final,
        "steps": trainer.state.global_step,
        "epochs": round(trainer.state.epoch or 0, 4),
        "examples": len(train_set),
        "held_out": len(eval_set) if eval_set else 0,
        "skipped_examples": sum(skipped.values()),
        "skipped": skipped,
        "samples_seen": counted["samples"],
        "tokens_seen": counted["tokens"],
        "train_seconds": round(seconds, 3),
        "tokens_per_s": round(run_tokens / seconds, 1) if seconds else None,
        "steady_tokens_per_s": steady,
        "world_size": world,
        "resumed_from_step": step_of(resume) if resume else None,
        "frozen": frozen,
        "lora": settings.get("lora"),
        "deepspeed": args.deepspeed if isinstance(args.deepspeed, dict) else None,
        "method": how.name,
        **run_environment(args, model),
    }
    method_log, method_metadata = how.results(logged, history, method, trainer)
    log.update(method_log)
    if rank == 0:
        (out_dir / "train_log.json").write_text(json.dumps(log, indent=2))
    metadata = {
        "output_dir": str(out_dir),
        "steps": log["steps"],
        "examples": log["examples"],
        "skipped_examples": log["skipped_examples"],
        "skipped": {"raw_value": skipped, "type": "json"},
        "samples_seen": log["samples_seen"],
        "tokens_seen": log["tokens_seen"],
        "initial_loss": initial,
        "final_loss": final,
        "tokens_per_s": log["tokens_per_s"],
        "train_seconds": log["train_seconds"],
        "world_size": world,
        "resumed_from_step": log["resumed_from_step"] if resume else -1,
        "loss_curve": {"raw_value": loss_table(losses), "type": "md"},
    }
    if evals:
        metadata["eval_loss"] = evals[-1]["eval_loss"]
    metadata.update(method_metadata)
    return {"log": log, "metadata": metadata}


def _save(trainer, settings: dict, model_dir: Path, out_dir: Path) -> None:
    """An HF folder in out_dir: the weights (gathered from the ranks under ZeRO-3; with LoRA merged, the adapter itself in
    adapter/), and the tokenizer and processor files of the base."""
    if settings.get("lora"):  # ZeRO 0-2 only (the config refuses LoRA with ZeRO-3): every rank holds the whole model
        if trainer.args.should_save:
            trainer.model.save_pretrained(out_dir / "adapter")
            merged = trainer.model.merge_and_unload()
            merged.config.use_cache = True
            merged.save_pretrained(out_dir, safe_serialization=True)
    else:
        trainer.model.config.use_cache = True
        trainer.save_model(str(out_dir))  # every rank takes part (ZeRO-3 gathers the weights); rank 0 writes
    if not trainer.args.should_save:
        return
    (out_dir / "training_args.bin").unlink(missing_ok=True)
    copy_processor_files(model_dir, out_dir)


def copy_processor_files(model_dir: Path, out_dir: Path) -> None:
    """The base's tokenizer, chat template and image processor into a saved model: all it holds but weights and configs."""
    for name in os.listdir(model_dir):
        if not (
            name.endswith(".safetensors")
            or name.endswith(".bin")
            or name in {"config.json", "generation_config.json"}
            or name.endswith(".index.json")
            or name.startswith(".")
            or name in NOT_PROCESSOR_FILES
        ):
            source = model_dir / name
            (shutil.copytree if source.is_dir() else shutil.copy2)(source, out_dir / name)


def _default_single_process_env() -> None:
    """A plain `python -m` run is a world of one (the launchers set these for every rank)."""
    defaults = {
        "RANK": "0",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_WORLD_SIZE": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": os.environ.get("MASTER_PORT", "29511"),
    }
    for key, value in defaults.items():
        os.environ.setdefault(key, value)


if __name__ == "__main__":
    raise SystemExit(main())
