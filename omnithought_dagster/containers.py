"""Steps in containers on one machine: dagster-docker's executor as this project runs it, and the Docker API it talks to.

`operations.executor: docker` runs each step as `dagster api execute_step` in a container of its own, from
`operations.docker.image` (what `make image` builds; the Kubernetes and ECS executors start the same entry point in
the same image). A step's container shares with the run, mounted at the same paths so that every path means the same
inside: the Dagster instance's folder (its SQLite files: events, pools, runs), the project file, and the folders
`operations.docker.volumes` lists (the store, models_dir, the sources' files). Whatever a step starts - a vLLM server,
the trainer, lmms-eval - runs inside the step's container and dies with it: a killed container leaves no process.
When the run ends - done, failed or cancelled - its step containers are removed (dagster-docker leaves them behind),
killed first if still running: a cancelled run leaves none running.

The Docker API (`docker_api`, entered by the executor, so runs launched from the CLI, the UI or a schedule alike):
$DOCKER_HOST if set, else Docker's socket if a daemon answers there, else a podman API service started for the run and
stopped after it, with the project's podman settings (deploy/container/). Step containers run as the engine runs them
(root under rootful Docker or podman): the files they write in the mounted folders belong to that user. The project
file is trusted like code: its volumes are mounted read-write. No GPU is passed to a step container: executor docker
runs CPU steps (GPU steps go to Kubernetes or ECS, or run with the multiprocess executor on a GPU box).
"""

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import dagster as dg

from omnithought_dagster.config import ProjectConfig
from omnithought_dagster.pools import WrappedExecutor

# Every step container carries it (the project's name): `podman ps -a --filter label=omnithought-dagster` finds them.
LABEL = "omnithought-dagster"
CONTAINER_ID_KEY = "Docker container id"  # dagster-docker's metadata on a step's STEP_WORKER_STARTING event
PODMAN_CONF = Path(__file__).resolve().parents[1] / "deploy" / "container" / "containers.conf"
DOCKER_SOCKET = "/var/run/docker.sock"


def step_mounts(config: ProjectConfig, instance_dir: str) -> dict[str, dict[str, str]]:
    """The step containers' bind mounts, each at its own path: the instance and the volumes read-write, the project file
    read-only (a volume that holds it keeps it writable)."""
    mounts = {
        os.path.abspath(path): {"bind": os.path.abspath(path), "mode": "rw"} for path in [instance_dir, *config.operations.docker.volumes]
    }
    if config.config_path:
        project_file = os.path.abspath(config.config_path)
        mounts.setdefault(project_file, {"bind": project_file, "mode": "ro"})
    return dict(sorted(mounts.items()))


def step_env(config: ProjectConfig, instance_dir: str) -> list[str]:
    """The step containers' environment: where the instance and the project file are, plus `operations.docker.env_vars`
    (a bare NAME takes this process's value)."""
    env = [f"DAGSTER_HOME={os.path.abspath(instance_dir)}"]
    if config.config_path:
        env.append(f"OMNITHOUGHT_CONFIG={os.path.abspath(config.config_path)}")
    return env + list(config.operations.docker.env_vars)


def container_kwargs(config: ProjectConfig, instance_dir: str) -> dict:
    """What docker-py's `containers.create` gets besides image, command and environment."""
    docker = config.operations.docker
    return {
        "volumes": step_mounts(config, instance_dir),
        "network_mode": docker.network_mode,
        "shm_size": docker.shm_size,
        "labels": {LABEL: config.project},
        "stop_timeout": docker.stop_timeout_s,  # dagster-docker's: taken out before create, used by a cancelled step's stop
    }


