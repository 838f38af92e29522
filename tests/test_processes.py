"""Child processes die with the step that started them, however it dies, and see only the environment they need."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from omnithought_dagster.processes import child_environment, guarded

# A command that starts a grandchild (as vLLM starts engines, a launcher its ranks), reports both pids and its
# environment, then waits.
TREE = textwrap.dedent("""
    import json, os, subprocess, sys, time
    grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    with open(sys.argv[1], "w") as out:
        json.dump({"pid": os.getpid(), "grandchild": grandchild.pid, "env": dict(os.environ)}, out)
    time.sleep(600)
""")


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def _wait_for(path: Path, timeout: float = 30) -> dict:
    deadline = time.monotonic() + timeout
    while not (path.exists() and path.read_text().endswith("}")):
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)
    return json.loads(path.read_text())


@pytest.mark.parametrize("own_session", [True, False])
def test_a_guarded_tree_ends_when_its_starter_is_killed(tmp_path, own_session):
    """own_session=False is how Dagster's Pipes client starts the trainer: the guard makes its own group."""
    report = tmp_path / "tree.json"
    (tmp_path / "tree.py").write_text(TREE)
    starter = tmp_path / "starter.py"
    starter.write_text(
        textwrap.dedent(f"""
        import subprocess, sys, time
        from omnithought_dagster.processes import guarded
        guard = subprocess.Popen(guarded([sys.executable, {str(tmp_path / "tree.py")!r}, {str(report)!r}], grace_s=5),
                                 start_new_session={own_session})
        print(guard.pid, flush=True)
        time.sleep(600)
    """)
    )
    step = subprocess.Popen([sys.executable, str(starter)], stdout=subprocess.PIPE, text=True)
    guard = int(step.stdout.readline())
    tree = _wait_for(report)
    pids = [guard, tree["pid"], tree["grandchild"]]
    try:
        assert all(_alive(pid) for pid in pids)
        assert os.getpgid(tree["grandchild"]) == guard  # the guard leads the group that holds the whole tree
        step.kill()  # SIGKILL: the starter runs no cleanup at all
        step.wait(timeout=10)
        deadline = time.monotonic() + 20
        while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert [pid for pid in pids if _alive(pid)] == []
    finally:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_the_guard_passes_the_exit_code_and_filters_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    monkeypatch.setenv("WANDB_API_KEY", "wanted")
    monkeypatch.setenv("HF_HOME", "/hf")
    code = "import json, os, sys; print(json.dumps(dict(os.environ))); sys.exit(7)"
    done = subprocess.run(guarded([sys.executable, "-c", code], keep_env=["WANDB_API_KEY"]), capture_output=True, text=True, timeout=60)
    assert done.returncode == 7
    env = json.loads(done.stdout)
    assert env["WANDB_API_KEY"] == "wanted" and env["HF_HOME"] == "/hf" and "AWS_SECRET_ACCESS_KEY" not in env
    assert "AWS_SECRET_ACCESS_KEY" not in child_environment() and child_environment({"X": "1"})["X"] == "1"


def test_the_guard_keeps_the_last_lines_of_standard_error_and_still_passes_them_on(tmp_path):
    code = (
        "import sys\nfor i in range(500): print(f'line {i}', file=sys.stderr)\n"
        "print('Traceback: ValueError: Image features and image tokens do not match', file=sys.stderr); sys.exit(3)"
    )
    done = subprocess.run(guarded([sys.executable, "-c", code], stderr_tail=tmp_path / "tail"), capture_output=True, text=True, timeout=60)
    assert done.returncode == 3 and done.stderr.count("\n") == 501  # everything still reaches the caller's stream
    kept = (tmp_path / "tail").read_text().split("\n")
    assert kept[-2] == "Traceback: ValueError: Image features and image tokens do not match" and len(kept) == 201


def test_an_evaluator_dies_with_a_killed_step(tmp_path):
    """lmms-eval (here a stand-in that starts a child of its own) ends with the step that runs it."""
    report = tmp_path / "tree.json"
    fake = tmp_path / "python"
    fake.write_text(f"#!{sys.executable}\n" + TREE.replace("sys.argv[1]", repr(str(report))))
    fake.chmod(0o755)
    step = tmp_path / "step.py"
    step.write_text(
        textwrap.dedent(f"""
        from pathlib import Path
        from omnithought_dagster.evaluation.run import run_lmms_eval
        run_lmms_eval([{str(fake)!r}, "-m", "lmms_eval"], ["t"], Path({str(tmp_path)!r}), 600, {{"SECRET_TOKEN": "x"}}, {{}})
    """)
    )
    process = subprocess.Popen([sys.executable, str(step)], env={**os.environ, "AWS_SECRET_ACCESS_KEY": "secret"})
    tree = _wait_for(report)
    assert "AWS_SECRET_ACCESS_KEY" not in tree["env"] and tree["env"]["SECRET_TOKEN"] == "x"  # what the step passes, not all
    process.kill()
    process.wait(timeout=10)
    deadline = time.monotonic() + 20
    while (_alive(tree["pid"]) or _alive(tree["grandchild"])) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(tree["pid"]) and not _alive(tree["grandchild"])
