"""The project's environments: what each is for, whether it matches its lock, and a smoke check of its job.

Each environment installs from a committed lock (deploy/env/<profile>/<name>.lock, written by
`make lock`). `omnithought doctor` compares what an environment has installed with its lock
and names every drifted package; `--smoke` then runs a real, tiny piece of the environment's
job (one DeepSpeed step, one vLLM request, a 2-item lmms-eval run), so a broken install fails
where it happened, with the tool's own error. No Dagster here.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from omnithought_dagster.logtail import log_tail

PROFILES = ("cpu", "gpu")
LOCKS_DIR = Path("deploy") / "env"
PROJECT = "omnithought-dagster"
# What `python -m venv` seeds an environment with; a lock may pin them, else they are not drift.
SEED_PACKAGES = frozenset({"pip", "setuptools", "wheel"})
SMOKE_TIMEOUT_S = 600
TAIL_LINES = 30


@dataclass(frozen=True)
class Environment:
    name: str  # the lock's name: deploy/env/<profile>/<name>.lock
    venv: str
    purpose: str
    has_project: bool  # this package is installed into it (editable, without dependencies)
    imports: tuple[str, ...] = ()  # what its job imports: `doctor --imports` (a GPU image on a machine without a GPU)

    def python(self, root: Path) -> Path:
        return root / self.venv / "bin" / "python"

    def lock(self, root: Path, profile: str) -> Path:
        return root / LOCKS_DIR / profile / f"{self.name}.lock"


ENVIRONMENTS = {
    "dagster": Environment(
        "dagster",
        ".venv",
        "the code location, the CPU steps and the trainer (DeepSpeed)",
        True,
        (
            "dagster",
            "dagster_docker",
            "dagster_k8s",
            "dagster_aws",
            "torch",
            "transformers",
            "deepspeed",
            "duckdb",
            "omnithought_dagster.defs",
        ),
    ),
    "vllm": Environment(
        "vllm",
        ".venv-vllm",
        "the vLLM server of the teacher and the judge",
        False,
        ("torch", "transformers", "vllm", "vllm.entrypoints.openai.api_server"),
    ),
    "lmms": Environment(
        "lmms",
        ".venv-lmms",
        "lmms-eval, which scores the students (our model class via its entry point)",
        True,
        ("torch", "lmms_eval", "omnithought_dagster.evaluation.lmms_entry"),
    ),
}


@dataclass(frozen=True)
class Drift:
    package: str
    locked: str | None
    installed: str | None

    def __str__(self) -> str:
        if self.installed is None:
            return f"{self.package}: locked {self.locked}, not installed"
        if self.locked is None:
            return f"{self.package}: installed {self.installed}, not in the lock"
        return f"{self.package}: locked {self.locked}, installed {self.installed}"


class SmokeError(RuntimeError):
    """A smoke check failed; the message ends with the tool's own last lines."""


def normalize(name: str) -> str:
    """A distribution name as package indexes compare them (PEP 503)."""
    return re.sub(r"[-_.]+", "-", name).lower()


_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[^\]]*\])?==([^\s;\\]+)")


def read_lock(path: str | Path) -> dict[str, str]:
    """{package: version} of a lock (pip requirements with exact pins, hashes and comments allowed)."""
    pins = {}
    for line in Path(path).read_text().split("\n"):
        match = _PIN.match(line.strip())
        if match:
            pins[normalize(match.group(1))] = match.group(2)
    if not pins:
        raise ValueError(f"{path}: no `name==version` pins (not a lock?)")
    return pins


_LIST_INSTALLED = (
    "import importlib.metadata as m, json; "
    "print(json.dumps({d.metadata['Name']: d.version for d in m.distributions() if d.metadata['Name']}))"
)


def installed_packages(python: str | Path) -> dict[str, str]:
    """{package: version} installed in the environment of `python` (read by that interpreter)."""
    done = subprocess.run(
        [str(python), "-c", _LIST_INSTALLED], capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONNOUSERSITE": "1"}
    )
    if done.returncode != 0:
        raise RuntimeError(f"{python} could not list its packages: {done.stderr.strip()[-2000:]}")
    return {normalize(name): version for name, version in json.loads(done.stdout).items()}


