"""On-policy self-distillation (`method: opsd`): the student samples answers and matches itself given privileged context
(`train/opsd.py`). Answers are sampled: there is no held-out loss to take."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from omnithought_dagster.settings_model import SettingsModel
from omnithought_dagster.train.methods.base import Method
from omnithought_dagster.train.trainer import LOSS_WINDOW, mean


class OPSDSettings(SettingsModel):
    """On-policy self-distillation with privileged context (`method: opsd`): the student samples its own answer to each
    question; a teacher with the student's weights reads the same plus privileged context (the curated trace or the
    reference answer) and the student is trained towards it, token by token along its own sample (generalized JSD)."""

    context: Literal["trace", "answer"] = Field(
        default="trace", description="what only the teacher sees: the curated trace of the question, or its reference answer"
    )
    teacher: Literal["frozen", "ema", "live"] = Field(
        default="frozen",
        description=(
            "the teacher's weights: a frozen copy of the start, an exponential moving average of the student, or the student itself"
        ),
    )
    ema_decay: float = Field(default=0.99, gt=0, lt=1, description="teacher ema: teacher <- decay x teacher + (1 - decay) x student")
    beta: float = Field(default=0.5, gt=0, lt=1, description="the generalized JSD's teacher weight (0.5: symmetric)")
    top_k: int | None = Field(default=None, ge=1, description="compare only the teacher's k most likely tokens (renormalised)")
    clip: float | None = Field(default=None, gt=0, description="cap on each sampled token's divergence (None: no cap)")
    max_new_tokens: int = Field(default=256, ge=1, description="tokens the student samples per question")
    temperature: float = Field(default=1.0, gt=0, description="the student's sampling temperature")


class OPSD(Method):
    name = "opsd"
    logged = ("opsd_divergence", "sample_length")
    samples = True
    reports = ("initial_divergence", "final_divergence", "mean_sample_length")
    settings_model = OPSDSettings  # every setting has a default: `opsd: {}` may be left out

    def describe(self, student, method):
        return (
            f"opsd ({method['teacher']} teacher with the {method['context']} as privileged context, "
            f"{method['max_new_tokens']} tokens sampled)"
        )

    def arguments(self, kwargs, method):
        from transformers import TrainingArguments

        return TrainingArguments(**{**kwargs, "eval_strategy": "no"})

    def datasets(self, index, vl, settings, method, args, run_dir, data_dir):
        """The question for the student, with the privileged context for the teacher."""
        from omnithought_dagster.train.opsd import PrivilegedPrompts

        return PrivilegedPrompts(index, vl, method["context"]), None, {}

    def trainer(self, counting_trainer, *, model, teacher, method, vl, args, train_set, eval_set, callbacks, model_dir):
        from omnithought_dagster.train import opsd

        return opsd.build_trainer(counting_trainer, model, method, vl, args=args, train_dataset=train_set, callbacks=callbacks)

    def short_run_settings(self, teacher, sample_tokens):
        return {"max_new_tokens": sample_tokens}

    def short_run(self, log):
        return {"divergence_first": log.get("initial_divergence"), "divergence_last": log.get("final_divergence")}

    def results(self, logged, history, method, trainer):
        # the divergence to the privileged teacher and the sampled answers' length, per step
        log = {
            "opsd_divergences": logged["opsd_divergence"],
            "sample_lengths": logged["sample_length"],
            "initial_divergence": mean(logged["opsd_divergence"][:LOSS_WINDOW]),
            "final_divergence": mean(logged["opsd_divergence"][-LOSS_WINDOW:]),
            "mean_sample_length": mean(logged["sample_length"]),
        }
        metadata = {
            "method": self.name,
            "initial_divergence": log["initial_divergence"],
            "final_divergence": log["final_divergence"],
            "mean_sample_length": log["mean_sample_length"],
        }
        return log, metadata

    def curves(self, log, run):
        caption = f"on-policy divergence per optimizer step ({run}; answers {log['mean_sample_length']:.0f} tokens on average)"
        return [("plot/opsd", {"JSD to the privileged teacher": log["opsd_divergences"]}, caption, "loss")]


METHOD = OPSD()
