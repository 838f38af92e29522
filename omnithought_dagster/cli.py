"""The `omnithought` command: demo, stats, query and lineage over the corpus store."""

from __future__ import annotations

import base64
import datetime
import decimal
import json
import os
import sys
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text
from rich.tree import Tree

from omnithought_dagster.config import ConfigError, ProjectConfig, load_config

app = typer.Typer(add_completion=False, no_args_is_help=True, help="OmniThoughtVis distillation pipeline: inspect and run the corpus.")
# Piped output (make, CI logs) would wrap at rich's default 80 columns; tables need more.
console = Console() if sys.stdout.isatty() else Console(width=120)
err = Console(stderr=True)

ConfigOption = typer.Option(None, "--config", "-c", help="project file (default: $OMNITHOUGHT_CONFIG, else ./omnithought.yaml)")
JsonOption = typer.Option(False, "--json", help="machine-readable JSON on stdout")

# Statements a read-only query may contain; anything else (COPY, CREATE, INSERT, ATTACH, SET...) is refused.
READ_ONLY_STATEMENTS = {"SELECT", "EXPLAIN"}


def _config(path: Path | None) -> ProjectConfig:
    try:
        return load_config(path)
    except ConfigError as exc:
        err.print(f"[red]config error[/red]: {exc}")
        raise typer.Exit(2) from None


def _store(config: ProjectConfig):
    from omnithought_dagster.store import open_store

    return open_store(config.store)


@app.command()
def demo(config: Path | None = ConfigOption, force: bool = typer.Option(False, help="re-materialise even up-to-date partitions")) -> None:
    """Materialise every stage on the embedded default and summarise what each kept and dropped."""
    cfg = _config(config)
    outcomes, dagster_home = _run(cfg, force)
    failed = _print_outcomes(outcomes, "omnithought demo: what each stage took in, produced and flagged")
    scores = _score_table(_store(cfg))
    if scores is not None:
        console.print(scores)
    console.print(f"store: {cfg.store.root}   Dagster instance: {dagster_home}   browse both with `make ui`", markup=False)
    if failed:
        raise typer.Exit(1)


def _run(cfg: ProjectConfig, force: bool, only=None, out: Console | None = None) -> tuple[list, Path]:
    """run_demo on the configured Dagster instance ($DAGSTER_HOME, created with the project's dagster.yaml)."""
    dagster_home = Path(os.environ.setdefault("DAGSTER_HOME", str(Path.cwd() / ".dagster")))
    dagster_home.mkdir(parents=True, exist_ok=True)
    if not (dagster_home / "dagster.yaml").exists():  # no telemetry, the gpu pool limit
        (dagster_home / "dagster.yaml").write_text((Path(__file__).parent / "dagster.yaml").read_text())
    import dagster as dg

    from omnithought_dagster.demo import run_demo

    with dg.DagsterInstance.get() as instance:
        say = lambda line: (out or console).print(escape(line), soft_wrap=True, highlight=False)  # noqa: E731
        return run_demo(cfg, instance, force=force, say=say, only=only), dagster_home


def _print_outcomes(outcomes: list, title: str) -> bool:
    """The stages' table and notes; True when a partition or a check failed."""
    table = Table(title=title)
    for column in ("stage", "partition", "in", "out", "flagged", "checks", "run"):
        table.add_column(column, justify="right" if column in ("in", "out", "flagged") else "left")
    failed = False
    notes = []
    for o in outcomes:
        c = o.counts
        passed = sum(status == "passed" for status in o.checks.values())
        warned = sum(status == "warn" for status in o.checks.values())
        checks = (f"{passed}/{len(o.checks)} passed" + (f", {warned} warn" if warned else "")) if o.checks else "-"
        run = "up to date" if o.skipped else ("ran" if o.success else "[red]FAILED[/red]")
        failed |= not o.success or "failed" in o.checks.values()
        table.add_row(o.stage, o.partition, str(c.get("input", "?")), str(c.get("output", "?")), str(c.get("flagged", "?")), checks, run)
        label = escape(f"{o.stage}[{o.partition}]")
        if c.get("detail"):
            notes.append(f"  {label}: " + escape(c["detail"]))
        if c.get("reasons"):
            notes.append(f"  {label} flagged: " + escape(", ".join(f"{k} {v}" for k, v in c["reasons"].items())))
        if c.get("error"):
            notes.append(f"  [red]{label} failed[/red]: " + escape(c["error"]))
        for name, status in o.checks.items():
            if status == "failed":
                notes.append(f"  [red]{label} check failed[/red]: " + escape(name))
            elif status == "warn":
                notes.append(f"  [yellow]{label} check warns[/yellow]: " + escape(name))
    console.print(table)
    for line in notes:
        console.print(line, soft_wrap=True)
    return failed


