"""Executors and GPU placement: the same Definitions in each mode, GPU steps carrying their requests; deployment files valid."""

from __future__ import annotations

import json
from pathlib import Path

import dagster as dg
import pytest
import yaml

from omnithought_dagster.config import load_config
from omnithought_dagster.defs import build_definitions

from conftest import write_config

REPO = Path(__file__).resolve().parents[1]
GPU_STEPS = {"cot_traces": 4, "annotations": 1, "student_checkpoints": 8, "benchmark_scores": 1}
CPU_STEPS = ["filtered_set", "sampled_subsets", "student_baselines"]


def _config(tmp_path, executor: str, **operations):
    path = write_config(
        tmp_path,
        [{"name": "s", "kind": "synthetic"}],
        teacher={"backend": "vllm", "model": "tiny:teacher", "tensor_parallel_size": 2, "data_parallel_size": 2},
        judge={"backend": "vllm", "model": "tiny:teacher"},
        recipes=[{"name": "r", "size": 4, "difficulty_mix": {"easy": 1}}],
        students=[{"name": "st"}],
        training={"nproc_per_node": 8, "precision": "bf16"},
        benchmarks=[{"name": "b", "kind": "synthetic", "n_samples": 2}],
        evaluation={"benchmarks": ["b"], "device": "cuda"},
        operations={"executor": executor, **operations},
    )
    return load_config(path)


@pytest.mark.parametrize(
    ("mode", "executor_name"),
    [
        ("multiprocess", "omnithought_multiprocess"),
        ("in_process", "in_process"),
        ("docker", "omnithought_docker"),
        ("k8s", "omnithought_k8s"),
        ("ecs", "ecs"),
    ],
)
def test_each_executor_mode_builds_with_gpu_requests_on_gpu_steps_only(tmp_path, mode, executor_name):
    operations = {
        "max_concurrent": 4,
        "k8s": {
            "job_namespace": "omni",
            "gpu_node_selector": {"pool": "a100"},
            "gpu_image": "reg/omni-gpu:1",
            "gpu_tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        },
        "ecs": {"gpu_cpu": "8192", "gpu_memory": "61440"},
    }
    defs = build_definitions(_config(tmp_path, mode, **operations))
    job = defs.resolve_job_def("train_students")
    assert job.executor_def.name == executor_name
    graph = defs.resolve_asset_graph()
    for name, gpus in GPU_STEPS.items():
        tags = graph.get(dg.AssetKey(name)).assets_def.op.tags
        k8s = json.loads(tags["dagster-k8s/config"])
        assert k8s["container_config"]["resources"]["limits"] == {"nvidia.com/gpu": str(gpus)}, name
        assert k8s["container_config"]["image"] == "reg/omni-gpu:1"
        assert (
            k8s["pod_spec_config"]["node_selector"] == {"pool": "a100"}
            and k8s["pod_spec_config"]["tolerations"][0]["key"] == "nvidia.com/gpu"
        )
        assert json.loads(tags["ecs/container_overrides"]) == {"resourceRequirements": [{"type": "GPU", "value": str(gpus)}]}
        assert tags["ecs/cpu"] == "8192" and tags["ecs/memory"] == "61440"
        assert graph.get(dg.AssetKey(name)).assets_def.op.pool == "gpu"
    for name in CPU_STEPS:
        tags = graph.get(dg.AssetKey(name)).assets_def.op.tags
        assert "dagster-k8s/config" not in tags and "ecs/container_overrides" not in tags, name


def test_cpu_runs_of_gpu_stages_ask_for_no_gpus(tmp_path):
    """The embedded default (one fp32 training process, CPU evaluation, an HTTP teacher) requests no GPUs."""
    path = write_config(
        tmp_path,
        [{"name": "s", "kind": "synthetic"}],
        recipes=[{"name": "r", "size": 4, "difficulty_mix": {"easy": 1}}],
        students=[{"name": "st"}],
        benchmarks=[{"name": "b", "kind": "synthetic", "n_samples": 2}],
        evaluation={"benchmarks": ["b"]},
        teacher={"backend": "openai", "base_url": "http://127.0.0.1:1/v1"},
    )
    graph = build_definitions(load_config(path)).resolve_asset_graph()
    for name in GPU_STEPS:
        assert "dagster-k8s/config" not in graph.get(dg.AssetKey(name)).assets_def.op.tags, name


def test_deployment_files_are_valid_instance_configs(monkeypatch):
    from dagster._config import process_config
    from dagster._core.instance.config import dagster_instance_config
    from dagster_aws.ecs import EcsRunLauncher

    for name in ("DAGSTER_PG_HOST", "DAGSTER_PG_USER", "DAGSTER_PG_PASSWORD", "DAGSTER_PG_DB"):
        monkeypatch.setenv(name, "x")
    for folder in ("deploy/dagster", "deploy/ecs", "omnithought_dagster"):
        config, _ = dagster_instance_config(str(REPO / folder))
        assert config["run_monitoring"]["enabled"] and config["concurrency"]["pools"]["default_limit"] >= 1, folder
    launcher = dagster_instance_config(str(REPO / "deploy/ecs"))[0]["run_launcher"]
    assert process_config(EcsRunLauncher.config_type(), launcher["config"]).success
    values = yaml.safe_load((REPO / "deploy/k8s/values.yaml").read_text())
    deployment = values["dagster-user-deployments"]["deployments"][0]
    assert deployment["dagsterApiGrpcArgs"] == ["--module-name", "omnithought_dagster.definitions"]
    assert values["runLauncher"]["type"] == "K8sRunLauncher"
