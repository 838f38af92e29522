"""`omnithought report`: a self-contained HTML curation report for people who do not open Dagster.

One file (plots embedded as PNG data URIs, no network): what each stage took in and kept,
quarantine and drop reasons, difficulty / tag / pass-rate distributions, subset composition,
training loss curves and scores with their deltas. Everything is read from the store through
the DuckDB catalog; sections whose tables are empty say so. No Dagster here.
"""

from __future__ import annotations

import html
import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from omnithought_dagster.ledger.ledger import ledger_summary
from omnithought_dagster.plots import bar, barh, curves, histogram, png_base64
from omnithought_dagster.store import CorpusStore
from omnithought_dagster.teacher.report import teacher_report

TOP_TAGS = 15


@dataclass
class Report:
    path: Path
    sections: list[str] = field(default_factory=list)
    figures: int = 0


def write_report(store: CorpusStore, out: str | Path, *, title: str = "omnithought curation report") -> Report:
    con = store.catalog()
    report = Report(Path(out))
    parts: list[str] = []

    def section(name: str, body: list[str]) -> None:
        report.sections.append(name)
        parts.append(f"<section><h2>{html.escape(name)}</h2>{''.join(body)}</section>")

    def figure(draw, caption: str) -> str:
        report.figures += 1
        image = f"<img alt='{html.escape(caption)}' src='data:image/png;base64,{png_base64(draw)}'>"
        return f"<figure>{image}<figcaption>{html.escape(caption)}</figcaption></figure>"

    def rows(sql: str, params: list | None = None) -> list[tuple]:
        return con.execute(sql, params or []).fetchall()

    # Stage overview
    overview = [
        ("seed_pool", rows("SELECT count(*) FROM seed_pool")[0][0], rows("SELECT count(*) FROM quarantine")[0][0]),
        (
            "cot_traces",
            rows("SELECT count(*) FROM cot_traces")[0][0],
            rows("SELECT count(*) FROM cot_traces WHERE finish_reason IN ('error', 'length')")[0][0],
        ),
        ("annotations", rows("SELECT count(*) FROM annotations")[0][0], rows("SELECT count(judge_error) FROM annotations")[0][0]),
        (
            "filtered_set",
            rows("SELECT count(*) FILTER (kept) FROM filter_decisions")[0][0],
            rows("SELECT count(*) FILTER (NOT kept) FROM filter_decisions")[0][0],
        ),
        ("subset_members", rows("SELECT count(*) FROM subset_members")[0][0], 0),
        ("student_checkpoints", rows("SELECT count(*) FROM student_checkpoints")[0][0], 0),
        ("benchmark_scores", rows("SELECT count(*) FROM benchmark_scores")[0][0], 0),
    ]
    section("Stages", [_table(["table", "rows kept / written", "set aside / failed"], overview)])

    # Seed pool and quarantine
    sources = rows("SELECT source, count(*) FROM seed_pool GROUP BY 1 ORDER BY 1")
    reasons = rows("SELECT reason, count(*) FROM quarantine GROUP BY 1 ORDER BY 2 DESC")
    body = [_table(["source", "samples"], sources)]
    if reasons:
        body.append(figure(lambda ax: barh(ax, reasons, "records"), "quarantine reasons (records set aside at ingestion)"))
    section("Seed pool", body if sources else ["<p>empty: materialise seed_pool</p>"])

    # Annotations
    labels = rows(
        "SELECT difficulty_label, count(DISTINCT sample_id) FROM annotations WHERE difficulty_label IS NOT NULL GROUP BY 1 ORDER BY 1"
    )
    tags = rows(f"SELECT t, count(*) FROM annotations, unnest(tags) AS u(t) GROUP BY 1 ORDER BY 2 DESC, 1 LIMIT {TOP_TAGS}")
    pass_rates = [r[0] for r in rows("SELECT any_value(pass_rate) FROM annotations WHERE pass_rate IS NOT NULL GROUP BY sample_id")]
    body = []
    if labels:
        body.append(figure(lambda ax: bar(ax, labels, "samples"), "samples by difficulty label"))
    if tags:
        body.append(figure(lambda ax: barh(ax, tags, "traces"), f"judge task tags (top {TOP_TAGS})"))
    if pass_rates:
        body.append(
            figure(lambda ax: histogram(ax, pass_rates, "pass rate", "samples", value_range=(0, 1)), "rollout pass rate per sample")
        )
    section("Annotations", body or ["<p>empty: materialise annotations</p>"])

    # Filtering
    drops = rows("SELECT r.code, count(*) FROM filter_decisions, unnest(reasons) AS u(r) GROUP BY 1 ORDER BY 2 DESC, 1")
    kept = rows("SELECT source, count(*) FILTER (kept), count(*) FROM filter_decisions GROUP BY 1 ORDER BY 1")
    body = [_table(["source", "kept", "traces"], kept)] if kept else []
    if drops:
        body.append(figure(lambda ax: barh(ax, drops, "traces"), "drop reasons (a trace can have several)"))
    section("Filtered set", body or ["<p>empty: materialise filtered_set</p>"])

    # Teachers side by side, and the cost ledger
    teachers = teacher_report(con)
    body = []
    if teachers.rows:
        body.append(
            _table(
                [
                    "teacher",
                    "traces",
                    "accuracy",
                    "pass rate",
                    "judge quality",
                    "verbosity",
                    "kept",
                    "kept share",
                    "tokens/trace",
                    "latency s",
                    "cost / 1000 kept",
                    "judged by",
                ],
                [
                    (
                        r["teacher"],
                        r["traces"],
                        r["accuracy"],
                        r["pass_rate"],
                        r["judge_quality"],
                        r["judge_verbosity"],
                        r["kept"],
                        r["kept_share"],
                        r["tokens_per_trace"],
                        r["latency_s"],
                        r["cost_per_1000_kept"],
                        r["judged_by"],
                    )
                    for r in teachers.overall
                ],
            )
        )
        by_label = [(f"{r['teacher']} {r['slice']}", r["accuracy"] or 0.0) for r in teachers.rows if r["slice_kind"] == "difficulty"]
        if len(teachers.overall) > 1 and by_label:
            body.append(figure(lambda ax: barh(ax, by_label, "accuracy"), "accuracy against the reference, by teacher and difficulty"))
        reasons = [(t, code, n) for t, codes in teachers.drop_reasons.items() for code, n in codes.items()]
        if reasons:
            body.append(_table(["teacher", "drop reason", "traces"], reasons))
    section("Teachers", body or ["<p>empty: materialise cot_traces</p>"])
    costs = ledger_summary(con)
    section(
        "Costs",
        [
            _table(
                [
                    "stage",
                    "role",
                    "model",
                    "requests ok",
                    "failed",
                    "retries",
                    "prompt tokens",
                    "completion tokens",
                    "engine s",
                    "GPU s",
                    "cost",
                    "unpriced partitions",
                ],
                [
                    (
                        c["stage"],
                        c["role"],
                        c["model"],
                        c["requests_ok"],
                        c["requests_failed"],
                        c["retries"],
                        c["prompt_tokens"],
                        c["completion_tokens"],
                        c["engine_seconds"],
                        c["gpu_seconds"],
                        None if c["cost"] is None else f"{c['cost']:.6f} {c['currency']}",
                        c["unpriced_partitions"],
                    )
                    for c in costs
                ],
            )
        ]
        if costs
        else ["<p>no ledger yet: materialise a model stage</p>"],
    )

    # Subsets
    subsets = rows(
        "SELECT subset, any_value(subset_version), count(*), count(DISTINCT sample_id) FROM subset_members GROUP BY 1 ORDER BY 1"
    )
    body = [_table(["recipe", "subset_version", "traces", "samples"], subsets)] if subsets else []
    for subset, *_ in subsets:
        composition = rows(
            "SELECT split_part(stratum, '/', 1) AS label, count(*) FROM subset_members WHERE subset = $1 GROUP BY 1 ORDER BY 1", [subset]
        )
        body.append(figure(lambda ax, c=composition: bar(ax, c, "traces"), f"{subset}: members by difficulty"))
    section("Subsets", body or ["<p>empty: materialise sampled_subsets</p>"])

    # Students
    checkpoints = rows(
        "SELECT checkpoint_id, student, recipe, baseline, steps, initial_loss, final_loss, tokens_per_s FROM student_checkpoints "
        "ORDER BY student, recipe"
    )
    body = (
        [
            _table(
                ["checkpoint", "student", "recipe", "baseline", "steps", "initial loss", "final loss", "tokens/s"],
                [(c[0][:12], *c[1:]) for c in checkpoints],
            )
        ]
        if checkpoints
        else []
    )
    losses = {f"{c[1]}/{c[2]}": _losses(store, c[0]) for c in checkpoints if not c[3]}
    losses = {k: v for k, v in losses.items() if v}
    if losses:
        body.append(figure(lambda ax: curves(ax, losses), "training loss"))
    section("Students", body or ["<p>none trained yet</p>"])

    # Scores
    scores = rows(
        "SELECT student, recipe, benchmark, metric, slice, score, n, baseline_score, delta FROM benchmark_scores "
        "ORDER BY student, recipe != 'base', recipe, benchmark, slice != 'all', slice"
    )
    body = [_table(["student", "recipe", "benchmark", "metric", "slice", "score", "n", "baseline", "delta"], scores)] if scores else []
    deltas = [(f"{r[0]}/{r[1]} {r[4]}", r[8]) for r in scores if r[8] is not None and r[1] != "base"]
    if deltas:
        body.append(figure(lambda ax: barh(ax, deltas, "delta vs baseline"), "score deltas against each student's baseline, by slice"))
    section("Scores", body or ["<p>none scored yet</p>"])
    con.close()

    stamp = datetime.now(UTC).isoformat(timespec="seconds")
    document = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>{_CSS}</style></head><body>"
        f"<h1>{html.escape(title)}</h1><p class='meta'>store {html.escape(store.root_uri)} - written {stamp}</p>"
        + "".join(parts)
        + "</body></html>"
    )
    report.path.parent.mkdir(parents=True, exist_ok=True)
    report.path.write_text(document, encoding="utf-8")
    return report


def _losses(store: CorpusStore, checkpoint_id: str) -> list[float]:
    if not store.checkpoints.exists(checkpoint_id):
        return []
    try:
        with store.fs.open_input_stream(f"{store.checkpoints.path(checkpoint_id)}/train_log.json") as stream:
            return list(json.loads(stream.read())["losses"])
    except (OSError, KeyError, ValueError):
        return []


def _table(header: list[str], body: list[tuple]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    lines = "".join("<tr>" + "".join(f"<td>{html.escape(_cell(v))}</td>" for v in row) + "</tr>" for row in body)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{lines}</tbody></table>"


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


_CSS = (
    "body{font-family:system-ui,sans-serif;max-width:980px;margin:2em auto;color:#222}h1{margin-bottom:0}.meta{color:#777}"
    "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ddd;padding:3px 8px;text-align:right}"
    "th{background:#f4f4f4}figure{margin:1em 0}figcaption{color:#555;font-size:.9em}section{margin-top:2em}"
)