def compare(locked: dict[str, str], installed: dict[str, str], *, allowed_extra: frozenset[str] = frozenset()) -> list[Drift]:
    """Every package whose installed version differs from the lock, is missing, or is not in the lock."""
    drift = [Drift(name, version, installed.get(name)) for name, version in sorted(locked.items()) if installed.get(name) != version]
    extra = set(installed) - set(locked) - set(allowed_extra) - SEED_PACKAGES
    return drift + [Drift(name, None, installed[name]) for name in sorted(extra)]


def installed_profile(env: Environment, root: Path) -> str:
    """The profile an environment was installed with (the Makefile's stamp), else cpu."""
    stamps = sorted(p.name.removeprefix(".installed-") for p in (root / env.venv).glob(".installed-*"))
    return stamps[0] if len(stamps) == 1 and stamps[0] in PROFILES else "cpu"


def environment_drift(env: Environment, root: Path, profile: str) -> list[Drift]:
    python = env.python(root)
    if not python.exists():
        raise FileNotFoundError(f"{env.venv} does not exist (`make env PROFILE={profile}` creates it)")
    allowed = frozenset({PROJECT}) if env.has_project else frozenset()
    return compare(read_lock(env.lock(root, profile)), installed_packages(python), allowed_extra=allowed)


# -- smoke checks --------------------------------------------------------------------------------


def check_imports(env: Environment, root: Path, work: Path) -> str:
    """Each of the environment's modules imported by its own interpreter, in one process (no GPU needed: a CUDA build
    imports without one). Raises SmokeError naming the module that failed, with the interpreter's last lines."""
    code = "import importlib, sys\nfor name in sys.argv[1:]:\n    print('importing', name, flush=True)\n    importlib.import_module(name)\n"
    work.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    _run([str(env.python(root)), "-c", code, *env.imports], work, {}, f"{env.name} imports")
    return f"{len(env.imports)} modules imported ({', '.join(env.imports)}) ({time.monotonic() - started:.0f} s)"


def smoke(env: Environment, root: Path, work: Path, log: Callable[[str], None] = print) -> str:
    """Run the environment's smoke check in `work` (replaced); returns a one-line summary, raises SmokeError."""
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    started = time.monotonic()
    try:
        summary = SMOKES[env.name](root, work, log)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return f"{summary} ({time.monotonic() - started:.0f} s)"


def _smoke_trainer(root: Path, work: Path, log: Callable[[str], None]) -> str:
    """One DeepSpeed ZeRO-2 optimizer step of the tiny student on two examples, as the asset launches it."""
    from omnithought_dagster.config import StudentConfig, TrainingConfig
    from omnithought_dagster.train.launch import launcher_command, resolve_student, training_spec

    model_dir, _ = resolve_student(StudentConfig(name="smoke", model="tiny:student"), root / ".cache" / "models")
    data = work / "data"
    data.mkdir()
    _write_image(data / "0.png")
    records = [
        {
            "messages": [
                {"role": "user", "content": f"<image>What is {i} + {i}?"},
                {"role": "assistant", "content": f"<think>{i} plus {i}</think>\nAnswer: {2 * i}"},
            ],
            "images": ["0.png"],
        }
        for i in range(2)
    ]
    (data / "data.json").write_text(json.dumps(records))
    training = TrainingConfig(
        python=str(ENVIRONMENTS["dagster"].python(root)), max_steps=1, micro_batch_size=2, zero_stage=2, max_length=512, work_dir=str(work)
    )
    spec_path = work / "spec.json"
    out = work / "out"
    spec_path.write_text(json.dumps(training_spec(model_dir, data, out, training)))
    log("smoke: one DeepSpeed step of the tiny student (the first run compiles DeepSpeed's CPU op, ~1 min)")
    _run(launcher_command(training, spec_path), work, {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}, "the trainer")
    if not any(out.glob("*.safetensors")):
        raise SmokeError(f"the trainer exited 0 but saved no weights in {out}")
    return "deepspeed took one step and saved the student"


