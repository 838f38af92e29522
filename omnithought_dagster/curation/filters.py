"""Rule filters and difficulty-aware selection: a verdict with every reason for every trace.

Each rule is a small named function of the config returning a `Rule`: a reason code, the
measured value as a DuckDB expression over one trace's row, the predicate that trips it, the
threshold, and the same measurement in Python. DuckDB evaluates all rules of a source in one
pass over the text (the cost that matters at 1.8M traces); the Python twin is what the checks
and tests use to recompute a verdict independently.

    rows -> text metrics (one scan of cot_traces) -> + annotations + per-sample flags
         -> rule reasons -> duplicate traces -> selection (unsolvable / trivial / trace cap)
         -> filter_decisions (kept = no reason)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import pyarrow as pa

from omnithought_dagster.curation.settings import RulesConfig, SelectionConfig
from omnithought_dagster.markup import KINDS as MARKUP_KINDS
from omnithought_dagster.markup import markup_counts, sql_pattern, sql_shown

# Per-trace measurements the rules read; computed once (SQL: `metrics`, Python: `measure`).
TEXT_METRICS_SQL = {
    # Not trim(): over 2 KB texts it cost more than everything else together; a regex finding the
    # first non-blank character stops at once on real text.
    "reasoning_chars": "CASE WHEN regexp_matches(coalesce(reasoning, ''), '[^ \t\n\r]') THEN length(reasoning) ELSE 0 END",
    "has_answer": "regexp_matches(coalesce(final_answer, ''), '[^ \t\n\r]')",
    "line_repeat": "CASE WHEN len(lines) >= 4 THEN 1 - len(list_distinct(lines)) / len(lines) ELSE 0.0 END",
    "loop": "CASE WHEN $tail > 0 AND length(reasoning) >= 4 * $tail "
    "AND strpos(reasoning, right(reasoning, $tail)) <= length(reasoning) - $tail THEN 1.0 ELSE 0.0 END",
    "foreign_share": "CASE WHEN length(reasoning) > 0 THEN (strlen(reasoning) - length(reasoning)) / length(reasoning) ELSE 0.0 END",
    "content_hash": "hash(coalesce(reasoning, ''), coalesce(final_answer, ''))",
}
# Markup in what the student would learn to write (reasoning and final answer; markup.py): per kind, how many and the
# first one, as the rules' value and detail. One scan finds the traces holding any; only those are measured kind by kind.
_REPLY_TEXT = "coalesce(reasoning, '') || chr(10) || coalesce(final_answer, '')"


def _quoted(pattern: str) -> str:
    return "'" + pattern.replace("'", "''") + "'"


TEXT_METRICS_SQL["has_markup"] = f"regexp_matches({_REPLY_TEXT}, {_quoted('|'.join(f'(?:{sql_pattern(k)})' for k in MARKUP_KINDS))})"
for _kind in MARKUP_KINDS:  # each reads has_markup, the column just above (DuckDB's lateral alias)
    TEXT_METRICS_SQL[f"{_kind}_n"] = (
        f"CASE WHEN has_markup THEN len(regexp_extract_all({_REPLY_TEXT}, {_quoted(sql_pattern(_kind))})) ELSE 0 END"
    )
    TEXT_METRICS_SQL[f"{_kind}_first"] = (
        f"CASE WHEN {_kind}_n > 0 THEN {sql_shown(_kind, f'regexp_extract({_REPLY_TEXT}, {_quoted(sql_pattern(_kind))})')} END"
    )


def measure(trace: dict, tail: int) -> dict:
    """The Python twin of TEXT_METRICS_SQL for one trace (reasoning, final_answer)."""
    reasoning = trace.get("reasoning") or ""
    answer = trace.get("final_answer") or ""
    lines = [line for line in reasoning.split("\n") if line != ""]
    n = len(reasoning)
    markup = {
        f"{kind}_{part}": value
        for kind, (count, first) in markup_counts(f"{reasoning}\n{answer}").items()
        for part, value in (("n", count), ("first", first))
    }
    return {
        **markup,
        "reasoning_chars": n if reasoning.strip(" \t\n\r") else 0,
        "has_answer": bool(answer.strip(" \t\n\r")),
        "line_repeat": 1 - len(set(lines)) / len(lines) if len(lines) >= 4 else 0.0,
        "loop": 1.0 if tail > 0 and n >= 4 * tail and reasoning.find(reasoning[-tail:]) + 1 <= n - tail else 0.0,
        "foreign_share": (len(reasoning.encode("utf-8")) - n) / n if n else 0.0,
    }


@dataclass(frozen=True)
class Rule:
    code: str
    value_sql: str  # the measured value, over the joined row (metrics m, annotations a, sample flags f)
    trips_sql: str  # when the rule applies
    threshold: float | None
    value: Callable[[dict], float | None]  # Python twin over the joined row dict
    trips: Callable[[dict], bool]
    detail_sql: str = "NULL"  # what tripped it, in words (the markup rules name the string)
    detail: Callable[[dict], str | None] = lambda row: None


def _flag(value) -> float:
    return 1.0 if value else 0.0


def not_annotated(c: RulesConfig) -> Rule | None:
    """Always on: a trace without an annotation cannot be curated by its annotation."""
    return Rule(
        "not_annotated",
        "(a.trace_id IS NULL)::DOUBLE",
        "a.trace_id IS NULL",
        0,
        lambda r: _flag(r.get("annotation_id") is None),
        lambda r: r.get("annotation_id") is None,
    )


def missing_reasoning(c: RulesConfig) -> Rule | None:
    if not c.require_reasoning:
        return None
    return Rule(
        "missing_reasoning",
        "m.reasoning_chars",
        "m.reasoning_chars = 0",
        1,
        lambda r: r["reasoning_chars"],
        lambda r: r["reasoning_chars"] == 0,
    )


def missing_answer(c: RulesConfig) -> Rule | None:
    if not c.require_final_answer:
        return None
    return Rule(
        "missing_final_answer",
        "m.has_answer::DOUBLE",
        "NOT m.has_answer",
        1,
        lambda r: _flag(r["has_answer"]),
        lambda r: not r["has_answer"],
    )


def wrong_answer(c: RulesConfig) -> Rule | None:
    if not c.drop_wrong_answers:
        return None
    return Rule("wrong_answer", "a.correct::DOUBLE", "NOT a.correct", 1, lambda r: _flag(r["correct"]), lambda r: r["correct"] is False)


def truncated(c: RulesConfig) -> Rule | None:
    if not c.drop_truncated:
        return None
    return Rule(
        "truncated",
        "(m.finish_reason = 'length')::DOUBLE",
        "m.finish_reason = 'length'",
        0,
        lambda r: _flag(r["finish_reason"] == "length"),
        lambda r: r["finish_reason"] == "length",
    )


def generation_error(c: RulesConfig) -> Rule | None:
    if not c.drop_generation_errors:
        return None
    return Rule(
        "generation_error",
        "(m.finish_reason = 'error')::DOUBLE",
        "m.finish_reason = 'error'",
        0,
        lambda r: _flag(r["finish_reason"] == "error"),
        lambda r: r["finish_reason"] == "error",
    )


def annotation_error(c: RulesConfig) -> Rule | None:
    if not c.drop_annotation_errors:
        return None
    return Rule(
        "annotation_error",
        "(a.judge_error IS NOT NULL)::DOUBLE",
        "a.judge_error IS NOT NULL",
        0,
        lambda r: _flag(r["judge_error"] is not None),
        lambda r: r["judge_error"] is not None,
    )


def too_short(c: RulesConfig) -> Rule | None:
    return Rule(
        "too_short",
        "coalesce(m.n_tokens, 0)",
        "coalesce(m.n_tokens, 0) < $min_tokens",
        c.min_tokens,
        lambda r: r["n_tokens"] or 0,
        lambda r: (r["n_tokens"] or 0) < c.min_tokens,
    )


def too_long(c: RulesConfig) -> Rule | None:
    total = "coalesce(m.n_prompt_tokens, 0) + coalesce(m.n_tokens, 0)"
    return Rule(
        "too_long",
        total,
        f"{total} > $max_total_tokens",
        c.max_total_tokens,
        lambda r: (r["n_prompt_tokens"] or 0) + (r["n_tokens"] or 0),
        lambda r: (r["n_prompt_tokens"] or 0) + (r["n_tokens"] or 0) > c.max_total_tokens,
    )


def repetitive_lines(c: RulesConfig) -> Rule | None:
    return Rule(
        "repetitive_lines",
        "m.line_repeat",
        "m.line_repeat > $max_line_repeat_ratio",
        c.max_line_repeat_ratio,
        lambda r: r["line_repeat"],
        lambda r: r["line_repeat"] > c.max_line_repeat_ratio,
    )


def repetitive_loop(c: RulesConfig) -> Rule | None:
    if c.loop_tail_chars <= 0:
        return None
    return Rule("repetitive_loop", "m.loop", "m.loop > 0", c.loop_tail_chars, lambda r: r["loop"], lambda r: r["loop"] > 0)


def script_mismatch(c: RulesConfig) -> Rule | None:
    if c.expected_script == "any":
        return None
    return Rule(
        "script_mismatch",
        "m.foreign_share",
        "m.foreign_share > $max_foreign_share",
        c.max_foreign_share,
        lambda r: r["foreign_share"],
        lambda r: r["foreign_share"] > c.max_foreign_share,
    )


def low_quality(c: RulesConfig) -> Rule | None:
    if c.min_quality <= 0:
        return None
    return Rule(
        "low_quality",
        "a.quality",
        "a.quality < $min_quality",
        c.min_quality,
        lambda r: r["quality"],
        lambda r: r["quality"] is not None and r["quality"] < c.min_quality,
    )


def near_duplicate_sample(c: RulesConfig) -> Rule | None:
    if c.near_duplicate_question_similarity > 100:
        return None
    return Rule(
        "near_duplicate_sample",
        "f.near_duplicate_similarity",
        "f.near_duplicate_similarity IS NOT NULL",
        c.near_duplicate_question_similarity,
        lambda r: r["near_duplicate_similarity"],
        lambda r: r["near_duplicate_similarity"] is not None,
    )


def contaminated_question(c: RulesConfig) -> Rule | None:
    return Rule(
        "contaminated_question",
        "f.question_overlap",
        "f.question_overlap IS NOT NULL",
        None,
        lambda r: r["question_overlap"],
        lambda r: r["question_overlap"] is not None,
    )


def contaminated_image(c: RulesConfig) -> Rule | None:
    return Rule(
        "contaminated_image",
        "f.image_distance",
        "f.image_distance IS NOT NULL",
        None,
        lambda r: r["image_distance"],
        lambda r: r["image_distance"] is not None,
    )


def _markup_rule(kind: str):
    def rule(c: RulesConfig) -> Rule | None:
        """The reasoning or final answer holds markup of this kind (markup.py); off with `markup: clean` (kept, then cleaned
        where the text is exported). The value is how many, the detail the first one."""
        if c.markup != "drop":
            return None
        return Rule(
            kind,
            f"m.{kind}_n",
            f"m.{kind}_n > 0",
            0,
            lambda r: r[f"{kind}_n"],
            lambda r: r[f"{kind}_n"] > 0,
            f"m.{kind}_first",
            lambda r: r[f"{kind}_first"],
        )

    rule.__name__ = kind
    return rule


RULES = [
    not_annotated,
    missing_reasoning,
    missing_answer,
    wrong_answer,
    truncated,
    generation_error,
    annotation_error,
    too_short,
    too_long,
    repetitive_lines,
    repetitive_loop,
    script_mismatch,
    low_quality,
    near_duplicate_sample,
    contaminated_question,
    contaminated_image,
    *map(_markup_rule, MARKUP_KINDS),
]
# Codes added after the row rules: duplicate traces (the first clean copy is kept), then
# difficulty-aware selection (sample-level unsolvable / trivial; a per-sample cap on clean traces).
DUPLICATE = "duplicate_trace"
SELECTION_CODES = ("unsolvable_sample", "trivial_sample", "over_trace_cap")


def active_rules(config: RulesConfig) -> list[Rule]:
    return [rule for rule in (factory(config) for factory in RULES) if rule is not None]


def rule_reasons(row: dict, rules: list[Rule]) -> list[dict]:
    """The Python verdict of the row rules on one joined row (what the checks recompute)."""
    return [
        {"code": r.code, "value": _number(r.value(row)), "threshold": r.threshold, "detail": r.detail(row)} for r in rules if r.trips(row)
    ]


def preference(quality: float | None, verbosity: float | None, label: str, selection: SelectionConfig) -> float:
    """Higher is kept first: judge quality, minus the distance of verbosity from the bin's target."""
    score = float(quality) if quality is not None else 0.0
    target = selection.verbosity_targets.get(label)
    if target is not None and verbosity is not None:
        score -= abs(float(verbosity) - target)
    return score


