"""The lmms-eval command line, and reading what it wrote.

lmms-eval exits 0 even when an evaluation failed, so its exit code decides nothing: the run
counts only if its results JSON exists and names every task asked for, each with its metric.
Per-sample records (--log_samples) give the per-tag breakdown: their doc_id is the row index
of the task's Parquet, which carries each item's id and tag.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import subprocess
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from omnithought_dagster.evaluation.task_utils import extract_answer
from omnithought_dagster.evaluation.tasks import LocalTask
from omnithought_dagster.logtail import log_tail
from omnithought_dagster.processes import child_environment, guarded

OVERALL = "all"
PROGRESS_PREFIX = "omnithought-progress: "  # our model class's progress lines in lmms-eval's output
POLL_S = 1.0


class EvalError(RuntimeError):
    """lmms-eval did not produce the results asked for; the message says what is missing."""


@dataclass
class TaskScores:
    task: str
    benchmark: str
    metric: str
    score: float
    n: int
    n_total: int | None
    by_tag: dict[str, tuple[float, int]] = field(default_factory=dict)  # tag -> (score, n)
    samples: list[dict] = field(default_factory=list)


def lmms_command(python: str, model: str, model_args: dict[str, str], tasks: list[str], include_paths: list[Path], output_dir: Path, *,
                 batch_size: int, device: str, limit: int | None, seed: int) -> list[str]:
    args = ",".join(f"{k}={v}" for k, v in model_args.items())
    command = [python, "-m", "lmms_eval", "eval", "--model", model, "--model_args", args, "--tasks", ",".join(tasks),
               "--output_path", str(output_dir), "--log_samples", "--batch_size", str(batch_size), "--device", device,
               "--seed", str(seed), "--verbosity", "WARNING"]
    for path in include_paths:
        command += ["--include_path", str(path)]
    if limit is not None:
        command += ["--limit", str(limit)]
    return command


def run_lmms_eval(command: list[str], tasks: list[str], work: Path, timeout_s: float, env: dict[str, str],
                  local: dict[str, LocalTask], progress: Callable[[str], None] | None = None) -> dict[str, TaskScores]:
    """Run lmms-eval; its results decide, not its exit code. EvalError carries the end of its log.

    Progress lines our model class writes to the log (PROGRESS_PREFIX) go to `progress` as they come.
    """
    log = work / "lmms_eval.log"
    # What the evaluator needs, not the step's every secret; under a guard that ends it (and whatever it starts)
    # when the step dies, however it dies.
    run_env = child_environment({"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
                                 "HF_DATASETS_CACHE": str(work / "hf-datasets"), **env})
    if not Path(command[0]).exists() and shutil.which(command[0]) is None:
        raise EvalError(f"cannot start lmms-eval: no interpreter at {command[0]} (evaluation.python)")
    with log.open("wb") as out:
        try:
            process = subprocess.Popen(guarded(command), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=run_env,
                                       cwd=work, start_new_session=True)
        except OSError as exc:
            raise EvalError(f"cannot start lmms-eval ({command[0]}): {exc}") from None
    deadline, read = time.monotonic() + timeout_s, 0
    try:
        while process.poll() is None:
            if time.monotonic() > deadline:
                raise EvalError(f"lmms-eval ran past {timeout_s:.0f} s and was stopped; its last lines:\n{log_tail(log)}")
            time.sleep(POLL_S)
            read = _forward_progress(log, read, progress)
        _forward_progress(log, read, progress)
    finally:
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)  # the guard's group: lmms-eval and what it started
            process.wait()
    try:
        return parse_results(work / "out", tasks, local)
    except EvalError as exc:
        raise EvalError(f"{exc} (exit code {process.returncode}); its last lines:\n{log_tail(log)}") from None


def _forward_progress(log: Path, offset: int, progress: Callable[[str], None] | None) -> int:
    """Pass the complete new progress lines of the log (from byte `offset`) on; returns the new offset."""
    if progress is None:
        return offset
    with log.open("rb") as handle:
        handle.seek(offset)
        chunk = handle.read()
    end = chunk.rfind(b"\n") + 1  # complete lines only
    for line in chunk[:end].decode("utf-8", "replace").split("\n"):
        if line.startswith(PROGRESS_PREFIX):
            progress(line[len(PROGRESS_PREFIX):])
    return offset + end


def parse_results(output_dir: Path, tasks: list[str], local: dict[str, LocalTask]) -> dict[str, TaskScores]:
    """{task: scores} from the newest results JSON under output_dir; EvalError when anything asked for is missing."""
    found = sorted(Path(output_dir).rglob("*_results.json"))
    if not found:
        raise EvalError(f"lmms-eval wrote no results JSON under {output_dir}: the evaluation failed (see its log)")
    results_path = found[-1]
    try:
        document = json.loads(results_path.read_text())
    except ValueError as exc:
        raise EvalError(f"{results_path}: not valid JSON ({exc})") from None
    results, n_samples = document.get("results") or {}, document.get("n-samples") or {}
    missing = [task for task in tasks if task not in results]
    if missing:
        raise EvalError(f"{results_path.name}: no results for {', '.join(missing)} (have {sorted(results)})")
    scores = {}
    for task in tasks:
        metric, value = _main_metric(task, results[task], local.get(task))
        if value is None or not math.isfinite(value):
            raise EvalError(f"{results_path.name}: {task} has no numeric {metric}")
        counts = n_samples.get(task) or {}
        entry = TaskScores(task, local[task].benchmark if task in local else task, metric, float(value), int(counts.get("effective", 0)),
                           counts.get("original"))
        if task in local:
            entry.samples, entry.by_tag = _samples(results_path.parent, task, local[task])
        scores[task] = entry
    return scores


def _main_metric(task: str, values: dict, local: LocalTask | None) -> tuple[str, float | None]:
    """The task's headline metric: `accuracy` for ours, else the first numeric non-stderr entry."""
    if local is not None:
        return "accuracy", values.get("accuracy,none")
    for key, value in values.items():
        if "," in key and "_stderr" not in key and isinstance(value, (int, float)):
            return key.split(",", 1)[0], float(value)
    return "?", None


def _samples(folder: Path, task: str, local: LocalTask) -> tuple[list[dict], dict[str, tuple[float, int]]]:
    import pyarrow.parquet as pq

    files = sorted(folder.glob(f"*_samples_{task}.jsonl"))
    if not files:
        raise EvalError(f"lmms-eval wrote no per-sample file for {task} in {folder}")
    items = pq.read_table(local.folder / "data.parquet", columns=["doc_id", "tag"]).to_pylist()
    samples, totals = [], defaultdict(lambda: [0.0, 0])
    for line in files[-1].read_text().splitlines():
        record = json.loads(line)
        item = items[int(record["doc_id"])]
        response = record["resps"][0] if isinstance(record.get("resps"), list) else record.get("resps")
        while isinstance(response, list):
            response = response[0] if response else ""
        value = float(record["accuracy"])
        samples.append({"doc_index": int(record["doc_id"]), "item_id": item["doc_id"], "tag": item["tag"], "target": str(record.get("target")),
                        "response": response or "", "extracted_answer": extract_answer(response or ""), "correct": value >= 1.0})
        totals[item["tag"]][0] += value
        totals[item["tag"]][1] += 1
    return samples, {tag: (total / n, n) for tag, (total, n) in sorted(totals.items())}
