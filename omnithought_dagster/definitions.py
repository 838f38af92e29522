"""The code location: Definitions built from the project file ($OMNITHOUGHT_CONFIG or ./omnithought.yaml)."""

from omnithought_dagster.config import load_config
from omnithought_dagster.defs import build_definitions

defs = build_definitions(load_config())
