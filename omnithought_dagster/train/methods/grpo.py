"""RL with verifiable rewards (`method: grpo`, TRL's GRPOTrainer) from another student's checkpoint (`train/grpo.py`):
questions only, answers sampled and rewarded by the answer verifier."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from omnithought_dagster.settings_model import SettingsModel
from omnithought_dagster.train.methods.base import Method
from omnithought_dagster.train.trainer import LOSS_WINDOW, mean


class GRPOSettings(SettingsModel):
    """Reinforcement learning with verifiable rewards (`method: grpo`, TRL's GRPOTrainer), started from another student's
    checkpoint on the same recipe: the student answers each question of the subset `num_generations` times; each answer is
    rewarded by the project's answer verifier (1 right, 0 wrong or missing) plus a format reward (`<think>...</think>` then
    `Answer: ...`), and the policy moves towards the answers that beat their group's mean."""

    start_from: str = Field(
        description="the student (method sft or kd, same base model) whose checkpoint on the same recipe "
        "GRPO starts from; its partition is trained first"
    )
    num_generations: int = Field(default=4, ge=2, description="answers sampled per question (the group the advantages are taken in)")
    max_completion_length: int = Field(default=256, ge=8, description="tokens per sampled answer")
    temperature: float = Field(default=1.0, gt=0, description="sampling temperature of the answers")
    beta: float = Field(
        default=0.0, ge=0, description="KL penalty towards the starting checkpoint (0: none, and no reference model is held)"
    )
    epsilon: float = Field(default=0.2, gt=0, lt=1, description="PPO-style clipping of the probability ratio")
    loss_type: Literal["grpo", "dapo", "dr_grpo", "bnpo"] = Field(default="dapo", description="TRL's loss normalisation")
    answer_weight: float = Field(default=1.0, ge=0, description="weight of the verifier's reward (right answer: 1)")
    format_weight: float = Field(default=0.5, ge=0, description="weight of the format reward (`<think>` block then `Answer:`)")
    learning_rate: float | None = Field(default=None, gt=0, description="default: training.learning_rate (RL usually wants less)")
    max_steps: int | None = Field(default=None, ge=1, description="optimizer steps; default: training.max_steps")

    @model_validator(mode="after")
    def _some_reward(self) -> GRPOSettings:
        if self.answer_weight == 0 and self.format_weight == 0:
            raise ValueError("grpo: answer_weight and format_weight are both 0: there is nothing to learn from")
        return self


