"""The base of every settings model of the project file (config.py's sections, each method's settings in train/methods/):
unknown fields are errors, settings are frozen, and defaults are validated like given values."""

from pydantic import BaseModel, ConfigDict


class SettingsModel(BaseModel):
    # validate_default: default paths are resolved against the config file like given ones.
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)
