"""annotations: the joint annotation of every trace, partitioned like cot_traces."""

from collections.abc import Callable
from typing import Any

import dagster as dg

from omnithought_dagster.annotate.agreement import PASS_RATE_BUCKETS, agreement, distributions, pass_rate_histogram
from omnithought_dagster.annotate.annotations import ANNOTATION_CACHE, annotate_shard
from omnithought_dagster.annotate.judge import judge_prompt
from omnithought_dagster.annotate.taxonomy import Taxonomy
from omnithought_dagster.assets.metadata import bar_plot, counts, preview
from omnithought_dagster.assets.teacher import COT_TRACES_KEY, one_run, shard_asset, teacher_identities, widest
from omnithought_dagster.config import LLMConfig, ProjectConfig
from omnithought_dagster.gpu import slots_from_config
from omnithought_dagster.ids import code_version, version_of
from omnithought_dagster.ledger.ledger import Payer, ledger_metadata, llm_row, write_ledger
from omnithought_dagster.progress import progress_line
from omnithought_dagster.resources import CorpusStoreResource, LLMResource, ProjectResource
from omnithought_dagster.store import CorpusStore
from omnithought_dagster.teacher.traces import BackendPlan

ANNOTATE_GROUP = "annotate"
ANNOTATIONS_KEY = dg.AssetKey("annotations")
ANNOTATE_CODE_VERSION = "annotations-v1"
PREVIEW_COLUMNS = ["trace_id", "correct", "verify_method", "pass_rate", "difficulty", "verbosity", "quality", "tags", "difficulty_label"]


def annotations_settings(config: ProjectConfig) -> dict:
    """The project file's settings that change annotations (its code version hashes them); one judge keeps the hash it had
    before several teachers (each judged by another) existed."""
    judges = config.judges
    if len(judges) == 1:
        return {"judge": judge_settings(judges[0]), "annotation": config.annotation.output_settings()}
    return {
        "judges": {t.label: judge_settings(config.judge_for(t.label)) for t in config.teachers},
        "annotation": config.annotation.output_settings(),
    }


def judge_settings(judge: LLMConfig) -> dict:
    """A judge's settings that change its judgements: a teacher judging leaves its own rollout count out."""
    return {k: v for k, v in judge.output_settings().items() if k != "rollouts"}


def judge_plans(config: ProjectConfig, resource: LLMResource, log=None) -> Callable[[str], BackendPlan]:
    """A trace's teacher identity -> the plan of its judge (ProjectConfig.judge_for); an identity no configured teacher has
    (traces of a teacher since removed) gets the first teacher's judge."""
    slots = slots_from_config(config)
    plans: dict[str, BackendPlan] = {}
    by_identity = {identity: label for label, identity in teacher_identities(config).items()}

    def judge_of(identity: str) -> BackendPlan:
        judge = config.judge_for(by_identity.get(identity, config.teacher.label))
        if judge.label not in plans:
            plans[judge.label] = resource.plan(judge, models_dir=config.models_dir, log=log, gpu_slots=slots)
        return plans[judge.label]

    return judge_of


