"""Asset checks, one module per stage, plus the shared Great Expectations helper (`checks.gx`)."""

from omnithought_dagster.checks.seed import build_seed_checks

__all__ = ["build_seed_checks"]
