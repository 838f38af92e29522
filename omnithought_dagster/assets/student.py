"""student_checkpoints: one student per (student, recipe), fine-tuned by DeepSpeed in its own process.
The asset exports the recipe's subset, writes the run's spec and launches the trainer through
Dagster Pipes (`deepspeed` or `torchrun`, from the training interpreter), so the same asset
drives one CPU process here and N GPUs x M nodes elsewhere; rank 0 reports the loss curve,
tokens/s and samples seen. The checkpoint goes to the store under its checkpoint_id (base
model + subset_version + training settings): the same inputs find it there and train nothing.
student_baselines registers each student's untrained base model (the `base` rows of the same
table), so every score has a delta.
"""

import json
import shutil
import time
from contextlib import nullcontext
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import dagster as dg
import pyarrow as pa
from dagster._core.errors import DagsterPipesExecutionError  # not exported at the top level in 1.13

from omnithought_dagster.assets.curate import SAMPLED_SUBSETS_KEY
from omnithought_dagster.assets.metadata import column_schema, plot
from omnithought_dagster.assets.teacher import GPU_POOL
from omnithought_dagster.automation import cpu_stage_condition
from omnithought_dagster.config import BASELINE_RECIPE, ProjectConfig, StudentConfig
from omnithought_dagster.gpu import slots_from_config, visible_devices_env
from omnithought_dagster.ids import code_version
from omnithought_dagster.ledger.ledger import Payer, ledger_metadata, process_row, write_ledger
from omnithought_dagster.logtail import log_tail
from omnithought_dagster.placement import gpu_step_tags
from omnithought_dagster.plots import curves
from omnithought_dagster.processes import guarded
from omnithought_dagster.resources import CorpusStoreResource, ProjectResource
from omnithought_dagster.store import CorpusStore, table_spec
from omnithought_dagster.train.checkpoints import RunCheckpoints
from omnithought_dagster.train.launch import (
    checkpoint_id,
    launcher_command,
    master_port,
    method_hash,
    resolve_student,
    run_method,
    train_config_hash,
    training_spec,
)
from omnithought_dagster.train.methods import METHODS
from omnithought_dagster.train.trainer import remove_shm_buffers, sweep_shm_buffers

STUDENT_GROUP = "student"
STUDENT_CHECKPOINTS_KEY = dg.AssetKey("student_checkpoints")
STUDENT_BASELINES_KEY = dg.AssetKey("student_baselines")
STUDENT_CODE_VERSION = "student_checkpoints-v1"


def student_partitions(config: ProjectConfig) -> dg.MultiPartitionsDefinition:
    """student x recipe (the recipe dimension is sampled_subsets' own partitions)."""
    from omnithought_dagster.assets.curate import recipe_partitions

    return dg.MultiPartitionsDefinition({"student": baseline_partitions(config), "recipe": recipe_partitions(config)})


def baseline_partitions(config: ProjectConfig) -> dg.StaticPartitionsDefinition:
    return dg.StaticPartitionsDefinition([s.name for s in config.students])


def student_partition_keys(config: ProjectConfig) -> list[str]:
    """The (student, recipe) partitions that are trained (a student may be limited to some recipes), in an order that can
    run one after the other: grpo students after the others (each starts from another student's checkpoint)."""
    ordered = sorted(config.students, key=lambda s: METHODS[s.method].starts_from(s) is not None)
    return [
        str(dg.MultiPartitionKey({"student": s.name, "recipe": r}))
        for s in ordered
        for r in config.student_recipes(s.name)
        if r != BASELINE_RECIPE
    ]


def expected_checkpoint_id(config: ProjectConfig, store: CorpusStore, student: str, recipe: str) -> str | None:
    """The checkpoint_id the partition would have now, None while its subset is missing (what a run starting from it reads)."""
    _, base_fingerprint = resolve_student(config.student(student), config.models_dir)
    if recipe == BASELINE_RECIPE:
        return checkpoint_id(base_fingerprint, None, None)
    version = subset_version(store, recipe)
    if version is None:
        return None
    return checkpoint_id(
        base_fingerprint,
        version,
        train_config_hash(config.training_for(config.student(student))),
        method_hash(partition_method(config, store, config.student(student), recipe)),
    )


