"""White-box distillation (`method: kd`): the SFT loss mixed with the divergence from a frozen teacher model over the
reply tokens (the counting Trainer's two-part loss, `train/distill.py`)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from omnithought_dagster.settings_model import SettingsModel
from omnithought_dagster.train.methods.base import Method
from omnithought_dagster.train.trainer import LOSS_WINDOW, mean


class DistillSettings(SettingsModel):
    """White-box token-level distillation (`method: kd`): the student matches a teacher model's next-token distribution
    over the reply tokens of each trace, mixed with the SFT loss."""

    teacher: str = Field(
        description="the teacher model: a local folder, a hub id or tiny:<name>; it must tokenize like the "
        "student (same vocabulary and image processor)"
    )
    divergence: Literal["forward_kl", "reverse_kl", "jsd"] = Field(
        default="forward_kl", description="KL(teacher || student), KL(student || teacher), or the generalized JSD with `beta`"
    )
    beta: float = Field(default=0.5, gt=0, lt=1, description="jsd: the teacher's weight in the mixture (0.5: the symmetric JSD)")
    temperature: float = Field(default=1.0, gt=0, description="both distributions are softened by it; the loss is scaled by T^2")
    top_k: int | None = Field(default=None, ge=1, description="compare only the teacher's k most likely tokens (renormalised)")
    weight: float = Field(default=0.5, ge=0, le=1, description="the distillation loss's share; the SFT loss gets 1 - weight")


class KD(Method):
    name = "kd"
    teacher_model = True
    logged = ("ce_loss", "kd_loss")
    settings_model = DistillSettings
    reports = ("initial_kd_loss", "final_kd_loss", "final_ce_loss")
    settings_needed = "at least `teacher`"

    def check(self, project, index, student):
        if project.training.zero_stage == 3:
            raise ValueError(
                f"students[{index}] (name={student.name}): method {self.name} with training.zero_stage 3 is not supported "
                "(the teacher is a whole copy on every rank; use ZeRO 0-2)"
            )

    def spec(self, student, models_dir, *, start_checkpoint, answer_pattern):
        """Its settings, the teacher's folder (or hub id) and fingerprint (tiny:<name> teachers are built when missing)."""
        from omnithought_dagster.ids import content_id
        from omnithought_dagster.models.resolve import resolve_model

        settings = self.settings(student)
        teacher_dir, fingerprint = resolve_model(settings.teacher, models_dir)
        return {
            "name": self.name,
            **settings.model_dump(mode="json"),
            "teacher_dir": str(teacher_dir),
            "teacher_fingerprint": fingerprint or content_id("base-model", {"model": settings.teacher}),
        }

    def describe(self, student, method):
        return f"{self.name} from {self.settings(student).teacher} ({method['divergence']}, weight {method['weight']})"

    def results(self, logged, history, method, trainer):
        log = {
            "ce_losses": logged["ce_loss"],
            "kd_losses": logged["kd_loss"],
            "teacher": method["teacher"],
            "initial_kd_loss": mean(logged["kd_loss"][:LOSS_WINDOW]),
            "final_kd_loss": mean(logged["kd_loss"][-LOSS_WINDOW:]),
        }
        metadata = {
            "method": self.name,
            "teacher": method["teacher"],
            "initial_kd_loss": log["initial_kd_loss"],
            "final_kd_loss": log["final_kd_loss"],
            "final_ce_loss": mean(logged["ce_loss"][-LOSS_WINDOW:]),
        }
        return log, metadata

    def short_run_settings(self, teacher, sample_tokens):
        return {"teacher": teacher}

    def short_run(self, log):
        losses = log.get("kd_losses") or [None]
        return {"kd_loss_first": losses[0], "kd_loss_last": losses[-1]}

    def curves(self, log, run):
        parts = {"distillation (to the teacher)": log["kd_losses"], "SFT (cross-entropy)": log["ce_losses"]}
        return [("plot/kd_loss", parts, f"the loss's parts per optimizer step ({run}, {log['method']})", "loss")]


METHOD = KD()