def _score_table(store) -> Table | None:
    """Overall benchmark scores of every checkpoint, with deltas against the baseline."""
    con = store.catalog(["benchmark_scores"])
    rows = con.execute(
        "SELECT student, recipe, benchmark, metric, score, n, baseline_score, delta, checkpoint_id FROM benchmark_scores "
        "WHERE slice = 'all' ORDER BY student, recipe != 'base', recipe, benchmark"
    ).fetchall()
    con.close()
    if not rows:
        return None
    table = Table(title="benchmark scores (overall; per-tag slices in benchmark_scores)")
    for column in ("student", "recipe", "benchmark", "metric", "score", "n", "baseline", "delta", "checkpoint"):
        table.add_column(column, justify="right" if column in ("score", "n", "baseline", "delta") else "left")
    for student, recipe, benchmark, metric, score, n, base, delta, checkpoint in rows:
        table.add_row(
            student,
            recipe,
            benchmark,
            metric,
            f"{score:.3f}",
            str(n),
            "-" if base is None else f"{base:.3f}",
            "-" if delta is None else f"{delta:+.3f}",
            checkpoint[:12],
        )
    return table


@app.command()
def stats(config: Path | None = ConfigOption, as_json: bool = JsonOption) -> None:
    """Row counts per table and partition, quarantine reasons per source, and the cost ledger summed per stage and model."""
    from omnithought_dagster.ledger.ledger import ledger_summary
    from omnithought_dagster.store import TABLES

    store = _store(_config(config))
    con = store.catalog()
    report: dict[str, Any] = {"store": store.root_uri, "tables": {}, "quarantine_reasons": {}}
    for name, spec in TABLES.items():
        keys = ", ".join(spec.partition_by)
        rows = con.execute(f'SELECT {keys}, count(*) FROM "{name}" GROUP BY ALL ORDER BY ALL').fetchall()
        partitions = {"/".join(str(v) for v in row[:-1]): row[-1] for row in rows}
        report["tables"][name] = {"rows": sum(partitions.values()), "partitions": partitions}
    for source, reason, n in con.execute("SELECT source, reason, count(*) FROM quarantine GROUP BY ALL ORDER BY 1, 3 DESC, 2").fetchall():
        report["quarantine_reasons"].setdefault(source, {})[reason] = n
    report["costs"] = ledger_summary(con)
    if as_json:
        print(json.dumps(report, indent=2))
        return
    table = Table(title=f"corpus store {store.root_uri}")
    for column in ("table", "partition", "rows"):
        table.add_column(column, justify="right" if column == "rows" else "left")
    for name, info in report["tables"].items():
        if not info["partitions"]:
            table.add_row(name, "-", "0")
        for partition, n in info["partitions"].items():
            table.add_row(name, partition, str(n))
    console.print(table)
    if report["quarantine_reasons"]:
        reasons = Table(title="quarantine reasons")
        for column in ("source", "reason", "rows"):
            reasons.add_column(column, justify="right" if column == "rows" else "left")
        for source, by_reason in report["quarantine_reasons"].items():
            for reason, n in by_reason.items():
                reasons.add_row(source, reason, str(n))
        console.print(reasons)
    if report["costs"]:
        costs = Table(title="cost ledger (summed over partitions; cost empty where a model has no price)")
        columns = ("stage", "role", "model", "requests_ok", "requests_failed", "retries", "prompt_tokens", "completion_tokens")
        columns += ("engine_seconds", "gpu_seconds", "cost")
        for column in columns:
            costs.add_column(column.replace("_", " "), justify="left" if column in ("stage", "role", "model") else "right")
        for row in report["costs"]:
            cells = [escape(str(row[c])) for c in columns[:3]] + [str(row[c]) for c in columns[3:-1]]
            cells.append(escape(f"{row['cost']:.6f} {row['currency']}") if row["cost"] is not None else "-")
            costs.add_row(*cells)
        console.print(costs)


@app.command()
def query(
    sql: str = typer.Argument(..., help="SQL over the views (seed_pool, quarantine, images, ...)"),
    config: Path | None = ConfigOption,
    as_json: bool = JsonOption,
) -> None:
    """Run a read-only DuckDB query over the catalog views."""
    import duckdb

    con = _store(_config(config)).catalog()
    try:
        statements = duckdb.extract_statements(sql)
    except duckdb.Error as exc:
        err.print(f"[red]query error[/red]: {exc}")
        raise typer.Exit(2) from None
    refused = [s.type.name for s in statements if s.type.name not in READ_ONLY_STATEMENTS]
    if not statements or refused:
        err.print(f"[red]refused[/red]: only read-only SELECT queries are allowed (got {refused or 'nothing'})")
        raise typer.Exit(2)
    try:
        cursor = None
        for statement in statements:
            cursor = con.execute(statement)
        names = [d[0] for d in cursor.description]
        rows = cursor.fetchall()
    except duckdb.Error as exc:
        err.print(f"[red]query error[/red]: {exc}")
        raise typer.Exit(2) from None
    if as_json:
        print(json.dumps([dict(zip(names, row, strict=True)) for row in rows], default=_json_value, ensure_ascii=False))
        return
    table = Table()
    for name in names:
        table.add_column(name)
    for row in rows:
        table.add_row(*(Text(_cell(v)) for v in row))  # a cell is text: a row's "[...]" is no rich markup
    console.print(table)
    console.print(f"{len(rows)} row{'s' if len(rows) != 1 else ''}")


