"""A code location for the pool tests (test_pools.py): one `gpu` pool step that waits for a file, run by the
project's executor and with the project resource, as the real GPU steps are, and the project's reaper sensor.
$POOL_TEST_DIR is the folder of
the files it writes (`started-<run id>`: its pid) and waits for (`release`)."""

import os
import time
from pathlib import Path

import dagster as dg

from omnithought_dagster.config import load_config
from omnithought_dagster.placement import executor
from omnithought_dagster.resources.project import ProjectResource
from omnithought_dagster.sensors import dead_run_reaper


@dg.asset(pool="gpu")
def held(context: dg.AssetExecutionContext, project: ProjectResource) -> None:
    folder = Path(os.environ["POOL_TEST_DIR"])
    temporary = folder / f".started-{context.run_id}"  # written whole, then renamed: the test polls for the name
    temporary.write_text(str(os.getpid()))
    temporary.replace(folder / f"started-{context.run_id}")
    while not (folder / "release").exists():
        time.sleep(0.1)


config = load_config()
defs = dg.Definitions(
    assets=[held],
    resources={"project": ProjectResource(config_path=config.config_path)},
    executor=executor(config),
    sensors=[dead_run_reaper],
)  # as the project's Definitions have it
