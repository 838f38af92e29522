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
from omnithought_dagster.markup import storable
from omnithought_dagster.processes import child_environment, guarded
from omnithought_dagster.seed.sources import jsonstream

OVERALL = "all"
PROGRESS_PREFIX = "omnithought-progress: "  # our model class's progress lines in lmms-eval's output
PROBLEMS_ENV = "OMNITHOUGHT_EVAL_PROBLEMS"  # where our model class records the items it could not generate for (lmms_plugin.py)
PROBLEMS_FILE = "generation_problems.jsonl"
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
    lmms_eval_score: float | None = None  # lmms-eval's own aggregate (our tasks' score is the mean of their item rows)


def lmms_command(
    python: str,
    model: str,
    model_args: dict[str, str],
    tasks: list[str],
    include_paths: list[Path],
    output_dir: Path,
    *,
    batch_size: int,
    device: str,
    limit: int | None,
    seed: int,
) -> list[str]:
    args = ",".join(f"{k}={v}" for k, v in model_args.items())
    command = [
        python,
        "-m",
        "lmms_eval",
        "eval",
        "--model",
        model,
        "--model_args",
        args,
        "--tasks",
        ",".join(tasks),
        "--output_path",
        str(output_dir),
        "--log_samples",
        "--batch_size",
        str(batch_size),
        "--device",
        device,
        "--seed",
        str(seed),
        "--verbosity",
        "WARNING",
    ]
    for path in include_paths:
        command += ["--include_path", str(path)]
    if limit is not None:
        command += ["--limit", str(limit)]
    return command


def run_lmms_eval(
    command: list[str],
    tasks: list[str],
    work: Path,
    timeout_s: float,
    env: dict[str, str],
    local: dict[str, LocalTask],
    progress: Callable[[str], None] | None = None,
) -> dict[str, TaskScores]:
    """Run lmms-eval; its results decide, not its exit code. EvalError carries the end of its log.

    Progress lines our model class writes to the log (PROGRESS_PREFIX) go to `progress` as they come.
    """
    log = work / "lmms_eval.log"
    # What the evaluator needs, not the step's every secret; under a guard that ends it (and whatever it starts)
    # when the step dies, however it dies.
    run_env = child_environment(
        {
            "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1",
            "OMP_NUM_THREADS": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "HF_DATASETS_CACHE": str(work / "hf-datasets"),
            PROBLEMS_ENV: str(work / PROBLEMS_FILE),
            **env,
        }
    )
    if not Path(command[0]).exists() and shutil.which(command[0]) is None:
        raise EvalError(f"cannot start lmms-eval: no interpreter at {command[0]} (evaluation.python)")
    with log.open("wb") as out:
        try:
            process = subprocess.Popen(
                guarded(command),
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=run_env,
                cwd=work,
                start_new_session=True,
            )
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
        return parse_results(work / "out", tasks, local, work / PROBLEMS_FILE)
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
            progress(line[len(PROGRESS_PREFIX) :])
    return offset + end


def parse_results(output_dir: Path, tasks: list[str], local: dict[str, LocalTask], problems: Path | None = None) -> dict[str, TaskScores]:
    """{task: scores} from the newest results JSON under output_dir; EvalError when anything asked for is missing.
    `problems`: our model class's record of items it could not generate for (scored wrong; the reason goes to the row)."""
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
    failed: dict[str, dict[int, str]] = {}
    for _, record, problem in jsonstream.jsonl_file(problems) if problems is not None and Path(problems).exists() else ():
        if problem is None and isinstance(record, dict) and isinstance(record.get("doc_id"), int):
            failed.setdefault(str(record.get("task")), {})[record["doc_id"]] = storable(str(record.get("problem")))
    scores = {}
    for task in tasks:
        metric, value = _main_metric(task, results[task], local.get(task))
        if value is None or not math.isfinite(value):
            raise EvalError(f"{results_path.name}: {task} has no numeric {metric}")
        counts = n_samples.get(task) or {}
        entry = TaskScores(
            task,
            local[task].benchmark if task in local else task,
            metric,
            float(value),
            int(counts.get("effective", 0)),
            counts.get("original"),
            lmms_eval_score=float(value),
        )
        if task in local:
            # Our own tasks are scored from their per-item rows (what benchmark_samples stores); lmms-eval's aggregate is kept
            # beside it and differs only where a record was unreadable (scored wrong, with the reason).
            entry.samples = _samples(results_path.parent, task, local[task], entry.n, failed.get(task, {}))
            entry.score, entry.n, entry.by_tag = item_scores(entry.samples)
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


