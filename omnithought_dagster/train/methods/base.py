"""What a distillation method is to the training process, and what every method does unless it says otherwise.

The training process (`train/sft.py`) asks the run's method (the spec's `method`, None for sft) for its Trainer
arguments, its datasets, its Trainer and what it adds to the run's log and metadata; it branches on no method name.
A method is one module of this package with a `Method` subclass, and one line in `METHODS` (`__init__.py`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


class Method:
    """Long-CoT SFT: the teacher's traces as targets, the loss on the reply tokens.

    Its hooks run in two places: before a run, in the asset's process (`spec`, `starts_from`, `describe`, `rises`), and in
    the training process (`arguments` ... `results`). Its settings are the student's field named like it (`kd:`, `grpo:`).
    """

    name = "sft"
    teacher_model = False  # a frozen teacher model (its settings' `teacher`) is loaded beside the student; the loss mixes in its divergence
    keeps_cache = False  # the run generates through the model's own sampler (TRL's): the KV cache stays on
    logged: tuple[str, ...] = ()  # the trainer's per-step log values it keeps, beside the loss and the learning rate
    rises: str | None = None  # the objective that must rise over the run (reported as initial_<it> / final_<it>); None: the loss falls
    reports: tuple[str, ...] = ()  # the metadata its `results` add that the checkpoint's manifest keeps (`results`)
    settings_model: type | None = None  # its settings' model (a SettingsModel): the student's field named like the method
    settings_needed: str | None = None  # what a project file must give, when its settings have required fields ("at least `teacher`")
    samples = False  # each step samples answers from the student (a short run halves its batch: groups of answers per question)
    short_run_starts_from: str | None = None  # the method whose short run's checkpoint its own starts from (grpo: sft)

    # -- the project file ---------------------------------------------------------------------------------------------------

    def check(self, project, index: int, student) -> None:
        """What its settings must agree on with the rest of the project file (a ValueError saying so)."""

    # -- before the run (the asset's process) --------------------------------------------------------------------------------

    def settings(self, student) -> Any:
        """The student's settings for this method (its field named like the method), or None."""
        return student.settings if student.method == self.name else None

    def starts_from(self, student) -> str | None:
        """The student whose checkpoint (on the same recipe) this run starts from; None: the student's base model."""
        return None

    def spec(self, student, models_dir: str | Path, *, start_checkpoint: str | None, answer_pattern: str | None) -> dict[str, Any] | None:
        """What the method adds to the run's spec (hashed into the checkpoint id, read by the training process); None for sft,
        whose checkpoint ids stay what they were."""
        settings = self.settings(student)
        if self.name == Method.name and settings is None:
            return None
        return {"name": self.name, **(settings.model_dump(mode="json") if settings is not None else {})}

    def describe(self, student, method: dict[str, Any] | None) -> str:
        """One line for the run's log and lineage."""
        return self.name

    # -- in the training process --------------------------------------------------------------------------------------------

    def arguments(self, kwargs: dict[str, Any], method: dict[str, Any] | None):
        """The Trainer's arguments from the run's keywords (`trainer.training_kwargs`)."""
        from transformers import TrainingArguments

        return TrainingArguments(**kwargs)

    def prepare(self, args, vl) -> None:
        """What the arguments take from the tokenizer (grpo: the media tokens its sampler must not emit)."""

    def datasets(self, index, vl, settings: dict[str, Any], method: dict[str, Any] | None, args, run_dir: Path, data_dir: Path):
        """(the training set, the held-out set or None, examples set aside by reason) from the run's example index."""
        from omnithought_dagster.train.data import LazyExamples, split

        train_part, held_out = split(index, settings["eval_share"], settings["seed"])
        # Without worker processes a batch's examples are decoded by threads of this one (no copy of the batch between processes).
        threads = 1 if settings["dataloader_workers"] else min(4, len(os.sched_getaffinity(0)))
        train_set = LazyExamples(index, vl, settings["max_length"], train_part, threads=threads)
        eval_set = LazyExamples(index, vl, settings["max_length"], held_out, threads=threads) if held_out else None
        return train_set, eval_set, {}

    def trainer(self, counting_trainer, *, model, teacher, method, vl, args, train_set, eval_set, callbacks, model_dir: Path):
        """The Trainer, built on `counting_trainer` (`trainer.counting_trainer`: examples and tokens counted; kd's loss)."""
        return counting_trainer()(
            model=model, args=args, train_dataset=train_set, eval_dataset=eval_set, data_collator=vl.collate, callbacks=callbacks
        )

    def results(self, logged: dict[str, list], history: list[dict], method: dict[str, Any] | None, trainer) -> tuple[dict, dict]:
        """What it adds to train_log.json and to the materialisation's metadata, from its `logged` values per step."""
        return {}, {}

    # -- after the run (the asset's process) ---------------------------------------------------------------------------------

    def short_run_settings(self, teacher: str, sample_tokens: int) -> dict[str, Any]:
        """Its settings for a short run of a few steps (the GPU check's), given a teacher model's folder and a sampling length."""
        return {}

    def short_run(self, log: dict[str, Any]) -> dict[str, Any]:
        """Its objective first and last, from a short run's train_log.json (the GPU check's line for it)."""
        return {}

    def curves(self, log: dict[str, Any], run: str) -> list[tuple[str, dict[str, list], str, str]]:
        """Its plots beside the loss curve, from train_log.json: (metadata key, {label: per-step values}, caption, y label).
        `run` names the run in captions ("student on recipe")."""
        return []
