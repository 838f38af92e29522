"""What Kubernetes gets for a GPU step: the step pod dagster-k8s' executor would create, rendered from the Helm values
and the asset's own tags by dagster-k8s' code, checked against what the GPU image holds.

The pod is built as K8sStepHandler.launch_step builds it (container context from the chart's values, merged with the
step's `dagster-k8s/config` tag; the step's `dagster api execute_step` arguments; construct_dagster_k8s_job), without
a cluster to send it to. The image side is read from deploy/docker/Dockerfile.gpu and the Makefile (its PATH, its
root, the environments `make envs` makes there); tests/test_containers.py checks the same paths inside a built image.
Untested without a cluster: scheduling on a GPU node, the NVIDIA device plugin, pulling the image, the pod's run.
"""

import re
from pathlib import Path
from types import SimpleNamespace

import dagster as dg
import pytest
import yaml

from omnithought_dagster.config import load_config
from omnithought_dagster.defs import build_definitions

from conftest import write_config

REPO = Path(__file__).resolve().parents[1]
GPU_IMAGE = "registry.example.com/omnithought-dagster-gpu:latest"


def dockerfile_env(path: Path) -> dict[str, str]:
    """ENV of a Dockerfile (the `ENV A=b \\ C=d` form this project uses), $VAR references expanded as docker does."""
    text = re.sub(r"\\\n\s*", " ", path.read_text())
    env: dict[str, str] = {}
    for line in text.split("\n"):
        if line.startswith("ENV "):
            for name, value in re.findall(r"(\w+)=(\S+)", line[4:]):
                env[name] = re.sub(r"\$(\w+)", lambda m: env.get(m.group(1), "/usr/local/bin:/usr/bin:/bin"), value)
    return env


def render_step_job(config, defs: dg.Definitions, job_name: str, step_key: str, values: dict) -> dict:
    """The Kubernetes Job (as JSON) dagster-k8s' step handler creates for `step_key` of a run of `job_name`."""
    from dagster._core.definitions.reconstruct import ReconstructableRepository
    from dagster._grpc.types import ExecuteStepArgs
    from dagster_k8s.container_context import K8sContainerContext
    from dagster_k8s.job import construct_dagster_k8s_job, get_user_defined_k8s_config
    from kubernetes.client import ApiClient

    deployment = values["dagster-user-deployments"]["deployments"][0]
    launcher = values["runLauncher"]["config"]["k8sRunLauncher"]
    # What the chart passes a run's pods: the code location's env, volumes and mounts (includeConfigInLaunchedRuns),
    # and the run launcher's secrets.
    context = K8sContainerContext(
        env=deployment.get("env", []),
        env_secrets=[s["name"] for s in launcher.get("envSecrets", [])],
        volumes=deployment.get("volumes", []),
        volume_mounts=[{"name": m["name"], "mount_path": m["mountPath"]} for m in deployment.get("volumeMounts", [])],
        namespace="omnithought",
    )
    step_tags = defs.resolve_asset_graph().get(dg.AssetKey(step_key)).assets_def.op.tags  # the step's op is the asset's
    context = context.merge(K8sContainerContext(run_k8s_config=get_user_defined_k8s_config(step_tags)))
    # The K8sRunLauncher's instance settings, as the dagster chart sets them (release "dagster").
    launcher_settings = SimpleNamespace(
        dagster_home="/opt/dagster/dagster_home",
        instance_config_map="dagster-instance",
        postgres_password_secret="dagster-postgresql-secret",
    )
    job_config = context.get_k8s_job_config(f"{deployment['image']['repository']}:{deployment['image']['tag']}", launcher_settings)
    origin = ReconstructableRepository.for_module("omnithought_dagster.definitions", "defs").get_reconstructable_job(job_name)
    args = ExecuteStepArgs(job_origin=origin.get_python_origin(), run_id="r1", step_keys_to_execute=[step_key])
    job = construct_dagster_k8s_job(
        job_config=job_config,
        args=args.get_command_args(skip_serialized_namedtuple=True),
        job_name="dagster-step-test",
        pod_name="dagster-step-test",
        component="step_worker",
        user_defined_k8s_config=context.run_k8s_config,
        env_vars=args.get_command_env(),
    )
    return ApiClient().sanitize_for_serialization(job)


