"""Where steps run: the executor, and what a GPU step asks of Kubernetes or ECS.

The same Definitions run on a laptop, a GPU box, Kubernetes or ECS; `operations.executor`
picks the executor (`multiprocess` by default; `docker` = dagster-docker's step handler, one container
per step on this machine (containers.py); `k8s` = dagster-k8s' k8s_job_executor, one pod per step; `ecs` =
dagster-aws' ecs_executor, one task per step). GPU steps (cot_traces and
annotations with a vLLM server, student_checkpoints, benchmark_scores on CUDA) carry both the
Kubernetes and the ECS form of their GPU request; each executor reads its own and ignores the
other's:
- `dagster-k8s/config`: nvidia.com/gpu limits and requests, /dev/shm in memory, the GPU node
  selector and tolerations from `operations.k8s`;
- `ecs/container_overrides`: a GPU resourceRequirement, plus `ecs/cpu` / `ecs/memory` from
  `operations.ecs` when set.
CPU steps carry none, and land on the default pool of machines.
"""

import json

import dagster as dg

from omnithought_dagster.config import ProjectConfig
from omnithought_dagster.pools import watched


def gpu_step_tags(config: ProjectConfig, gpus: int) -> dict:
    if gpus <= 0:
        return {}
    k8s, ecs = config.operations.k8s, config.operations.ecs
    count = str(gpus)
    # /dev/shm as memory: the container default (64 MiB) breaks vLLM's engine and DeepSpeed's shared-memory op (measured
    # in a container of the CPU image, 2026-12-05).
    pod: dict = {"volumes": [{"name": "dshm", "empty_dir": {"medium": "Memory"}}]}
    if k8s.gpu_node_selector:
        pod["node_selector"] = dict(k8s.gpu_node_selector)
    if k8s.gpu_tolerations:
        pod["tolerations"] = [dict(t) for t in k8s.gpu_tolerations]
    k8s_config: dict = {
        "container_config": {
            "resources": {"limits": {"nvidia.com/gpu": count}, "requests": {"nvidia.com/gpu": count}},
            "volume_mounts": [{"name": "dshm", "mount_path": "/dev/shm"}],
        }
    }
    if k8s.gpu_image:
        k8s_config["container_config"]["image"] = k8s.gpu_image
    k8s_config["pod_spec_config"] = pod
    tags: dict = {
        "dagster-k8s/config": k8s_config,
        "ecs/container_overrides": json.dumps({"resourceRequirements": [{"type": "GPU", "value": count}]}),
    }
    if ecs.gpu_cpu:
        tags["ecs/cpu"] = ecs.gpu_cpu
    if ecs.gpu_memory:
        tags["ecs/memory"] = ecs.gpu_memory
    return tags


def executor(config: ProjectConfig) -> dg.ExecutorDefinition:
    ops = config.operations
    if ops.executor == "in_process":
        return watched(dg.in_process_executor)
    if ops.executor == "docker":
        from omnithought_dagster.containers import docker_executor

        return watched(docker_executor(config))
    if ops.executor == "k8s":
        from dagster_k8s import k8s_job_executor

        settings = {"max_concurrent": ops.max_concurrent} if ops.max_concurrent else {}
        if ops.k8s.job_namespace:
            settings["job_namespace"] = ops.k8s.job_namespace
        return k8s_job_executor.configured(settings, name="omnithought_k8s") if settings else k8s_job_executor
    if ops.executor == "ecs":
        from dagster_aws.ecs import ecs_executor

        return ecs_executor
    # Local runs are watched (pools.py): a killed run's pool slots are freed, a step waiting for one obeys SIGTERM.
    return watched(dg.multiprocess_executor).configured({"max_concurrent": ops.max_concurrent or 0}, name="omnithought_multiprocess")
