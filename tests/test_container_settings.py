"""`operations.executor: docker` without an engine: what a step container gets (mounts, env, shm, label), the project
file's docker section, the step containers removed at a run's end, the interpreters a project file leaves out, and
`doctor --imports`. tests/test_containers.py runs the real thing (the `containers` tier)."""

import contextlib
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import dagster as dg
import pytest

from omnithought_dagster import containers, doctor
from omnithought_dagster.config import load_config
from omnithought_dagster.settings_model import ConfigError, project_environment

from conftest import write_config

REPO = Path(__file__).resolve().parents[1]


def _config(tmp_path, **docker):
    path = write_config(tmp_path, [{"name": "s", "kind": "synthetic"}], operations={"executor": "docker", "docker": docker})
    return load_config(path)


def test_a_step_container_gets_the_instance_the_project_file_and_the_volumes_at_their_own_paths(tmp_path, monkeypatch):
    monkeypatch.setenv("OMNI_KEY", "secret")
    config = _config(tmp_path, volumes=["store", str(tmp_path / "models")], env_vars=["OMNI_KEY", "A=b"], shm_size="1g")
    instance = str(tmp_path / "dagster")
    kwargs = containers.container_kwargs(config, instance)
    project_file = str(tmp_path / "omnithought.yaml")
    assert kwargs["volumes"] == {
        instance: {"bind": instance, "mode": "rw"},
        project_file: {"bind": project_file, "mode": "ro"},
        str(tmp_path / "models"): {"bind": str(tmp_path / "models"), "mode": "rw"},
        str(tmp_path / "store"): {"bind": str(tmp_path / "store"), "mode": "rw"},  # relative to the project file
    }
    assert kwargs["shm_size"] == "1g" and kwargs["network_mode"] == "host" and kwargs["labels"] == {"omnithought-dagster": "test"}
    env = containers.step_env(config, instance)
    assert env == [f"DAGSTER_HOME={instance}", f"OMNITHOUGHT_CONFIG={project_file}", "OMNI_KEY", "A=b"]
    # A volume holding the project file keeps it writable (one mount, not two).
    config = _config(tmp_path, volumes=["."])
    assert containers.step_mounts(config, instance)[str(tmp_path)]["mode"] == "rw"


@pytest.mark.parametrize("volume", ["s3://bucket/store", "https://example.com/x"])
def test_a_volume_must_be_a_local_folder(tmp_path, volume):
    with pytest.raises(ConfigError, match="a local folder"):
        _config(tmp_path, volumes=[volume])


def test_the_docker_executor_is_the_jobs_executor(tmp_path):
    from omnithought_dagster.defs import build_definitions

    defs = build_definitions(_config(tmp_path, image="reg/omni:1"))
    assert defs.resolve_job_def("ingest_seeds").executor_def.name == "omnithought_docker"


class _Inner:
    retries = "r"
    step_dependency_config = "d"

    def __init__(self, events, fail=False):
        self.events, self.fail = events, fail

    def execute(self, plan_context, execution_plan):
        yield from self.events
        if self.fail:
            raise RuntimeError("the run failed")


def _worker_starting(container_id: str):
    return SimpleNamespace(
        event_type_value="STEP_WORKER_STARTING",
        event_specific_data=SimpleNamespace(metadata={"Docker container id": dg.MetadataValue.text(container_id)}),
    )


