"""benchmark_scores: lmms-eval scores of every student checkpoint and baseline, with deltas and per-tag slices.

lmms-eval runs from its own environment (evaluation.python) as a process: its dependencies
cannot share the Dagster environment (see the README). The configured local benchmarks are
written as lmms-eval tasks first; lmms-eval's results JSON is parsed (its exit code is not
trusted) and its per-sample log is kept as benchmark_samples. Partitions: student x recipe,
the recipe dimension starting with `base` (the untrained baseline every delta is taken against).
"""

import os
import shutil
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import dagster as dg
import pyarrow as pa

from omnithought_dagster.assets.inputs import BENCHMARK_ITEMS_KEY
from omnithought_dagster.assets.metadata import column_schema, markdown_cell, plot, preview
from omnithought_dagster.assets.student import STUDENT_BASELINES_KEY, STUDENT_CHECKPOINTS_KEY, baseline_partitions
from omnithought_dagster.assets.teacher import GPU_POOL
from omnithought_dagster.config import BASELINE_RECIPE, ProjectConfig
from omnithought_dagster.evaluation.run import OVERALL, EvalError, TaskScores, lmms_command, run_lmms_eval
from omnithought_dagster.evaluation.tasks import write_local_task
from omnithought_dagster.gpu import slots_from_config, visible_devices_env
from omnithought_dagster.ids import code_version, content_id
from omnithought_dagster.ledger.ledger import Payer, ledger_metadata, process_row, write_ledger
from omnithought_dagster.placement import gpu_step_tags
from omnithought_dagster.plots import barh
from omnithought_dagster.resources import CorpusStoreResource, ProjectResource
from omnithought_dagster.store import CorpusStore, table_spec

SCORES_GROUP = "scores"
BENCHMARK_SCORES_KEY = dg.AssetKey("benchmark_scores")
SCORES_CODE_VERSION = "benchmark_scores-v1"


def score_partitions(config: ProjectConfig) -> dg.MultiPartitionsDefinition:
    recipes = [BASELINE_RECIPE] + [r.name for r in config.recipes]
    return dg.MultiPartitionsDefinition({"student": baseline_partitions(config), "recipe": dg.StaticPartitionsDefinition(recipes)})


def score_partition_keys(config: ProjectConfig) -> list[str]:
    """Each student's baseline first, then its recipes (a replicate's baseline is its student's: not scored again)."""
    return [
        str(dg.MultiPartitionKey({"student": s.name, "recipe": r}))
        for s in config.students
        for r in config.student_recipes(s.name)
        if r != BASELINE_RECIPE or s.replicate_of is None
    ]


def scores_settings(config: ProjectConfig) -> dict:
    """The project file's settings that change benchmark_scores (its code version hashes them): evaluation's, and its benchmarks."""
    return {
        "evaluation": config.evaluation.run_settings(),
        "benchmarks": [config.benchmark(name).model_dump(mode="json") for name in config.evaluation.benchmarks],
    }


