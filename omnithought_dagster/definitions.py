"""The code location: Definitions built from the project file ($OMNITHOUGHT_CONFIG or ./omnithought.yaml)."""

from omnithought_dagster.config import load_config
from omnithought_dagster.defs import build_definitions

_config = load_config()
defs_config_path = _config.config_path  # which project file this process's code location is (containers.py checks it)
defs = build_definitions(_config)