@app.command()
def lineage(
    ident: str | None = typer.Argument(None, help="a sample, trace, image or checkpoint id (or a unique prefix), or SOURCE/NATIVE_ID"),
    subset: str | None = typer.Option(None, "--subset", help="summarise a subset instead: what went in by tag and difficulty"),
    config: Path | None = ConfigOption,
    as_json: bool = JsonOption,
) -> None:
    """The whole story of one sample, trace, image or checkpoint - or, with --subset, of a subset."""
    from omnithought_dagster.lineage import LineageError, subset_summary
    from omnithought_dagster.lineage import lineage as trace

    store = _store(_config(config))
    if (ident is None) == (subset is None):
        err.print("[red]give an id or --subset NAME[/red]")
        raise typer.Exit(2)
    try:
        story = subset_summary(store, subset) if subset else trace(store, ident)
    except LineageError as exc:
        err.print(f"[red]not found[/red]: {exc}")
        raise typer.Exit(1) from None
    if as_json:
        print(json.dumps(story, default=_json_value, ensure_ascii=False, indent=2))
        return
    console.print(_story_tree(story))


@app.command()
def export(
    subset: str = typer.Argument(..., help="recipe name (a sampled_subsets partition)"),
    fmt: str = typer.Option("llamafactory", "--format", help="sharegpt | llamafactory | hf"),
    out: Path = typer.Option(..., "--out", help="folder to write (replaced)"),
    cutoff_len: int | None = typer.Option(
        None,
        "--cutoff-len",
        help="set aside examples longer than this many tokens "
        "(counted with the student's chat template and image tokens: needs --tokenizer)",
    ),
    tokenizer: str | None = typer.Option(
        None, "--tokenizer", help="the student's model folder: counts tokens for --cutoff-len, and its added tokens count as markup"
    ),
    config: Path | None = ConfigOption,
    as_json: bool = JsonOption,
) -> None:
    """Write a subset as training data (ShareGPT, LLaMA-Factory or HF datasets); the pre-flight sets aside what a client would misread."""
    from omnithought_dagster.curation.export import ExportError, export_subset

    cfg = _config(config)
    store = _store(cfg)
    try:
        report = export_subset(
            store, subset, fmt, out, cutoff_len=cutoff_len, tokenizer=tokenizer, clean_markup=cfg.curation.rules.markup == "clean"
        )
    except ExportError as exc:
        err.print(f"[red]export refused[/red]: {escape(str(exc))}")
        raise typer.Exit(1) from None
    summary = {
        "subset": report.subset,
        "subset_version": report.subset_version,
        "format": report.format,
        "examples": report.examples,
        "images": report.images,
        "out": str(report.out),
        "dataset_name": report.dataset_name,
        "token_counter": report.token_counter,
        "max_tokens": report.max_tokens_seen,
        "set_aside": [{"id": a.id, "reason": a.reason, "detail": a.detail} for a in report.set_aside],
    }
    if as_json:
        print(json.dumps(summary, indent=2, ensure_ascii=False))
    else:
        console.print(
            f"exported {report.examples} examples ({report.images} images) of {subset} "
            f"[{report.subset_version[:12]}] as {report.format} to {report.out}, registered as {report.dataset_name}"
        )
        for aside in report.set_aside[:20]:
            console.print(f"  set aside {aside.id[:12]}: {aside.reason}: " + escape(aside.detail))
        if len(report.set_aside) > 20:
            console.print(f"  ... and {len(report.set_aside) - 20} more (manifest.json lists them all)")


@app.command()
def report(out: Path = typer.Option(..., "--out", help="the HTML file to write"), config: Path | None = ConfigOption) -> None:
    """Write a self-contained HTML curation report (plots embedded) for people who don't open Dagster."""
    from omnithought_dagster.report import write_report

    written = write_report(_store(_config(config)), out)
    console.print(f"wrote {written.path} ({len(written.sections)} sections, {written.figures} plots)", markup=False)


experiment_app = typer.Typer(no_args_is_help=True, help="Curated recipes against their controls: differences with intervals.")
app.add_typer(experiment_app, name="experiment")


@app.command("sandbox-teacher")
def sandbox_teacher(config: Path | None = ConfigOption) -> None:
    """Train the sandbox teacher (`tiny:sandbox-teacher`, models/sandbox.py) into the project's models folder with the
    project's trainer, unless a build of the same recipe is there (~15 min on 2 CPU cores, once)."""
    import time

    from omnithought_dagster.models.sandbox import SANDBOX_TEACHER
    from omnithought_dagster.sandbox import build_sandbox_teacher

    cfg = _config(config)
    started = time.monotonic()
    say = lambda line: console.print(escape(line), highlight=False)  # noqa: E731
    folder = build_sandbox_teacher(SANDBOX_TEACHER, Path(cfg.models_dir) / SANDBOX_TEACHER.name, say=say)
    console.print(escape(f"sandbox teacher {SANDBOX_TEACHER.fingerprint[:12]}: {folder} ({time.monotonic() - started:.0f} s)"))


