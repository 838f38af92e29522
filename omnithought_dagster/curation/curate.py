"""filter_decisions for one source: read what the store holds, flag samples, run the rules and selection.

This is what the `filtered_set` asset and `bench/curation.py` call: the same code at any scale.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field

import pyarrow as pa

from omnithought_dagster.curation.decontam import BenchmarkItem, Contamination, contamination_under
from omnithought_dagster.curation.filters import decide, sample_flags
from omnithought_dagster.curation.settings import CurationConfig
from omnithought_dagster.store import CorpusStore
from omnithought_dagster.store.tables import FILTER_DECISIONS


@dataclass
class CurationResult:
    decisions: pa.Table
    timings: dict[str, float]
    contamination: dict[str, list[Contamination]] = field(default_factory=dict)
    markup_kept: dict[str, int] = field(default_factory=dict)  # kept traces holding markup, by kind (`markup: clean`)

    @property
    def reason_counts(self) -> Counter:
        return Counter(reason["code"] for reasons in self.decisions.column("reasons").to_pylist() for reason in reasons)


def curate_source(store: CorpusStore, source: str, curation: CurationConfig, benchmark_items: list[BenchmarkItem]) -> CurationResult:
    timings: dict[str, float] = {}
    started = time.perf_counter()
    con = store.catalog(["seed_pool", "cot_traces", "annotations"])
    con.execute(f"SET memory_limit = '{curation.duckdb_memory_limit}'")
    if curation.duckdb_threads:
        con.execute(f"SET threads = {int(curation.duckdb_threads)}")
    con.execute("SET enable_progress_bar = false")
    seed = store.read_partition("seed_pool", source, ["sample_id", "question", "image_phashes", "near_duplicate_of"])
    if seed is None:
        raise LookupError(f"seed_pool[{source}] is not materialised")
    samples = seed.to_pylist()
    wanted = sorted({s["near_duplicate_of"] for s in samples if s["near_duplicate_of"]})
    representatives = _questions_of(con, wanted)
    contamination = contamination_under(samples, benchmark_items, curation.decontamination)
    flags = sample_flags(samples, representatives, contamination, curation.rules.near_duplicate_question_similarity)
    timings["sample_flags"] = time.perf_counter() - started
    decisions = decide(con, source, curation.rules, curation.selection, flags)
    timings.update(decisions.timings)
    table = decisions.table.select(FILTER_DECISIONS.column_names).cast(FILTER_DECISIONS.schema)
    con.close()
    return CurationResult(table, timings, contamination, decisions.markup_kept)


def recheck_kept(
    store: CorpusStore, source: str, curation: CurationConfig, benchmark_items: list[BenchmarkItem], limit: int | None = None
) -> tuple[int, list[dict]]:
    """Recompute, in Python and from the stored inputs, every rule and selection condition for the
    kept traces of a source (a deterministic sample of `limit` when there are more). Returns
    (traces checked, violations) - a violation names the trace and what it should have been dropped for."""
    from rapidfuzz import fuzz

    from omnithought_dagster.curation.filters import active_rules, measure, rule_reasons
    from omnithought_dagster.ids import normalise_text

    con = store.catalog(["seed_pool", "cot_traces", "annotations", "filter_decisions"])
    kept_total = con.execute("SELECT count(*) FROM filter_decisions WHERE source = $1 AND kept", [source]).fetchall()[0][0]
    sample_clause = f"USING SAMPLE reservoir({int(limit)} ROWS) REPEATABLE (7)" if limit and kept_total > limit else ""
    rows = (
        con.sql(
            f"""
        WITH kept AS (SELECT trace_id, sample_id FROM filter_decisions WHERE source = $source AND kept {sample_clause})
        SELECT k.trace_id, k.sample_id, t.reasoning, t.final_answer, t.finish_reason, t.n_tokens, t.n_prompt_tokens,
               a.annotation_id, a.correct, a.judge_error, a.quality, a.pass_rate, a.difficulty_bin,
               s.question, s.image_phashes, s.near_duplicate_of
        FROM kept k JOIN cot_traces t ON t.trace_id = k.trace_id LEFT JOIN annotations a ON a.trace_id = k.trace_id
        JOIN seed_pool s ON s.sample_id = k.sample_id
    """,
            params={"source": source},
        )
        .to_arrow_table()
        .to_pylist()
    )
    samples = {r["sample_id"]: r for r in rows}
    contamination = contamination_under(samples.values(), benchmark_items, curation.decontamination)
    wanted = sorted({r["near_duplicate_of"] for r in rows if r["near_duplicate_of"]})
    representatives = _questions_of(con, wanted)
    per_sample_kept = dict(
        con.execute("SELECT sample_id, count(*) FROM filter_decisions WHERE source = $1 AND kept GROUP BY 1", [source]).fetchall()
    )
    rules = active_rules(curation.rules)
    selection = curation.selection
    violations, contents = [], {}
    for row in rows:
        row.update(measure(row, curation.rules.loop_tail_chars))
        similarity = None
        other = row["near_duplicate_of"]
        if other in representatives and curation.rules.near_duplicate_question_similarity <= 100:
            value = fuzz.ratio(normalise_text(row["question"]).casefold(), normalise_text(representatives[other]).casefold())
            similarity = value if value >= curation.rules.near_duplicate_question_similarity else None
        hits = contamination.get(row["sample_id"], [])
        row["near_duplicate_similarity"] = similarity
        row["question_overlap"] = next((h.value for h in hits if h.code == "contaminated_question"), None)
        row["image_distance"] = next((h.value for h in hits if h.code == "contaminated_image"), None)
        reasons = [r["code"] for r in rule_reasons(row, rules)]
        if selection.drop_unsolvable and row["pass_rate"] == 0:
            reasons.append("unsolvable_sample")
        if (
            row["pass_rate"] is not None
            and row["pass_rate"] >= selection.trivial_min_pass_rate
            and row["difficulty_bin"] is not None
            and row["difficulty_bin"] <= selection.trivial_max_difficulty_bin
        ):
            reasons.append("trivial_sample")
        if per_sample_kept.get(row["sample_id"], 0) > selection.max_traces_per_sample:
            reasons.append("over_trace_cap")
        content = (row["reasoning"] or "", row["final_answer"] or "")
        if curation.rules.drop_duplicate_traces and content in contents:
            reasons.append(f"duplicate_trace (of {contents[content]})")
        contents.setdefault(content, row["trace_id"])
        if reasons:
            violations.append({"trace_id": row["trace_id"], "should_drop_for": reasons})
    con.close()
    return len(rows), violations


def _questions_of(con, sample_ids: list[str]) -> dict[str, str]:
    """The question of each of these samples (the near-duplicates' representatives), from the catalog's seed_pool."""
    if not sample_ids:
        return {}
    query = "SELECT sample_id, any_value(question) FROM seed_pool WHERE sample_id IN (SELECT unnest($1::VARCHAR[])) GROUP BY 1"
    return dict(con.execute(query, [sample_ids]).fetchall())
