"""The teacher report: every teacher side by side, overall, by difficulty and by tag, from the stored rows alone.

Per teacher and slice: traces and samples, accuracy against the reference answer (annotations.correct), pass rate (the share
of samples one of its rollouts solved), the judge's mean quality and verbosity (and who judged), kept share (filter_decisions),
generated tokens per trace, latency; overall also its drop reasons and its cost from the cost ledger (money per 1,000 kept
traces). One DuckDB query over cot_traces, annotations, filter_decisions and cost_ledger: `TEACHER_REPORT_SQL` is what a
reader runs to get the same numbers. No Dagster here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# $sources: a list of source names, or NULL for every source.
TEACHER_REPORT_SQL = """
WITH t AS (
  SELECT trace_id, sample_id, source, teacher, n_tokens, latency_s FROM cot_traces
  WHERE $sources IS NULL OR list_contains($sources, source)
), j AS (
  SELECT t.*, a.correct, a.quality, a.verbosity, a.annotator, coalesce(a.difficulty_label, 'unannotated') AS difficulty_label,
         coalesce(a.tags, []::VARCHAR[]) AS tags, f.kept
  FROM t LEFT JOIN annotations a USING (trace_id) LEFT JOIN filter_decisions f USING (trace_id)
), sliced AS (
  SELECT * EXCLUDE (tags), 'all' AS slice_kind, 'all' AS slice FROM j
  UNION ALL SELECT * EXCLUDE (tags), 'difficulty', difficulty_label FROM j
  UNION ALL SELECT * EXCLUDE (tags, tag), 'tag', tag
            FROM (SELECT *, unnest(CASE WHEN len(tags) > 0 THEN tags ELSE ['untagged'] END) AS tag FROM j)
), solved AS (
  SELECT teacher, slice_kind, slice, avg(solved::INT) AS pass_rate
  FROM (SELECT teacher, slice_kind, slice, sample_id, bool_or(correct) AS solved FROM sliced GROUP BY ALL)  -- unjudged: NULL, skipped
  GROUP BY ALL
), ledger AS (
  SELECT model AS teacher, sum(prompt_tokens) AS prompt_tokens, sum(completion_tokens) AS completion_tokens,
         sum(engine_seconds) AS engine_seconds, sum(gpu_seconds) AS gpu_seconds,
         CASE WHEN count(DISTINCT currency) = 1 THEN any_value(currency) ELSE 'mixed' END AS currency,
         CASE WHEN count(*) = count(cost) AND count(DISTINCT currency) = 1 THEN sum(cost) END AS cost
  FROM cost_ledger
  WHERE stage = 'cot_traces' AND role = 'teacher' AND ($sources IS NULL OR list_contains($sources, split_part(partition, '|', 2)))
  GROUP BY ALL
)
SELECT s.teacher, s.slice_kind, s.slice, count(*) AS traces, count(DISTINCT s.sample_id) AS samples,
       avg(s.correct::INT) AS accuracy, any_value(p.pass_rate) AS pass_rate,
       avg(s.quality) AS judge_quality, avg(s.verbosity) AS judge_verbosity, string_agg(DISTINCT s.annotator, ', ') AS judged_by,
       count(*) FILTER (s.kept) AS kept, count(s.kept) AS decided, count(*) FILTER (s.kept) / nullif(count(s.kept), 0) AS kept_share,
       avg(s.n_tokens) AS tokens_per_trace, avg(s.latency_s) AS latency_s, median(s.latency_s) AS latency_p50_s,
       CASE WHEN s.slice_kind = 'all' THEN any_value(l.prompt_tokens) END AS prompt_tokens,
       CASE WHEN s.slice_kind = 'all' THEN any_value(l.completion_tokens) END AS completion_tokens,
       CASE WHEN s.slice_kind = 'all' THEN any_value(l.engine_seconds) END AS engine_seconds,
       CASE WHEN s.slice_kind = 'all' THEN any_value(l.cost) END AS cost,
       any_value(l.currency) AS currency,
       CASE WHEN s.slice_kind = 'all' AND count(*) FILTER (s.kept) > 0
            THEN any_value(l.cost) / count(*) FILTER (s.kept) * 1000 END AS cost_per_1000_kept
FROM sliced s LEFT JOIN solved p USING (teacher, slice_kind, slice) LEFT JOIN ledger l USING (teacher)
GROUP BY s.teacher, s.slice_kind, s.slice
ORDER BY s.teacher, s.slice_kind = 'all' DESC, s.slice_kind, s.slice
"""

DROP_REASONS_SQL = """
SELECT t.teacher, r.code, count(DISTINCT t.trace_id) AS traces
FROM cot_traces t JOIN filter_decisions f USING (trace_id), unnest(f.reasons) AS u(r)
WHERE NOT f.kept AND ($sources IS NULL OR list_contains($sources, t.source))
GROUP BY ALL ORDER BY t.teacher, traces DESC, r.code
"""


@dataclass
class TeacherReport:
    rows: list[dict] = field(default_factory=list)  # per teacher and slice (slice_kind all | difficulty | tag)
    drop_reasons: dict[str, dict[str, int]] = field(default_factory=dict)  # teacher -> reason code -> traces

    @property
    def overall(self) -> list[dict]:
        return [row for row in self.rows if row["slice_kind"] == "all"]

    @property
    def teachers(self) -> list[str]:
        return [row["teacher"] for row in self.overall]


def teacher_report(con, sources: list[str] | None = None) -> TeacherReport:
    """The report over a catalog connection (store.catalog()), for every source or these."""
    params = {"sources": sources}
    cursor = con.execute(TEACHER_REPORT_SQL, params)
    names = [d[0] for d in cursor.description]
    rows = [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]
    reasons: dict[str, dict[str, int]] = {}
    for teacher, code, n in con.execute(DROP_REASONS_SQL, params).fetchall():
        reasons.setdefault(teacher, {})[code] = n
    return TeacherReport(rows, reasons)