@experiment_app.command("run")
def experiment_run(
    name: str = typer.Argument(..., help="an experiment of the project file (experiments[].name)"),
    config: Path | None = ConfigOption,
    force: bool = typer.Option(False, help="re-materialise even up-to-date partitions"),
) -> None:
    """Materialise what one experiment needs - the curation stages, its arms' subsets, checkpoints and scores, then the
    experiment itself - skipping what is up to date, and print its results."""
    cfg = _config(config)
    if name not in [e.name for e in cfg.experiments]:
        err.print(f"no experiment {name!r} in {cfg.config_path}; experiments: {[e.name for e in cfg.experiments]}")
        raise typer.Exit(2)
    from omnithought_dagster.assets.experiment import experiment_selection

    outcomes, _ = _run(cfg, force, only=experiment_selection(cfg, name))
    failed = _print_outcomes(outcomes, f"omnithought experiment run {name}")
    if _store(cfg).has_partition("experiment_results", {"experiment": name}):
        _print_experiment(cfg, name, sql=False)
    if failed:
        raise typer.Exit(1)


def _experiment_rows(cfg: ProjectConfig, name: str) -> list[dict]:
    table = _store(cfg).read_partition("experiment_results", {"experiment": name})
    return table.to_pylist() if table is not None else []


def _number(value: float, sign: str = "") -> str:
    """Token counts whole (with thousands separators), shares and scores to 3 decimals."""
    return f"{value:{sign},.0f}" if abs(value) >= 100 else f"{value:{sign}.3f}"


def _print_experiment(cfg: ProjectConfig, name: str, sql: bool) -> None:
    """One table per student and curated recipe: each measure of the curated arm and each control, their difference and
    its 95% interval over items and seeds."""
    rows = _experiment_rows(cfg, name)
    value = {(r["measure"], r["student"], r["benchmark"], r["arm"]): r for r in rows if r["row"] == "arm" and r["slice"] == "all"}
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        if r["row"] == "difference":
            groups.setdefault((r["student"], r["curated"]), []).append(r)
    for (student, curated), differences in groups.items():
        seeds = differences[0]["seeds"]
        table = Table(title=escape(f"experiment {name}: {student} on {curated} against its controls ({seeds or '?'} seeds; 95% intervals)"))
        numbers = ("curated", "control", "difference [95%]")
        for column in ("measure", "control", *numbers, "verdict"):
            table.add_column(column, justify="right" if column in numbers else "left")
        for r in differences:
            measure = r["measure"] if r["benchmark"] == "-" else f"{r['measure']} {r['benchmark']} ({r['items'] or '?'} items)"
            first, second = (value.get((r["measure"], student, r["benchmark"], arm)) for arm in (curated, r["control"]))
            interval = "-" if r["low"] is None else f"{_number(r['estimate'], '+')} [{_number(r['low'], '+')}, {_number(r['high'], '+')}]"
            verdict = r["verdict"] if r["problem"] is None else f"{r['verdict']}: {r['problem']}"
            shown = ["-" if v is None else _number(v["estimate"]) for v in (first, second)]
            table.add_row(*(escape(cell) for cell in (measure, f"{r['control']} ({r['kind']})", *shown, interval, verdict)))
        console.print(table)
    if sql:
        for r in rows:
            if r["row"] == "difference" and r["sql"]:
                console.print(f"-- {r['measure']}: {r['curated']} vs {r['control']}, {r['student']}, {r['benchmark']}", markup=False)
                console.print(r["sql"], markup=False, highlight=False, soft_wrap=True)