class GRPO(Method):
    name = "grpo"
    keeps_cache = True  # TRL generates through the model
    samples = True
    short_run_starts_from = "sft"
    rises = "reward"  # its loss is a policy-gradient surrogate near 0: the reward is the objective
    settings_model = GRPOSettings
    reports = ("start_checkpoint", "initial_reward", "final_reward", "initial_pass_rate", "final_pass_rate", "mean_completion_length")
    settings_needed = "at least `start_from`"

    def check(self, project, index, student):
        """It starts from another student, trained on its recipes from the same base model; its generation rounds split into
        groups."""
        settings = self.settings(student)
        where = f"students[{index}] (name={student.name}).grpo"
        start = next((s for s in project.students if s.name == settings.start_from), None)
        if start is None or start is student:
            raise ValueError(f"{where}.start_from: no other student named {settings.start_from!r}")
        if start.method == self.name:
            raise ValueError(
                f"{where}.start_from: {start.name!r} is itself a grpo student; start from an sft, kd, prefix_mask_kd or opsd one"
            )
        if start.model != student.model:
            raise ValueError(
                f"{where}.start_from: {start.name!r} is trained from {start.model!r}, this student from {student.model!r}; "
                "give both the same base model"
            )
        missing = set(project.student_recipes(student.name)) - set(project.student_recipes(start.name))
        if missing:
            raise ValueError(f"{where}.start_from: {start.name!r} is not trained on {sorted(missing)}")
        training = project.training
        world = training.micro_batch_size * training.gradient_accumulation_steps * training.nproc_per_node * training.nnodes
        if world % settings.num_generations:
            raise ValueError(
                f"{where}.num_generations: the answers of one generation round (micro_batch_size x "
                f"gradient_accumulation_steps x processes = {world}) must be a multiple of num_generations "
                f"({settings.num_generations})"
            )

    def starts_from(self, student):
        return self.settings(student).start_from

    def spec(self, student, models_dir, *, start_checkpoint, answer_pattern):
        """Its settings, the checkpoint it starts from (the start_from student's on the same recipe) and the answer pattern its
        reward parses replies with."""
        if start_checkpoint is None or answer_pattern is None:
            raise ValueError(f"students[{student.name}]: method grpo needs the checkpoint it starts from and the answer pattern")
        return {
            "name": self.name,
            **self.settings(student).model_dump(mode="json"),
            "start_checkpoint": start_checkpoint,
            "answer_pattern": answer_pattern,
        }

    def describe(self, student, method):
        return (
            f"grpo from {self.starts_from(student)}'s checkpoint {method['start_checkpoint'][:12]} ({method['num_generations']} answers "
            f"a question, {method['loss_type']})"
        )

    def arguments(self, kwargs, method):
        from omnithought_dagster.train.grpo import grpo_arguments

        return grpo_arguments(kwargs, method)

    def prepare(self, args, vl):
        # TRL suppresses the image token in its samples; the other media tokens too (train/opsd.py: sample)
        args.generation_kwargs = {**(args.generation_kwargs or {}), "suppress_tokens": sorted(vl.media_ids)}

    def datasets(self, index, vl, settings, method, args, run_dir, data_dir):
        """Questions with a reference answer; answers are sampled, so there is no held-out loss to take."""
        from omnithought_dagster.train.grpo import prompt_dataset

        with args.main_process_first(local=True, desc="questions"):
            train_set, set_aside = prompt_dataset(index, None, run_dir / "questions", tuple(vl.added_tokens))
        if not len(train_set):
            skipped = {**dict(index.skipped), **set_aside}
            raise SystemExit(f"grpo: no question in {data_dir} has a reference answer (set aside: {skipped})")
        return train_set, None, set_aside

    def trainer(self, counting_trainer, *, model, teacher, method, vl, args, train_set, eval_set, callbacks, model_dir):
        from omnithought_dagster.train.grpo import grpo_trainer_class, reward_functions, vl_processor

        return grpo_trainer_class(counting_trainer)(
            model=model,
            reward_funcs=reward_functions(method["answer_pattern"]),
            args=args,
            train_dataset=train_set,
            processing_class=vl_processor(model_dir),
            callbacks=callbacks,
        )

    def results(self, logged, history, method, trainer):
        from omnithought_dagster.train.grpo import grpo_log

        # rewards, pass rate and answer lengths per step
        log = {**grpo_log(history), "start_checkpoint": method["start_checkpoint"]}
        metadata = {
            "method": self.name,
            "start_checkpoint": method["start_checkpoint"],
            "initial_reward": mean(log["rewards"][:LOSS_WINDOW]),
            "final_reward": mean(log["rewards"][-LOSS_WINDOW:]),
            "initial_pass_rate": mean(log["pass_rates"][:LOSS_WINDOW]),
            "final_pass_rate": mean(log["pass_rates"][-LOSS_WINDOW:]),
            "mean_completion_length": mean(log["completion_lengths"]),
        }
        return log, metadata

    def short_run_settings(self, teacher, sample_tokens):
        return {"start_from": "sft", "num_generations": 2, "max_completion_length": sample_tokens}

    def short_run(self, log):
        rewards = log.get("rewards") or [None]
        return {"reward_first": rewards[0], "reward_last": rewards[-1]}

    def curves(self, log, run):
        rewards = {"reward (weighted sum)": log["rewards"], "pass rate (verifier)": log["pass_rates"], "format": log["format_rates"]}
        return [("plot/reward", rewards, f"GRPO rewards per optimizer step ({run})", "mean over the step's answers")]


METHOD = GRPO()