def build_annotate_assets(config: ProjectConfig) -> list[dg.AssetsDefinition]:
    @dg.asset(
        **shard_asset(config, ANNOTATIONS_KEY, ANNOTATE_GROUP, widest(config.judges), deps=(COT_TRACES_KEY,)),
        code_version=code_version(ANNOTATE_CODE_VERSION, annotations_settings(config)),
    )
    def annotations(
        context: dg.AssetExecutionContext, project: ProjectResource, store: CorpusStoreResource, judge: LLMResource
    ) -> dg.MaterializeResult:
        """Verified correctness and pass rate per trace, plus the judge's difficulty, verbosity, quality and task tags."""
        cfg = project.config
        keys = context.partition_key.keys_by_dimension
        source, shard = keys["source"], keys["shard"]
        corpus = store.open()
        taxonomy = Taxonomy.load(cfg.annotation.taxonomy)
        judge_of = judge_plans(cfg, judge, context.log)
        prompt = judge_prompt(cfg.annotation)
        partition = {"source": source, "shard": shard}
        with one_run(corpus, "annotations", partition, cfg, context):  # a second run waits, then reads the cache
            try:
                result = annotate_shard(
                    corpus,
                    source,
                    shard,
                    judge_of,
                    prompt,
                    cfg.annotation,
                    taxonomy,
                    run_label=context.run_id,
                    progress=lambda s: context.log.info(
                        progress_line(f"{source}/{shard}", s.sent + s.cache_hits, s.total, s.seconds, "traces judged", rate_done=s.sent)
                        + f", {s.tokens_per_s:.0f} tokens/s, {s.failed} failed"
                    ),
                )
            except LookupError as exc:
                raise dg.Failure(description=str(exc)) from exc
            written = corpus.write_partition("annotations", partition, result.rows)
            ledger = [
                llm_row(
                    Payer("annotations", context.partition_key, "judge", plan.identity, plan.names, plan.token_source),
                    run.completions.values(),
                    run.stats,
                    context.run_id,
                    cfg.costs,
                )
                for plan, run, _teachers in result.runs
            ]
            write_ledger(corpus, "annotations", context.partition_key, ledger)
            corpus.cache(ANNOTATION_CACHE).compact(partition)

        rows = result.rows.to_pylist()
        judged = [r for r in rows if r["judge_error"] is None]
        requested = [r for r in rows if r["judge_reply"] is not None]
        unparsable = [r for r in requested if r["judge_error"]]
        shares = agreement(rows, result.samples)
        dist = distributions(rows)
        histogram = pass_rate_histogram(rows)
        return dg.MaterializeResult(
            metadata={
                "dagster/row_count": len(rows),
                **result.stats.as_metadata(),
                "annotator": ", ".join(plan.identity for plan, _, _ in result.runs),
                **ledger_metadata(ledger),
                "prompt_version": prompt.version,
                "taxonomy_version": taxonomy.version,
                "correct_rate": round(sum(r["correct"] for r in rows) / len(rows), 4) if rows else 0.0,
                "mean_pass_rate": round(sum(r["pass_rate"] for r in rows) / len(rows), 4) if rows else 0.0,
                "judged": len(judged),
                "judge_parse_failure_rate": round(len(unparsable) / len(requested), 4) if requested else 0.0,
                "judge_errors": len(rows) - len(judged),
                **{k: v for k, v in shares.items() if v is not None},
                "agreement": dg.MetadataValue.json(shares),
                "pass_rate_histogram": counts(histogram, "pass rate", "samples"),
                **{f"{name}_distribution": counts(counter, name) for name, counter in dist.items()},
                "plot/difficulty": bar_plot(
                    dist["difficulty_label"],
                    "traces by difficulty label",
                    "traces",
                    horizontal=False,
                    order=cfg.annotation.difficulty_labels,
                ),
                "plot/tags": bar_plot(dist["tags"], "judge task tags", "traces"),
                "plot/pass_rate": bar_plot(histogram, "samples by rollout pass rate", "samples", horizontal=False, order=PASS_RATE_BUCKETS),
                "preview": preview(result.rows, PREVIEW_COLUMNS),
                "path": dg.MetadataValue.path(written.uri),
            },
            data_version=dg.DataVersion(version_of(result.rows.column("annotation_id").to_pylist())),
        )

    return [annotations]


# -- the demo's view of the stage: its summary line ------------------------


def annotations_summary(store: CorpusStore, partition: str, metadata: dict) -> dict[str, Any]:
    shard, source = partition.split("|")
    con = store.catalog(["annotations"])
    traces, correct, errors, samples, pass_rate = con.execute(
        "SELECT count(*), count(*) FILTER (correct), count(judge_error), count(DISTINCT sample_id), avg(pass_rate) "
        "FROM annotations WHERE source = $1 AND shard = $2",
        [source, shard],
    ).fetchall()[0]
    labels = dict(
        con.execute(
            "SELECT difficulty_label, count(DISTINCT sample_id) FROM annotations WHERE source = $1 AND shard = $2 GROUP BY 1 ORDER BY 1",
            [source, shard],
        ).fetchall()
    )
    auc = metadata.get("quality_auc_vs_correct")
    detail = (
        f"{correct}/{traces} correct, mean pass rate {pass_rate or 0:.2f}; samples by difficulty {labels}; "
        f"{metadata.get('requests_sent', '?')} judge requests, {metadata.get('cache_hits', '?')} from cache, "
        f"parse failures {metadata.get('judge_parse_failure_rate', '?')}, quality AUC vs correct {auc if auc is not None else 'n/a'}"
    )
    return {
        "input": traces,
        "output": traces - errors,
        "flagged": errors,
        "reasons": {"judge_error": errors} if errors else {},
        "detail": detail,
    }