def docker_executor(config: ProjectConfig) -> dg.ExecutorDefinition:
    """dagster-docker's step handler under Dagster's step-delegating executor, configured from `operations.docker`, with
    the run's step containers removed when it ends."""
    from dagster._core.definitions.executor_definition import multiple_process_executor_requirements

    def create(init_context: dg.InitExecutorContext):
        from dagster._core.execution.retries import RetryMode
        from dagster._core.executor.step_delegating import StepDelegatingExecutor
        from dagster_docker.container_context import DockerContainerContext
        from dagster_docker.docker_executor import DockerStepHandler

        instance_dir = init_context.instance.root_directory
        outside = unmounted_paths(config, list(step_mounts(config, instance_dir)))
        if outside:  # a step would write them inside its container, and they would go with it
            raise ValueError(
                "operations.docker.volumes must hold every local path the steps read or write; not mounted: "
                + ", ".join(f"{name} {path}" for name, path in outside)
            )
        for path in config.operations.docker.volumes:  # a bind mount's source must exist: a new store's folder is made
            if not os.path.exists(path):
                os.makedirs(path, exist_ok=True)
        context = DockerContainerContext(env_vars=step_env(config, instance_dir), container_kwargs=container_kwargs(config, instance_dir))
        inner = StepDelegatingExecutor(
            DockerStepHandler(config.operations.docker.image, context),
            retries=RetryMode.ENABLED,
            # As the multiprocess executor: at most a step per core unless the project file says otherwise.
            max_concurrent=config.operations.max_concurrent or os.cpu_count() or 1,
        )
        return StepContainersRemoved(inner)

    return dg.ExecutorDefinition(
        name="omnithought_docker",
        executor_creation_fn=create,
        requirements=multiple_process_executor_requirements(),
        description="each step in its own container (dagster-docker), removed when the run ends",
    )


class StepContainersRemoved(WrappedExecutor):
    """A step-delegating executor whose run's step containers (named by the events it yields) are removed when it ends."""

    def execute(self, plan_context, execution_plan):
        started: list[str] = []
        with docker_api():  # whoever launched the run (the CLI, the UI, a schedule): a Docker API for its steps
            try:
                for event in self.inner.execute(plan_context, execution_plan):
                    container = _container_id(event)
                    if container:
                        started.append(container)
                    yield event
            finally:
                # Also the steps launched in the executor's last pass: their events are in the instance, not yet yielded
                # when a cancel or an error ends the run.
                recorded = plan_context.instance.all_logs(plan_context.run_id, of_type=dg.DagsterEventType.STEP_WORKER_STARTING)
                started += [c for c in (_container_id(r.dagster_event) for r in recorded if r.dagster_event) if c]
                failures = remove_containers(list(dict.fromkeys(started)))
                for container, error in failures.items():
                    plan_context.log.warning(f"could not remove step container {container[:12]}: {error}")


def unmounted_paths(config: ProjectConfig, mounts: list[str]) -> list[tuple[str, str]]:
    """(setting, path) of the local paths a step reads or writes that no mount holds: the store, the models, the lock
    and work folders, the sources' and benchmarks' files."""
    paths = [
        ("store.root", config.store.root),
        ("models_dir", config.models_dir),
        ("operations.gpu_lock_dir", config.operations.gpu_lock_dir),
        ("training.work_dir", config.training.work_dir),
        ("evaluation.work_dir", config.evaluation.work_dir),
    ]
    for kind, entries in (("sources", config.sources), ("benchmarks", config.benchmarks)):
        for entry in entries:
            for field in ("path", "image_root"):
                value = getattr(entry, field, None)
                if isinstance(value, str):
                    paths.append((f"{kind}[{entry.name}].{field}", value))
    roots = [os.path.abspath(m) for m in mounts]
    local = [(name, os.path.abspath(path)) for name, path in paths if path and "://" not in path]
    return [(name, path) for name, path in local if not any(os.path.commonpath([path, root]) == root for root in roots)]


def _container_id(event: dg.DagsterEvent) -> str | None:
    if event.event_type_value != "STEP_WORKER_STARTING":
        return None
    metadata = getattr(event.event_specific_data, "metadata", None) or {}
    value = metadata.get(CONTAINER_ID_KEY)
    return str(getattr(value, "value", value)) if value is not None else None