def _samples(folder: Path, task: str, local: LocalTask, n_items: int, failed: dict[int, str]) -> list[dict]:
    """One row per item lmms-eval was asked to score (the task's first `n_items` rows), read from its per-sample log
    (sources/jsonstream.jsonl_file: lines end at "\\n" only - a generation holding U+2028 is one record, not two).

    An item whose record is unreadable (a line that is not JSON, a record without a usable doc_id or verdict) or
    missing is scored wrong, with `problem` saying why: one bad record never fails the partition, and the task's score
    is the mean of these rows, so it is what a reader of benchmark_samples recomputes."""
    import pyarrow.parquet as pq

    files = sorted(folder.glob(f"*_samples_{task}.jsonl"))
    if not files:
        raise EvalError(f"lmms-eval wrote no per-sample file for {task} in {folder}")
    items = pq.read_table(local.folder / "data.parquet", columns=["doc_id", "tag", "answer"]).to_pylist()
    n_items = min(n_items, len(items)) if n_items else len(items)
    found: dict[int, dict] = {}
    problems: list[str] = []
    for number, record, problem in jsonstream.jsonl_file(files[-1]):
        sample, problem = (None, problem) if problem else _sample(record, n_items)
        if sample is None:
            problems.append(storable(problem or f"line {number}: unreadable"))
        elif sample["doc_index"] in found:
            problems.append(f"line {number}: a second record for item {sample['doc_index']} (the first is kept)")
        else:
            found[sample["doc_index"]] = sample
    found_note = f"; {len(problems)} unreadable per-sample records ({problems[0]})" if problems else ""
    samples = []
    for index in range(n_items):
        item = items[index]
        sample = found.get(index) or {
            "doc_index": index,
            "target": str(item["answer"]),
            "response": None,
            "extracted_answer": None,
            "correct": False,
            "problem": "no readable per-sample record from lmms-eval" + found_note,
        }
        if index in failed:  # our model class wrote no reply for it (lmms-eval scored the empty one)
            sample = {**sample, "correct": False, "problem": failed[index]}
        samples.append({**sample, "item_id": item["doc_id"], "tag": item["tag"]})
    return samples


def _sample(record, n_items: int) -> tuple[dict | None, str | None]:
    """A per-sample record as an item row (None and why when it cannot be one)."""
    if not isinstance(record, dict):
        return None, f"a record that is a {type(record).__name__}, not an object"
    doc_id, value = record.get("doc_id"), record.get("accuracy")
    if isinstance(doc_id, bool) or not isinstance(doc_id, int) or not 0 <= doc_id < n_items:
        return None, f"doc_id {str(doc_id)[:40]!r} is not an item of the task"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None, f"item {doc_id}: accuracy {str(value)[:40]!r} is not a number"
    response = record.get("resps")
    while isinstance(response, list):
        response = response[0] if response else ""
    # Undecodable bytes in the log arrive as lone surrogates (surrogateescape): stored as U+FFFD, never a failed write.
    response = storable(response if isinstance(response, str) else "" if response is None else str(response))
    return {
        "doc_index": doc_id,
        "target": storable(str(record.get("target"))),
        "response": response,
        "extracted_answer": extract_answer(response),
        "correct": float(value) >= 1.0,
        "problem": None,
    }, None


def item_scores(samples: list[dict]) -> tuple[float, int, dict[str, tuple[float, int]]]:
    """(score, n, {tag: (score, n)}) of per-item rows: the share marked correct."""
    totals = defaultdict(lambda: [0, 0])
    for sample in samples:
        totals[sample["tag"]][0] += bool(sample["correct"])
        totals[sample["tag"]][1] += 1
    n = len(samples)
    score = sum(bool(s["correct"]) for s in samples) / n if n else 0.0
    return score, n, {tag: (right / count, count) for tag, (right, count) in sorted(totals.items())}