@experiment_app.command("report")
def experiment_report(
    name: str | None = typer.Argument(None, help="an experiment (default: every experiment; without any, each recipe's controls)"),
    config: Path | None = ConfigOption,
    as_json: bool = JsonOption,
    replicates: int = typer.Option(2000, min=100, help="bootstrap replicates (comparisons outside experiments)"),
    sql: bool = typer.Option(False, "--sql", help="also print each comparison's DuckDB query (run it with `omnithought query`)"),
) -> None:
    """Each curated recipe against each of its controls, per student trained on both and per benchmark, from the stored
    per-item verdicts: the scores, their paired difference and its 95% bootstrap interval over items and seeds."""
    from omnithought_dagster.experiment.report import compare_controls

    cfg = _config(config)
    names = [e.name for e in cfg.experiments]
    if name is not None or names:
        if name is not None and name not in names:
            err.print(f"no experiment {name!r} in {cfg.config_path}; experiments: {names}")
            raise typer.Exit(2)
        chosen = [name] if name is not None else names
        missing = [n for n in chosen if not _experiment_rows(cfg, n)]
        if as_json:
            print(json.dumps({n: _experiment_rows(cfg, n) for n in chosen}, indent=2))
        else:
            for n in chosen:
                if n not in missing:
                    _print_experiment(cfg, n, sql)
        for n in missing:
            err.print(f"experiment {n}: no results stored yet (run `omnithought experiment run {n}`)")
        if missing:
            raise typer.Exit(1)
        return
    if not any(r.controls for r in cfg.recipes):
        err.print("no recipe names controls (recipes[].controls): nothing to compare")
        raise typer.Exit(1)
    trained_on = {s.name: cfg.student_recipes(s.name) for s in cfg.students}
    comparisons = compare_controls(_store(cfg), cfg.recipes, trained_on, cfg.evaluation.benchmarks, replicates)
    if as_json:
        rows = [
            {
                "recipe": c.recipe,
                "control": c.control,
                "kind": c.kind,
                "student": c.student,
                "benchmark": c.benchmark,
                "recipe_score": c.recipe_score,
                "control_score": c.control_score,
                "missing": list(c.missing),
                "problem": c.problem,
                **({"difference": vars(c.difference), "sql": c.sql()} if c.difference else {}),
            }
            for c in comparisons
        ]
        print(json.dumps(rows, indent=2))
        return
    table = Table(title="curated recipes against their controls (95% interval over items and seeds)")
    numbers = ("items", "scores", "difference [95%]")
    for column in ("recipe vs control", "student", "benchmark", *numbers, "verdict"):
        table.add_column(column, justify="right" if column in numbers else "left", no_wrap=column in numbers)
    unscored = []
    for c in comparisons:
        arms = f"{c.recipe} vs {c.control} ({c.kind})"
        d = c.difference
        if d is None:
            table.add_row(arms, c.student, c.benchmark, "-", "-", "-", "not comparable" if c.problem else "not scored")
            why = c.problem or f"no per-item verdicts of {', '.join(c.missing)} (benchmark_samples)"
            unscored.append(f"{c.recipe} vs {c.control}, {c.student} / {c.benchmark}: {why}")
            continue
        verdict = "better" if d.low > 0 else "worse" if d.high < 0 else "no difference shown"
        scores = f"{c.recipe_score:.3f} vs {c.control_score:.3f}"
        table.add_row(arms, c.student, c.benchmark, str(d.items), scores, f"{d.estimate:+.3f} [{d.low:+.3f}, {d.high:+.3f}]", verdict)
    console.print(table)
    for line in unscored:
        console.print(line, markup=False)
    if sql:
        for c in comparisons:
            if c.difference is not None:
                console.print(f"-- {c.recipe} vs {c.control}, {c.student}, {c.benchmark}", markup=False)
                console.print(c.sql(), markup=False, highlight=False, soft_wrap=True)


@app.command()
def teachers(
    config: Path | None = ConfigOption,
    as_json: bool = JsonOption,
    by: str = typer.Option("all", "--by", help="all | difficulty | tag: the slices shown beside each teacher's overall row"),
    source: list[str] | None = typer.Option(None, "--source", help="only these sources (repeatable); default every source"),
    sql: bool = typer.Option(False, "--sql", help="also print the DuckDB query the numbers come from (`omnithought query` runs it)"),
) -> None:
    """Every teacher side by side from the stored rows: accuracy against the reference, pass rate, the judge's quality and
    verbosity, kept share and drop reasons, tokens, latency, and cost per 1,000 kept traces (the cost ledger)."""
    from omnithought_dagster.teacher.report import TEACHER_REPORT_SQL, teacher_report

    if by not in ("all", "difficulty", "tag"):
        err.print(f"--by: {by!r} is not one of all, difficulty, tag")
        raise typer.Exit(2)
    cfg = _config(config)
    report = teacher_report(_store(cfg).catalog(), source or None)
    if not report.rows:
        err.print("no traces stored yet: materialise cot_traces first (`omnithought demo`)")
        raise typer.Exit(1)
    if as_json:
        print(json.dumps({"rows": report.rows, "drop_reasons": report.drop_reasons}, indent=2, default=str))
        return
    shown = [r for r in report.rows if r["slice_kind"] == "all" or r["slice_kind"] == by]
    table = Table(title="teachers side by side" + (escape(f" (sources: {', '.join(source)})") if source else ""))
    numbers = ("traces", "accuracy", "pass rate", "quality", "verbosity", "kept", "tokens/trace", "latency s", "cost / 1k kept")
    widest = max(len(r["teacher"]) for r in shown)
    table.add_column("teacher", min_width=min(widest, 40), overflow="fold")
    table.add_column("slice", overflow="fold")
    for column in numbers:
        table.add_column(column, justify="right")
    for r in shown:
        cost = r["cost_per_1000_kept"]
        table.add_row(
            escape(r["teacher"]),
            escape(r["slice"] if r["slice_kind"] == "all" else f"{r['slice_kind']} {r['slice']}"),
            str(r["traces"]),
            _share(r["accuracy"]),
            _share(r["pass_rate"]),
            _share(r["judge_quality"]),
            _share(r["judge_verbosity"]),
            f"{r['kept']} ({_share(r['kept_share'])})",
            _share(r["tokens_per_trace"]),
            _share(r["latency_s"]),
            escape(f"{cost:.4f} {r['currency']}") if cost is not None else ("unpriced" if r["slice_kind"] == "all" else ""),
        )
    console.print(table)
    for r in report.overall:
        console.print(f"{r['teacher']} judged by: {r['judged_by'] or '-'}", markup=False)
    for teacher, reasons in report.drop_reasons.items():
        top = ", ".join(f"{code} {n}" for code, n in list(reasons.items())[:6])
        console.print(f"{teacher} dropped: {top}", markup=False)
    if sql:
        console.print(TEACHER_REPORT_SQL, markup=False, highlight=False, soft_wrap=True)


