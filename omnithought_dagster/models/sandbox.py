"""The sandbox teacher: a tiny model that knows something, built here from nothing downloadable.

Every other model of this project is random-weight. This one starts as a tiny random Qwen2-VL (a few layers wider than
the tiny teacher, the same tokenizer) and is trained by the project's own trainer (train/sft.py under DeepSpeed, as a
student is) on worked solutions the synthetic source writes: samples of the `with_content` variant (the question says
in text what the image shows, where text can) drawn with a seed of their own - never the sandbox source's or its
benchmark's - each asked exactly as the teacher stage asks (its system prompt, its user turn, its JSON reply format)
and answered with `{"reasoning": <the worked solution>, "final_answer": <the answer>}`. So it is served by the same vLLM
path as any teacher, and it learns what a small model can from text (copying a table row or a bar's value) while what
only the image holds (counting, spatial relations) and what takes arithmetic stays hard: a natural mix of right and
wrong answers, by family and difficulty - the mix curation is supposed to find.

Building (omnithought_dagster/sandbox.py: it launches the trainer, so it lives above the stages) is deterministic and
cached like the tiny models: a folder whose manifest matches the recipe's fingerprint is reused; a new build trains in a
temporary sibling that is renamed into place. Resolving `tiny:sandbox-teacher` finds a built one; it never trains.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from omnithought_dagster.ids import content_id
from omnithought_dagster.models.tiny import TinySpec, manifest_matches

BUILDER_VERSION = 1
SANDBOX_BASE = TinySpec(
    name="sandbox-qwen2vl-teacher-base", family="qwen2_vl", hidden_size=128, layers=4, heads=4, kv_heads=2, intermediate_size=384, seed=5
)
IMAGE_PLACEHOLDER = "<image>"


@dataclass(frozen=True)
class SandboxRecipe:
    """What the sandbox teacher learns from and how long: its fingerprint names the built model."""

    name: str = "sandbox-qwen2vl-teacher"
    samples: int = 4000  # worked solutions, drawn from the synthetic source's `with_content` variant
    data_seed: int = 7  # the generator seed of those samples (a sandbox source or benchmark must use another)
    image_size: int = 320
    max_steps: int = 1500
    micro_batch_size: int = 16
    learning_rate: float = 3e-3
    warmup_steps: int = 50
    max_length: int = 512
    seed: int = 0

    @property
    def fingerprint(self) -> str:
        return content_id("sandbox-teacher", {**asdict(self), "base": SANDBOX_BASE.fingerprint, "builder": BUILDER_VERSION})


SANDBOX_TEACHER = SandboxRecipe()


def training_records(recipe: SandboxRecipe, images: Path) -> list[dict]:
    """The worked solutions as training records (the trainer's llamafactory-style messages), each asked as the teacher
    stage asks; the images are written into `images`."""
    from omnithought_dagster.seed.sources.synthetic import SyntheticReader
    from omnithought_dagster.teacher.prompt import teacher_prompt
    from omnithought_dagster.teacher.settings import GenerationConfig

    prompt = teacher_prompt(GenerationConfig(), "json")
    images.mkdir(parents=True, exist_ok=True)
    records = []
    reader = SyntheticReader(recipe.samples, seed=recipe.data_seed, image_size=recipe.image_size, question_text="with_content")
    for record in reader.records():
        path = images / f"{record.native_id}.png"
        path.write_bytes(record.images[0].data)
        user = IMAGE_PLACEHOLDER + prompt.user_text(record.question, record.choices or [], record.answer_type)
        reply = json.dumps({"reasoning": record.metadata["solution"], "final_answer": record.answer}, ensure_ascii=False)
        records.append(
            {
                "id": record.native_id,
                "messages": [
                    {"role": "system", "content": prompt.config.system},
                    {"role": "user", "content": user},
                    {"role": "assistant", "content": reply},
                ],
                "images": [str(path)],
            }
        )
    return records


def is_built(recipe: SandboxRecipe, folder: str | Path) -> bool:
    return manifest_matches(folder, recipe.fingerprint)


class SandboxTeacherMissing(FileNotFoundError):
    """`tiny:sandbox-teacher` is trained, not generated: it is built by `omnithought sandbox-teacher` (make sandbox)."""


def require_built(recipe: SandboxRecipe, folder: str | Path) -> Path:
    """The built sandbox teacher's folder; SandboxTeacherMissing (with the command that builds it) when there is none of
    this recipe."""
    if not is_built(recipe, folder):
        raise SandboxTeacherMissing(
            f"no sandbox teacher of this recipe ({recipe.fingerprint[:12]}) in {folder}: build it with `omnithought "
            "sandbox-teacher --config <project file>` (`make sandbox` does; ~15 min on 2 CPU cores, once)"
        )
    return Path(folder)
