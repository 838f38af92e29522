"""Asset checks on filtered_set (per source) and sampled_subsets (per recipe); each re-reads the store."""

import dagster as dg

from omnithought_dagster.assets.curate import FILTERED_SET_KEY, SAMPLED_SUBSETS_KEY, recipe_partitions
from omnithought_dagster.assets.seed import seed_partitions
from omnithought_dagster.assets.teacher import teacher_identities
from omnithought_dagster.checks.gx import Expect, gx_check_result
from omnithought_dagster.config import ProjectConfig
from omnithought_dagster.curation.curate import recheck_kept
from omnithought_dagster.curation.decontam import contamination_under, load_benchmark_items
from omnithought_dagster.curation.sampling import _quotas, pool_where
from omnithought_dagster.resources import CorpusStoreResource, ProjectResource

ONE_DECISION_PER_TRACE = "one_decision_per_trace"
KEPT_PASS_RULES = "kept_traces_pass_the_rules"
SIZE_MATCHES_RECIPE = "size_matches_recipe"
STRATA_WITHIN_TOLERANCE = "strata_within_tolerance"
NO_SAMPLE_TWICE = "no_sample_twice"
MEMBERS_KEPT = "members_are_kept"
NO_CONTAMINATION = "no_contamination"
EXPORTABLE = "exportable"


def build_filter_checks(config: ProjectConfig) -> list[dg.AssetChecksDefinition]:
    sources = seed_partitions(config)

    @dg.asset_check(asset=FILTERED_SET_KEY, name=ONE_DECISION_PER_TRACE, partitions_def=sources, blocking=True)
    def one_decision_per_trace(context: dg.AssetCheckExecutionContext, store: CorpusStoreResource) -> dg.AssetCheckResult:
        """Each trace of the source (every shard of cot_traces) has exactly one decision, and no decision lacks a trace."""
        con = store.open().catalog(["cot_traces", "filter_decisions"])
        frame = con.sql(
            "SELECT d.trace_id, t.trace_id IS NOT NULL AS has_trace FROM filter_decisions d "
            "LEFT JOIN (SELECT trace_id FROM cot_traces WHERE source = $s) t USING (trace_id) WHERE d.source = $s",
            params={"s": context.partition_key},
        ).to_df()
        undecided = con.execute(
            "SELECT count(*) FROM cot_traces WHERE source = $1 AND trace_id NOT IN "
            "(SELECT trace_id FROM filter_decisions WHERE source = $1)",
            [context.partition_key],
        ).fetchall()[0][0]
        if frame.empty:
            return dg.AssetCheckResult(passed=False, description=f"filter_decisions[{context.partition_key}] is empty or missing")
        result = gx_check_result(
            frame,
            [
                Expect("expect_column_values_to_be_unique", column="trace_id"),
                Expect("expect_column_values_to_be_in_set", column="has_trace", value_set=[True]),
            ],
            extra_metadata={"traces_without_decision": undecided},
        )
        if undecided:
            return dg.AssetCheckResult(
                passed=False, metadata=result.metadata, description=f"{undecided} traces of the source have no decision"
            )
        return result

    @dg.asset_check(asset=FILTERED_SET_KEY, name=KEPT_PASS_RULES, partitions_def=sources, blocking=True)
    def kept_traces_pass_the_rules(
        context: dg.AssetCheckExecutionContext, store: CorpusStoreResource, project: ProjectResource
    ) -> dg.AssetCheckResult:
        """Kept traces pass every rule and selection condition, recomputed here in Python from the stored inputs."""
        cfg = project.config
        items = load_benchmark_items([cfg.benchmark(n) for n in cfg.curation.decontamination.benchmarks], cfg.seed)
        checked, violations = recheck_kept(store.open(), context.partition_key, cfg.curation, items, cfg.curation.check_sample_limit)
        return dg.AssetCheckResult(
            passed=not violations,
            metadata={"kept_traces_checked": checked, "violations": len(violations), "examples": dg.MetadataValue.json(violations[:10])},
            description=None if not violations else f"{len(violations)} kept traces should have been dropped, e.g. {violations[0]}",
        )

    return [one_decision_per_trace, kept_traces_pass_the_rules]


