"""The GPU check: every distillation method's training step and the student's generation, on whatever accelerator
this interpreter sees, measured - one command, one JSON.

    python -m omnithought_dagster.gpu_check --out DIR      # `make gpu-check` here; the README's line on a GPU machine

It builds two random-weight Qwen2-VL models (a student and a teacher sharing its tokenizer; on CUDA a few hundred
million parameters, so the kernels and not the launch overheads are timed; on CPU the project's tiny ones), writes a
small exported subset with images, then runs a short training of each method (sft, kd, prefix_mask_kd, opsd, grpo -
grpo from sft's checkpoint, as the project runs it) through the project's own trainer and launcher: `deepspeed` with
ZeRO-2 where DeepSpeed imports, torchrun with plain torch otherwise; bf16 and the fused AdamW on CUDA, as the trainer
picks them. Then one batch of generation from the sft checkpoint through the transformers backend. It prints one JSON
(also written to DIR/gpu_check.json): per method steps/s, tokens/s, peak GPU memory and first/last loss, what ran
(engine, precision, optimizer, attention kernel), what was skipped and why. A method that fails is reported with the
end of its output and the exit status is 1; the others still run.

`prepare-wheels DEST` writes the wheel folder the GPU machine needs for this check (deploy/gpu-check/wheels.txt:
exact pins for its Python 3.12; DeepSpeed built here from its source distribution). No Dagster here.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

METHODS = ("sft", "kd", "prefix_mask_kd", "opsd", "grpo")  # the built-in ones (train/methods/), in the order they run
REPO = Path(__file__).resolve().parents[1]
WHEELS_FILE = REPO / "deploy" / "gpu-check" / "wheels.txt"
CARRY_LIMIT = 64 * 2**20  # what a device call carries, the working tree included
# The GPU machine's interpreter: pip download selects wheels for it.
TARGET = {
    "python_version": "3.12",
    "platforms": ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux1_x86_64"],
}


@dataclass(frozen=True)
class Scale:
    """How big the check's models and runs are."""

    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vision_depth: int
    vision_hidden: int
    examples: int
    steps: int
    micro_batch: int
    max_length: int
    sample_tokens: int  # opsd's and grpo's sampled answers, generation's replies
    image: int  # side of the square images, pixels


SCALES = {
    # ~0.3M parameters: the whole check in under 3 minutes on 2 CPU cores.
    "tiny": Scale(
        "tiny",
        hidden=64,
        layers=2,
        heads=2,
        kv_heads=1,
        intermediate=128,
        vision_depth=2,
        vision_hidden=32,
        examples=16,
        steps=4,
        micro_batch=2,
        max_length=256,
        sample_tokens=16,
        image=64,
    ),
    # ~0.3B parameters (student) and ~0.5B (teacher): seconds per method on one H200, large enough to time the kernels.
    "small": Scale(
        "small",
        hidden=1024,
        layers=16,
        heads=16,
        kv_heads=4,
        intermediate=2816,
        vision_depth=4,
        vision_hidden=512,
        examples=64,
        steps=20,
        micro_batch=8,
        max_length=768,
        sample_tokens=64,
        image=224,
    ),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m omnithought_dagster.gpu_check", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command")
    wheels = sub.add_parser("prepare-wheels", help="the wheel folder the GPU machine needs for the check")
    wheels.add_argument("dest", type=Path)
    parser.add_argument("--out", type=Path, default=None, help="folder for gpu_check.json (default: only printed)")
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one, removed)")
    parser.add_argument("--scale", choices=["auto", *SCALES], default="auto", help="auto: small on CUDA, tiny otherwise")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated, of " + ", ".join(METHODS))
    parser.add_argument(
        "--engine",
        choices=["auto", "deepspeed", "torch"],
        default="auto",
        help="auto: DeepSpeed ZeRO-2 where it imports, plain torch otherwise",
    )
    parser.add_argument("--timeout", type=float, default=240.0, help="seconds per method's training")
    args = parser.parse_args(argv)
    if args.command == "prepare-wheels":
        print(json.dumps(prepare_wheels(args.dest)))
        return 0
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {', '.join(METHODS)}")
    if args.work is not None:
        result = run_check(args.work, methods, scale=args.scale, engine=args.engine, timeout=args.timeout)
    else:
        with tempfile.TemporaryDirectory(prefix="gpu-check-") as work:
            result = run_check(Path(work), methods, scale=args.scale, engine=args.engine, timeout=args.timeout)
    text = json.dumps(result, indent=2)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "gpu_check.json").write_text(text + "\n")
    print(text, flush=True)
    return 0 if result["ok"] else 1


