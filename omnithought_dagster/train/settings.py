"""The project file's `students:` and `training:` sections (a method's own settings live in train/methods/)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from omnithought_dagster.settings_model import SOURCE_NAME_PATTERN, SettingsModel, resolve_path
from omnithought_dagster.train.methods import METHODS

BASELINE_RECIPE = "base"  # the recipe-dimension key of a student's untrained baseline


class StudentConfig(SettingsModel):
    """A student model to fine-tune: a local folder, a hub id the trainer can load, or tiny:<name>, and how (`method`).

    `method` names one of the registered methods (train/methods/: sft, kd, prefix_mask_kd, opsd, grpo, and any a plug-in
    registers); its settings are the field named like it (`kd:`, `grpo:` ...), validated by the method's settings model.
    """

    model_config = ConfigDict(extra="allow", frozen=True, validate_default=True)  # the method's settings: checked below

    name: str = Field(pattern=SOURCE_NAME_PATTERN)
    model: str = "tiny:student"
    recipes: list[str] | None = Field(default=None, description="train on these recipes only; default all")
    method: str = Field(
        default="sft",
        description=(
            "sft: the teacher's traces as targets (long-CoT SFT); kd: also match a teacher model's token distribution (`kd`); "
            "prefix_mask_kd: kd with the student's most salient earlier reasoning tokens hidden from it (`prefix_mask_kd`); "
            "opsd: on-policy self-distillation with privileged context (`opsd`); "
            "grpo: RL with the answer verifier's reward, from another student's checkpoint (`grpo`)"
        ),
    )

    seed: int | None = Field(default=None, ge=0, le=2**32 - 1, description="this student's training seed; default training.seed")
    _replicate_of: str | None = PrivateAttr(default=None)  # set on the students an experiment adds for its other seeds

    @property
    def replicate_of(self) -> str | None:
        """The student this one replicates with another seed (experiment/settings.py); None for the project file's own."""
        return self._replicate_of

    @field_validator("method")
    @classmethod
    def _known_method(cls, value: str) -> str:
        if value not in METHODS:
            raise ValueError(f"unknown method {value!r}; methods: {', '.join(METHODS)}")
        return value

    @model_validator(mode="after")
    def _method_settings(self) -> StudentConfig:
        given = self.__pydantic_extra__ if self.__pydantic_extra__ is not None else {}
        for key in list(given):
            if key not in METHODS or METHODS[key].settings_model is None:
                raise ValueError(f"{key}: unknown field (check the spelling; see README 'Configuration')")
            if key != self.method:
                raise ValueError(f"students[{self.name}]: `{key}:` settings are given but method is {self.method!r}")
        how = METHODS[self.method]
        if how.settings_model is None:
            return self
        raw = given.get(self.method)
        if raw is None and how.settings_needed:
            raise ValueError(f"students[{self.name}]: method {self.method} needs `{self.method}:` settings ({how.settings_needed})")
        try:
            given[self.method] = how.settings_model.model_validate({} if raw is None else raw)
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, (self.method, *e['loc'])))}: {e['msg']}" for e in exc.errors())
            raise ValueError(problems) from None
        return self

    @property
    def settings(self) -> SettingsModel | None:
        """The method's settings (None for a method without any: sft)."""
        return (self.__pydantic_extra__ or {}).get(self.method)


class LoraSettings(SettingsModel):
    """LoRA adapters (peft) instead of training the whole model; the checkpoint holds the merged weights and the adapter."""

    r: int = Field(default=16, ge=1)
    alpha: int = Field(default=32, ge=1)
    dropout: float = Field(default=0.05, ge=0, lt=1)
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"], description="module names of the language model that get adapters"
    )


