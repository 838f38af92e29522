"""cot_traces: N teacher rollouts per seed sample, one partition per (source, shard).

Shards are hash buckets of sample_id (`ids.shard_of`), so a sample's shard never moves when a
source grows: new samples land in their shards, and everything already generated is a cache
hit. `generation.shards` bounds a shard's size (source size / shards); Dagster's limit of
~100k partitions per asset is far away (sources x shards). The step is a GPU step: it runs
in the `gpu` concurrency pool and asks Kubernetes for the GPUs its vLLM server uses.
"""

import contextlib
from collections import Counter
from typing import Any

import dagster as dg

from omnithought_dagster.assets.metadata import column_schema, counts, preview
from omnithought_dagster.assets.seed import SEED_POOL_KEY, seed_partitions
from omnithought_dagster.config import LLMConfig, ProjectConfig
from omnithought_dagster.gpu import slots_from_config
from omnithought_dagster.ids import code_version, shard_keys, version_of
from omnithought_dagster.ledger.ledger import Payer, ledger_metadata, llm_row, write_ledger
from omnithought_dagster.llm.choose import describe_backend
from omnithought_dagster.placement import gpu_step_tags
from omnithought_dagster.progress import progress_line
from omnithought_dagster.resources import CorpusStoreResource, LLMResource, ProjectResource
from omnithought_dagster.store import CorpusStore, table_spec
from omnithought_dagster.store.store import PartitionBusy
from omnithought_dagster.teacher.prompt import teacher_prompt
from omnithought_dagster.teacher.traces import GENERATION_CACHE, TeacherPlan, generate_teachers

TEACHER_GROUP = "teacher"
COT_TRACES_KEY = dg.AssetKey("cot_traces")
TEACHER_CODE_VERSION = "cot_traces-v1"
GPU_POOL = "gpu"
PREVIEW_COLUMNS = ["trace_id", "teacher", "rollout", "finish_reason", "final_answer", "reasoning", "n_tokens"]


def traces_partitions(config: ProjectConfig) -> dg.MultiPartitionsDefinition:
    return dg.MultiPartitionsDefinition(
        {"source": seed_partitions(config), "shard": dg.StaticPartitionsDefinition(shard_keys(config.generation.shards))}
    )


def gpu_op_tags(config: ProjectConfig, llm: LLMConfig) -> dict:
    """Kubernetes / ECS GPU requests for a step that serves `llm` with vLLM (none for other backends)."""
    return gpu_step_tags(config, llm.gpus_needed)


def shard_asset(config: ProjectConfig, key: dg.AssetKey, group: str, llm: LLMConfig, deps: tuple = ()) -> dict:
    """@asset arguments of a model-driven stage: source x shard partitions, seed_pool upstream by
    source, the `gpu` pool (for a model served on the step's devices) and the GPU request of the model it serves, its
    table's schema."""
    table = key.to_user_string()
    return {
        "key": key,
        "partitions_def": traces_partitions(config),
        "deps": [
            *deps,
            dg.AssetDep(SEED_POOL_KEY, partition_mapping=dg.MultiToSingleDimensionPartitionMapping(partition_dimension_name="source")),
        ],
        "group_name": group,
        "kinds": {"vllm", "parquet"},
        # A model on the step's own devices takes a `gpu` slot; a remote endpoint or a provider's batch (which may run for
        # hours) holds no local GPU and takes none.
        "pool": GPU_POOL if llm.gpus_needed else None,
        "op_tags": gpu_op_tags(config, llm),
        "tags": {"stage": group, "compute": "gpu"},
        "metadata": {"dagster/column_schema": column_schema(table_spec(table)), "table": table},
    }


@contextlib.contextmanager
def one_run(corpus, table: str, partition: dict, config: ProjectConfig, context: dg.AssetExecutionContext):
    """The partition's one-writer lock (store.partition_lock) around a model stage's step; a run that waited past
    `operations.partition_lock_wait_s` fails saying who holds it."""
    try:
        with corpus.partition_lock(table, partition, wait_s=config.operations.partition_lock_wait_s, log=context.log):
            yield
    except PartitionBusy as exc:
        raise dg.Failure(description=str(exc)) from exc


def traces_settings(config: ProjectConfig) -> dict:
    """The project file's settings that change cot_traces (its code version hashes them); one teacher keeps the hash it had
    before `teachers:` existed."""
    generation = config.generation.output_settings()
    if len(config.teachers) == 1:
        return {"teacher": config.teacher.output_settings(), "generation": generation}
    return {"teachers": [t.output_settings() for t in config.teachers], "generation": generation}


def widest(llms: list[LLMConfig]) -> LLMConfig:
    """Of models served one after the other in a step, the one that needs the most GPUs (what the step asks for)."""
    return max(llms, key=lambda llm: llm.gpus_needed)


def teacher_identities(config: ProjectConfig) -> dict[str, str]:
    """Each teacher's name in the project file -> its identity in cot_traces.teacher (builds a tiny model if missing)."""
    return {t.label: describe_backend(t, models_dir=config.models_dir)[0] for t in config.teachers}


