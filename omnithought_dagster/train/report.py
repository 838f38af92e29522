"""What a training run tells Dagster and the console: its progress lines (with ETA), the COMPLETE mark on each
training checkpoint every rank wrote, and the Pipes channel rank 0 opens."""

from __future__ import annotations

import json
import os
import time
from contextlib import nullcontext
from pathlib import Path

from omnithought_dagster.progress import progress_line
from omnithought_dagster.train.checkpoints import COMPLETE
from omnithought_dagster.train.ranks import sum_across_ranks as _sum_across_ranks


class Callback:
    """A TrainerCallback without transformers at import time: events it does not define do nothing."""

    def __getattr__(self, name):
        if name.startswith("on_"):
            return lambda *args, **kwargs: None
        raise AttributeError(name)


class MarkComplete(Callback):
    """Once every rank has saved a training checkpoint (the counts' all-reduce is the meeting point), rank 0 marks it
    COMPLETE, with the examples and tokens seen so far; a rerun resumes only from a marked one."""

    trainer = None

    def on_save(self, args, state, control, **kwargs):
        counts = self.trainer.totals()
        if state.is_world_process_zero:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            (folder / COMPLETE).write_text(json.dumps({"step": state.global_step, **counts}))


class Progress(Callback):
    """Progress lines (with ETA) at ~10 points of the run, the loss and learning rate with them."""

    trainer = None

    def __init__(self, report: Reporter):
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


def open_pipes():
    if "DAGSTER_PIPES_CONTEXT" not in os.environ:
        return nullcontext(None)  # run by hand: no Dagster to report to
    from dagster_pipes import open_dagster_pipes

    return open_dagster_pipes()


class Reporter:
    def __init__(self, channel):
        self.channel = channel

    def log(self, message: str) -> None:
        if self.channel is not None:
            self.channel.log.info(message)
        elif int(os.environ.get("RANK", "0")) == 0:
            print(message, flush=True)


def loss_table(losses: list[float]) -> str:
    """A markdown table of the loss curve (at most ~20 rows)."""
    every = max(1, len(losses) // 20)
    rows = [(i + 1, loss) for i, loss in enumerate(losses) if i % every == 0 or i == len(losses) - 1]
    return "| step | loss |\n| ---: | ---: |\n" + "\n".join(f"| {step} | {loss:.4f} |" for step, loss in rows)
