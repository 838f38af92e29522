"""What every section of the project file is built on (each stage's `settings.py`, each method's settings in
train/methods/, config/): the base model - unknown fields are errors, settings are frozen, defaults are validated like
given values - the error a bad file raises, the pattern of names that become partition keys, and relative paths
resolved against the file's folder."""

import os
from pathlib import Path

from pydantic import BaseModel, ConfigDict, ValidationInfo


class SettingsModel(BaseModel):
    # validate_default: default paths are resolved against the config file like given ones.
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


# Partition keys become folder names in the store and Dagster partition keys: keep them tame.
SOURCE_NAME_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,63}$"


class ConfigError(ValueError):
    """A project file that cannot be used; the message names the file, the field and the problem."""


def resolve_path(value: str | None, info: ValidationInfo) -> str | None:
    """Relative local paths are relative to the config file; URIs (s3://...) pass through."""
    if value is None or "://" in value:
        return value
    base = (info.context or {}).get("base_dir")
    path = Path(value).expanduser()
    if not path.is_absolute() and base is not None:
        path = Path(base) / path
    # abspath, not resolve(): a virtualenv's bin/python is a symlink that must stay one.
    return os.path.abspath(path) if base is not None else str(path)


def project_environment(venv: str) -> str:
    """The interpreter of one of the project's environments (`make envs`): <root>/<venv>/bin/python, root being
    $OMNITHOUGHT_ROOT (the images set /opt/omnithought), else the checkout this package is installed from. What an
    interpreter setting left out means: one project file then works on a laptop, in the images and in a step's container."""
    root = os.environ.get("OMNITHOUGHT_ROOT") or str(Path(__file__).resolve().parents[1])
    return os.path.join(os.path.abspath(root), venv, "bin", "python")


def interpreter(venv: str):
    """A validator for an interpreter field: given -> resolved against the config file; left out -> project_environment."""

    def validate(value: str | None, info: ValidationInfo) -> str:
        return project_environment(venv) if value is None else resolve_path(value, info)

    return validate