def _share(value: float | None) -> str:
    return "-" if value is None else _number(value)


@app.command()
def estimate(
    config: Path | None = ConfigOption,
    as_json: bool = JsonOption,
    share: float = typer.Option(0.1, min=0.0, max=1.0, help="share of the seed samples measured"),
    min_samples: int = typer.Option(8, min=1, help="measure at least this many samples"),
) -> None:
    """Tokens, engine time and money the project's teachers and judges will cost, measured on a sample before the run: the
    seed stage runs (cheap), every teacher and judge answers the sample's requests (the run later finds them cached: nothing
    is paid twice), and each model's cost per request is scaled to the requests the run will send."""
    from omnithought_dagster.annotate.judge import judge_prompt
    from omnithought_dagster.annotate.taxonomy import Taxonomy
    from omnithought_dagster.assets.annotate import judge_plans
    from omnithought_dagster.assets.seed import SEED_POOL_KEY
    from omnithought_dagster.assets.teacher import teacher_plans
    from omnithought_dagster.ids import shard_keys
    from omnithought_dagster.ledger.estimate import estimate as measure
    from omnithought_dagster.llm.vllm_server import keep_servers
    from omnithought_dagster.resources import LLMResource

    cfg = _config(config)
    outcomes, _ = _run(cfg, False, only=lambda key, _partition: key == SEED_POOL_KEY, out=err if as_json else None)
    if any(not o.success for o in outcomes):
        _print_outcomes(outcomes, "omnithought estimate: the seed stage failed")
        raise typer.Exit(1)
    resource = LLMResource()
    with keep_servers():  # one engine start per model for the whole sample
        result = measure(
            _store(cfg),
            cfg.source_names,
            shard_keys(cfg.generation.shards),
            teacher_plans(cfg, resource),
            judge_plans(cfg, resource),
            judge_prompt(cfg.annotation),
            cfg.annotation,
            Taxonomy.load(cfg.annotation.taxonomy),
            cfg.costs,
            share=share,
            min_samples=min_samples,
        )
    if as_json:
        print(json.dumps(result.as_dict(), indent=2))
        return
    table = Table(title=f"estimate: {result.samples} samples, measured on {result.measured_samples}")
    numbers = ("planned requests", "measured", "prompt tokens", "completion tokens", "engine s", "cost")
    for column in ("role", "model", *numbers):
        table.add_column(column, justify="right" if column in numbers else "left")
    for m in result.models:
        cost = escape(f"{m.cost:.6f} {m.currency}") if m.cost is not None else "unpriced"
        engine = f"{m.engine_seconds:,.0f}" if m.engine_seconds is not None else "-"
        table.add_row(
            m.role,
            escape(m.model),
            f"{m.planned_requests:,}",
            f"{m.measured_requests:,}",
            f"{m.prompt_tokens:,}",
            f"{m.completion_tokens:,}",
            engine,
            cost,
        )
    console.print(table)
    total = result.cost
    console.print(
        f"total: {total:.6f} {cfg.costs.currency}" if total is not None else "total: unknown (a model has no price in costs.prices)",
        markup=False,
    )


@app.command()
def doctor(
    env: list[str] | None = typer.Option(None, "--env", help="dagster | vllm | lmms (repeatable); default all"),
    profile: str | None = typer.Option(None, "--profile", help="cpu | gpu; default: the profile the environments were installed with"),
    smoke: bool = typer.Option(False, "--smoke", help="also run each environment's smoke check (a real, tiny piece of its job)"),
    imports: bool = typer.Option(False, "--imports", help="also import what each environment's job imports (no GPU needed)"),
    root: Path | None = typer.Option(None, "--root", help="the project checkout (default: $OMNITHOUGHT_ROOT, else .)"),
) -> None:
    """Compare each environment with its lock (every drifted package named); with --smoke, exercise it."""
    from omnithought_dagster import doctor as doc

    base = root.resolve() if root else doc.default_root()
    names = env or list(doc.ENVIRONMENTS)
    unknown = sorted(set(names) - set(doc.ENVIRONMENTS))
    if unknown:
        err.print(f"[red]unknown environment[/red] {unknown}; choose from {sorted(doc.ENVIRONMENTS)}")
        raise typer.Exit(2)
    broken = False
    for name in names:
        environment = doc.ENVIRONMENTS[name]
        used = profile or doc.installed_profile(environment, base)
        lock = environment.lock(base, used).relative_to(base)
        try:
            drift = doc.environment_drift(environment, base, used)
        except (OSError, ValueError, RuntimeError) as exc:
            console.print(f"[red]{name}[/red] ({environment.venv}): {escape(str(exc))}", soft_wrap=True)
            broken = True
            continue
        if drift:
            broken = True
            console.print(
                f"[red]{name}[/red] ({environment.venv}) differs from {lock} in {len(drift)} packages "
                f"(`make env PROFILE={used}` re-syncs it):"
            )
            for line in drift:
                console.print(f"  {escape(str(line))}", soft_wrap=True)
        else:
            console.print(f"{name} ({environment.venv}, {environment.purpose}): matches {lock}", soft_wrap=True)
        if imports and not drift:
            try:
                console.print(
                    f"{name} imports: {escape(doc.check_imports(environment, base, base / '.cache' / 'imports' / name))}", soft_wrap=True
                )
            except doc.SmokeError as exc:
                console.print(f"[red]{name} imports failed[/red]: {escape(str(exc))}", soft_wrap=True)
                broken = True
                continue
        if smoke and not drift:
            try:
                summary = doc.smoke(environment, base, base / ".cache" / "smoke" / name, log=lambda line: console.print(escape(line)))
            except doc.SmokeError as exc:
                console.print(f"[red]{name} smoke check failed[/red]: {escape(str(exc))}", soft_wrap=True)
                broken = True
                continue
            console.print(f"{name} smoke check: {escape(summary)}", soft_wrap=True)
    if broken:
        raise typer.Exit(1)