def build_score_assets(config: ProjectConfig) -> list[dg.AssetsDefinition]:
    if not config.students or not (config.evaluation.benchmarks or config.evaluation.lmms_tasks):
        return []
    recipes = [r.name for r in config.recipes]
    deps: list = [BENCHMARK_ITEMS_KEY] if config.evaluation.benchmarks else []  # the files it scores on (observed)
    deps += [
        dg.AssetDep(STUDENT_BASELINES_KEY, partition_mapping=dg.MultiToSingleDimensionPartitionMapping(partition_dimension_name="student"))
    ]
    if recipes:
        deps.append(
            dg.AssetDep(
                STUDENT_CHECKPOINTS_KEY,
                partition_mapping=dg.MultiPartitionMapping(
                    {
                        "student": dg.DimensionPartitionMapping("student", dg.IdentityPartitionMapping()),
                        "recipe": dg.DimensionPartitionMapping("recipe", dg.StaticPartitionMapping({r: r for r in recipes})),
                    }
                ),
            )
        )

    @dg.asset(
        key=BENCHMARK_SCORES_KEY,
        partitions_def=score_partitions(config),
        deps=deps,
        group_name=SCORES_GROUP,
        kinds={"pytorch", "parquet"},
        code_version=code_version(SCORES_CODE_VERSION, scores_settings(config)),
        pool=GPU_POOL,
        op_tags=gpu_step_tags(config, 1 if config.evaluation.device.startswith("cuda") else 0),
        tags={"stage": "scores", "compute": "gpu"},
        metadata={"dagster/column_schema": column_schema(table_spec("benchmark_scores")), "table": "benchmark_scores"},
    )
    def benchmark_scores(context: dg.AssetExecutionContext, project: ProjectResource, store: CorpusStoreResource) -> dg.MaterializeResult:
        """lmms-eval scores of one checkpoint (or baseline) on the configured benchmarks: overall and per tag, with deltas."""
        cfg = project.config
        keys = context.partition_key.keys_by_dimension
        student, recipe = keys["student"], keys["recipe"]
        corpus = store.open()
        checkpoint = _checkpoint(corpus, student, recipe)
        model_dir = (
            checkpoint["uri"]
            if checkpoint["baseline"]
            else str(corpus.checkpoints.local_dir(checkpoint["checkpoint_id"], cfg.training.work_dir))
        )
        work = Path(cfg.evaluation.work_dir) / f"{student}-{recipe}-{os.getpid()}"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        try:
            local = {}
            for name in cfg.evaluation.benchmarks:
                task = write_local_task(cfg.benchmark(name), cfg.seed, work / "tasks" / name, max_new_tokens=cfg.evaluation.max_new_tokens)
                local[task.name] = task
            config_hash = eval_config_hash(cfg, {t.benchmark: t.items_version for t in local.values()})
            tasks = [*local, *cfg.evaluation.lmms_tasks]
            command = lmms_command(
                cfg.evaluation.python,
                cfg.evaluation.lmms_model,
                {**cfg.evaluation.model_args, "pretrained": model_dir},
                tasks,
                [t.folder for t in local.values()],
                work / "out",
                batch_size=cfg.evaluation.batch_size,
                device=cfg.evaluation.device,
                limit=cfg.evaluation.limit,
                seed=cfg.evaluation.seed,
            )
            context.log.info(f"scoring {checkpoint['checkpoint_id'][:12]} ({student}/{recipe}): {' '.join(command)}")
            started = time.monotonic()
            needed = 1 if cfg.evaluation.device.startswith("cuda") and "CUDA_VISIBLE_DEVICES" not in cfg.evaluation.env else 0
            with slots_from_config(cfg).lease(needed, holder=f"eval {student}/{recipe}") as devices:
                scores = run_lmms_eval(
                    command,
                    tasks,
                    work,
                    cfg.evaluation.timeout_s,
                    {**cfg.evaluation.env, **visible_devices_env(devices)},
                    local,
                    progress=context.log.info,
                )
            seconds = time.monotonic() - started
            gpus = len(devices)
        except EvalError as exc:
            raise dg.Failure(description=str(exc)) from exc
        finally:
            shutil.rmtree(work, ignore_errors=True)

        # a replicate of a student (experiments' other seeds) shares its untrained baseline
        own = cfg.student(student).replicate_of or student
        baseline = None if recipe == BASELINE_RECIPE else _baseline_scores(corpus, own, config_hash)
        if recipe != BASELINE_RECIPE and baseline is None:
            context.log.warning(
                f"{student}'s baseline has no scores under this evaluation config: materialise "
                f"benchmark_scores[{BASELINE_RECIPE}|{student}] for deltas"
            )
        now = datetime.now(UTC).isoformat(timespec="seconds")
        rows = score_rows(checkpoint, scores, baseline, config_hash, now)
        samples = [
            {
                "checkpoint_id": checkpoint["checkpoint_id"],
                "student": student,
                "recipe": recipe,
                "benchmark": s.benchmark,
                **sample,
                "eval_config_hash": config_hash,
            }
            for s in scores.values()
            for sample in s.samples
        ]
        partition = {"student": student, "recipe": recipe}
        table = pa.Table.from_pylist(rows, schema=table_spec("benchmark_scores").schema)
        written = corpus.write_partition("benchmark_scores", partition, table)
        corpus.write_partition("benchmark_samples", partition, pa.Table.from_pylist(samples, schema=table_spec("benchmark_samples").schema))
        scored = cfg.student(student)
        ledger = process_row(
            Payer("benchmark_scores", context.partition_key, "evaluation", student, (student, scored.model)),
            seconds=seconds,
            gpus=gpus,
            tokens=None,
            run_id=context.run_id,
            costs=cfg.costs,
        )
        write_ledger(corpus, "benchmark_scores", context.partition_key, [ledger])
        overall = [r for r in rows if r["slice"] == OVERALL]
        unscored = [s for s in samples if s["problem"]]
        if unscored:
            context.log.warning(
                f"{len(unscored)} items had no readable verdict from lmms-eval and are scored wrong, e.g. "
                f"item {unscored[0]['doc_index']}: {unscored[0]['problem']}"
            )
        return dg.MaterializeResult(
            metadata={
                "dagster/row_count": len(rows),
                "checkpoint_id": checkpoint["checkpoint_id"],
                "eval_config_hash": config_hash,
                **{f"score/{r['benchmark']}": r["score"] for r in overall},
                **{f"delta/{r['benchmark']}": r["delta"] for r in overall if r["delta"] is not None},
                "scores": dg.MetadataValue.md(score_table(rows)),
                "plot/scores": _score_plot(rows, f"{student}/{recipe}"),
                "samples_kept": len(samples),
                "items_without_verdict": len(unscored),
                **{
                    f"lmms_eval_score/{e.benchmark}": e.lmms_eval_score
                    for e in scores.values()
                    if e.samples and e.lmms_eval_score is not None
                },
                "eval_seconds": round(seconds, 1),
                **ledger_metadata([ledger]),
                "compared_to_baseline": baseline is not None,
                "preview": preview(table, ["benchmark", "slice", "score", "n", "delta"]),
                "path": dg.MetadataValue.path(written.uri),
            },
            data_version=dg.DataVersion(content_id("scores", rows_without_time(rows))),
        )

    return [benchmark_scores]


