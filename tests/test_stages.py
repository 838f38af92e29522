"""The stage registry (stages.py): every asset and job belongs to one entry, the entries are in pipeline order,
defs.py and demo.py name no stage, and a stage added as one entry (a toy one here) gets its assets, checks and job."""

from __future__ import annotations

import ast
from pathlib import Path

import dagster as dg
import pytest

from omnithought_dagster import stages
from omnithought_dagster.assets.inputs import observe_job_name
from omnithought_dagster.config import load_config
from omnithought_dagster.defs import build_definitions
from omnithought_dagster.stages import STAGES, Stage

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "omnithought_dagster"


@pytest.fixture
def demo_config():
    return load_config(REPO / "omnithought.yaml")


def test_every_asset_and_job_belongs_to_one_stage_in_pipeline_order(demo_config):
    defs = build_definitions(demo_config)
    graph = defs.resolve_asset_graph()
    owner = {}
    for position, entry in enumerate(STAGES):
        for key in (*entry.keys, *entry.observes):  # its assets, and the files it is the first to read
            assert key not in owner, f"{key} in two stages"
            owner[key] = position
    assert set(owner) == set(graph.get_all_asset_keys())
    observed = [key for entry in STAGES for key in entry.observes]
    assert all(graph.get(key).is_observable for key in observed)
    assert {job.name for job in defs.jobs} == {entry.job for entry in STAGES} | {observe_job_name(key) for key in observed}
    for key, position in owner.items():  # each asset reads only what this stage or an earlier one makes
        assert all(owner[parent] <= position for parent in graph.get(key).parent_keys), key
    for entry in STAGES:
        job = defs.resolve_job_def(entry.job)
        assert set(job.asset_layer.executable_asset_keys) == set(entry.keys)
        assert set(entry.partition_keys(demo_config)) <= set(
            entry.partitions(demo_config).get_partition_keys()
        )  # a student may skip a recipe
    assert [check.asset_key for check in graph.asset_check_keys if check.asset_key not in owner] == []


def test_a_stage_the_project_file_does_not_ask_for_is_not_defined(tmp_path):
    from conftest import write_config

    config = load_config(write_config(tmp_path, [{"name": "s", "kind": "synthetic", "n_samples": 4}]))
    enabled = [entry.name for entry in STAGES if entry.enabled(config)]
    assert enabled == ["seed_pool", "cot_traces", "annotations", "filtered_set"]
    graph = build_definitions(config).resolve_asset_graph()
    assert {key.to_user_string() for key in graph.get_all_asset_keys()} == {
        key.to_user_string() for entry in STAGES if entry.enabled(config) for key in entry.keys
    } | {"seed_sources"}  # no benchmark named: no benchmark_items


def _named(path: Path) -> set[str]:
    """Every name, imported name and string constant of a module (attributes are other objects' fields)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module == "__future__":
            continue
        if isinstance(node, ast.Name):
            names.add(node.id)
        elif isinstance(node, ast.ImportFrom):
            names |= {alias.asname or alias.name for alias in node.names}
        elif isinstance(node, ast.Import):
            names |= {alias.asname or alias.name.rsplit(".", 1)[-1] for alias in node.names}
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            names.add(node.value)
    return names


def test_defs_and_demo_name_no_stage():
    stage_words = set()
    for entry in STAGES:
        stage_words |= {entry.name, entry.job, entry.table, *(key.to_user_string() for key in entry.keys)}
    stage_words |= {name for name in vars(stages) if name.endswith("_JOB")}
    for module in ("defs.py", "demo.py"):
        named = _named(PACKAGE / module)
        # defs.py hands the job names on from where they were always imported; it uses none of them
        used = named - ({name for name in vars(stages) if name.endswith("_JOB")} if module == "defs.py" else set())
        assert not used & stage_words, f"{module} names {sorted(used & stage_words)}"


def test_the_registry_refuses_an_unknown_name():
    assert stages.stage("filtered_set").table == "filter_decisions"
    with pytest.raises(KeyError, match="no stage 'nope'; stages: seed_pool, cot_traces"):
        stages.stage("nope")


TOY_KEY = dg.AssetKey("toy_counts")


def _toy_assets(config):
    @dg.asset(
        key=TOY_KEY, partitions_def=dg.StaticPartitionsDefinition(config.source_names), group_name="toy", deps=[dg.AssetKey("seed_pool")]
    )
    def toy_counts(context):
        return dg.MaterializeResult(metadata={"partition": context.partition_key})

    return [toy_counts]


def _toy_checks(config):
    @dg.asset_check(asset=TOY_KEY, name="toy_ran", partitions_def=dg.StaticPartitionsDefinition(config.source_names))
    def toy_ran(context):
        return dg.AssetCheckResult(passed=True)

    return [toy_ran]


@pytest.fixture
def toy_stage():
    toy = Stage(
        "toy_counts",
        "count_toys",
        "A toy stage added in a test.",
        (TOY_KEY,),
        "toy_table",
        _toy_assets,
        _toy_checks,
        lambda config: dg.StaticPartitionsDefinition(config.source_names),
        lambda config: config.source_names,
        lambda store, partition, metadata: {"output": 1},
    )
    STAGES.append(toy)
    try:
        yield toy
    finally:
        STAGES.remove(toy)


def test_a_stage_is_one_registry_entry(toy_stage, tmp_path):
    from conftest import write_config

    config = load_config(write_config(tmp_path, [{"name": "s", "kind": "synthetic", "n_samples": 4}]))
    defs = build_definitions(config)
    graph = defs.resolve_asset_graph()
    assert TOY_KEY in graph.get_all_asset_keys()
    assert [check.name for check in graph.asset_check_keys if check.asset_key == TOY_KEY] == ["toy_ran"]
    job = defs.resolve_job_def("count_toys")
    assert set(job.asset_layer.executable_asset_keys) == {TOY_KEY}
    with dg.instance_for_test() as instance:
        result = job.execute_in_process(partition_key="s", instance=instance)
    assert result.success
    assert [e.event_specific_data.passed for e in result.all_events if e.event_type_value == "ASSET_CHECK_EVALUATION"] == [True]