def _number(value) -> float | None:
    if value is None:
        return None
    value = float(value)
    return None if math.isnan(value) else value


@dataclass
class Decisions:
    table: pa.Table
    timings: dict[str, float]
    markup_kept: dict[str, int]  # kept traces holding markup, by kind (only under `markup: clean`: cleaned where exported)


def decide(con, source: str, rules_cfg: RulesConfig, selection: SelectionConfig, flags: pa.Table) -> Decisions:
    """All verdicts of one source. `con` has views cot_traces and annotations; `flags` is the per-sample
    table (sample_id, near_duplicate_of, near_duplicate_similarity, question_overlap, image_distance)."""
    import time

    timings = {}
    started = time.perf_counter()
    params = {"source": source, "tail": rules_cfg.loop_tail_chars}
    metrics = ",\n  ".join(f"{sql} AS {name}" for name, sql in TEXT_METRICS_SQL.items())
    con.execute(
        f"""
        CREATE OR REPLACE TEMP TABLE m AS
        SELECT trace_id, sample_id, shard, rollout, teacher, finish_reason, n_tokens, n_prompt_tokens,
          {metrics}
        FROM (SELECT *, list_filter(string_split(coalesce(reasoning, ''), chr(10)), lambda x: x <> '') AS lines
              FROM cot_traces WHERE source = $source)
    """,
        params,
    )
    timings["text_metrics"] = time.perf_counter() - started

    started = time.perf_counter()
    con.register("sample_flags", flags)
    rules = active_rules(rules_cfg)
    reason_items = ",\n        ".join(
        f"CASE WHEN {r.trips_sql} THEN {{'code': '{r.code}', 'value': ({r.value_sql})::DOUBLE, 'threshold': "
        f"{'NULL' if r.threshold is None else repr(float(r.threshold))}::DOUBLE, 'detail': ({r.detail_sql})::VARCHAR}} END"
        for r in rules
    )
    values = {
        "min_tokens": rules_cfg.min_tokens,
        "max_total_tokens": rules_cfg.max_total_tokens,
        "max_line_repeat_ratio": rules_cfg.max_line_repeat_ratio,
        "max_foreign_share": rules_cfg.max_foreign_share,
        "min_quality": rules_cfg.min_quality,
    }
    for key, value in values.items():
        reason_items = reason_items.replace(f"${key}", repr(value))
    # A label is the project file's text: a SQL literal with its quotes doubled, never part of the statement.
    targets = " ".join(
        f"WHEN '{label.replace(chr(39), chr(39) * 2)}' THEN {float(t)!r}" for label, t in selection.verbosity_targets.items()
    )
    verbosity_penalty = f"CASE a.difficulty_label {targets} ELSE NULL END" if targets else "NULL"
    dedup = "TRUE" if rules_cfg.drop_duplicate_traces else "FALSE"
    table = con.sql(
        f"""
        WITH joined AS (
          SELECT m.*, a.trace_id AS annotation_trace, a.tags, a.difficulty_label, a.difficulty_bin,
                 a.difficulty_score, a.pass_rate, a.quality, a.verbosity,
            f.near_duplicate_of,
            list_filter([{reason_items}], lambda x: x IS NOT NULL) AS row_reasons,
            coalesce(a.quality, 0)::DOUBLE - coalesce(abs(a.verbosity - {verbosity_penalty}), 0) AS preference
          FROM m LEFT JOIN (SELECT trace_id, correct, judge_error, tags, difficulty_label, difficulty_bin, difficulty_score, pass_rate,
                                   quality, verbosity FROM annotations WHERE source = $source) a USING (trace_id)
          LEFT JOIN sample_flags f USING (sample_id)
        ), deduped AS (
          -- The copy kept of identical traces is the first clean one (by trace_id), else the first.
          SELECT *,
            CASE WHEN {dedup} THEN first_value(trace_id) OVER (
              PARTITION BY content_hash ORDER BY len(row_reasons) = 0 DESC, trace_id) END AS first_copy
          FROM joined
        ), with_dup AS (
          SELECT * REPLACE (
              CASE WHEN first_copy IS NOT NULL AND first_copy <> trace_id
                   THEN list_append(row_reasons, {{'code': '{DUPLICATE}', 'value': 1.0::DOUBLE, 'threshold': NULL::DOUBLE,
                                                   'detail': NULL::VARCHAR}})
                   ELSE row_reasons END AS row_reasons)
          FROM deduped
        ), selected AS (
          SELECT *,
            CASE WHEN len(row_reasons) = 0 THEN
              row_number() OVER (PARTITION BY sample_id, len(row_reasons) = 0 ORDER BY preference DESC, trace_id) END AS clean_rank
          FROM with_dup
        )
        SELECT trace_id, sample_id, $source AS source, shard, rollout, teacher,
          list_concat(row_reasons, list_filter([
            CASE WHEN {str(selection.drop_unsolvable).upper()} AND pass_rate = 0
                 THEN {{'code': 'unsolvable_sample', 'value': pass_rate, 'threshold': 0.0::DOUBLE, 'detail': NULL::VARCHAR}} END,
            CASE WHEN pass_rate >= {selection.trivial_min_pass_rate!r} AND difficulty_bin <= {selection.trivial_max_difficulty_bin}
                 THEN {{'code': 'trivial_sample', 'value': pass_rate, 'threshold': {selection.trivial_min_pass_rate!r}::DOUBLE,
                        'detail': NULL::VARCHAR}} END,
            CASE WHEN clean_rank > {selection.max_traces_per_sample}
                 THEN {{'code': 'over_trace_cap', 'value': clean_rank::DOUBLE,
                                 'threshold': {float(selection.max_traces_per_sample)!r}::DOUBLE,
                        'detail': NULL::VARCHAR}} END
          ], lambda x: x IS NOT NULL)) AS reasons,
          CASE WHEN first_copy IS NOT NULL AND first_copy <> trace_id THEN first_copy ELSE near_duplicate_of END AS duplicate_of,
          coalesce(tags, []::VARCHAR[]) AS tags, coalesce(difficulty_label, 'unannotated') AS difficulty_label,
          coalesce(difficulty_score, 0.0) AS difficulty_score, coalesce(pass_rate, 0.0) AS pass_rate,
          quality, verbosity, n_tokens, preference
        FROM selected
        ORDER BY shard, sample_id, teacher, rollout
    """,
        params={"source": source},
    ).to_arrow_table()
    kept = pa.compute.equal(pa.compute.list_value_length(table.column("reasons")), 0)
    table = table.append_column("kept", kept)
    con.register("decided", table.select(["trace_id", "kept"]))
    counts = con.execute(
        f"SELECT {', '.join(f'count(*) FILTER (WHERE m.{kind}_n > 0)' for kind in MARKUP_KINDS)} "
        "FROM m JOIN decided USING (trace_id) WHERE decided.kept"
    ).fetchall()[0]  # fetchone leaves the result open
    con.unregister("decided")
    timings["decide"] = time.perf_counter() - started
    return Decisions(table, timings, {kind: n for kind, n in zip(MARKUP_KINDS, counts, strict=True) if n})