def _score_plot(rows: list[dict], name: str) -> dg.MetadataValue:
    """Deltas against the baseline by benchmark and slice (scores themselves when there is no baseline)."""
    deltas = any(r["delta"] is not None for r in rows)
    key, axis, caption = (
        ("delta", "score delta vs baseline", "score deltas against the baseline, by slice")
        if deltas
        else ("score", "score", "scores by benchmark and slice")
    )
    data = [(f"{r['benchmark']} / {r['slice']}", r[key]) for r in rows if r[key] is not None]
    return plot(lambda ax: barh(ax, data, axis), f"{name}: {caption}")


def eval_config_hash(config: ProjectConfig, versions: dict[str, str]) -> str:
    """Hash of the evaluation settings and the benchmarks' items (their versions by benchmark)."""
    return content_id("eval-config", {**config.evaluation.run_settings(), "benchmarks": versions})


def score_rows(checkpoint: dict, scores: dict[str, TaskScores], baseline: dict | None, config_hash: str, now: str) -> list[dict]:
    rows = []
    for entry in scores.values():
        slices = [(OVERALL, entry.score, entry.n)] + [(f"tag:{tag}", score, n) for tag, (score, n) in entry.by_tag.items()]
        for name, score, n in slices:
            base = None
            if checkpoint["baseline"]:
                base = score
            elif baseline is not None:
                base = baseline.get((entry.benchmark, entry.metric, name))
            rows.append(
                {
                    "checkpoint_id": checkpoint["checkpoint_id"],
                    "student": checkpoint["student"],
                    "recipe": checkpoint["recipe"],
                    "benchmark": entry.benchmark,
                    "task": entry.task,
                    "metric": entry.metric,
                    "slice": name,
                    "score": score,
                    "n": n,
                    "n_benchmark": entry.n_total,
                    "baseline_score": base,
                    "delta": None if base is None else round(score - base, 6),
                    "eval_config_hash": config_hash,
                    "evaluated_at": now,
                }
            )
    return rows


def rows_without_time(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "evaluated_at"} for r in rows]


def score_table(rows: list[dict]) -> str:
    lines = ["| benchmark | slice | score | n | baseline | delta |", "| --- | --- | ---: | ---: | ---: | ---: |"]
    for r in rows:
        base = "" if r["baseline_score"] is None else f"{r['baseline_score']:.3f}"
        delta = "" if r["delta"] is None else f"{r['delta']:+.3f}"
        lines.append(f"| {markdown_cell(r['benchmark'])} | {markdown_cell(r['slice'])} | {r['score']:.3f} | {r['n']} | {base} | {delta} |")
    return "\n".join(lines)


def _checkpoint(corpus: CorpusStore, student: str, recipe: str) -> dict:
    table = corpus.read_partition("student_checkpoints", {"student": student, "recipe": recipe})
    if table is None or table.num_rows == 0:
        upstream = f"student_baselines[{student}]" if recipe == BASELINE_RECIPE else f"student_checkpoints[{recipe}|{student}]"
        raise dg.Failure(description=f"no checkpoint for {student}/{recipe}: materialise {upstream} first")
    return table.to_pylist()[0]


def _baseline_scores(corpus: CorpusStore, student: str, config_hash: str) -> dict | None:
    table = corpus.read_partition("benchmark_scores", {"student": student, "recipe": BASELINE_RECIPE})
    if table is None:
        return None
    rows = [r for r in table.to_pylist() if r["eval_config_hash"] == config_hash]
    return {(r["benchmark"], r["metric"], r["slice"]): r["score"] for r in rows} or None


# -- the demo's view of the stage: its summary line ------------------------


def scores_summary(store: CorpusStore, partition: str, metadata: dict) -> dict[str, Any]:
    recipe, student = partition.split("|")
    rows = store.read_partition("benchmark_scores", {"student": student, "recipe": recipe}).to_pylist()
    overall = [r for r in rows if r["slice"] == "all"]
    parts = [
        f"{r['benchmark']} {r['metric']} {r['score']:.3f}" + ("" if r["delta"] is None else f" ({r['delta']:+.3f} vs base)")
        for r in overall
    ]
    return {
        "input": sum(r["n"] for r in overall),
        "output": len(rows),
        "flagged": 0,
        "reasons": {},
        "detail": f"{student}/{recipe}: " + "; ".join(parts) + f"; {len(rows) - len(overall)} tag slices",
    }