def partition_method(config: ProjectConfig, store: CorpusStore, student: StudentConfig, recipe: str) -> dict | None:
    """The student's method on a recipe whose subset exists (run_method); grpo's names the checkpoint it starts from: the
    start_from student's on the same recipe, by the id that one has now."""
    start_from = METHODS[student.method].starts_from(student)
    start = expected_checkpoint_id(config, store, start_from, recipe) if start_from else None
    return run_method(student, config.models_dir, start_checkpoint=start, answer_pattern=config.generation.answer_pattern)


def training_op_tags(config: ProjectConfig) -> dict:
    """Kubernetes / ECS GPU requests for the trainer's node: nproc_per_node GPUs (none for a 1-process CPU run)."""
    training = config.training
    on_gpus = training.nproc_per_node > 1 or training.gpus or training.precision != "fp32" or config.operations.gpu_devices
    return gpu_step_tags(config, training.nproc_per_node if on_gpus else 0)


def baseline_settings(config: ProjectConfig) -> dict:
    """The project file's settings that change student_baselines (its code version hashes them): each student's base model."""
    return {"students": {student.name: student.model for student in config.students}}


def checkpoint_settings(config: ProjectConfig) -> dict:
    """The project file's settings that change student_checkpoints (its code version hashes them): the training settings that
    change the weights, and the students (model, method and its settings, recipes)."""
    students = [student.model_dump(mode="json", exclude=set() if student.seed is not None else {"seed"}) for student in config.students]
    return {"training": config.training.run_settings(), "students": students}


def build_baseline_assets(config: ProjectConfig) -> list[dg.AssetsDefinition]:
    if not config.students:
        return []

    @dg.asset(
        key=STUDENT_BASELINES_KEY,
        partitions_def=baseline_partitions(config),
        group_name=STUDENT_GROUP,
        kinds={"pytorch"},
        code_version=code_version(STUDENT_CODE_VERSION, baseline_settings(config)),
        automation_condition=cpu_stage_condition(),  # registering a base model is cheap
        tags={"stage": "student", "compute": "cpu"},
        metadata={"dagster/column_schema": column_schema(table_spec("student_checkpoints")), "table": "student_checkpoints"},
    )
    def student_baselines(context: dg.AssetExecutionContext, project: ProjectResource, store: CorpusStoreResource) -> dg.MaterializeResult:
        """A student's untrained base model, as the `base` row of student_checkpoints: what every score's delta is taken against."""
        cfg = project.config
        student = cfg.student(context.partition_key)
        model_dir, base_fingerprint = resolve_student(student, cfg.models_dir)
        row = _row(
            checkpoint_id(base_fingerprint, None, None),
            student.name,
            BASELINE_RECIPE,
            student.model,
            base_fingerprint,
            None,
            None,
            model_dir,
        )
        return _result(store.open(), row, reused=False, extra={})

    return [student_baselines]


