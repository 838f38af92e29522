"""filtered_set (per source: filter_decisions) and sampled_subsets (per recipe: subset_members)."""

from collections import Counter
from typing import Any

import dagster as dg

from omnithought_dagster.assets.annotate import ANNOTATIONS_KEY
from omnithought_dagster.assets.inputs import BENCHMARK_ITEMS_KEY, build_benchmark_items
from omnithought_dagster.assets.metadata import bar_plot, column_schema, counts, markdown_cell, preview
from omnithought_dagster.assets.seed import SEED_POOL_KEY, seed_partitions
from omnithought_dagster.assets.teacher import COT_TRACES_KEY, teacher_identities
from omnithought_dagster.automation import cpu_stage_condition
from omnithought_dagster.config import ProjectConfig
from omnithought_dagster.curation.curate import curate_source
from omnithought_dagster.curation.decontam import load_benchmark_items
from omnithought_dagster.curation.sampling import draw
from omnithought_dagster.ids import code_version, version_of
from omnithought_dagster.resources import CorpusStoreResource, ProjectResource
from omnithought_dagster.store import CorpusStore, table_spec
from omnithought_dagster.teacher.report import TeacherReport, teacher_report

CURATE_GROUP = "curate"
FILTERED_SET_KEY = dg.AssetKey("filtered_set")
SAMPLED_SUBSETS_KEY = dg.AssetKey("sampled_subsets")
CURATE_CODE_VERSION = "curation-v2"  # v2: markup rules, reasons carry a detail
FILTER_CODE_VERSION = "curation-v3"  # v3: filter_decisions carry the trace's teacher


def recipe_partitions(config: ProjectConfig) -> dg.StaticPartitionsDefinition:
    return dg.StaticPartitionsDefinition([recipe.name for recipe in config.recipes])


def filter_settings(config: ProjectConfig) -> dict:
    """The project file's settings that change filtered_set (its code version hashes them): curation's, and the benchmarks it
    decontaminates against."""
    return {
        "curation": config.curation.output_settings(),
        "benchmarks": [config.benchmark(name).model_dump(mode="json") for name in config.curation.decontamination.benchmarks],
    }


def subset_settings(config: ProjectConfig) -> dict:
    """The project file's settings that change sampled_subsets (its code version hashes them): the recipes."""
    return {"recipes": [recipe.output_settings() for recipe in config.recipes]}


def build_filter_assets(config: ProjectConfig) -> list[dg.AssetsDefinition]:
    by_source = dg.MultiToSingleDimensionPartitionMapping(partition_dimension_name="source")

    @dg.asset(
        key=FILTERED_SET_KEY,
        partitions_def=seed_partitions(config),
        deps=[
            dg.AssetDep(COT_TRACES_KEY, partition_mapping=by_source),
            dg.AssetDep(ANNOTATIONS_KEY, partition_mapping=by_source),
            SEED_POOL_KEY,
            *([BENCHMARK_ITEMS_KEY] if config.curation.decontamination.benchmarks else []),  # what it decontaminates against
        ],
        group_name=CURATE_GROUP,
        kinds={"duckdb", "parquet"},
        code_version=code_version(FILTER_CODE_VERSION, filter_settings(config)),
        automation_condition=cpu_stage_condition(),
        tags={"stage": "curate", "compute": "cpu"},
        metadata={"dagster/column_schema": column_schema(table_spec("filter_decisions")), "table": "filter_decisions"},
    )
    def filtered_set(context: dg.AssetExecutionContext, project: ProjectResource, store: CorpusStoreResource) -> dg.MaterializeResult:
        """Every trace of the source with its verdict: rule filters, decontamination, difficulty-aware selection."""
        cfg = project.config
        source = context.partition_key
        corpus = store.open()
        benchmarks = [cfg.benchmark(name) for name in cfg.curation.decontamination.benchmarks]
        items = load_benchmark_items(benchmarks, cfg.seed)
        try:
            result = curate_source(corpus, source, cfg.curation, items)
        except LookupError as exc:
            raise dg.Failure(description=str(exc)) from exc
        written = corpus.write_partition("filter_decisions", source, result.decisions)
        table = result.decisions
        kept = [r for r in table.select(["kept", "difficulty_label", "tags"]).to_pylist() if r["kept"]]
        reasons = result.reason_counts
        total = table.num_rows
        context.log.info(f"{source}: {len(kept)}/{total} traces kept; {dict(reasons.most_common(5))}")
        teachers = teacher_report(corpus.catalog(), [source])
        return dg.MaterializeResult(
            metadata={
                "dagster/row_count": total,
                "traces": total,
                "kept": len(kept),
                "dropped": total - len(kept),
                "kept_share": round(len(kept) / total, 4) if total else 0.0,
                "drop_reasons": counts(reasons, "reason", "traces"),
                **({"plot/drop_reasons": bar_plot(reasons, "drop reasons (a trace can have several)", "traces")} if reasons else {}),
                "plot/kept_by_difficulty": bar_plot(
                    Counter(r["difficulty_label"] for r in kept),
                    "kept traces by difficulty",
                    "traces",
                    horizontal=False,
                    order=cfg.annotation.difficulty_labels,
                ),
                **{f"reason/{code}": n for code, n in sorted(reasons.items())},
                "contaminated_samples": len(result.contamination),
                # `markup: clean` keeps traces holding markup; the export deletes it from their text (curation.export).
                **{f"markup_kept/{kind}": n for kind, n in sorted(result.markup_kept.items())},
                "benchmark_items": len(items),
                "kept_by_difficulty": counts(Counter(r["difficulty_label"] for r in kept), "difficulty"),
                "kept_by_tag": counts(Counter(r["tags"][0] if r["tags"] else "untagged" for r in kept), "primary tag"),
                **{f"seconds/{stage}": round(seconds, 3) for stage, seconds in result.timings.items()},
                **teacher_metadata(teachers),
                "preview": preview(table, ["trace_id", "kept", "reasons", "difficulty_label", "quality", "verbosity"]),
                "path": dg.MetadataValue.path(written.uri),
            },
            data_version=dg.DataVersion(
                version_of(f"{t}:{k}" for t, k in zip(table.column("trace_id").to_pylist(), table.column("kept").to_pylist(), strict=True))
            ),
        )

    return [*build_benchmark_items(config, CURATE_GROUP), filtered_set]


