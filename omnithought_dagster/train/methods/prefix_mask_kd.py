"""Salient reasoning-prefix masking (`method: prefix_mask_kd`): kd's loss, with the student's most salient earlier reply
tokens hidden from it under a growing budget (`train/prefix_mask.py`)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from omnithought_dagster.train.methods.kd import KD, DistillSettings
from omnithought_dagster.train.trainer import LOSS_WINDOW, mean


class PrefixMaskSettings(DistillSettings):
    """Salient reasoning-prefix masking (`method: prefix_mask_kd`): kd's loss, with the student's attention mask hiding,
    for each reply token it predicts, the earlier reply tokens its attention leans on most (never the image or the
    prompt); the share hidden (the budget) grows over training while the student keeps up with the teacher."""

    saliency: Literal["student", "teacher"] = Field(
        default="student",
        description=(
            "whose attention ranks the earlier reply tokens: the student's (one extra forward pass without gradients per "
            "micro-batch) or the teacher's (taken from the pass the KD loss needs; needs a teacher with the same attention interface)"
        ),
    )
    saliency_layers: list[int] = Field(
        default=[-1],
        min_length=1,
        description=("text decoder layers whose attention (heads averaged, then layers) is the saliency; negative counts from the last"),
    )
    max_budget: float = Field(default=0.3, gt=0, le=1, description="the largest share of a prediction's candidate tokens hidden")
    growth: float = Field(default=0.02, gt=0, le=1, description="budget added after an optimizer step the student kept up in")
    warmup_steps: int = Field(default=10, ge=0, description="optimizer steps of plain KD (budget 0) before the masks start")
    tolerance: float = Field(
        default=1.25,
        ge=1,
        description=(
            "the budget grows after a step whose divergence to the teacher under the masks is at most tolerance x its divergence "
            "without them, and holds otherwise"
        ),
    )
    keep_recent: int = Field(default=1, ge=0, description="the tokens just before each prediction that are never hidden")


class PrefixMaskKD(KD):
    name = "prefix_mask_kd"
    logged = (*KD.logged, "mask_budget", "masking_cost", "hidden_per_prediction")
    settings_model = PrefixMaskSettings
    reports = (*KD.reports, "final_mask_budget", "final_masking_cost", "final_hidden_per_prediction")

    def describe(self, student, method):
        return (
            f"prefix_mask_kd from {self.settings(student).teacher} ({method['divergence']}, weight {method['weight']}; "
            f"up to {method['max_budget']:.0%} of the earlier reply tokens hidden by the {method['saliency']}'s attention)"
        )

    def short_run_settings(self, teacher, sample_tokens):
        return {"teacher": teacher, "warmup_steps": 1, "max_budget": 0.3, "growth": 0.1}  # masking starts within a few steps

    def trainer(self, counting_trainer, *, model, teacher, method, vl, args, train_set, eval_set, callbacks, model_dir):
        from omnithought_dagster.train import prefix_mask

        return prefix_mask.build_trainer(
            counting_trainer,
            model,
            teacher,
            method,
            vl.image_token_id,
            args=args,
            train_dataset=train_set,
            eval_dataset=eval_set,
            data_collator=vl.collate,
            callbacks=callbacks,
        )

    def results(self, logged, history, method, trainer):
        log, metadata = super().results(logged, history, method, trainer)
        # the masking budget in force and the reply tokens hidden per prediction, per step
        log.update(
            {
                "mask_budgets": logged["mask_budget"],
                "masking_costs": logged["masking_cost"],
                "hidden_per_prediction": logged["hidden_per_prediction"],
                "final_mask_budget": trainer.schedule.budget,
            }
        )
        metadata.update(
            {
                "final_mask_budget": log["final_mask_budget"],
                "final_masking_cost": mean(logged["masking_cost"][-LOSS_WINDOW:]),
                "final_hidden_per_prediction": mean(logged["hidden_per_prediction"][-LOSS_WINDOW:]),
            }
        )
        return log, metadata

    def curves(self, log, run):
        hidden = log["hidden_per_prediction"][-1] if log["hidden_per_prediction"] else 0
        budget = {
            "budget (share of earlier reply tokens hidden)": log["mask_budgets"],
            "masking cost (divergence masked / unmasked)": log["masking_costs"],
        }
        caption = f"self-paced masking budget per optimizer step ({run}; {hidden:.1f} tokens hidden per prediction at the end)"
        return [*super().curves(log, run), ("plot/mask_budget", budget, caption, "share; ratio")]


METHOD = PrefixMaskKD()