def build_subset_checks(config: ProjectConfig) -> list[dg.AssetChecksDefinition]:
    if not config.recipes:
        return []
    recipes = recipe_partitions(config)

    def recipe_of(context, project, store):
        """The partition's recipe; a control named by a curated recipe with that recipe's sources and traces_per_sample."""
        recipe = project.config.recipe(context.partition_key)
        curated = project.config.controlled_by(recipe.name)
        if curated is None:
            return recipe
        taken = {"sources": curated.sources, "traces_per_sample": curated.traces_per_sample}
        if recipe.is_control:
            taken["teachers"] = curated.teachers
        else:  # a curated control keeps its own teachers (the teacher arm) and is drawn at the recipe's realised size
            stored = store.open().read_partition("subset_members", curated.name, columns=["trace_id"])
            taken["size"] = stored.num_rows if stored is not None and stored.num_rows else curated.size
        return recipe.model_copy(update=taken)

    def members_of(context, store):
        return store.open().read_partition("subset_members", context.partition_key)

    @dg.asset_check(asset=SAMPLED_SUBSETS_KEY, name=SIZE_MATCHES_RECIPE, partitions_def=recipes, blocking=True)
    def size_matches_recipe(
        context: dg.AssetCheckExecutionContext, store: CorpusStoreResource, project: ProjectResource
    ) -> dg.AssetCheckResult:
        """The subset has the recipe's size - a control named by a curated recipe, exactly that recipe's stored subset's
        (arms of equal size); less only when its pool has no more eligible traces (a WARN: the documented shortfall)."""
        recipe = recipe_of(context, project, store)
        members = members_of(context, store)
        if members is None:
            return dg.AssetCheckResult(passed=False, description=f"subset {recipe.name} is not materialised")
        curated = project.config.controlled_by(recipe.name)
        target = recipe.size
        if curated is not None:
            arm = store.open().read_partition("subset_members", curated.name, columns=["trace_id"])
            if arm is None:
                return dg.AssetCheckResult(
                    passed=False, description=f"{recipe.name} is {curated.name}'s control: materialise {curated.name}"
                )
            target = arm.num_rows
        eligible = _eligible(store, recipe, project.config)
        size = members.num_rows
        metadata = {"size": size, "target": target, "eligible_traces": eligible, **({"control_of": curated.name} if curated else {})}
        if size == target:
            return dg.AssetCheckResult(passed=True, metadata=metadata)
        if curated is not None:
            return dg.AssetCheckResult(
                passed=False,
                metadata=metadata,
                description=f"{size} members for the {target} of {curated.name}, the recipe it controls: the arms differ in size",
            )
        if size > target or size < min(target, eligible):
            return dg.AssetCheckResult(
                passed=False,
                metadata=metadata,
                description=f"{size} members for a target of {target} while {eligible} eligible traces exist: not the fill policy",
            )
        return dg.AssetCheckResult(
            passed=False,
            severity=dg.AssetCheckSeverity.WARN,
            metadata=metadata,
            description=f"shortfall: {target - size} of {target} could not be filled - its pool has only {eligible} eligible traces",
        )

    @dg.asset_check(asset=SAMPLED_SUBSETS_KEY, name=STRATA_WITHIN_TOLERANCE, partitions_def=recipes, blocking=True)
    def strata_within_tolerance(
        context: dg.AssetCheckExecutionContext, store: CorpusStoreResource, project: ProjectResource
    ) -> dg.AssetCheckResult:
        """Each difficulty label's share of the subset is within `tolerance` of the mix (a WARN when a label had too few candidates)."""
        recipe = recipe_of(context, project, store)
        members = members_of(context, store)
        if members is None:
            return dg.AssetCheckResult(passed=False, description=f"subset {recipe.name} is not materialised")
        labels = [s.split("/", 1)[0] for s in members.column("stratum").to_pylist()]
        size = max(len(labels), 1)
        shares = dg.MetadataValue.json({label: round(labels.count(label) / size, 4) for label in set(labels)})
        if recipe.is_control:  # drawn uniformly: its shares are the pool's, shown beside the curated arm's
            return dg.AssetCheckResult(passed=True, metadata={"shares": shares}, description=f"a {recipe.kind} control has no mix to hold")
        available = _eligible_by_label(store, recipe, project.config)
        quotas = _quotas(recipe.size, recipe.difficulty_mix)
        off = [
            f"{label}: {labels.count(label) / size:.1%} vs {share:.1%}"
            for label, share in recipe.difficulty_mix.items()
            if abs(labels.count(label) / size - share) > recipe.tolerance + 1.0 / size
        ]
        starved = [
            f"{label} ({available.get(label, 0)} candidates for a quota of {quota})"
            for label, quota in quotas.items()
            if available.get(label, 0) < quota
        ]
        metadata = {
            "shares": shares,
            "mix": dg.MetadataValue.json(recipe.difficulty_mix),
            "tolerance": recipe.tolerance,
            "starved_labels": dg.MetadataValue.json(starved),
        }
        if off and not starved:
            return dg.AssetCheckResult(passed=False, metadata=metadata, description="strata off the mix: " + "; ".join(off))
        if off:  # the fill policy moved the starved labels' quota to others: documented, so a warning
            return dg.AssetCheckResult(
                passed=False,
                severity=dg.AssetCheckSeverity.WARN,
                metadata=metadata,
                description="strata off the mix because labels had too few candidates: "
                + "; ".join(starved)
                + "; shares: "
                + "; ".join(off),
            )
        return dg.AssetCheckResult(passed=True, metadata=metadata)

    @dg.asset_check(asset=SAMPLED_SUBSETS_KEY, name=NO_SAMPLE_TWICE, partitions_def=recipes, blocking=True)
    def no_sample_twice(
        context: dg.AssetCheckExecutionContext, store: CorpusStoreResource, project: ProjectResource
    ) -> dg.AssetCheckResult:
        """No trace twice, and no sample more often than the recipe's traces_per_sample."""
        recipe = recipe_of(context, project, store)
        members = members_of(context, store)
        if members is None:
            return dg.AssetCheckResult(passed=False, description=f"subset {recipe.name} is not materialised")
        frame = members.select(["trace_id", "sample_id"]).to_pandas()
        per_sample = frame.groupby("sample_id").size().rename("traces").reset_index()
        result = gx_check_result(frame, [Expect("expect_column_values_to_be_unique", column="trace_id")])
        over = per_sample[per_sample["traces"] > recipe.traces_per_sample]
        if not over.empty:
            return dg.AssetCheckResult(
                passed=False,
                metadata={"samples_over": len(over)},
                description=f"{len(over)} samples appear more than {recipe.traces_per_sample} times",
            )
        return result

    @dg.asset_check(asset=SAMPLED_SUBSETS_KEY, name=MEMBERS_KEPT, partitions_def=recipes, blocking=True)
    def members_are_kept(
        context: dg.AssetCheckExecutionContext, store: CorpusStoreResource, project: ProjectResource
    ) -> dg.AssetCheckResult:
        """Every member trace is in its recipe's pool in filter_decisions: kept (curated, filtered), or not contaminated
        (a random control) - and written by the recipe's teachers when it names some."""
        recipe = recipe_of(context, project, store)
        teachers = [teacher_identities(project.config)[t] for t in recipe.teachers] if recipe.teachers else None
        pool, params = pool_where(None, recipe.kind, teachers)
        con = store.open().catalog(["subset_members", "filter_decisions", "cot_traces"])
        frame = con.sql(
            f"SELECT m.trace_id, coalesce({pool}, false) AS kept FROM subset_members m LEFT JOIN filter_decisions d USING (trace_id) "
            "WHERE m.subset = $s",
            params={"s": context.partition_key, **params},
        ).to_df()
        if frame.empty:
            return dg.AssetCheckResult(passed=False, description=f"subset {context.partition_key} is empty or missing")
        return gx_check_result(frame, [Expect("expect_column_values_to_be_in_set", column="kept", value_set=[True])])

    @dg.asset_check(asset=SAMPLED_SUBSETS_KEY, name=NO_CONTAMINATION, partitions_def=recipes, blocking=True)
    def no_contamination(
        context: dg.AssetCheckExecutionContext, store: CorpusStoreResource, project: ProjectResource
    ) -> dg.AssetCheckResult:
        """No member's question or image matches a benchmark item (recomputed against the configured benchmarks)."""
        cfg = project.config
        con = store.open().catalog(["subset_members", "seed_pool"])
        samples = (
            con.sql(
                "SELECT DISTINCT s.sample_id, s.question, s.image_phashes FROM subset_members m JOIN seed_pool s USING (sample_id) "
                "WHERE m.subset = $s",
                params={"s": context.partition_key},
            )
            .to_arrow_table()
            .to_pylist()
        )
        items = load_benchmark_items([cfg.benchmark(n) for n in cfg.curation.decontamination.benchmarks], cfg.seed)
        hits = contamination_under(samples, items, cfg.curation.decontamination)
        examples = [
            {"sample_id": s, "benchmark": h[0].benchmark, "item": h[0].item_id, "code": h[0].code} for s, h in list(hits.items())[:10]
        ]
        return dg.AssetCheckResult(
            passed=not hits,
            metadata={
                "member_samples": len(samples),
                "benchmark_items": len(items),
                "contaminated": len(hits),
                "examples": dg.MetadataValue.json(examples),
            },
            description=f"{len(hits)} member samples match benchmark items" if hits else None,
        )

    @dg.asset_check(asset=SAMPLED_SUBSETS_KEY, name=EXPORTABLE, partitions_def=recipes, blocking=True)
    def exportable(context: dg.AssetCheckExecutionContext, store: CorpusStoreResource, project: ProjectResource) -> dg.AssetCheckResult:
        """The export's pre-flight over the members (missing images, placeholder counts, markup in markup.py's list): the
        traces it would set aside. Up to curation.max_set_aside_share of the subset warns (the export writes the rest);
        more fails. The training step's export also sets aside text holding the student tokenizer's own added tokens and,
        with a cutoff, over-long examples: those are counted in its metadata (export_set_aside), not here."""
        from omnithought_dagster.curation.export import ExportError, preflight

        cfg = project.config
        try:
            checked = preflight(store.open(), context.partition_key, clean_markup=cfg.curation.rules.markup == "clean")
        except ExportError as exc:
            return dg.AssetCheckResult(passed=False, description=str(exc))
        share = len(checked.set_aside) / max(checked.considered, 1)
        by_reason: dict[str, int] = {}
        for aside in checked.set_aside:
            by_reason[aside.reason] = by_reason.get(aside.reason, 0) + 1
        metadata = {
            "members": checked.considered,
            "set_aside": len(checked.set_aside),
            "set_aside_share": round(share, 4),
            "by_reason": dg.MetadataValue.json(by_reason),
            "threshold": cfg.curation.max_set_aside_share,
            "examples": dg.MetadataValue.json([{"trace_id": a.id, "reason": a.reason, "detail": a.detail} for a in checked.set_aside[:10]]),
        }
        if not checked.set_aside:
            return dg.AssetCheckResult(passed=True, metadata=metadata)
        first = checked.set_aside[0]
        description = (
            f"the export would set aside {len(checked.set_aside)} of {checked.considered} traces ({share:.1%}), e.g. "
            f"{first.id[:12]}: {first.reason}: {first.detail}"
        )
        if share <= cfg.curation.max_set_aside_share:
            return dg.AssetCheckResult(passed=False, severity=dg.AssetCheckSeverity.WARN, metadata=metadata, description=description)
        return dg.AssetCheckResult(
            passed=False,
            metadata=metadata,
            description=f"{description}: over curation.max_set_aside_share ({cfg.curation.max_set_aside_share:.1%})",
        )

    return [size_matches_recipe, strata_within_tolerance, no_sample_twice, members_are_kept, no_contamination, exportable]


