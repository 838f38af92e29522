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
import math
import os
import re
import shutil
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from omnithought_dagster.progress import progress_line
from omnithought_dagster.train.checkpoints import COMPLETE, latest_complete, step_of
from omnithought_dagster.train.ranks import sum_across_ranks as _sum_across_ranks

LOSS_WINDOW = 3  # steps averaged for the initial and final loss
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
    pipes = _open_pipes() if rank == 0 else nullcontext(None)
    with pipes as channel:
        report = _Reporter(channel)
        result = (train_fn or train)(spec, report)
        if channel is not None:
            channel.report_asset_materialization(metadata=result["metadata"])
    return 0


def train(spec: dict[str, Any], report: _Reporter) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForImageTextToText
    from transformers.utils import logging as hf_logging

    from omnithought_dagster.models.vl_chat import VLTokenizer
    from omnithought_dagster.train.data import ExampleIndex, LazyExamples, build_index, split
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
    kind = method["name"] if method else "sft"
    if kind == "grpo":
        from omnithought_dagster.train.grpo import grpo_arguments

        args = grpo_arguments(training_kwargs(settings, run_dir / "checkpoints"), method)
    elif kind == "opsd":  # sampled answers: no held-out loss to take
        from transformers import TrainingArguments

        args = TrainingArguments(**{**training_kwargs(settings, run_dir / "checkpoints"), "eval_strategy": "no"})
    else:
        args = training_arguments(settings, run_dir / "checkpoints")
    rank, world = args.process_index, args.world_size

    vl = VLTokenizer.load(model_dir)
    if kind == "grpo":  # TRL suppresses the image token in its samples; the other media tokens too (train/opsd.py: sample)
        args.generation_kwargs = {**(args.generation_kwargs or {}), "suppress_tokens": sorted(vl.media_ids)}
    with args.main_process_first(local=True, desc="example index"):  # one rank per machine reads the export
        index_dir = run_dir / "index"
        if args.local_process_index == 0:
            index = build_index(data_dir, index_dir, vl, settings["max_length"], settings["overlong"])
        else:
            index = ExampleIndex.load(index_dir)
    skipped = dict(index.skipped)
    if not index.offsets:
        raise SystemExit(f"no trainable examples in {data_dir} (set aside: {skipped or 'none'}; max_length {settings['max_length']})")
    if kind == "grpo":  # questions only; answers are sampled, so there is no held-out loss to take
        from omnithought_dagster.train.grpo import prompt_dataset

        with args.main_process_first(local=True, desc="questions"):
            train_set, set_aside = prompt_dataset(index, None, run_dir / "questions", tuple(vl.added_tokens))
        skipped.update(set_aside)
        eval_set = None
        if not len(train_set):
            raise SystemExit(f"grpo: no question in {data_dir} has a reference answer (set aside: {skipped})")
    elif kind == "opsd":  # the question for the student, with the privileged context for the teacher
        from omnithought_dagster.train.opsd import PrivilegedPrompts

        train_set, eval_set = PrivilegedPrompts(index, vl, method["context"]), None
    else:
        train_part, held_out = split(index, settings["eval_share"], settings["seed"])
        # Without worker processes a batch's examples are decoded by threads of this one (no copy of the batch between processes).
        threads = 1 if settings["dataloader_workers"] else min(4, len(os.sched_getaffinity(0)))
        train_set = LazyExamples(index, vl, settings["max_length"], train_part, threads=threads)
        eval_set = LazyExamples(index, vl, settings["max_length"], held_out, threads=threads) if held_out else None
    report.log(
        f"rank {rank}/{world}: {len(train_set)} examples"
        + (f", {len(eval_set)} held out" if eval_set else "")
        + (f" ({sum(skipped.values())} set aside: {', '.join(f'{k} {v}' for k, v in sorted(skipped.items()))})" if skipped else "")
    )

    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32)
    model.config.use_cache = kind == "grpo"  # GRPO generates through TRL; opsd asks for the cache when it samples
    frozen = freeze(model, settings)
    if settings.get("lora"):
        model = with_lora(model, settings["lora"])
    teacher = load_teacher(method, vl, settings["precision"], args.device) if kind in ("kd", "prefix_mask_kd") else None
    resume = latest_complete(run_dir / "checkpoints")
    marker, progress = _MarkComplete(), _Progress(report)
    if kind == "grpo":
        from omnithought_dagster.train.grpo import grpo_trainer_class, reward_functions, vl_processor

        trainer = grpo_trainer_class(_counting_trainer)(
            model=model,
            reward_funcs=reward_functions(method["answer_pattern"]),
            args=args,
            train_dataset=train_set,
            processing_class=vl_processor(model_dir),
            callbacks=[progress, marker],
        )
    elif kind == "opsd":
        from omnithought_dagster.train import opsd

        trainer = opsd.build_trainer(_counting_trainer, model, method, vl, args=args, train_dataset=train_set, callbacks=[progress, marker])
    elif kind == "prefix_mask_kd":
        from omnithought_dagster.train import prefix_mask

        trainer = prefix_mask.build_trainer(
            _counting_trainer,
            model,
            teacher,
            method,
            vl.image_token_id,
            args=args,
            train_dataset=train_set,
            eval_dataset=eval_set,
            data_collator=vl.collate,
            callbacks=[progress, marker],
        )
    else:
        trainer = _counting_trainer()(
            model=model, args=args, train_dataset=train_set, eval_dataset=eval_set, data_collator=vl.collate, callbacks=[progress, marker]
        )
    marker.trainer = progress.trainer = trainer
    trainer.distill = (teacher, method) if teacher is not None else None
    from transformers import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # it prints every log dict; _Progress reports what matters
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
    parts = {
        name: [entry[name] for entry in history if name in entry]
        for name in ("ce_loss", "kd_loss", "opsd_divergence", "sample_length", "mask_budget", "masking_cost", "hidden_per_prediction")
    }
    counted = trainer.totals()
    initial, final = _mean(losses[:LOSS_WINDOW]), _mean(losses[-LOSS_WINDOW:])
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
        "method": kind,
        **run_environment(args, model),
    }
    if kind in ("kd", "prefix_mask_kd"):  # the two parts of the loss, per step
        log.update(
            {
                "ce_losses": parts["ce_loss"],
                "kd_losses": parts["kd_loss"],
                "teacher": method["teacher"],
                "initial_kd_loss": _mean(parts["kd_loss"][:LOSS_WINDOW]),
                "final_kd_loss": _mean(parts["kd_loss"][-LOSS_WINDOW:]),
            }
        )
    if kind == "prefix_mask_kd":  # the masking budget in force and the reply tokens hidden per prediction, per step
        log.update(
            {
                "mask_budgets": parts["mask_budget"],
                "masking_costs": parts["masking_cost"],
                "hidden_per_prediction": parts["hidden_per_prediction"],
                "final_mask_budget": trainer.schedule.budget,
            }
        )
    if kind == "opsd":  # the divergence to the privileged teacher and the sampled answers' length, per step
        log.update(
            {
                "opsd_divergences": parts["opsd_divergence"],
                "sample_lengths": parts["sample_length"],
                "initial_divergence": _mean(parts["opsd_divergence"][:LOSS_WINDOW]),
                "final_divergence": _mean(parts["opsd_divergence"][-LOSS_WINDOW:]),
                "mean_sample_length": _mean(parts["sample_length"]),
            }
        )
    if kind == "grpo":  # rewards, pass rate and answer lengths per step
        from omnithought_dagster.train.grpo import grpo_log

        log.update({**grpo_log(history), "start_checkpoint": method["start_checkpoint"]})
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
        "loss_curve": {"raw_value": _loss_table(losses), "type": "md"},
    }
    if evals:
        metadata["eval_loss"] = evals[-1]["eval_loss"]
    if kind in ("kd", "prefix_mask_kd"):
        metadata.update(
            {
                "method": kind,
                "teacher": method["teacher"],
                "initial_kd_loss": log["initial_kd_loss"],
                "final_kd_loss": log["final_kd_loss"],
                "final_ce_loss": _mean(parts["ce_loss"][-LOSS_WINDOW:]),
            }
        )
    if kind == "prefix_mask_kd":
        metadata.update(
            {
                "final_mask_budget": log["final_mask_budget"],
                "final_masking_cost": _mean(parts["masking_cost"][-LOSS_WINDOW:]),
                "final_hidden_per_prediction": _mean(parts["hidden_per_prediction"][-LOSS_WINDOW:]),
            }
        )
    if kind == "opsd":
        metadata.update(
            {
                "method": kind,
                "initial_divergence": log["initial_divergence"],
                "final_divergence": log["final_divergence"],
                "mean_sample_length": log["mean_sample_length"],
            }
        )
    if kind == "grpo":
        metadata.update(
            {
                "method": kind,
                "start_checkpoint": method["start_checkpoint"],
                "initial_reward": _mean(log["rewards"][:LOSS_WINDOW]),
                "final_reward": _mean(log["rewards"][-LOSS_WINDOW:]),
                "initial_pass_rate": _mean(log["pass_rates"][:LOSS_WINDOW]),
                "final_pass_rate": _mean(log["pass_rates"][-LOSS_WINDOW:]),
                "mean_completion_length": _mean(log["completion_lengths"]),
            }
        )
    return {"log": log, "metadata": metadata}