def remove_containers(ids: list[str]) -> dict[str, str]:
    """Remove (kill first if running) each container; those already gone are fine. Returns {id: error} of the others."""
    if not ids:
        return {}
    import docker
    import docker.errors

    failures = {}
    try:
        client = docker.from_env()
    except docker.errors.DockerException as error:  # no engine to ask: name every container, hide nothing else
        return {container_id: f"no Docker API: {error}" for container_id in ids}
    try:
        for container_id in ids:
            try:
                client.containers.get(container_id).remove(force=True)
            except docker.errors.NotFound:
                pass
            except docker.errors.DockerException as error:
                failures[container_id] = str(error)
    finally:
        client.close()
    return failures


def reconstructable_job(config: ProjectConfig, name: str):
    """Job `name` of the code location module (omnithought_dagster.definitions, which reads $OMNITHOUGHT_CONFIG): what
    a step's container loads by the same module name from its image. Sets $OMNITHOUGHT_CONFIG to this project file."""
    from dagster._core.definitions.reconstruct import ReconstructableRepository

    if not config.config_path:
        raise ValueError("a containerised run needs a project file (load_config), not a config built in memory")
    path = os.path.abspath(config.config_path)
    loaded = sys.modules.get("omnithought_dagster.definitions")
    if loaded is not None and os.path.abspath(loaded.defs_config_path or "") != path:
        raise RuntimeError(f"the code location was loaded from {loaded.defs_config_path}, not {path}")
    os.environ["OMNITHOUGHT_CONFIG"] = path
    return ReconstructableRepository.for_module("omnithought_dagster.definitions", "defs").get_reconstructable_job(name)


def docker_api_answers(base_url: str | None = None, timeout_s: float = 5) -> bool:
    import docker

    try:
        client = docker.DockerClient(base_url=base_url, timeout=timeout_s) if base_url else docker.from_env(timeout=timeout_s)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except Exception:
        return False


@contextlib.contextmanager
def docker_api(start_timeout_s: float = 60) -> Iterator[str]:
    """Yields the Docker API's address, set as $DOCKER_HOST for this process (docker-py reads it) while inside: the one
    set, Docker's own socket, or a podman API service this process starts and stops on the way out."""
    if os.environ.get("DOCKER_HOST"):
        yield os.environ["DOCKER_HOST"]
        return
    if docker_api_answers():  # Docker's default socket
        yield f"unix://{DOCKER_SOCKET}"
        return
    podman = shutil.which("podman")
    if podman is None:
        raise RuntimeError(
            "no Docker API: $DOCKER_HOST unset, no Docker daemon, no podman (`deploy/container/engine.sh setup` installs it)"
        )
    from omnithought_dagster.llm.vllm_server import stop_group
    from omnithought_dagster.processes import guarded

    folder = tempfile.mkdtemp(prefix="omnithought-podman-")
    address = f"unix://{folder}/podman.sock"
    env = dict(os.environ)
    if "CONTAINERS_CONF" not in env and PODMAN_CONF.exists():
        env["CONTAINERS_CONF"] = str(PODMAN_CONF)
    log = open(os.path.join(folder, "service.log"), "wb")  # noqa: SIM115 - closed below
    try:
        service = subprocess.Popen(
            guarded([podman, "system", "service", "--time=0", address]),
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    except OSError:
        log.close()
        shutil.rmtree(folder, ignore_errors=True)
        raise
    try:
        deadline = time.monotonic() + start_timeout_s
        while not docker_api_answers(address):
            if service.poll() is not None or time.monotonic() > deadline:
                log.flush()
                tail = Path(folder, "service.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"the podman API service did not answer at {address}: {tail}")
            time.sleep(0.2)
        os.environ["DOCKER_HOST"] = address
        yield address
    finally:
        os.environ.pop("DOCKER_HOST", None)  # it was unset on the way in
        stop_group(service, grace_s=10)
        log.close()
        shutil.rmtree(folder, ignore_errors=True)