# -- per-sample flags: near duplicates and contamination ----------------------------------------------

FLAGS_SCHEMA = pa.schema(
    [
        pa.field("sample_id", pa.string()),
        pa.field("near_duplicate_of", pa.string()),
        pa.field("near_duplicate_similarity", pa.float64()),
        pa.field("question_overlap", pa.float64()),
        pa.field("image_distance", pa.float64()),
    ]
)


def sample_flags(samples: list[dict], representatives: dict[str, str], contamination: dict, min_similarity: float) -> pa.Table:
    """One row per flagged sample. `samples`: sample_id, question, near_duplicate_of; `representatives`:
    question of each representative sample (any source)."""
    from rapidfuzz import fuzz

    from omnithought_dagster.ids import normalise_text

    rows = {}
    if min_similarity <= 100:
        for sample in samples:
            other = sample.get("near_duplicate_of")
            if other and other in representatives:
                similarity = fuzz.ratio(normalise_text(sample["question"]).casefold(), normalise_text(representatives[other]).casefold())
                if similarity >= min_similarity:
                    rows[sample["sample_id"]] = {
                        "sample_id": sample["sample_id"],
                        "near_duplicate_of": other,
                        "near_duplicate_similarity": round(similarity, 2),
                    }
    for sample_id, hits in contamination.items():
        row = rows.setdefault(sample_id, {"sample_id": sample_id})
        for hit in hits:
            field = "question_overlap" if hit.code == "contaminated_question" else "image_distance"
            row[field] = hit.value
    return pa.Table.from_pylist(list(rows.values()), schema=FLAGS_SCHEMA)