def _eligible(store: CorpusStoreResource, recipe, config: ProjectConfig) -> int:
    """Kept traces a recipe could use at most: per sample, up to traces_per_sample of its kept traces."""
    return sum(_eligible_by_label(store, recipe, config).values())


def _eligible_by_label(store: CorpusStoreResource, recipe, config: ProjectConfig) -> dict[str, int]:
    """Per difficulty label (of the mix; every label for a control), the traces of its pool (of its teachers) it could use at
    most."""
    con = store.open().catalog(["filter_decisions", "cot_traces"])
    identities = teacher_identities(config) if recipe.teachers else {}
    where, params = pool_where(recipe.sources, recipe.kind, [identities[t] for t in recipe.teachers] if recipe.teachers else None)
    rows = con.execute(  # a sample's traces share its difficulty label; any_value keeps one row a sample whatever they hold
        f"SELECT difficulty_label, sum(least(n, $per_sample)) FROM (SELECT sample_id, any_value(difficulty_label) AS difficulty_label, "
        f"count(*) AS n FROM filter_decisions WHERE {where} GROUP BY sample_id) GROUP BY 1",
        {**params, "per_sample": recipe.traces_per_sample},
    ).fetchall()
    labels = set(recipe.difficulty_mix)
    return {label: int(n) for label, n in rows if recipe.is_control or label in labels}