def teacher_plans(config: ProjectConfig, resource: LLMResource, log=None) -> list[TeacherPlan]:
    slots = slots_from_config(config)
    return [
        TeacherPlan(
            label=teacher.label,
            plan=resource.plan(teacher, models_dir=config.models_dir, log=log, gpu_slots=slots),
            prompt=teacher_prompt(config.generation, teacher.structured_output),
            generation=config.generation.model_copy(update={"rollouts": config.rollouts_of(teacher)}),
            send_seed=teacher.send_seed,
        )
        for teacher in config.teachers
    ]


def build_teacher_assets(config: ProjectConfig) -> list[dg.AssetsDefinition]:
    @dg.asset(
        **shard_asset(config, COT_TRACES_KEY, TEACHER_GROUP, widest(config.teachers)),
        code_version=code_version(TEACHER_CODE_VERSION, traces_settings(config)),
    )
    def cot_traces(
        context: dg.AssetExecutionContext, project: ProjectResource, store: CorpusStoreResource, teacher: LLMResource
    ) -> dg.MaterializeResult:
        """Structured chain-of-thought traces from every teacher: N rollouts per sample each, cached by trace id."""
        cfg = project.config
        keys = context.partition_key.keys_by_dimension
        source, shard = keys["source"], keys["shard"]
        corpus = store.open()
        plans = teacher_plans(cfg, teacher, context.log)
        partition = {"source": source, "shard": shard}
        # One run of a partition at a time: a second one waits, then finds the first's replies in the cache.
        with one_run(corpus, "cot_traces", partition, cfg, context):
            try:
                result = generate_teachers(
                    corpus,
                    source,
                    shard,
                    plans,
                    run_label=context.run_id,
                    progress=lambda label, s: context.log.info(
                        progress_line(f"{source}/{shard} {label}", s.sent + s.cache_hits, s.total, s.seconds, "traces", rate_done=s.sent)
                        + f", {s.tokens_per_s:.0f} tokens/s, {s.failed} failed"
                    ),
                )
            except LookupError as exc:
                raise dg.Failure(description=str(exc)) from exc
            written = corpus.write_partition("cot_traces", partition, result.rows)
            ledger = [
                llm_row(
                    Payer(
                        "cot_traces",
                        context.partition_key,
                        "teacher",
                        plan.plan.identity,
                        plan.plan.names,
                        plan.plan.token_source,
                    ),
                    shard_result.completions.values(),
                    shard_result.stats,
                    context.run_id,
                    cfg.costs,
                )
                for plan, shard_result in result.results
            ]
            write_ledger(corpus, "cot_traces", context.partition_key, ledger)
            corpus.cache(GENERATION_CACHE).compact(partition)

        rows = result.rows
        finish = Counter(rows.column("finish_reason").to_pylist())
        answered = sum(1 for a in rows.column("final_answer").to_pylist() if a)
        stats = result.stats
        context.log.info(f"{source}/{shard}: {rows.num_rows} traces, {stats.cache_hits} from cache, {stats.sent} requests sent")
        return dg.MaterializeResult(
            metadata={
                "dagster/row_count": rows.num_rows,
                **stats.as_metadata(),
                "samples": len(set(rows.column("sample_id").to_pylist())),
                "finish_reasons": counts(finish, "finish_reason"),
                "final_answer_parsed": answered,
                "error_rate": round(finish.get("error", 0) / rows.num_rows, 4) if rows.num_rows else 0.0,
                "truncation_rate": round(finish.get("length", 0) / rows.num_rows, 4) if rows.num_rows else 0.0,
                "teacher": ", ".join(plan.plan.identity for plan in plans),
                "prompt_version": plans[0].prompt.version,
                **ledger_metadata(ledger),
                "preview": preview(rows, PREVIEW_COLUMNS),
                "path": dg.MetadataValue.path(written.uri),
            },
            data_version=dg.DataVersion(version_of(rows.column("trace_id").to_pylist())),
        )

    return [cot_traces]


# -- the demo's view of the stage: its partitions in order, and its summary line ------------------------


def traces_partition_keys(config: ProjectConfig) -> list[str]:
    """The project file's sources x shards (also when sources are dynamic partitions)."""
    return [
        str(dg.MultiPartitionKey({"source": source, "shard": shard}))
        for source in config.source_names
        for shard in shard_keys(config.generation.shards)
    ]


def traces_summary(store: CorpusStore, partition: str, metadata: dict) -> dict[str, Any]:
    shard, source = partition.split("|")
    con = store.catalog(["cot_traces"])
    samples, traces, errors, truncated, answered = con.execute(
        "SELECT count(DISTINCT sample_id), count(*), count(*) FILTER (finish_reason = 'error'), "
        "count(*) FILTER (finish_reason = 'length'), count(final_answer) FROM cot_traces WHERE source = $1 AND shard = $2",
        [source, shard],
    ).fetchall()[0]
    reasons = {k: v for k, v in {"error": errors, "length": truncated}.items() if v}
    detail = (
        f"{metadata.get('requests_sent', '?')} requests sent, {metadata.get('cache_hits', '?')} from cache, "
        f"{metadata.get('tokens_per_s', '?')} tokens/s; {answered}/{traces} answers parsed"
    )
    return {"input": samples, "output": traces, "flagged": errors + truncated, "reasons": reasons, "detail": detail}