TEACHER_NUMBERS = ("accuracy", "pass_rate", "judge_quality", "judge_verbosity", "kept_share", "tokens_per_trace", "latency_s")


def teacher_metadata(report: TeacherReport) -> dict:
    """The teacher report of one source for the asset page: a table, and per teacher its numbers (plotted over time)."""
    if not report.rows:
        return {}
    header = "| teacher | traces | accuracy | pass rate | judge quality | kept | tokens/trace | latency s | cost / 1000 kept |"
    lines = [header, "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]

    def cell(value, digits=3):
        return "-" if value is None else f"{value:.{digits}f}"

    for r in report.overall:
        cost = markdown_cell(f"{r['cost_per_1000_kept']:.4f} {r['currency']}") if r["cost_per_1000_kept"] is not None else "unpriced"
        cells = [markdown_cell(r["teacher"]), str(r["traces"]), cell(r["accuracy"]), cell(r["pass_rate"]), cell(r["judge_quality"], 2)]
        cells += [f"{r['kept']} ({cell(r['kept_share'])})", cell(r["tokens_per_trace"], 1), cell(r["latency_s"], 3), cost]
        lines.append("| " + " | ".join(cells) + " |")
    out: dict = {"teachers": dg.MetadataValue.md("\n".join(lines))}
    for r in report.overall:
        for name in TEACHER_NUMBERS:
            if r[name] is not None:
                out[f"teacher/{r['teacher']}/{name}"] = round(float(r[name]), 4)
        if r["cost_per_1000_kept"] is not None:
            out[f"teacher/{r['teacher']}/cost_per_1000_kept"] = round(float(r["cost_per_1000_kept"]), 6)
    return out


def build_subset_assets(config: ProjectConfig) -> list[dg.AssetsDefinition]:
    if not config.recipes:
        return []

    @dg.asset(
        key=SAMPLED_SUBSETS_KEY,
        partitions_def=recipe_partitions(config),
        deps=[dg.AssetDep(FILTERED_SET_KEY, partition_mapping=dg.AllPartitionMapping())],
        group_name=CURATE_GROUP,
        kinds={"duckdb", "parquet"},
        code_version=code_version(CURATE_CODE_VERSION, subset_settings(config)),
        automation_condition=cpu_stage_condition(),
        tags={"stage": "curate", "compute": "cpu"},
        metadata={"dagster/column_schema": column_schema(table_spec("subset_members")), "table": "subset_members"},
    )
    def sampled_subsets(context: dg.AssetExecutionContext, project: ProjectResource, store: CorpusStoreResource) -> dg.MaterializeResult:
        """One recipe's subset: difficulty-stratified, tag-diverse, deterministic; shortfalls reported, never silent. A control's:
        a uniform draw at the realised size of the curated recipe naming it."""
        cfg = project.config
        recipe = cfg.recipe(context.partition_key)
        curated = cfg.controlled_by(recipe.name)
        corpus = store.open()
        # The teachers it draws from: its own, or a random / filtered control's curated recipe's.
        chosen = curated.teachers if curated is not None and recipe.is_control else recipe.teachers
        named = recipe.teachers or (curated.teachers if curated is not None else None)
        result = draw(corpus, recipe, curated, teacher_identities(cfg) if named else None)
        written = corpus.write_partition("subset_members", recipe.name, result.members)
        members = result.members
        strata = Counter(s.split("/", 1)[0] for s in members.column("stratum").to_pylist())
        tags = Counter(s.split("/", 1)[1] for s in members.column("stratum").to_pylist())
        if result.shortfall:
            context.log.warning(f"recipe {recipe.name}: {result.shortfall} of {result.target} could not be filled (candidates exhausted)")
        lines = ["| label | quota | first pass | shortfall |", "| --- | ---: | ---: | ---: |"]
        lines += [f"| {s['label']} | {s['quota']} | {s['picked']} | {s['shortfall']} |" for s in result.strata]
        return dg.MaterializeResult(
            metadata={
                "dagster/row_count": members.num_rows,
                "subset_version": result.version,
                "kind": recipe.kind,
                **({"teachers": ", ".join(chosen)} if chosen else {}),
                **({"control_of": curated.name} if curated else {}),
                **({"controls": dg.MetadataValue.json(recipe.controls)} if recipe.controls else {}),
                "target_size": result.target,
                "size": members.num_rows,
                "shortfall": result.shortfall,
                "filled_from_other_labels": result.filled_from_other_labels,
                "filled_without_tag_caps": result.filled_without_tag_caps,
                "candidates": result.candidates,
                "strata": dg.MetadataValue.md("\n".join(lines)),
                "members_by_difficulty": counts(strata, "difficulty"),
                "members_by_tag": counts(tags, "primary tag"),
                "plot/composition": bar_plot(
                    strata, "subset members by difficulty", "traces", horizontal=False, order=cfg.annotation.difficulty_labels
                ),
                "plot/tags": bar_plot(tags, "subset members by primary tag", "traces"),
                "preview": preview(members, ["trace_id", "sample_id", "source", "stratum", "pick"]),
                "path": dg.MetadataValue.path(written.uri),
            },
            data_version=dg.DataVersion(result.version),
        )

    return [sampled_subsets]


# -- the demo's view of the stage: what its skip compares, and its summary line ------------------------


def filter_summary(store: CorpusStore, source: str, metadata: dict) -> dict[str, Any]:
    con = store.catalog(["filter_decisions"])
    total, kept = con.execute("SELECT count(*), count(*) FILTER (kept) FROM filter_decisions WHERE source = $1", [source]).fetchall()[0]
    reasons = dict(
        con.execute(
            "SELECT r.code, count(*) FROM filter_decisions, unnest(reasons) AS u(r) WHERE source = $1 GROUP BY 1 ORDER BY 2 DESC, 1",
            [source],
        ).fetchall()
    )
    markup = {key.split("/", 1)[1]: value for key, value in metadata.items() if key.startswith("markup_kept/")}
    detail = f"{kept}/{total} traces kept; {metadata.get('contaminated_samples', '?')} samples matched a benchmark" + (
        f"; kept traces holding markup, deleted where exported: {', '.join(f'{k} {v}' for k, v in sorted(markup.items()))}"
        if markup
        else ""
    )
    return {"input": total, "output": kept, "flagged": total - kept, "reasons": reasons, "detail": detail}


def subset_summary(store: CorpusStore, recipe: str, metadata: dict) -> dict[str, Any]:
    con = store.catalog(["subset_members"])
    members, samples = con.execute("SELECT count(*), count(DISTINCT sample_id) FROM subset_members WHERE subset = $1", [recipe]).fetchall()[
        0
    ]
    strata = dict(
        con.execute(
            "SELECT split_part(stratum, '/', 1), count(*) FROM subset_members WHERE subset = $1 GROUP BY 1 ORDER BY 1", [recipe]
        ).fetchall()
    )
    target, shortfall = metadata.get("target_size", "?"), metadata.get("shortfall", 0)
    detail = (
        f"{members} of {target} traces ({samples} samples), by difficulty {strata}; version {str(metadata.get('subset_version', ''))[:12]}"
        + (f"; shortfall {shortfall} (too few candidates)" if shortfall else "")
    )
    return {"input": metadata.get("candidates", "?"), "output": members, "flagged": shortfall or 0, "reasons": {}, "detail": detail}
