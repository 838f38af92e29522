"""Assembles the one Definitions from a project config: each stage contributes, nothing else lives here."""

from __future__ import annotations

import warnings

import dagster as dg

from omnithought_dagster.assets import build_seed_assets
from omnithought_dagster.assets.seed import seed_partitions
from omnithought_dagster.checks import build_seed_checks
from omnithought_dagster.config import ProjectConfig
from omnithought_dagster.resources import CorpusStoreResource, ProjectResource

SEED_JOB = "ingest_seeds"

# Checks are per partition (one source's rows at a time). Dagster 1.13 marks partitioned checks
# as preview; the version is pinned in pyproject.toml, so the warning says nothing new.
warnings.filterwarnings("ignore", message="Specifying a partitions_def on an AssetCheckSpec", category=dg.PreviewWarning)


def build_definitions(config: ProjectConfig) -> dg.Definitions:
    if config.config_path is None:
        raise ValueError("build_definitions needs a config loaded from a file (load_config), so runs can reload it")
    seed = dg.Definitions(
        assets=build_seed_assets(config),
        asset_checks=build_seed_checks(config),
        jobs=[
            dg.define_asset_job(
                SEED_JOB,
                selection=dg.AssetSelection.groups("seed"),
                partitions_def=seed_partitions(config),
                description="Ingest one seed source: seed_pool, quarantine and images, with their checks.",
            )
        ],
    )
    resources = dg.Definitions(
        resources={
            "project": ProjectResource(config_path=config.config_path),
            "store": CorpusStoreResource(root_uri=config.store.root),
        }
    )
    return dg.Definitions.merge(seed, resources)
