"""The Trainer a training run uses, whatever its method: its arguments (DeepSpeed's config among them), freezing and
LoRA, the counting Trainer that every method's trainer builds on (examples and tokens seen; kd's two-part loss), and
where and how the run ran.

Imports torch, transformers, deepspeed and peft only inside its functions: the Dagster process imports it too.
"""

from __future__ import annotations

import glob
import math
import os
import re
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from omnithought_dagster.train.ranks import sum_across_ranks as _sum_across_ranks

LOSS_WINDOW = 3  # steps averaged for the initial and final loss


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


def counting_trainer(base=None):
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


def mean(values: list[float]) -> float | None:
    values = [v for v in values if v is not None and math.isfinite(v)]
    return round(sum(values) / len(values), 6) if values else None


# DeepSpeed's CPU collectives (deepspeed/ops/csrc/cpu/comm/shm.cpp) put one 66 MB buffer per rank in shared memory, named
# <prefix>_<uid>_<master addr>_<master port>_<rank>, and never unlink it: every CPU run left one in /dev/shm (RAM) for
# good - 468 of them, 18 GB, on a machine whose tests then had vLLM OOM-killed.
SHM_DIR = Path("/dev/shm")
SHM_PREFIX = "deepspeed_allreduce_buffer"
ORPHAN_AGE_S = 120.0  # a buffer younger than this may belong to a run that is still starting (created, not yet mapped)


def shm_buffers(addr: str, port: str | int, rank: int | None = None) -> list[Path]:
    """The shared-memory allreduce buffers of one run (its master address and port), or of one of its ranks."""
    pattern = f"{SHM_PREFIX}_{os.getuid()}_{glob.escape(str(addr))}_{glob.escape(str(port))}_{'*' if rank is None else rank}"
    return sorted(SHM_DIR.glob(pattern))


def remove_shm_buffers(addr: str, port: str | int, rank: int | None = None) -> int:
    """Unlinks a run's buffers (a rank's own at its end; every rank's once the run is over, however it ended); how many."""
    removed = 0
    for path in shm_buffers(addr, port, rank):
        try:
            path.unlink()
            removed += 1
        except FileNotFoundError:
            pass
    return removed


def sweep_shm_buffers(min_age_s: float = ORPHAN_AGE_S) -> int:
    """Unlinks this user's DeepSpeed buffers that no live process maps and that are older than `min_age_s`: those of runs
    that were SIGKILLed with their parent (nobody was left to clean up). Another run's live buffers are mapped by its ranks
    and stay. How many went."""
    mine = sorted(SHM_DIR.glob(f"{SHM_PREFIX}_{os.getuid()}_*"))
    if not mine:
        return 0
    mapped = _mapped_shm()
    now, removed = time.time(), 0
    for path in mine:
        try:
            old = now - path.stat().st_mtime > min_age_s
        except FileNotFoundError:
            continue
        if old and str(path) not in mapped:
            path.unlink(missing_ok=True)
            removed += 1
    return removed


def _mapped_shm() -> set[str]:
    """The /dev/shm files that any process we can see has mapped (from /proc/<pid>/maps)."""
    mapped = set()
    for maps in glob.glob("/proc/[0-9]*/maps"):
        try:
            with open(maps, encoding="utf-8", errors="replace") as handle:
                for line in handle:
                    if "/dev/shm/" in line:
                        mapped.add(line[line.index("/dev/shm/") :].split(" (deleted)")[0].rstrip("\n"))
        except OSError:  # the process ended, or is not ours to read
            continue
    return mapped
