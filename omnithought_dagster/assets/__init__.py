"""Software-defined assets, one module per stage; each module exposes a build_* factory over the config."""

from omnithought_dagster.assets.seed import IMAGES_KEY, QUARANTINE_KEY, SEED_POOL_KEY, build_seed_assets

__all__ = ["IMAGES_KEY", "QUARANTINE_KEY", "SEED_POOL_KEY", "build_seed_assets"]