def build_checkpoint_assets(config: ProjectConfig) -> list[dg.AssetsDefinition]:
    if not config.students or not config.recipes:
        return []

    @dg.asset(
        key=STUDENT_CHECKPOINTS_KEY,
        partitions_def=student_partitions(config),
        deps=[
            dg.AssetDep(SAMPLED_SUBSETS_KEY, partition_mapping=dg.MultiToSingleDimensionPartitionMapping(partition_dimension_name="recipe"))
        ],
        group_name=STUDENT_GROUP,
        kinds={"deepspeed", "pytorch"},
        code_version=code_version(STUDENT_CODE_VERSION, checkpoint_settings(config)),
        pool=GPU_POOL,
        op_tags=training_op_tags(config),
        tags={"stage": "student", "compute": "gpu"},
        metadata={"dagster/column_schema": column_schema(table_spec("student_checkpoints")), "table": "student_checkpoints"},
    )
    def student_checkpoints(
        context: dg.AssetExecutionContext,
        project: ProjectResource,
        store: CorpusStoreResource,
        pipes_subprocess_client: dg.PipesSubprocessClient,
    ) -> dg.MaterializeResult:
        """A student fine-tuned on one recipe's subset: SFT with DeepSpeed ZeRO in its own process, reporting through Pipes."""
        cfg = project.config
        keys = context.partition_key.keys_by_dimension
        student, recipe = cfg.student(keys["student"]), keys["recipe"]
        if recipe not in cfg.student_recipes(student.name):
            raise dg.Failure(description=f"student {student.name!r} is not trained on recipe {recipe!r} (students[].recipes)")
        corpus = store.open()
        model_dir, base_fingerprint = resolve_student(student, cfg.models_dir)
        version = subset_version(corpus, recipe)
        if version is None:
            raise dg.Failure(description=f"subset_members[{recipe}] is missing or empty: materialise sampled_subsets[{recipe}] first")
        training = cfg.training_for(student)  # with the student's own seed, when it has one
        config_hash = train_config_hash(training)
        method = partition_method(cfg, corpus, student, recipe)
        ckpt = checkpoint_id(base_fingerprint, version, config_hash, method_hash(method))
        manifest = corpus.checkpoints.manifest(ckpt)
        if manifest is not None:
            context.log.info(f"checkpoint {ckpt[:12]} already in the store (same base, subset {version[:12]}, settings): not retrained")
            return _result(corpus, manifest["row"], reused=True, extra={})

        work = Path(cfg.training.work_dir) / ckpt
        # work/run holds the example index and the training checkpoints: a rerun after a kill resumes from the newest
        # complete one, this disk's or the store's (runs/<checkpoint_id>/, the one a replaced machine finds). Everything
        # else there (the export, a half-written model) is redone.
        _clear(work, keep={"run"})
        run_checkpoints = RunCheckpoints(corpus, ckpt)
        if cfg.training.save_steps:
            run_checkpoints.restore(work / "run" / "checkpoints", log=context.log.info)
        succeeded = False
        try:
            if METHODS[student.method].starts_from(student):  # RL starts from another student's checkpoint on this recipe
                model_dir = str(_start_checkpoint(corpus, method["start_checkpoint"], student, recipe, work / "start"))
            from omnithought_dagster.curation.export import ExportError, export_subset

            try:  # what the student's tokenizer would read as markup is set aside too (its own added tokens)
                export = export_subset(
                    corpus, recipe, "llamafactory", work / "data", tokenizer=model_dir, clean_markup=cfg.curation.rules.markup == "clean"
                )
            except ExportError as exc:
                raise dg.Failure(description=str(exc)) from exc
            if export.set_aside:
                context.log.warning(
                    f"the export set {len(export.set_aside)} of {export.examples + len(export.set_aside)} traces aside, e.g. "
                    f"{export.set_aside[0].id[:12]}: {export.set_aside[0].reason}: {export.set_aside[0].detail}"
                )
            spec_path = work / "spec.json"
            spec = training_spec(model_dir, work / "data", work / "model", training, run_dir=work / "run", method=method)
            spec_path.write_text(json.dumps(spec, indent=2))
            command = launcher_command(cfg.training, spec_path)
            how = METHODS[student.method].describe(student, method)
            context.log.info(f"training {student.name} on {recipe} ({export.examples} examples, {how}): {' '.join(command)}")
            env = {**cfg.training.env, "OMP_NUM_THREADS": cfg.training.env.get("OMP_NUM_THREADS", "1"), "TOKENIZERS_PARALLELISM": "false"}
            if cfg.training.gpus is not None:
                env["CUDA_VISIBLE_DEVICES"] = cfg.training.gpus
            started = time.monotonic()
            # This node's ranks get devices no other step holds (none on CPU machines or with `training.gpus` set).
            needed = cfg.training.nproc_per_node if cfg.training.gpus is None else 0
            uploading = (
                run_checkpoints.uploading(work / "run" / "checkpoints", keep=cfg.training.save_total_limit, log=context.log.info)
                if cfg.training.save_steps
                else nullcontext()
            )
            with slots_from_config(cfg).lease(needed, holder=f"train {student.name}/{recipe}") as devices, uploading:
                env.update(visible_devices_env(devices))
                gpus = len(devices) or len([d for d in (cfg.training.gpus or "").split(",") if d.strip()])
                # Under a guard: the launcher and its ranks end with the step however it ends; they see the variables
                # they need plus the training env, not the step's other secrets.
                tail = work / "trainer.stderr"
                swept = sweep_shm_buffers()  # DeepSpeed's buffers of runs SIGKILLed with their step: nobody else frees that RAM
                if swept:
                    context.log.info(f"removed {swept} shared-memory buffer(s) that killed training runs left in /dev/shm")
                try:
                    invocation = pipes_subprocess_client.run(
                        command=guarded(command, keep_env=sorted(env), stderr_tail=tail), context=context, env=env, cwd=str(work)
                    )
                except DagsterPipesExecutionError as exc:  # it says only the exit code: the trainer's own last lines say why
                    raise dg.Failure(description=f"the trainer failed ({exc}); its last lines:\n{log_tail(tail)}") from None
                finally:  # however the ranks ended (a rank killed cannot free its own)
                    remove_shm_buffers(cfg.training.master_addr, master_port(command))
            reported = {k: getattr(v, "value", v) for k, v in invocation.get_materialize_result().metadata.items()}
            trained_s = time.monotonic() - started
            context.log.info(f"trainer finished in {trained_s:.1f} s")
            if not (work / "model" / "config.json").is_file():
                raise dg.Failure(description=f"the trainer exited without writing a model to {work / 'model'}")
            row = _row(
                ckpt,
                student.name,
                recipe,
                student.model,
                base_fingerprint,
                version,
                config_hash,
                corpus.checkpoints.uri(ckpt),
                examples=reported.get("examples"),
                steps=reported.get("steps"),
                samples_seen=reported.get("samples_seen"),
                tokens_seen=reported.get("tokens_seen"),
                initial_loss=reported.get("initial_loss"),
                final_loss=reported.get("final_loss"),
                tokens_per_s=reported.get("tokens_per_s"),
                train_seconds=reported.get("train_seconds"),
                launcher=f"{cfg.training.launcher} x{reported.get('world_size', '?')}",
            )
            # what the method reports beyond the loss; kept in the manifest (the loss_decreased check reads grpo's rewards)
            results = {key: reported[key] for key in METHODS[student.method].reports if key in reported}
            ledger = process_row(
                Payer("student_checkpoints", context.partition_key, "training", student.name, (student.name, student.model)),
                seconds=trained_s,
                gpus=gpus,
                tokens=reported.get("tokens_seen"),
                run_id=context.run_id,
                costs=cfg.costs,
            )
            write_ledger(corpus, "student_checkpoints", context.partition_key, [ledger])
            corpus.checkpoints.put(
                ckpt,
                work / "model",
                {
                    "row": row,
                    "train_spec": json.loads(spec_path.read_text()),
                    "export": {"examples": export.examples, "images": export.images, "set_aside": len(export.set_aside)},
                    "results": results,
                },
            )
            extra = {"loss_curve": dg.MetadataValue.md(reported["loss_curve"])} if reported.get("loss_curve") else {}
            extra.update(
                {
                    key: reported[key]
                    for key in ("skipped_examples", "resumed_from_step", "eval_loss", "method", "teacher")
                    if key in reported
                }
            )
            extra.update(ledger_metadata([ledger]))
            if export.set_aside:
                extra["export_set_aside"] = dg.MetadataValue.json(
                    [{"trace_id": a.id, "reason": a.reason, "detail": a.detail} for a in export.set_aside[:50]]
                )
            extra.update(results)
            if reported.get("skipped"):
                extra["skipped"] = dg.MetadataValue.json(reported["skipped"])
            log = json.loads((work / "model" / "train_log.json").read_text())
            if log.get("losses"):
                extra["plot/loss_curve"] = plot(
                    lambda ax: curves(ax, {f"{student.name}/{recipe}": log["losses"]}),
                    f"training loss per optimizer step ({student.name} on {recipe})",
                )
            for key, series, caption, ylabel in METHODS[student.method].curves(log, f"{student.name} on {recipe}"):
                if any(series.values()):  # a run too short to log one step draws nothing
                    extra[key] = plot(lambda ax, series=series, ylabel=ylabel: curves(ax, series, ylabel=ylabel), caption)
            if log.get("learning_rates"):
                schedule = f"{cfg.training.lr_scheduler}, warmup {cfg.training.warmup_steps}"
                extra["plot/learning_rate"] = plot(
                    lambda ax: curves(ax, {"learning rate": log["learning_rates"]}, ylabel="learning rate"),
                    f"learning rate per optimizer step ({schedule})",
                )
            result = _result(corpus, row, reused=False, extra=extra)
            run_checkpoints.delete()  # the model is stored: its training checkpoints are no longer needed
            succeeded = True
            return result
        finally:
            # After a failure or a kill the run folder stays for the rerun to resume from; after success nothing stays.
            _clear(work, keep=set() if succeeded else {"run"})

    return [student_checkpoints]