@app.command()
def tables() -> None:
    """Print the reference of every store table (columns, types, meaning) as markdown."""
    from omnithought_dagster.store.tables import tables_markdown

    print(tables_markdown(), end="")


def _story_tree(story: dict) -> Tree:
    if story["kind"] == "subset":
        tree = Tree(
            f"[bold]subset[/bold] {story['subset']}  version {story['subset_version']}: "
            f"{story['members']} traces of {story['samples']} samples"
        )
        for title, key in (("by difficulty", "by_difficulty"), ("by primary tag", "by_tag"), ("by source", "by_source")):
            branch = tree.add(title)
            for name, n in story[key].items():
                branch.add(f"{escape(str(name))}: {n}")
        return tree
    if story["kind"] == "trace":
        t = story["trace"]
        tree = Tree(f"[bold]trace[/bold] {story['trace_id']}  rollout {t['rollout']} of sample {t['sample_id']}")
        tree.add(f"teacher {t['teacher']}, prompt {t['prompt_version']}; {t['source']}/{t['shard']}")
        tree.add(
            f"finish: {t['finish_reason']}, {t['n_tokens']} tokens, {t['attempts']} attempt(s)"
            + (f", error: {escape(str(t['error']))}" if t["error"] else "")
        )
        tree.add("final answer: " + escape(str(t["final_answer"])))
        tree.add("reasoning: " + escape(_short(t["reasoning"] or "", 200)))
        if story.get("annotation"):
            tree.add(_annotation_line(story["annotation"]))
        record = story["sample"]["kept"]
        if record:
            sample = tree.add(f"from sample {record['sample_id']}: source {record['source']}, native id {escape(str(record['native_id']))}")
            sample.add("question: " + escape(_short(record["question"], 200)))
            sample.add(f"reference answer ({record['answer_type']}): {escape(record['answer'])}")
            for image in story["sample"]["images"]:
                sample.add(f"image {image['image_id']}  {escape(str(image['uri']))}")
        return tree
    if story["kind"] == "checkpoint":
        return _checkpoint_tree(story)
    if story["kind"] == "image":
        tree = Tree(f"[bold]image[/bold] {story['image_id']}")
        tree.add(
            f"{story.get('width')}x{story.get('height')} {story.get('format')} {story.get('n_bytes')} bytes, phash {story.get('phash')}"
        )
        tree.add(f"stored at {escape(str(story['uri']))} ({'present' if story['in_store'] else '[red]MISSING[/red]'})")
        used = tree.add(f"used by {len(story['used_by'])} sample(s)")
        for row in story["used_by"]:
            used.add(f"{row['sample_id']}  {row['source']}/{escape(str(row['native_id']))}")
        return tree
    tree = Tree(f"[bold]sample[/bold] {story['sample_id']}  [{'green' if story['status'] == 'kept' else 'red'}]{story['status']}[/]")
    record = story["kept"]
    if record:
        origin = tree.add(
            f"from source [bold]{record['source']}[/bold], native id {escape(str(record['native_id']))}, record #{record['record_index']}"
        )
        origin.add("question: " + escape(_short(record["question"], 200)))
        if record["choices"]:
            origin.add("choices: " + escape("  ".join(f"{chr(65 + i)}. {c}" for i, c in enumerate(record["choices"]))))
        origin.add(f"answer ({record['answer_type']}): {escape(record['answer'])}")
        if record["source_tags"]:
            origin.add(f"source tags: {escape(', '.join(record['source_tags']))}; difficulty {record['source_difficulty']}")
        images = tree.add(f"{len(story['images'])} image(s)")
        for image in story["images"]:
            state = "" if image["in_store"] else " [red]MISSING FROM STORE[/red]"
            images.add(
                f"{image['image_id']}  {image.get('width')}x{image.get('height')} {image.get('format')}  {escape(str(image['uri']))}{state}"
            )
        if story["near_duplicate_of"]:
            near = story["near_duplicate_of"]
            tree.add(
                f"near duplicate (phash distance {near['distance']}) of {near['sample_id']} "
                f"{near.get('source', '')}/{escape(str(near.get('native_id', '')))}"
            )
        for other in story["also_kept_by"]:
            tree.add(f"[red]also kept by {other}[/red] (cross-source duplicate: re-materialise the later source)")
    if story.get("traces"):
        traces = tree.add(f"{len(story['traces'])} teacher trace(s)")
        for t in story["traces"]:
            branch = traces.add(
                f"{t['trace_id']}  rollout {t['rollout']} {t['finish_reason']}: " + escape(_short(str(t["final_answer"]), 60))
            )
            if t.get("annotation"):
                branch.add(_annotation_line(t["annotation"]))
            if t.get("verdict"):
                verdict = t["verdict"]
                reasons = ", ".join(
                    f"{r['code']} ({_fmt(r['value'])} vs {_fmt(r['threshold'])}{', ' + escape(r['detail']) if r.get('detail') else ''})"
                    for r in verdict["reasons"]
                )
                branch.add("[green]kept[/green]" if verdict["kept"] else "[red]dropped[/red]: " + escape(reasons))
            if t.get("subsets"):
                branch.add("in subsets: " + ", ".join(t["subsets"]))
    if story.get("checkpoints"):
        trained = tree.add(f"trained {len({c['checkpoint_id'] for c in story['checkpoints']})} checkpoint(s)")
        for c in story["checkpoints"]:
            trained.add(f"{c['checkpoint_id']}  {c['student']} on {c['recipe']} (trace {c['trace_id'][:12]})")
    for row in story["quarantine"]:
        branch = tree.add(
            f"[yellow]quarantined[/yellow] {row['source']}/{escape(str(row['native_id']))} (record #{row['record_index']}): "
            f"[bold]{row['reason']}[/bold]"
        )
        branch.add(escape(str(row["detail"])))  # the detail quotes the record ('[INST]' would be rich markup)
    return tree


