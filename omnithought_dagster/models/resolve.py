"""Which folder (or hub id) a model name loads from, and its fingerprint: `tiny:<name>` is one of the models this project
builds offline: the random-weight tiny models (built when missing), and `tiny:sandbox-teacher`, trained here on the
synthetic source's worked solutions (models/sandbox.py; built by `omnithought sandbox-teacher`, found here); anything
else passes through. No config here: the training
process resolves a method's teacher with it too."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

TINY_PREFIX = "tiny:"
SANDBOX_TEACHER_KEY = "sandbox-teacher"


@dataclass(frozen=True)
class BuiltModel:
    """A model this project builds: its folder's name under models_dir, its fingerprint, and how to build it there."""

    name: str
    fingerprint: str
    build: Callable[[Path], Path]


def built_models() -> dict[str, BuiltModel]:
    """`tiny:<key>` -> the model it names."""
    from omnithought_dagster.models.sandbox import SANDBOX_TEACHER, require_built
    from omnithought_dagster.models.tiny import TINY_MODELS, build_tiny_model

    models = {
        key: BuiltModel(spec.name, spec.fingerprint, lambda folder, spec=spec: build_tiny_model(spec, folder))
        for key, spec in TINY_MODELS.items()
    }
    models[SANDBOX_TEACHER_KEY] = BuiltModel(
        SANDBOX_TEACHER.name, SANDBOX_TEACHER.fingerprint, lambda folder: require_built(SANDBOX_TEACHER, folder)
    )
    return models


def built_model(model: str) -> BuiltModel:
    """The model `tiny:<key>` names (ValueError naming the ones there are)."""
    key = model[len(TINY_PREFIX) :] if model.startswith(TINY_PREFIX) else model
    models = built_models()
    if key not in models:
        raise ValueError(f"no tiny model {key!r}; available: {sorted(models)}")
    return models[key]


def resolve_model(model: str, models_dir: str | Path) -> tuple[str, str | None]:
    """(path or hub id to load, fingerprint) - `tiny:<name>` builds the model when missing."""
    if model.startswith(TINY_PREFIX):
        built = built_model(model)
        return str(built.build(Path(models_dir) / built.name)), built.fingerprint
    return model, None
