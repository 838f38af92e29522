"""The project file's `experiments:` section, and the arms an experiment is made of.

An experiment names curated recipes (each compared with the controls it names), students and seeds. An arm is one recipe
(the curated one or a control) for one student and one seed; every arm is an ordinary partition of the existing assets.
A seed is the student's training seed and, for a control (drawn at random), its draw's seed. The arm of seed s is the
student or control itself when s is its own seed, else a replicate named `<name>-s<s>` that the project file gains
(`ProjectConfig` adds them): a student with `seed: s`, a control with `seed: s`. So adding an experiment changes no
existing partition key or id, and nothing is trained or scored twice for the same inputs.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import Field, field_validator

from omnithought_dagster.settings_model import SOURCE_NAME_PATTERN, SettingsModel

MAX_SEED = 2**32 - 1  # what torch's and numpy's seeding take


class ExperimentConfig(SettingsModel):
    """Curated recipes against their controls, for these students, over these seeds, on these benchmarks."""

    name: str = Field(pattern=SOURCE_NAME_PATTERN)
    recipes: list[str] = Field(min_length=1, description="curated recipes; each is compared with the controls it names")
    students: list[str] = Field(min_length=1, description="each is trained on every arm (its method is part of the arm)")
    seeds: list[int] = Field(
        default_factory=lambda: [0], min_length=1, description="training seeds (and a control's draw seed): one run of every arm per seed"
    )
    benchmarks: list[str] | None = Field(default=None, min_length=1, description="default: evaluation.benchmarks")

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, value: list[int]) -> list[int]:
        if any(not 0 <= s <= MAX_SEED for s in value) or len(set(value)) != len(value):
            raise ValueError(f"distinct seeds from 0 to {MAX_SEED}")
        return value

    @field_validator("recipes", "students")
    @classmethod
    def _distinct(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError("names must be distinct")
        return value


@dataclass(frozen=True)
class Arm:
    """One recipe (`arm`: the curated recipe's or a control's name) trained into one student with one seed: which
    partitions hold it (`student_key` x `recipe_key`)."""

    experiment: str
    arm: str
    kind: str  # curated | random | filtered
    curated: str  # the curated recipe this arm belongs to (itself, or the recipe naming the control)
    student: str  # as the experiment names it
    seed: int
    student_key: str  # the student partition: the student, or its replicate for this seed
    recipe_key: str  # the recipe partition: the recipe, or the control's replicate for this seed


def replicate(name: str, seed: int) -> str:
    """The name of a student's or control's replicate for another seed."""
    return f"{name}-s{seed}"
