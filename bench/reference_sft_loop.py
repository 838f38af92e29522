"""The hand-written DeepSpeed SFT loop the project trained with before it moved to transformers' Trainer.

Kept only as the peer of `bench/training.py`'s throughput comparison (the new trainer must stay within
10% of it on the tiny student); nothing in the project runs it. It reads the same spec and writes the
same train_log.json fields the bench reads. Launched as a script by the deepspeed launcher:

    deepspeed --num_gpus 1 bench/reference_sft_loop.py --spec spec.json
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from omnithought_dagster.progress import progress_line  # noqa: E402
from omnithought_dagster.train import sft  # noqa: E402
from omnithought_dagster.train import trainer as project_trainer  # noqa: E402
from omnithought_dagster.train.ranks import sum_across_ranks as _sum_across_ranks  # noqa: E402
from omnithought_dagster.train.report import Reporter as _Reporter  # noqa: E402
from omnithought_dagster.train.report import loss_table as _loss_table  # noqa: E402
from omnithought_dagster.train.trainer import mean as _mean  # noqa: E402

LOSS_WINDOW = 3  # steps averaged for the initial and final loss


def train(spec: dict[str, Any], report: _Reporter) -> dict[str, Any]:
    import deepspeed
    import torch
    from PIL import Image
    from torch.utils.data import DataLoader, DistributedSampler
    from transformers import AutoModelForImageTextToText
    from transformers.utils import logging as hf_logging

    from omnithought_dagster.models.vl_chat import VLTokenizer, user_content

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    settings = spec["training"]
    deepspeed.init_distributed(dist_backend=spec.get("dist_backend") or ("nccl" if torch.cuda.is_available() else "gloo"))
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.manual_seed(settings["seed"])

    model_dir, data_dir, out_dir = Path(spec["model_dir"]), Path(spec["data_dir"]), Path(spec["output_dir"])
    vl = VLTokenizer.load(model_dir)
    examples, skipped = [], 0
    for record in json.loads((data_dir / "data.json").read_text()):
        images = [Image.open(data_dir / path) for path in record["images"]]
        user, assistant = record["messages"][0]["content"], record["messages"][-1]["content"]
        messages = [{"role": "user", "content": user_content(user, len(images))}, {"role": "assistant", "content": assistant}]
        encoded = vl.encode_example(messages, images, settings["max_length"])
        if encoded is None:
            skipped += 1
            continue
        examples.append(encoded)
    if not examples:
        raise SystemExit(f"no trainable examples in {data_dir} ({skipped} prompts longer than max_length {settings['max_length']})")
    report.log(f"rank {rank}/{world}: {len(examples)} examples ({skipped} skipped: prompt over max_length)")

    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32)
    model.config.use_cache = False
    ds_config = deepspeed_config(settings)
    optimizer = None
    if not settings["offload_optimizer"]:
        # A client optimizer needs no compiled DeepSpeed op; ZeRO shards its states all the same.
        optimizer = torch.optim.AdamW(model.parameters(), lr=settings["learning_rate"], weight_decay=settings["weight_decay"])
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, config=ds_config, model_parameters=None if optimizer else model.parameters()
    )
    sampler = DistributedSampler(examples, num_replicas=world, rank=rank, shuffle=True, seed=settings["seed"])
    loader = DataLoader(examples, batch_size=settings["micro_batch_size"], sampler=sampler, collate_fn=vl.collate)

    accumulation = settings["gradient_accumulation_steps"]
    losses: list[float] = []
    samples = tokens = 0
    epoch, step, micro = 0, 0, 0
    window: list[float] = []
    started = time.monotonic()
    engine.train()
    while step < settings["max_steps"]:
        sampler.set_epoch(epoch)
        for batch in loader:
            batch = {k: v.to(engine.device) for k, v in batch.items()}
            loss = engine(**batch).loss
            engine.backward(loss)
            engine.step()
            window.append(float(loss.detach()))
            samples += int(batch["input_ids"].shape[0])
            tokens += int(batch["attention_mask"].sum())
            micro += 1
            if micro % accumulation == 0:
                step += 1
                if step == 1:
                    mark = (time.monotonic(), tokens)  # the steady-state rate counts from here, as the trainer's does
                losses.append(_sum_across_ranks(sum(window) / len(window)) / world)
                window = []
                if step == 1 or step % max(1, settings["max_steps"] // 10) == 0 or step == settings["max_steps"]:
                    report.log(
                        progress_line("training", step, settings["max_steps"], time.monotonic() - started, "steps")
                        + f", loss {losses[-1]:.4f}"
                    )
                if step >= settings["max_steps"]:
                    break
        epoch += 1
    ended = time.monotonic()
    seconds = ended - started
    steady = round(_sum_across_ranks(tokens - mark[1]) / (ended - mark[0]), 1) if step > 1 else None
    samples, tokens = int(_sum_across_ranks(samples)), int(_sum_across_ranks(tokens))

    _save(engine, model, settings, model_dir, out_dir, rank)
    initial, final = _mean(losses[:LOSS_WINDOW]), _mean(losses[-LOSS_WINDOW:])
    log = {
        "losses": losses,
        "initial_loss": initial,
        "final_loss": final,
        "steps": step,
        "epochs": epoch,
        "examples": len(examples),
        "skipped_examples": skipped,
        "samples_seen": samples,
        "tokens_seen": tokens,
        "train_seconds": round(seconds, 3),
        "tokens_per_s": round(tokens / seconds, 1) if seconds else None,
        "steady_tokens_per_s": steady,
        "world_size": world,
        "deepspeed": ds_config,
    }
    if rank == 0:
        (out_dir / "train_log.json").write_text(json.dumps(log, indent=2))
    metadata = {
        "output_dir": str(out_dir),
        "steps": step,
        "examples": len(examples),
        "skipped_examples": skipped,
        "samples_seen": samples,
        "tokens_seen": tokens,
        "initial_loss": initial,
        "final_loss": final,
        "tokens_per_s": log["tokens_per_s"],
        "train_seconds": log["train_seconds"],
        "world_size": world,
        "loss_curve": {"raw_value": _loss_table(losses), "type": "md"},
    }
    return {"log": log, "metadata": metadata}


def deepspeed_config(settings: dict[str, Any]) -> dict[str, Any]:
    """The project's DeepSpeed config with the values the Trainer fills in for "auto", and DeepSpeed's own optimizer
    settings and WarmupLR, as the loop had them."""
    config = project_trainer.deepspeed_config(settings)
    del config["train_batch_size"]
    config.update(
        {
            "train_micro_batch_size_per_gpu": settings["micro_batch_size"],
            "gradient_clipping": settings["gradient_clipping"],
            "gradient_accumulation_steps": settings["gradient_accumulation_steps"],
            "bf16": {"enabled": settings["precision"] == "bf16"},
            "fp16": {"enabled": settings["precision"] == "fp16"},
        }
    )
    if settings["offload_optimizer"]:
        config["optimizer"] = {"type": "AdamW", "params": {"lr": settings["learning_rate"], "weight_decay": settings["weight_decay"]}}
    if settings["warmup_steps"]:
        config["scheduler"] = {
            "type": "WarmupLR",
            "params": {"warmup_min_lr": 0, "warmup_max_lr": settings["learning_rate"], "warmup_num_steps": settings["warmup_steps"]},
        }
    return config


def _save(engine, model, settings: dict, model_dir: Path, out_dir: Path, rank: int) -> None:
    """Rank 0 writes an HF folder: weights (gathered from the ranks under ZeRO-3), tokenizer, processor files."""
    state = engine._zero3_consolidated_16bit_state_dict() if settings["zero_stage"] == 3 else None  # every rank takes part
    if rank != 0:
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    module = engine.module
    module.config.use_cache = True
    module.save_pretrained(out_dir, state_dict=state, safe_serialization=True)
    sft.copy_processor_files(model_dir, out_dir)


if __name__ == "__main__":
    raise SystemExit(sft.main(train_fn=train))