@pytest.fixture
def k8s_project(tmp_path, monkeypatch):
    """A GPU deployment's project file with no interpreter named, loaded as the GPU image's processes load it."""
    image_env = dockerfile_env(REPO / "deploy/docker/Dockerfile.gpu")
    monkeypatch.setenv("OMNITHOUGHT_ROOT", image_env["OMNITHOUGHT_ROOT"])
    path = write_config(
        tmp_path,
        [{"name": "s", "kind": "synthetic"}],
        teacher={"backend": "vllm", "model": "tiny:teacher", "tensor_parallel_size": 2},
        recipes=[{"name": "r", "size": 4, "difficulty_mix": {"easy": 1}}],
        students=[{"name": "st"}],
        benchmarks=[{"name": "b", "kind": "synthetic", "n_samples": 2}],
        evaluation={"benchmarks": ["b"], "device": "cuda"},
        operations={
            "executor": "k8s",
            "k8s": {
                "gpu_image": GPU_IMAGE,
                "gpu_node_selector": {"nvidia.com/gpu.present": "true"},
                "gpu_tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
            },
        },
    )
    monkeypatch.setenv("OMNITHOUGHT_CONFIG", str(path))
    monkeypatch.delitem(__import__("sys").modules, "omnithought_dagster.definitions", raising=False)
    config = load_config(path)
    return config, build_definitions(config), image_env


def test_a_gpu_step_pod_runs_the_gpu_image_entry_point_with_its_gpus_shm_and_env(k8s_project):
    config, defs, image_env = k8s_project
    values = yaml.safe_load((REPO / "deploy/k8s/values.yaml").read_text())
    job = render_step_job(config, defs, "generate_traces", "cot_traces", values)
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    # The GPU image (operations.k8s.gpu_image), not the code location's.
    assert container["image"] == GPU_IMAGE
    # The step's entry point: `dagster api execute_step`, its arguments in the environment.
    assert container["args"] == ["dagster", "api", "execute_step"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["DAGSTER_COMPRESSED_EXECUTE_STEP_ARGS"]
    assert env["OMNITHOUGHT_CONFIG"] == "/config/omnithought.yaml"  # the code location's env, from the values
    assert {s["secretRef"]["name"] for s in container["envFrom"]} == {"omnithought-s3", "omnithought-endpoints"}
    # Two GPUs (tensor parallel 2), on a GPU node, tolerating its taint.
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "2" == container["resources"]["requests"]["nvidia.com/gpu"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    # /dev/shm in memory, and the project file's ConfigMap, both mounted.
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes[mounts["/dev/shm"]]["emptyDir"] == {"medium": "Memory"}
    assert volumes[mounts["/config"]]["configMap"]["name"] == "omnithought-config"

    # The image's side: `dagster` is found on its PATH - the environment `make envs` makes under its root holds it -
    # and the interpreters the pod's project file resolves to are the ones `make envs` makes there.
    root = image_env["OMNITHOUGHT_ROOT"]
    first_on_path = image_env["PATH"].split(":")[0]
    assert first_on_path == f"{root}/.venv/bin"
    makefile = (REPO / "deploy/env/envs.mk").read_text()
    venvs = dict(re.findall(r"^(VENV|VLLM_VENV|LMMS_VENV) := (\S+)$", makefile, re.M))
    assert first_on_path == f"{root}/{venvs['VENV']}/bin"
    assert config.teacher.python == f"{root}/{venvs['VLLM_VENV']}/bin/python"
    assert config.evaluation.python == f"{root}/{venvs['LMMS_VENV']}/bin/python"
    assert re.search(r"^WORKDIR " + re.escape(root) + "$", (REPO / "deploy/docker/Dockerfile.gpu").read_text(), re.M)
    # dagster's console script is in the dagster environment's lock.
    assert re.search(r"^dagster==", (REPO / "deploy/env/gpu/dagster.lock").read_text(), re.M)


def test_a_cpu_step_pod_asks_for_no_gpu_and_runs_the_code_location_image(k8s_project):
    config, defs, _ = k8s_project
    values = yaml.safe_load((REPO / "deploy/k8s/values.yaml").read_text())
    job = render_step_job(config, defs, "filter_traces", "filtered_set", values)
    (container,) = job["spec"]["template"]["spec"]["containers"]
    assert container["image"] == "registry.example.com/omnithought-dagster:latest"
    assert "nvidia.com/gpu" not in ((container.get("resources") or {}).get("limits") or {})
    assert container["args"] == ["dagster", "api", "execute_step"]