def engine(settings: dict[str, Any]) -> str:
    """deepspeed or torch (a spec written before the setting existed: deepspeed)."""
    return settings.get("engine") or "deepspeed"


def run_environment(args, model) -> dict[str, Any]:
    """Where and how the run ran: the engine, device, precision, optimizer and attention kernel the Trainer used, and
    on CUDA this process's peak memory (what the GPU check reports per method)."""
    import torch

    cuda = torch.cuda.is_available()
    base = getattr(model, "get_base_model", lambda: model)()
    return {
        "engine": "deepspeed" if args.deepspeed else "torch",
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "precision": "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32",
        "optimizer": str(getattr(args.optim, "value", args.optim)),
        "attention": getattr(base.config, "_attn_implementation", None),
        "peak_gpu_memory_bytes": int(torch.cuda.max_memory_allocated()) if cuda else None,
        "torch": torch.__version__,
    }


def training_arguments(settings: dict[str, Any], output_dir: Path):
    """transformers' TrainingArguments for the settings (DeepSpeed through deepspeed_config, CPU when there is no GPU)."""
    from transformers import TrainingArguments

    return TrainingArguments(**training_kwargs(settings, output_dir))


def training_kwargs(settings: dict[str, Any], output_dir: Path) -> dict[str, Any]:
    """The Trainer arguments of a run, as keywords (TrainingArguments', or a subclass's such as TRL's GRPOConfig)."""
    import torch

    cuda = torch.cuda.is_available()
    evaluate = settings["eval_share"] > 0 and settings["eval_steps"] > 0
    return dict(
        output_dir=str(output_dir),
        seed=settings["seed"],
        data_seed=settings["seed"],
        per_device_train_batch_size=settings["micro_batch_size"],
        per_device_eval_batch_size=settings["micro_batch_size"],
        gradient_accumulation_steps=settings["gradient_accumulation_steps"],
        learning_rate=settings["learning_rate"],
        weight_decay=settings["weight_decay"],
        warmup_steps=settings["warmup_steps"],
        lr_scheduler_type=settings["lr_scheduler"],
        max_grad_norm=settings["gradient_clipping"] or 0.0,
        max_steps=-1 if settings.get("epochs") else settings["max_steps"],
        num_train_epochs=settings.get("epochs") or 1,
        bf16=settings["precision"] == "bf16",
        fp16=settings["precision"] == "fp16",
        gradient_checkpointing=settings["gradient_checkpointing"],
        gradient_checkpointing_kwargs={"use_reentrant": False} if settings["gradient_checkpointing"] else None,
        eval_strategy="steps" if evaluate else "no",
        eval_steps=settings["eval_steps"] or None,
        save_strategy="steps" if settings["save_steps"] else "no",
        save_steps=settings["save_steps"] or 500,
        save_total_limit=settings["save_total_limit"],
        logging_strategy="steps",
        logging_steps=1,
        logging_first_step=True,
        report_to=[],
        disable_tqdm=True,
        remove_unused_columns=False,
        dataloader_num_workers=settings["dataloader_workers"],
        dataloader_persistent_workers=settings["dataloader_workers"] > 0,  # not restarted every epoch
        # The fused AdamW kernel is CUDA's; on CPU torch's own loop is faster (measured: ~3 ms of a 47 ms tiny-model step).
        optim="adamw_torch_fused" if cuda else "adamw_torch",
        use_cpu=not cuda,
        ddp_backend=None if cuda else "gloo",
        deepspeed=deepspeed_config(settings) if engine(settings) == "deepspeed" else None,
    )