@pytest.mark.parametrize("fail", [False, True])
def test_the_runs_step_containers_are_removed_when_it_ends_however_it_ends(monkeypatch, fail):
    removed = []
    monkeypatch.setattr(containers, "remove_containers", lambda ids: removed.extend(ids) or {"c2": "busy"})
    monkeypatch.setattr(containers, "docker_api", contextlib.nullcontext)
    warnings = []
    # A step launched in the executor's last pass: its event is in the instance, never yielded (a cancel, an error).
    recorded = [SimpleNamespace(dagster_event=_worker_starting("c3")), SimpleNamespace(dagster_event=_worker_starting("c1"))]
    instance = SimpleNamespace(all_logs=lambda run_id, of_type: recorded if run_id == "r1" else [])
    plan_context = SimpleNamespace(log=SimpleNamespace(warning=warnings.append), instance=instance, run_id="r1")
    other = SimpleNamespace(event_type_value="STEP_SUCCESS", event_specific_data=None)
    executor = containers.StepContainersRemoved(_Inner([_worker_starting("c1"), other, _worker_starting("c2")], fail=fail))
    assert executor.retries == "r" and executor.step_dependency_config == "d"
    run = executor.execute(plan_context, None)
    if fail:
        with pytest.raises(RuntimeError):
            list(run)
    else:
        assert len(list(run)) == 3
    assert removed == ["c1", "c2", "c3"]
    assert warnings == ["could not remove step container c2: busy"]


def test_every_local_path_a_step_uses_must_be_mounted(tmp_path):
    path = write_config(
        tmp_path,
        [{"name": "s", "kind": "synthetic"}, {"name": "j", "kind": "json", "format": "llava", "path": str(tmp_path / "data/x.json")}],
        models_dir=str(tmp_path / "models"),
        operations={"executor": "docker", "docker": {"volumes": ["store", "models"]}},
    )
    config = load_config(path)
    outside = dict(containers.unmounted_paths(config, list(containers.step_mounts(config, str(tmp_path / "dagster")))))
    # The store and the models are mounted; the default lock and work folders (beside the project file) and the source's
    # file are not.
    assert set(outside) == {"operations.gpu_lock_dir", "training.work_dir", "evaluation.work_dir", "sources[j].path"}
    assert outside["sources[j].path"] == str(tmp_path / "data/x.json")
    config = load_config(
        write_config(tmp_path, [{"name": "s", "kind": "synthetic"}], operations={"executor": "docker", "docker": {"volumes": ["."]}})
    )
    assert containers.unmounted_paths(config, list(containers.step_mounts(config, str(tmp_path / "dagster")))) == []
    # An object store is no local path.
    config = load_config(
        write_config(tmp_path, [{"name": "s", "kind": "synthetic"}], store_root="s3://b/p", operations={"docker": {"volumes": ["."]}})
    )
    assert containers.unmounted_paths(config, [str(tmp_path)]) == []


def test_removing_no_containers_needs_no_engine():
    assert containers.remove_containers([]) == {}


def test_a_left_out_interpreter_is_the_projects_environment(tmp_path, monkeypatch):
    monkeypatch.delenv("OMNITHOUGHT_ROOT", raising=False)
    config = load_config(write_config(tmp_path, [{"name": "s", "kind": "synthetic"}]))
    assert config.teacher.python == str(REPO / ".venv-vllm/bin/python")  # this checkout's, not the project file's folder's
    assert config.evaluation.python == str(REPO / ".venv-lmms/bin/python")
    monkeypatch.setenv("OMNITHOUGHT_ROOT", "/opt/omnithought")
    config = load_config(write_config(tmp_path, [{"name": "s", "kind": "synthetic"}], teacher={"python": "envs/v/bin/python"}))
    assert config.teacher.python == str(tmp_path / "envs/v/bin/python")  # given: relative to the project file, as before
    assert config.evaluation.python == "/opt/omnithought/.venv-lmms/bin/python" == project_environment(".venv-lmms")


def test_doctor_imports_name_the_module_that_does_not_import(tmp_path):
    root = tmp_path / "root"
    (root / "bin").mkdir(parents=True)
    os.symlink(sys.executable, root / "bin" / "python")
    env = doctor.Environment("here", "root", "this interpreter", False, ("json", "omnithought_no_such_module"))
    with pytest.raises(doctor.SmokeError, match="omnithought_no_such_module"):
        doctor.check_imports(env, tmp_path, tmp_path / "work")
    ok = doctor.Environment("here", "root", "this interpreter", False, ("json", "sqlite3"))
    assert "2 modules imported" in doctor.check_imports(ok, tmp_path, tmp_path / "work")