def _start_checkpoint(corpus: CorpusStore, start: str, student: StudentConfig, recipe: str, cache_dir: Path) -> Path:
    """The folder of the checkpoint a student starts from (its method's `starts_from`); a clear failure while it is not trained yet."""
    if corpus.checkpoints.manifest(start) is None:
        start_from = METHODS[student.method].starts_from(student)
        raise dg.Failure(
            description=(
                f"student {student.name!r} ({student.method}) starts from {start_from!r}'s checkpoint on {recipe!r} ({start[:12]}), "
                f"which is not in the store: materialise student_checkpoints[{recipe}|{start_from}] first"
            )
        )
    return corpus.checkpoints.local_dir(start, cache_dir)


def _clear(folder: Path, keep: set[str]) -> None:
    """Remove what `folder` holds but the entries named in `keep` (the folder itself when nothing is kept)."""
    if not keep:
        shutil.rmtree(folder, ignore_errors=True)
        return
    folder.mkdir(parents=True, exist_ok=True)
    for entry in folder.iterdir():
        if entry.name not in keep:
            shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()


def subset_version(corpus: CorpusStore, recipe: str) -> str | None:
    """The stored subset's version (None while subset_members[recipe] is missing or empty)."""
    members = corpus.read_partition("subset_members", recipe, columns=["subset_version"])
    return members.column("subset_version")[0].as_py() if members is not None and members.num_rows else None


