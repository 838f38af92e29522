"""Which folder (or hub id) a model name loads from, and its fingerprint: `tiny:<name>` is one of the tiny models this
project builds offline (built when missing); anything else passes through. No config here: the training process
resolves a method's teacher with it too."""

from __future__ import annotations

from pathlib import Path

TINY_PREFIX = "tiny:"


def resolve_model(model: str, models_dir: str | Path) -> tuple[str, str | None]:
    """(path or hub id to load, fingerprint) - `tiny:<name>` builds the tiny model when missing."""
    if model.startswith(TINY_PREFIX):
        from omnithought_dagster.models.tiny import TINY_MODELS, build_tiny_model

        name = model[len(TINY_PREFIX) :]
        if name not in TINY_MODELS:
            raise ValueError(f"no tiny model {name!r}; available: {sorted(TINY_MODELS)}")
        spec = TINY_MODELS[name]
        return str(build_tiny_model(spec, Path(models_dir) / spec.name)), spec.fingerprint
    return model, None