def _checkpoint_tree(story: dict) -> Tree:
    c = story["checkpoint"]
    what = "untrained baseline" if c["baseline"] else f"trained on recipe {c['recipe']}"
    tree = Tree(f"[bold]checkpoint[/bold] {story['checkpoint_id']}  student {c['student']}, {what}")
    tree.add(f"base model {escape(str(c['base_model']))}; stored at {escape(str(c['uri']))}")
    if not c["baseline"]:
        tree.add(
            f"{c['steps']} steps on {c['examples']} examples ({c['launcher']}), loss {_fmt(c['initial_loss'])} -> {_fmt(c['final_loss'])}, "
            f"{_fmt(c['tokens_per_s'])} tokens/s; train config {c['train_config_hash']}"
        )
        method = story.get("method") or {"name": "sft"}
        tree.add("method: " + escape(", ".join([method["name"], *(f"{k}={v}" for k, v in method.items() if k != "name")])))
        if story["training"]:
            tree.add("settings: " + ", ".join(f"{k}={v}" for k, v in story["training"].items()))
        on = story["trained_on"]
        data = tree.add(
            f"subset {on['subset']} version {on['subset_version']}: {on['traces']} traces of {on['samples']} samples"
            + ("" if on["in_store"] else " [red](that version is no longer in the store)[/red]")
        )
        for title, key in (
            ("by source", "samples_by_source"),
            ("by primary tag", "samples_by_tag"),
            ("by difficulty", "samples_by_difficulty"),
        ):
            data.add(f"{title}: " + escape(", ".join(f"{k} {n}" for k, n in on[key].items())))
    scores = tree.add(f"{len(story['scores'])} score(s)")
    for r in story["scores"]:
        delta = "" if r["delta"] is None else f" ({r['delta']:+.3f} vs baseline)"
        scores.add(escape(f"{r['benchmark']} {r['metric']} [{r['slice']}]: {r['score']:.3f} over {r['n']}{delta}"))
    return tree


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:g}" if isinstance(value, float) else str(value)


def _annotation_line(a: dict) -> str:
    verdict = "[green]correct[/green]" if a["correct"] else "[red]wrong[/red]"
    judge = (
        (
            f"judge {a['annotator']}: difficulty {a['difficulty']}, verbosity {a['verbosity']}, quality {a['quality']}, "
            f"tags {', '.join(a['tags'])}"
        )
        if a["judge_error"] is None
        else "judge error: " + escape(a["judge_error"])
    )
    return (
        f"{verdict} ({a['verify_method']}), sample pass rate {a['pass_rate']:.2f}, difficulty {a['difficulty_label']} "
        f"({a['difficulty_score']:.1f}); " + judge
    )


def _json_value(value: Any) -> Any:
    if isinstance(value, (datetime.date, datetime.datetime, datetime.time)):
        return value.isoformat()
    if isinstance(value, decimal.Decimal):
        return float(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return base64.b64encode(bytes(value)).decode("ascii")
    return str(value)


def _cell(value: Any) -> str:
    return _short("" if value is None else str(value), 120)


def _short(text: str, limit: int) -> str:
    text = text.replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def main() -> None:  # pragma: no cover - console entry
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