def deepspeed_config(settings: dict[str, Any]) -> dict[str, Any]:
    """The DeepSpeed config of a run: ZeRO stage and offload here; batch sizes, clipping and precision are the Trainer's
    ("auto"), as are the optimizer and schedule (DeepSpeed's CPU Adam only with offload)."""
    zero: dict[str, Any] = {"stage": settings["zero_stage"]}
    if settings["offload_optimizer"]:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
    if settings["zero_stage"] == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": "auto",
        "train_batch_size": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        "bf16": {"enabled": "auto"},
        "fp16": {"enabled": "auto"},
    }
    if settings["offload_optimizer"]:
        config["optimizer"] = {"type": "AdamW", "params": {"lr": "auto", "weight_decay": "auto", "betas": "auto", "eps": "auto"}}
    return config


def freeze(model, settings: dict[str, Any]) -> list[str]:
    """Freeze the parts the settings name (vision tower, projector, language model); the names of the frozen parts."""
    parts = {
        "vision_tower": settings.get("freeze_vision_tower"),
        "projector": settings.get("freeze_projector"),
        "language_model": settings.get("freeze_language_model"),
    }
    for name, parameter in model.named_parameters():
        if parts[part_of(name)]:
            parameter.requires_grad_(False)
    return [part for part, frozen in parts.items() if frozen]


