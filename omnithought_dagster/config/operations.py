"""The project file's `operations:` section: automation, placement on Kubernetes / ECS, pools, locks."""

from __future__ import annotations

import os
from typing import Any, Literal

from pydantic import Field, ValidationInfo, field_validator

from omnithought_dagster.settings_model import SettingsModel, resolve_path


class K8sPlacement(SettingsModel):
    job_namespace: str | None = Field(default=None, description="namespace of the step pods (k8s executor)")
    gpu_image: str | None = Field(
        default=None, description="image of GPU step pods (deploy/docker/Dockerfile.gpu); default the code location's"
    )
    gpu_node_selector: dict[str, str] = Field(default_factory=dict, description="node selector of GPU step pods")
    gpu_tolerations: list[dict[str, Any]] = Field(default_factory=list, description="tolerations of GPU step pods")


class EcsPlacement(SettingsModel):
    gpu_cpu: str | None = Field(default=None, description="CPU units of a GPU step's task (ecs/cpu), e.g. '8192'")
    gpu_memory: str | None = Field(default=None, description="memory (MiB) of a GPU step's task (ecs/memory)")


class DockerPlacement(SettingsModel):
    """`executor: docker` (dagster-docker): each step in its own container of `image`, on this machine's Docker or podman."""

    image: str = Field(default="omnithought-dagster:latest", description="the image steps run in (`make image`)")
    volumes: list[str] = Field(
        default_factory=list,
        description=(
            "local folders (or files) the steps read and write - the store, models_dir, the sources' files - each mounted at "
            "the same path; the project file and the Dagster instance's folder are always mounted"
        ),
    )
    env_vars: list[str] = Field(default_factory=list, description="names of this process's env vars passed on (API keys), or NAME=value")
    shm_size: str = Field(
        default="2g", description="the container's /dev/shm (DeepSpeed's and vLLM's shared memory; the default 64m breaks both)"
    )
    network_mode: str = Field(default="host", description="the step containers' network (host: they reach what this machine reaches)")
    stop_timeout_s: int = Field(default=30, ge=0, description="a cancelled step's container gets this long after SIGTERM before SIGKILL")

    @field_validator("volumes")
    @classmethod
    def _volumes(cls, value: list[str], info: ValidationInfo) -> list[str]:
        resolved = [resolve_path(path, info) for path in value]
        for path in resolved:
            if "://" in path or not os.path.isabs(path):
                raise ValueError(f"{path!r}: a local folder (relative paths are relative to the project file)")
        return resolved


class OperationsConfig(SettingsModel):
    """Running it unattended: the re-curation schedule, the executor, GPU placement."""

    executor: Literal["multiprocess", "in_process", "docker", "k8s", "ecs"] = Field(
        default="multiprocess",
        description=(
            "multiprocess here; docker (dagster-docker: a container per step, this machine); "
            "k8s (dagster-k8s) or ecs (dagster-aws) on a cluster"
        ),
    )
    max_concurrent: int | None = Field(default=None, ge=1, description="steps at once (default: CPU count / unlimited)")
    docker: DockerPlacement = DockerPlacement()
    k8s: K8sPlacement = K8sPlacement()
    ecs: EcsPlacement = EcsPlacement()

    recuration_cron: str = Field(default="0 3 * * *", description="when the recuration schedule re-runs the CPU curation stages")
    observe_cron: str = Field(
        default="0 * * * *",
        description="when Dagster's automation observes the files the pipeline reads (seed sources, benchmarks); also when never observed",
    )
    timezone: str = "UTC"
    recuration_running: bool = Field(default=False, description="start the schedule running (else turn it on in the UI)")
    gpu_devices: list[str] = Field(default_factory=list, description="GPUs GPU steps lease from (CUDA indices); empty on CPU machines")
    gpu_lock_dir: str = Field(default=".cache/gpu-locks", description="lock files of the leases (local to the machine)")
    gpu_wait_s: float = Field(default=3600, gt=0, description="how long a GPU step waits for free devices")
    source_manifests: str | None = Field(
        default=None, description="folder or s3:// prefix watched for source manifests (<name>.yaml); set -> sources are dynamic partitions"
    )
    manifest_roots: list[str] | None = Field(
        default=None,
        description=(
            "the folders a manifest may read: its paths (path, image_root, allowed_image_roots) and every file its reader "
            "lists or opens must resolve there, symlinks followed; default: the manifest folder itself. A manifest in S3 "
            "reads no worker's local file"
        ),
    )
    manifest_sensor_interval_s: int = Field(default=60, ge=5, description="how often the source_manifests sensor looks")
    manifest_sensor_running: bool = Field(
        default=False, description="start the source_manifests sensor running (else turn it on in the UI)"
    )
    partition_lock_wait_s: float = Field(
        default=3600,
        ge=0,
        description=(
            "a model stage's run waits this long for another run of the same partition to finish (then reuses its cached "
            "results) before it fails; 0 fails at once"
        ),
    )

    _resolve = field_validator("gpu_lock_dir", "source_manifests")(resolve_path)

    @field_validator("manifest_roots")
    @classmethod
    def _resolve_roots(cls, value: list[str] | None, info: ValidationInfo) -> list[str] | None:
        return None if value is None else [resolve_path(root, info) for root in value]

    @field_validator("recuration_cron", "observe_cron")
    @classmethod
    def _cron(cls, value: str) -> str:
        from dagster._utils.schedules import is_valid_cron_string

        if not is_valid_cron_string(value):
            raise ValueError(f"{value!r} is not a cron expression (5 fields, e.g. '0 3 * * *')")
        return value
