"""The whole Definitions loads from the shipped config and from workspace.yaml's module."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import dagster as dg

from omnithought_dagster.config import load_config
from omnithought_dagster.defs import SEED_JOB, build_definitions

REPO = Path(__file__).resolve().parents[1]


def test_definitions_snapshot_from_the_demo_config():
    defs = build_definitions(load_config(REPO / "omnithought.yaml"))
    graph = defs.resolve_asset_graph()
    specs = {key.to_user_string(): graph.get(key) for key in graph.get_all_asset_keys()}
    assert sorted(specs) == sorted(
        [
            "annotations",
            "cot_traces",
            "filtered_set",
            "images",
            "quarantine",
            "sampled_subsets",
            "seed_pool",
            "student_baselines",
            "student_checkpoints",
            "benchmark_scores",
            "seed_sources",  # the files read, observed (assets/inputs.py)
            "benchmark_items",
            "experiments",
        ]
    )
    assert specs["seed_sources"].is_observable and specs["seed_sources"].partitions_def.get_partition_keys() == ["synthetic", "mini_llava"]
    assert specs["benchmark_items"].is_observable and specs["benchmark_items"].partitions_def is None
    assert specs["filtered_set"].partitions_def.get_partition_keys() == ["synthetic", "mini_llava"]
    assert specs["sampled_subsets"].partitions_def.get_partition_keys() == ["balanced", "balanced-random", "hard-long"]
    for name in ("images", "quarantine", "seed_pool"):
        node = specs[name]
        assert node.group_name == "seed"
        assert node.partitions_def.get_partition_keys() == ["synthetic", "mini_llava"]
        assert node.code_version.startswith("seed-v3+")
        assert node.description
        assert {k.to_user_string() for k in node.parent_keys} == {"seed_sources"}
    traces = specs["cot_traces"]
    assert traces.group_name == "teacher" and traces.code_version.startswith("cot_traces-v1+")
    assert traces.partitions_def.get_partition_keys() == ["000|synthetic", "000|mini_llava"]  # demo: 1 shard per source
    assert graph.get_partition_mapping(traces.key, specs["seed_pool"].key).partition_dimension_name == "source"
    annotations = specs["annotations"]
    assert annotations.group_name == "annotate" and annotations.partitions_def == traces.partitions_def
    assert {k.to_user_string() for k in annotations.parent_keys} == {"cot_traces", "seed_pool"}
    assert "parquet" in specs["seed_pool"].kinds
    students = specs["student_checkpoints"]
    assert students.partitions_def.get_partition_keys() == [
        "balanced|tiny",
        "balanced|tiny-kd",
        "balanced|tiny-masked",
        "balanced|tiny-grpo",
        "balanced-random|tiny",
        "balanced-random|tiny-kd",
        "balanced-random|tiny-masked",
        "balanced-random|tiny-grpo",
        "hard-long|tiny",
        "hard-long|tiny-kd",
        "hard-long|tiny-masked",
        "hard-long|tiny-grpo",
    ]
    assert graph.get_partition_mapping(students.key, specs["sampled_subsets"].key).partition_dimension_name == "recipe"
    assert students.assets_def.op.pool == "gpu" and "deepspeed" in students.kinds
    assert specs["student_baselines"].partitions_def.get_partition_keys() == ["tiny", "tiny-kd", "tiny-masked", "tiny-grpo"]
    scores = specs["benchmark_scores"]
    assert scores.partitions_def.get_partition_keys() == [
        f"{recipe}|{student}"
        for recipe in ("base", "balanced", "balanced-random", "hard-long")
        for student in ("tiny", "tiny-kd", "tiny-masked", "tiny-grpo")
    ]
    assert {k.to_user_string() for k in scores.parent_keys} == {"student_checkpoints", "student_baselines", "benchmark_items"}
    checks = sorted(f"{k.asset_key.to_user_string()}:{k.name}" for k in graph.asset_check_keys)
    assert checks == [
        "annotations:every_trace_annotated",
        "annotations:judge_parse_failure_rate",
        "annotations:pass_rate_consistent",
        "annotations:tags_in_taxonomy",
        "annotations:values_in_range",
        "benchmark_scores:no_regression_vs_baseline",
        "benchmark_scores:scores_valid",
        "cot_traces:error_rate",
        "cot_traces:final_answer_present",
        "cot_traces:rollouts_complete",
        "cot_traces:samples_in_seed_pool",
        "cot_traces:trace_id_unique",
        "cot_traces:truncation_rate",
        "experiments:arms_equal_size",
        "experiments:arms_same_items",
        "experiments:intervals_finite",
        "filtered_set:kept_traces_pass_the_rules",
        "filtered_set:one_decision_per_trace",
        "quarantine:reasons_known",
        "sampled_subsets:exportable",
        "sampled_subsets:members_are_kept",
        "sampled_subsets:no_contamination",
        "sampled_subsets:no_sample_twice",
        "sampled_subsets:size_matches_recipe",
        "sampled_subsets:strata_within_tolerance",
        "seed_pool:answer_type_valid",
        "seed_pool:images_in_store",
        "seed_pool:required_columns_present",
        "seed_pool:row_accounting",
        "seed_pool:sample_id_unique",
        "student_baselines:loads_and_generates",
        "student_checkpoints:loads_and_generates",
        "student_checkpoints:loss_decreased",
    ]
    experiments = specs["experiments"]
    assert experiments.partitions_def.get_partition_keys() == ["balancing"] and experiments.group_name == "experiments"
    assert {k.to_user_string() for k in experiments.parent_keys} == {"sampled_subsets", "student_checkpoints", "benchmark_scores"}
    blocking = {f"{k.asset_key.to_user_string()}:{k.name}" for k in graph.asset_check_keys if graph.get_check_spec(k).blocking}
    assert set(checks) - blocking == {"benchmark_scores:no_regression_vs_baseline"}  # a regression warns, it does not block
    schema = specs["seed_pool"].metadata["dagster/column_schema"]
    assert [c.name for c in schema.columns][:3] == ["sample_id", "source", "native_id"]
    assert defs.resolve_job_def(SEED_JOB).partitions_def.get_partition_keys() == ["synthetic", "mini_llava"]
    assert set(defs.resources) == {"project", "store", "teacher", "judge", "pipes_subprocess_client"}
    assert [s.name for s in defs.schedules] == ["recuration"]


def test_teacher_step_is_a_gpu_step(project):
    """cot_traces runs in the `gpu` pool and asks Kubernetes for the GPUs of its vLLM server."""
    config = project([{"name": "s", "kind": "synthetic"}])
    wide = config.teacher.model_copy(update={"tensor_parallel_size": 2, "data_parallel_size": 2})
    config = config.model_copy(update={"teacher": wide, "teachers": [wide]})
    node = build_definitions(config).resolve_asset_graph().get(dg.AssetKey("cot_traces"))
    op = node.assets_def.op
    assert op.pool == "gpu"
    limits = json.loads(op.tags["dagster-k8s/config"])["container_config"]["resources"]["limits"]
    assert limits == {"nvidia.com/gpu": "4"}


def test_adding_a_source_adds_a_partition(project):
    config = project([{"name": "one", "kind": "synthetic"}, {"name": "two", "kind": "synthetic", "seed": 1}])
    graph = build_definitions(config).resolve_asset_graph()
    assert graph.get(dg.AssetKey("seed_pool")).partitions_def.get_partition_keys() == ["one", "two"]


def test_code_location_module_loads_like_the_workspace_does(tmp_path):
    """`python -m dagster definitions validate` is what the webserver does with workspace.yaml."""
    env = {"PATH": str(Path(sys.executable).parent), "DAGSTER_HOME": str(tmp_path), "HOME": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-m", "dagster", "definitions", "validate", "-w", "workspace.yaml"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Validation successful" in done.stdout + done.stderr