def part_of(parameter_name: str) -> str:
    """Which part of a Qwen-VL model a parameter belongs to: the projector is the vision merger(s), the rest of the vision
    model is the tower; everything else (embeddings, decoder, lm_head) is the language model."""
    if ".visual." in f".{parameter_name}":
        return "projector" if "merger" in parameter_name else "vision_tower"
    return "language_model"


def with_lora(model, lora: dict[str, Any]):
    """The model with LoRA adapters on the language model's target modules (peft); only the adapters train."""
    from peft import LoraConfig, get_peft_model

    pattern = r".*language_model.*\.(" + "|".join(re.escape(m) for m in lora["target_modules"]) + r")$"
    return get_peft_model(
        model,
        LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"], target_modules=pattern, task_type="CAUSAL_LM"),
    )


def _counting_trainer(base=None):
    """transformers' Trainer (or `base`, a subclass of it) that also counts the examples and tokens it trained on
    (samples_seen, tokens/s), those of the checkpoint it resumed from included."""
    from transformers import Trainer

    class CountingTrainer(base or Trainer):
        samples = tokens = 0
        resumed = {"samples": 0, "tokens": 0}
        distill = None  # (teacher model, method settings) for method kd
        _parts: dict | None = None  # the loss's parts summed since the last log (kd)

        def training_step(self, model, inputs, num_items_in_batch=None):
            self.count(inputs)
            return super().training_step(model, inputs, num_items_in_batch)

        def count(self, inputs) -> None:
            self.samples += int(inputs["input_ids"].shape[0])
            self.tokens += int(inputs["attention_mask"].sum())

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            """With a teacher: (1 - weight) * the SFT loss + weight * the divergence from the teacher over the reply tokens
            (train/distill.py). Evaluation keeps the SFT loss alone, comparable between methods."""
            if self.distill is None or not model.training:
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

            from omnithought_dagster.train.distill import reply_divergence

            teacher, settings = self.distill
            teacher_logits = self.teacher_logits(teacher, inputs)
            with self.student_view(model, inputs):
                sft, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
            kd, values = reply_divergence(outputs.logits, teacher_logits, inputs["labels"], settings, num_items_in_batch)
            self.divergence_seen(values)
            if num_items_in_batch is not None and self.args.average_tokens_across_devices:
                kd = kd * self.accelerator.num_processes  # as the Trainer scales the SFT loss (a count over every rank)
            parts = self._parts = self._parts or {"ce_loss": 0.0, "kd_loss": 0.0}
            parts["ce_loss"] += sft.detach()
            parts["kd_loss"] += kd.detach()
            loss = (1 - settings["weight"]) * sft + settings["weight"] * kd
            return (loss, outputs) if return_outputs else loss

        def teacher_logits(self, teacher, inputs):
            """The frozen teacher's logits on the micro-batch (before the student's pass: a subclass may use them in it)."""
            import torch

            with torch.no_grad():
                return teacher(**{k: v for k, v in inputs.items() if k != "labels"}).logits

        def student_view(self, model, inputs):
            """What the student's training pass runs within (a subclass hides context from it)."""
            return nullcontext()

        def divergence_seen(self, values) -> None:
            """The per-token divergences of a micro-batch, for a subclass that paces itself by them."""

        def log(self, logs, *args, **kwargs):
            """The loss's parts beside the loss (their mean over the ranks, per optimizer step since the last log)."""
            if self._parts is not None and "loss" in logs:
                steps = max(1, self.state.global_step - getattr(self, "_logged_at", 0))
                for name, value in self._parts.items():
                    logs[name] = round(_sum_across_ranks(float(value)) / self.args.world_size / steps, 6)
                self._parts, self._logged_at = None, self.state.global_step
            super().log(logs, *args, **kwargs)

        def totals(self) -> dict[str, int]:
            """Over every rank and the resumed run (a collective: every rank calls it)."""
            return {
                "samples": self.resumed["samples"] + int(_sum_across_ranks(self.samples)),
                "tokens": self.resumed["tokens"] + int(_sum_across_ranks(self.tokens)),
            }

    return CountingTrainer