def run_check(work: Path, methods: list[str], *, scale: str = "auto", engine: str = "auto", timeout: float = 240.0) -> dict[str, Any]:
    import torch

    started = time.monotonic()
    cuda = torch.cuda.is_available()
    size = SCALES["small" if cuda else "tiny"] if scale == "auto" else SCALES[scale]
    engine, why = choose_engine(engine)
    skipped = [] if why is None else [{"what": "deepspeed", "why": why}]
    result: dict[str, Any] = {"environment": environment(cuda), "scale": size.name, "engine": engine, "methods": {}, "skipped": skipped}
    work.mkdir(parents=True, exist_ok=True)
    models = build_models(size, work / "models")
    result["models"] = {role: parameters(folder) for role, folder in models.items()}
    data = write_export(work / "data", size)
    outputs: dict[str, Path] = {}
    for method in methods:
        after = registered(method).short_run_starts_from
        if after is not None and after not in outputs:
            skipped.append({"what": method, "why": f"it starts from {after}'s checkpoint, and {after} did not train"})
            continue
        start = outputs.get(after) if after else None
        run = train_method(method, size, models, data, work / method, engine=engine, timeout=timeout, start=start)
        result["methods"][method] = run
        if run["ok"]:
            outputs[method] = work / method / "out"
    if "sft" in outputs:
        result["generation"] = generate(outputs["sft"], data, size, cuda)
    else:
        skipped.append({"what": "generation", "why": "no sft checkpoint to generate from"})
    result["ok"] = (
        all(run["ok"] for run in result["methods"].values()) and bool(result["methods"]) and result.get("generation", {}).get("ok", False)
    )
    result["wall_s"] = round(time.monotonic() - started, 1)
    return result


def choose_engine(wanted: str) -> tuple[str, str | None]:
    """(engine, why DeepSpeed is not used or None). An explicit deepspeed that does not import fails in the trainer."""
    if wanted != "auto":
        return wanted, None if wanted == "deepspeed" else "engine torch asked for"
    try:
        import deepspeed  # noqa: F401
    except Exception as exc:  # ImportError, or its own checks failing at import
        return "torch", f"deepspeed does not import here ({type(exc).__name__}: {str(exc)[:200]})"
    return "deepspeed", None


def environment(cuda: bool) -> dict[str, Any]:
    import torch

    out: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "device": torch.cuda.get_device_name() if cuda else "cpu",
    }
    for name in ("transformers", "deepspeed", "trl", "peft", "accelerate", "datasets"):
        try:
            from importlib.metadata import version

            out[name] = version(name)
        except Exception:
            out[name] = None
    return out