def _row(
    ckpt: str,
    student: str,
    recipe: str,
    base_model: str,
    base_fingerprint: str,
    subset_version: str | None,
    config_hash: str | None,
    uri: str,
    **stats,
) -> dict:
    return {
        "checkpoint_id": ckpt,
        "student": student,
        "recipe": recipe,
        "baseline": subset_version is None,
        "base_model": base_model,
        "base_fingerprint": base_fingerprint,
        "subset_version": subset_version,
        "train_config_hash": config_hash,
        "uri": uri,
        **{
            k: stats.get(k)
            for k in (
                "examples",
                "steps",
                "samples_seen",
                "tokens_seen",
                "initial_loss",
                "final_loss",
                "tokens_per_s",
                "train_seconds",
                "launcher",
            )
        },
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def _result(corpus: CorpusStore, row: dict, *, reused: bool, extra: dict) -> dg.MaterializeResult:
    written = corpus.write_partition(
        "student_checkpoints",
        {"student": row["student"], "recipe": row["recipe"]},
        pa.Table.from_pylist([row], schema=table_spec("student_checkpoints").schema),
    )
    shown = {k: v for k, v in row.items() if v is not None and k not in {"student", "recipe"}}
    return dg.MaterializeResult(
        metadata={
            "dagster/row_count": 1,
            **shown,
            "reused": reused,
            "checkpoint": dg.MetadataValue.path(row["uri"]),
            "path": dg.MetadataValue.path(written.uri),
            **extra,
        },
        data_version=dg.DataVersion(row["checkpoint_id"]),
    )


# -- the demo's view of the stage: its summary line ------------------------


def baseline_summary(store: CorpusStore, student: str, metadata: dict) -> dict[str, Any]:
    (row,) = store.read_partition("student_checkpoints", {"student": student, "recipe": BASELINE_RECIPE}).to_pylist()
    return {"input": 0, "output": 1, "flagged": 0, "reasons": {}, "detail": f"{student}: untrained {row['base_model']} (the baseline)"}


def checkpoint_summary(store: CorpusStore, partition: str, metadata: dict) -> dict[str, Any]:
    recipe, student = partition.split("|")
    (row,) = store.read_partition("student_checkpoints", {"student": student, "recipe": recipe}).to_pylist()
    if metadata.get("initial_reward") is not None and metadata.get("final_reward") is not None:  # grpo: the reward is the objective
        moved = f"reward {metadata['initial_reward']:.3f} -> {metadata['final_reward']:.3f}"
    else:
        moved = f"loss {row['initial_loss']:.3f} -> {row['final_loss']:.3f}"
    detail = (
        f"{student} on {recipe}: {moved} over {row['steps']} steps, "
        f"{row['tokens_per_s']} tokens/s ({row['launcher']}); checkpoint {row['checkpoint_id'][:12]}"
        + (" reused" if metadata.get("reused") else "")
    )
    return {"input": row["examples"], "output": 1, "flagged": 0, "reasons": {}, "detail": detail}