class TrainingConfig(SettingsModel):
    """Supervised fine-tuning on transformers' Trainer with DeepSpeed ZeRO, launched as its own process through Dagster Pipes.

    The same settings run 1 CPU process here and N GPUs x M nodes elsewhere: the launcher
    gets nproc_per_node / nnodes / hostfile, the DeepSpeed config gets the rest.
    """

    launcher: Literal["deepspeed", "torchrun"] = "deepspeed"
    engine: Literal["deepspeed", "torch"] = Field(
        default="deepspeed",
        description=(
            "deepspeed: the Trainer drives DeepSpeed ZeRO (zero_stage, offload_optimizer); torch: plain torch (DDP across "
            "processes), for a machine without DeepSpeed - launched by torchrun"
        ),
    )
    python: str | None = Field(default=None, description="interpreter of the training environment; default: this one")
    nproc_per_node: int = Field(default=1, ge=1, description="processes (GPUs) per node; 1 on CPU")
    nnodes: int = Field(default=1, ge=1)
    hostfile: str | None = Field(default=None, description="deepspeed hostfile for multi-node runs")
    master_addr: str = "127.0.0.1"
    master_port: int | None = Field(default=None, ge=1024, le=65535, description="default: a free port")
    launcher_args: list[str] = Field(default_factory=list, description="more launcher arguments, passed through")
    gpus: str | None = Field(default=None, description="CUDA_VISIBLE_DEVICES for the training process; default: inherited")
    zero_stage: Literal[0, 1, 2, 3] = 2
    offload_optimizer: bool = Field(default=False, description="ZeRO-Offload of optimizer states to CPU (DeepSpeedCPUAdam)")
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    micro_batch_size: int = Field(default=4, ge=1, description="examples per process per forward")
    gradient_accumulation_steps: int = Field(default=1, ge=1)
    learning_rate: float = Field(default=1e-3, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    warmup_steps: int = Field(default=0, ge=0)
    lr_scheduler: Literal["linear", "cosine", "constant_with_warmup", "constant"] = Field(
        default="cosine", description="the learning rate after warmup: decays to 0 (linear, cosine) or stays"
    )
    gradient_clipping: float = Field(default=1.0, ge=0)
    max_steps: int = Field(default=30, ge=1, description="optimizer steps (epochs repeat the subset until reached); unused with epochs")
    epochs: float | None = Field(default=None, gt=0, description="passes over the subset instead of max_steps")
    max_length: int = Field(default=2048, ge=16, description="tokens per example, images included")
    overlong: Literal["skip", "truncate_reply"] = Field(
        default="skip",
        description=(
            "an example over max_length: skip it (counted), or cut its reply (an example whose prompt and images do not fit is "
            "skipped either way: images are never cut)"
        ),
    )
    gradient_checkpointing: bool = Field(default=False, description="recompute activations in the backward pass (less memory)")
    freeze_vision_tower: bool = False
    freeze_projector: bool = Field(default=False, description="the vision-to-language merger")
    freeze_language_model: bool = False
    lora: LoraSettings | None = Field(default=None, description="train LoRA adapters on the language model instead")
    eval_share: float = Field(default=0.0, ge=0, le=0.5, description="share of the subset held out for the evaluation loss")
    eval_steps: int = Field(default=0, ge=0, description="evaluation loss every N steps (0: once, at the end); needs eval_share")
    save_steps: int = Field(
        default=0,
        ge=0,
        description=(
            "a resumable training checkpoint (model, optimizer, scheduler, data position, RNG) every N optimizer steps, copied "
            "to the store under runs/<checkpoint_id>/; a rerun after a kill resumes from the newest complete one (this disk's or "
            "the store's). 0: none"
        ),
    )
    save_total_limit: int = Field(default=2, ge=1, description="training checkpoints kept (the newest), on disk and in the store")
    dataloader_workers: int = Field(
        default=1,
        ge=0,
        description=("processes per rank decoding examples ahead of the trainer (0: threads of the rank decode each batch)"),
    )
    seed: int = 0
    work_dir: str = Field(
        default=".cache/train",
        description=("local scratch: the exported subset, the example index, training checkpoints, the model before upload"),
    )
    env: dict[str, str] = Field(default_factory=dict, description="more environment variables for the training processes")

    _resolve = field_validator("python", "hostfile", "work_dir")(resolve_path)

    def run_settings(self) -> dict[str, Any]:
        """What changes the trained weights (hashed into checkpoint ids); placement and timeouts do not."""
        return self.model_dump(
            mode="json",
            include={
                "zero_stage",
                "offload_optimizer",
                "precision",
                "micro_batch_size",
                "gradient_accumulation_steps",
                "learning_rate",
                "weight_decay",
                "warmup_steps",
                "lr_scheduler",
                "gradient_clipping",
                "max_steps",
                "epochs",
                "max_length",
                "overlong",
                "freeze_vision_tower",
                "freeze_projector",
                "freeze_language_model",
                "lora",
                "eval_share",
                "seed",
            },
        )

    @model_validator(mode="after")
    def _coherent(self) -> TrainingConfig:
        if self.freeze_vision_tower and self.freeze_projector and self.freeze_language_model:
            raise ValueError(
                "training: every part is frozen (freeze_vision_tower, freeze_projector, freeze_language_model): nothing to train"
            )
        if self.lora is not None and self.zero_stage == 3:
            raise ValueError("training: lora with zero_stage 3 is not supported (use ZeRO 0-2: adapters are small)")
        if self.lora is not None and self.freeze_language_model:
            raise ValueError("training: lora puts adapters on the language model, which freeze_language_model freezes")
        if self.eval_steps and not self.eval_share:
            raise ValueError("training: eval_steps needs eval_share (the held-out part it evaluates on)")
        if self.engine == "torch" and (self.launcher != "torchrun" or self.offload_optimizer):
            raise ValueError("training: engine torch runs under launcher torchrun, without offload_optimizer (DeepSpeed's)")
        return self

    def process_settings(self) -> dict[str, Any]:
        """What the training process needs besides run_settings: how it saves, evaluates and reads (not the weights)."""
        return self.model_dump(
            mode="json", include={"gradient_checkpointing", "eval_steps", "save_steps", "save_total_limit", "dataloader_workers", "engine"}
        )