def build_models(size: Scale, folder: Path) -> dict[str, Path]:
    """The student and a larger teacher (same tokenizer: same corpus, vocabulary size and special tokens)."""
    from omnithought_dagster.models.tiny import TINY_STUDENT, TINY_TEACHER, TinySpec, build_tiny_model

    if size.name == "tiny":
        specs = {"student": TINY_STUDENT, "teacher": TINY_TEACHER}
    else:
        common = dict(
            family="qwen2_vl",
            heads=size.heads,
            kv_heads=size.kv_heads,
            vision_depth=size.vision_depth,
            vision_hidden=size.vision_hidden,
            vision_heads=max(1, size.vision_hidden // 64),
            max_pixels=size.image**2,
        )
        specs = {
            "student": TinySpec(
                name=f"gpu-check-{size.name}-student",
                hidden_size=size.hidden,
                layers=size.layers,
                intermediate_size=size.intermediate,
                seed=2,
                **common,
            ),
            "teacher": TinySpec(
                name=f"gpu-check-{size.name}-teacher",
                hidden_size=size.hidden,
                layers=size.layers * 2,
                intermediate_size=size.intermediate,
                seed=1,
                **common,
            ),
        }
    return {role: build_tiny_model(spec, folder / spec.name) for role, spec in specs.items()}


def parameters(folder: Path) -> int:
    """Parameters in a model folder's safetensors (from the headers: nothing loaded)."""
    from safetensors import safe_open

    total = 0
    for file in Path(folder).glob("*.safetensors"):
        with safe_open(str(file), "pt") as handle:
            for name in handle.keys():
                n = 1
                for d in handle.get_slice(name).get_shape():
                    n *= d
                total += n
    return total


def write_export(folder: Path, size: Scale) -> Path:
    """An exported subset as the trainer reads it (LLaMA-Factory layout: data.json + images/): a question on an image,
    the teacher's `<think>` reasoning and answer line, the reference answer the RL methods' reward checks against."""
    from PIL import Image

    (folder / "images").mkdir(parents=True, exist_ok=True)
    records = []
    words = "first I look at the image then I count the blocks and compare the colours".split()
    for i in range(size.examples):
        colour = (37 * i % 255, 90 + i % 60, 160)
        Image.new("RGB", (size.image, size.image), colour).save(folder / f"images/{i}.png")
        count = i % 9 + 1
        reasoning = " ".join(words[(i + k) % len(words)] for k in range(size.max_length // 8))
        records.append(
            {
                "id": f"gpu-check-{i}",
                "images": [f"images/{i}.png"],
                "messages": [
                    {"role": "user", "content": f"<image>\nHow many blocks are there? ({i})"},
                    {"role": "assistant", "content": f"<think>{reasoning}. I count {count} blocks.</think>\nAnswer: {count}"},
                ],
                "reference": {"answer": str(count), "answer_type": "numeric", "choices": []},
            }
        )
    (folder / "data.json").write_text(json.dumps(records))
    return folder


def registered(method: str):
    """The method registered as `method` (train/methods/): its short-run settings, what it needs first, what it reports."""
    from omnithought_dagster.train.methods import METHODS as REGISTRY

    return REGISTRY[method]


def train_method(
    method: str, size: Scale, models: dict[str, Path], data: Path, folder: Path, *, engine: str, timeout: float, start: Path | None
) -> dict[str, Any]:
    """One method's short run through the project's trainer and launcher; its measurements, or why it failed."""
    import torch

    from omnithought_dagster.config import GenerationConfig, StudentConfig, TrainingConfig
    from omnithought_dagster.train.launch import launcher_command, run_method, training_spec

    cuda = torch.cuda.is_available()
    folder.mkdir(parents=True, exist_ok=True)
    spec = registered(method)
    micro = size.micro_batch // 2 if spec.samples else size.micro_batch  # groups of 2 answers per question
    training = TrainingConfig(
        launcher="deepspeed" if engine == "deepspeed" else "torchrun",
        engine=engine,
        zero_stage=2,
        precision="bf16" if cuda else "fp32",
        micro_batch_size=max(2, micro),
        max_steps=size.steps,
        max_length=size.max_length,
        learning_rate=1e-4 if cuda else 1e-3,
        warmup_steps=0,
        lr_scheduler="constant",
        dataloader_workers=0,
        seed=0,
        work_dir=str(folder),
    )
    settings = spec.short_run_settings(str(models["teacher"]), size.sample_tokens)
    student = StudentConfig(
        name=f"gpu-check-{method}", model=str(start or models["student"]), method=method, **({method: settings} if settings else {})
    )
    spec_method = run_method(
        student, folder / "models", start_checkpoint=str(start) if start else None, answer_pattern=GenerationConfig().answer_pattern
    )
    run_spec = training_spec(str(start or models["student"]), data, folder / "out", training, run_dir=folder / "run", method=spec_method)
    spec_path = folder / "spec.json"
    spec_path.write_text(json.dumps(run_spec))
    command = launcher_command(training, spec_path)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    env.pop("DAGSTER_PIPES_CONTEXT", None)
    if not cuda:
        env["OMP_NUM_THREADS"] = "1"
    begun = time.monotonic()
    from omnithought_dagster.processes import guarded

    # Under the project's guard: the launcher and its ranks die with this check, however it dies (processes.guarded).
    process = subprocess.Popen(
        guarded(command), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=folder, env=env, start_new_session=True
    )
    try:
        out, err = process.communicate(timeout=timeout)
        status, output = process.returncode, out + err
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        out, err = process.communicate()
        status, output = None, f"timed out after {timeout:.0f} s\n" + _text(out) + _text(err)
    finally:  # DeepSpeed's CPU allreduce buffers of ranks that were killed (a rank that ends frees its own)
        from omnithought_dagster.train.launch import master_port
        from omnithought_dagster.train.trainer import remove_shm_buffers

        remove_shm_buffers(training.master_addr, master_port(command))
    seconds = round(time.monotonic() - begun, 1)
    log_path = folder / "out" / "train_log.json"
    if status != 0 or not log_path.is_file():
        return {"ok": False, "exit_status": status, "seconds": seconds, "output_tail": output[-3000:]}
    return {"ok": True, "seconds": seconds, **measurements(json.loads(log_path.read_text()))}


def measurements(log: dict[str, Any]) -> dict[str, Any]:
    """What the check reports of a run's train_log.json."""
    losses = [x for x in log.get("losses") or [] if x is not None]
    seconds = log.get("train_seconds") or 0
    peak = log.get("peak_gpu_memory_bytes")
    out = {
        "steps": log.get("steps"),
        "steps_per_s": round(log["steps"] / seconds, 3) if seconds else None,
        "tokens_per_s": log.get("tokens_per_s"),
        "steady_tokens_per_s": log.get("steady_tokens_per_s"),
        "peak_gpu_memory_mib": round(peak / 2**20, 1) if peak is not None else None,
        "loss_first": losses[0] if losses else None,
        "loss_last": losses[-1] if losses else None,
        "examples": log.get("examples"),
        "skipped_examples": log.get("skipped_examples"),
        "train_seconds": seconds,
    }
    for key in ("engine", "device", "precision", "optimizer", "attention"):
        out[key] = log.get(key)
    out.update(registered(log.get("method") or "sft").short_run(log))
    return out


def generate(model_dir: Path, data: Path, size: Scale, cuda: bool, batch: int = 8) -> dict[str, Any]:
    """One batch of the student's generation through the transformers backend (requests of the exported questions)."""
    import asyncio
    import base64

    from omnithought_dagster.llm.backends import ChatRequest, TransformersBackend

    records = json.loads((data / "data.json").read_text())[:batch]
    backend = TransformersBackend(model_dir, identity="gpu-check", device="cuda" if cuda else "cpu")
    requests = []
    for record in records:
        image = base64.b64encode((data / record["images"][0]).read_bytes()).decode()
        question = record["messages"][0]["content"].removeprefix("<image>\n")
        requests.append(
            ChatRequest(
                key=record["id"],
                max_tokens=size.sample_tokens,
                temperature=0.0,
                top_p=1.0,
                seed=0,
                messages=[
                    {
                        "role": "user",
                        "content": [
                            {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{image}"}},
                            {"type": "text", "text": question},
                        ],
                    }
                ],
            )
        )

    async def run_all():
        return await asyncio.gather(*(backend.complete(request) for request in requests))

    backend._load()  # loading is not generating
    begun = time.monotonic()
    try:
        completions = asyncio.run(run_all())
    except Exception as exc:
        return {"ok": False, "error": f"{type(exc).__name__}: {str(exc)[:500]}"}
    seconds = time.monotonic() - begun
    errors = [c.error for c in completions if c.finish_reason == "error"]
    tokens = sum(c.n_tokens or 0 for c in completions)
    return {
        "ok": not errors and tokens > 0,
        "requests": len(completions),
        "errors": errors[:3],
        "tokens": tokens,
        "seconds": round(seconds, 3),
        "tokens_per_s": round(tokens / seconds, 1) if seconds else None,
        "note": "the transformers backend answers one request at a time, in fp32",
    }


def _text(value) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else (value or "")


# -- the wheels the GPU machine needs ------------------------------------------------------------------


def pins(path: Path = WHEELS_FILE) -> dict[str, str]:
    """name -> exact version, from the pins file (`name==version` lines; # comments)."""
    out = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, sep, version = line.partition("==")
            if not sep or not version.strip():
                raise ValueError(f"{path}: {line!r} is not an exact pin (name==version)")
            out[_normal(name)] = version.strip()
    return out


def prepare_wheels(dest: Path, path: Path = WHEELS_FILE) -> dict[str, Any]:
    """Download the pinned wheels for the GPU machine's Python into `dest` (exactly those: older files there go), build
    the ones published only as source (DeepSpeed: a pure-Python wheel, its kernels left to build where they run), and
    check the folder against the pins and the carry limit. Returns what it holds."""
    wanted = pins(path)
    dest.mkdir(parents=True, exist_ok=True)
    for old in dest.glob("*.whl"):
        if _wheel_name(old) not in wanted or _wheel_version(old) != wanted[_wheel_name(old)]:
            old.unlink()
    have = {_wheel_name(w) for w in dest.glob("*.whl")}
    platform_args = [arg for p in TARGET["platforms"] for arg in ("--platform", p)]
    for name, version in sorted(wanted.items()):
        if name in have:
            continue
        download = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--quiet",
            "--disable-pip-version-check",
            "--no-deps",
            "--only-binary=:all:",
            "--python-version",
            TARGET["python_version"],
            "--implementation",
            "cp",
            *platform_args,
            "-d",
            str(dest),
            f"{name}=={version}",
        ]
        done = subprocess.run(download, capture_output=True, text=True)
        if done.returncode != 0:  # published as source only: build a wheel here, without its compiled extensions
            build = [
                sys.executable,
                "-m",
                "pip",
                "wheel",
                "--quiet",
                "--disable-pip-version-check",
                "--no-deps",
                "--no-build-isolation",
                "-w",
                str(dest),
                f"{name}=={version}",
            ]
            built = subprocess.run(build, capture_output=True, text=True, env={**os.environ, "DS_BUILD_OPS": "0"})
            if built.returncode != 0:
                raise RuntimeError(
                    f"{name}=={version}: no wheel for Python {TARGET['python_version']} and no build: "
                    f"{done.stderr[-500:]}{built.stderr[-1000:]}"
                )
    files = sorted(dest.glob("*.whl"))
    found = {_wheel_name(w): _wheel_version(w) for w in files}
    if found != wanted or len(files) != len(wanted):
        raise RuntimeError(f"{dest} holds {found}, the pins are {wanted}")
    size = sum(w.stat().st_size for w in files)
    if size >= CARRY_LIMIT:
        raise RuntimeError(f"{dest}: {size / 2**20:.1f} MiB of wheels, over the {CARRY_LIMIT / 2**20:.0f} MiB a device call carries")
    return {"dest": str(dest), "wheels": [w.name for w in files], "mib": round(size / 2**20, 2)}


def _normal(name: str) -> str:
    return name.strip().lower().replace("_", "-").replace(".", "-")


def _wheel_name(path: Path) -> str:
    return _normal(path.name.split("-")[0])


def _wheel_version(path: Path) -> str:
    return path.name.split("-")[1]


if __name__ == "__main__":
    raise SystemExit(main())