class _Callback:
    """A TrainerCallback without transformers at import time: events it does not define do nothing."""

    def __getattr__(self, name):
        if name.startswith("on_"):
            return lambda *args, **kwargs: None
        raise AttributeError(name)


class _MarkComplete(_Callback):
    """Once every rank has saved a training checkpoint (the counts' all-reduce is the meeting point), rank 0 marks it
    COMPLETE, with the examples and tokens seen so far; a rerun resumes only from a marked one."""

    trainer = None

    def on_save(self, args, state, control, **kwargs):
        counts = self.trainer.totals()
        if state.is_world_process_zero:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            (folder / COMPLETE).write_text(json.dumps({"step": state.global_step, **counts}))


class _Progress(_Callback):
    """Progress lines (with ETA) at ~10 points of the run, the loss and learning rate with them."""

    trainer = None

    def __init__(self, report: _Reporter):
        self.report = report
        self.started = 0.0
        self.first_step = 0
        self.mark: tuple[float, int] | None = None  # (time, this rank's tokens) at the end of the run's first step

    def on_train_begin(self, args, state, control, **kwargs):
        self.started, self.first_step = time.monotonic(), state.global_step

    def on_step_end(self, args, state, control, **kwargs):
        if self.mark is None:
            self.mark = (time.monotonic(), self.trainer.tokens)

    def on_train_end(self, args, state, control, **kwargs):
        self.ended = time.monotonic()

    def seconds(self) -> float:
        return getattr(self, "ended", time.monotonic()) - self.started

    def steady_tokens_per_s(self) -> float | None:
        """Tokens/s after the run's first step (whose time holds one-off costs: loader workers starting, the first
        batch, allocations), over every rank. A collective: every rank calls it."""
        if self.mark is None:
            return None
        tokens = _sum_across_ranks(self.trainer.tokens - self.mark[1])
        seconds = getattr(self, "ended", time.monotonic()) - self.mark[0]
        return round(tokens / seconds, 1) if tokens and seconds > 0 else None

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        step, total = state.global_step, state.max_steps
        if "eval_loss" in logs:
            self.report.log(f"evaluation at step {step}: loss {logs['eval_loss']:.4f}")
        if "loss" not in logs or not (step == 1 or step % max(1, total // 10) == 0 or step == total):
            return
        line = progress_line("training", step, total, time.monotonic() - self.started, "steps", rate_done=step - self.first_step)
        rewards = (
            f", reward {logs['reward']:.3f}, pass rate {logs.get('rewards/answer/mean') or 0:.2f}" if logs.get("reward") is not None else ""
        )
        self.report.log(f"{line}, loss {logs['loss']:.4f}{rewards}, lr {logs.get('learning_rate', 0):.2e}")


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


def _open_pipes():
    if "DAGSTER_PIPES_CONTEXT" not in os.environ:
        return nullcontext(None)  # run by hand: no Dagster to report to
    from dagster_pipes import open_dagster_pipes

    return open_dagster_pipes()


class _Reporter:
    def __init__(self, channel):
        self.channel = channel

    def log(self, message: str) -> None:
        if self.channel is not None:
            self.channel.log.info(message)
        elif int(os.environ.get("RANK", "0")) == 0:
            print(message, flush=True)


def _mean(values: list[float]) -> float | None:
    values = [v for v in values if v is not None and math.isfinite(v)]
    return round(sum(values) / len(values), 6) if values else None


def _loss_table(losses: list[float]) -> str:
    """A markdown table of the loss curve (at most ~20 rows)."""
    every = max(1, len(losses) // 20)
    rows = [(i + 1, loss) for i, loss in enumerate(losses) if i % every == 0 or i == len(losses) - 1]
    return "| step | loss |\n| ---: | ---: |\n" + "\n".join(f"| {step} | {loss:.4f} |" for step, loss in rows)


if __name__ == "__main__":
    raise SystemExit(main())