def _smoke_vllm(root: Path, work: Path, log: Callable[[str], None]) -> str:
    """The tiny teacher behind a real vLLM server answers one chat request."""
    from omnithought_dagster.config import LLMConfig
    from omnithought_dagster.llm.vllm_server import VLLMServer, VLLMStartError
    from omnithought_dagster.models.resolve import resolve_model

    model_dir, _ = resolve_model("tiny:teacher", root / ".cache" / "models")
    config = LLMConfig(
        model="tiny:teacher", python=str(ENVIRONMENTS["vllm"].python(root)), max_model_len=1024, startup_timeout_s=SMOKE_TIMEOUT_S
    )
    server = VLLMServer.from_config(config, model=model_dir, served_model_name="smoke", log_dir=work)
    log(f"smoke: starting vLLM on the tiny teacher ({server.base_url}, ~30-40 s)")
    try:
        with server:
            reply = _chat(server.base_url, "smoke")
    except VLLMStartError as exc:
        raise SmokeError(str(exc)) from None
    except OSError as exc:
        raise SmokeError(f"the vLLM server did not answer: {exc}\n{server.tail(TAIL_LINES)}") from None
    return f"vLLM answered one request ({reply['usage']['completion_tokens']} tokens)"


def _smoke_lmms(root: Path, work: Path, log: Callable[[str], None]) -> str:
    """lmms-eval scores the tiny student on a 2-item local task through our model class."""
    from omnithought_dagster.config import SeedSettings, SyntheticSourceConfig
    from omnithought_dagster.evaluation.run import EvalError, lmms_command, run_lmms_eval
    from omnithought_dagster.evaluation.tasks import write_local_task
    from omnithought_dagster.models.resolve import resolve_model

    model_dir, _ = resolve_model("tiny:student", root / ".cache" / "models")
    task = write_local_task(
        SyntheticSourceConfig(name="smoke", kind="synthetic", n_samples=2, image_size=128), SeedSettings(), work / "tasks", max_new_tokens=8
    )
    command = lmms_command(
        str(ENVIRONMENTS["lmms"].python(root)),
        "omnithought_vl",
        {"pretrained": model_dir},
        [task.name],
        [task.folder],
        work / "out",
        batch_size=1,
        device="cpu",
        limit=None,
        seed=0,
    )
    log("smoke: lmms-eval on a 2-item local task (~20-30 s)")
    try:
        scores = run_lmms_eval(command, [task.name], work, SMOKE_TIMEOUT_S, {}, {task.name: task})
    except EvalError as exc:
        raise SmokeError(str(exc)) from None
    (entry,) = scores.values()
    if entry.n != task.n_items:
        raise SmokeError(f"lmms-eval scored {entry.n} of {task.n_items} items")
    return f"lmms-eval scored {entry.n} items ({entry.metric} {entry.score:.2f})"


SMOKES = {"dagster": _smoke_trainer, "vllm": _smoke_vllm, "lmms": _smoke_lmms}


def _run(command: list[str], cwd: Path, env: dict[str, str], what: str) -> None:
    log = cwd / "smoke.log"
    with log.open("w") as out:
        try:
            done = subprocess.run(
                command,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=cwd,
                env={**os.environ, **env},
                timeout=SMOKE_TIMEOUT_S,
                start_new_session=True,
            )
        except subprocess.TimeoutExpired:
            raise SmokeError(f"{what} ran past {SMOKE_TIMEOUT_S} s:\n{log_tail(log, TAIL_LINES)}") from None
    if done.returncode != 0:
        raise SmokeError(f"{what} exited with code {done.returncode}:\n{log_tail(log, TAIL_LINES)}")


def _chat(base_url: str, model: str) -> dict:
    import urllib.request

    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 8, "temperature": 0}).encode()
    request = urllib.request.Request(f"{base_url}/chat/completions", data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        reply = json.loads(response.read())
    if not reply.get("choices"):
        raise OSError(f"a reply without choices: {reply}")
    return reply


def _write_image(path: Path) -> None:
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (64, 64), "white")
    ImageDraw.Draw(image).rectangle((8, 8, 40, 40), fill="black")
    image.save(path)


def default_root() -> Path:
    """The project checkout: where the environments and deploy/env live (the current folder by default)."""
    return Path(os.environ.get("OMNITHOUGHT_ROOT", Path.cwd())).resolve()
