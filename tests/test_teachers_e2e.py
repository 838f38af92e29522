"""Two tiny teachers (examples/teachers: one layer apart, other random weights) end to end on real vLLM servers: each writes
its own rollouts, each judges the other's traces, and the teacher report and the cost ledger show them side by side - in
the filtered set's metadata, `omnithought teachers`, `omnithought stats` and the HTML report."""

from __future__ import annotations

import json

import dagster as dg
import pytest
import yaml
from typer.testing import CliRunner

from omnithought_dagster.cli import app
from omnithought_dagster.config import load_config
from omnithought_dagster.demo import run_demo
from omnithought_dagster.report import write_report
from omnithought_dagster.store import open_store

from conftest import REPO, VLLM_PYTHON, rewrite_partition, run_partition_checks

pytestmark = pytest.mark.slow


def test_two_tiny_teachers_side_by_side(tmp_path, instance):
    document = yaml.safe_load((REPO / "examples" / "teachers" / "omnithought.yaml").read_text())
    document["store"]["root"] = str(tmp_path / "store")
    document["models_dir"] = str(REPO / ".cache" / "models")
    document["sources"][0]["n_samples"] = 40
    for teacher in document["teachers"]:
        teacher["python"] = str(VLLM_PYTHON)
    document["recipes"] = [{**r, "size": 2} if "size" in r else r for r in document["recipes"]]
    for section in ("students", "experiments", "benchmarks", "evaluation", "training"):  # the teacher arm trains: tested elsewhere
        document.pop(section)
    # The random teachers' gibberish: one unexportable trace of two would fail the subset (not what this test is about).
    document["curation"]["max_set_aside_share"] = 1.0
    path = tmp_path / "omnithought.yaml"
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    config = load_config(path)

    outcomes = run_demo(config, instance)
    failed = [(o.stage, o.partition, o.counts.get("error")) for o in outcomes if not o.success]
    assert not failed, failed
    store = open_store(config.store)
    con = store.catalog()
    # Each teacher its own rollouts (4 and 2) of every sample; each judged by the other.
    assert con.execute(
        "SELECT teacher, count(*), count(DISTINCT sample_id), max(rollout) FROM cot_traces GROUP BY 1 ORDER BY 1"
    ).fetchall() == [
        ("teacher-a", 160, 40, 3),
        ("teacher-b", 80, 40, 1),
    ]
    assert con.execute(
        "SELECT t.teacher, a.annotator, count(*) FROM cot_traces t JOIN annotations a USING (trace_id) GROUP BY ALL ORDER BY 1"
    ).fetchall() == [("teacher-a", "teacher-b", 160), ("teacher-b", "teacher-a", 80)]
    # A recipe restricted to one teacher draws its traces only.
    assert con.execute(
        "SELECT subset, list(DISTINCT teacher ORDER BY teacher) FROM subset_members JOIN cot_traces USING (trace_id) "
        "WHERE subset IN ('from-a', 'from-b') GROUP BY 1 ORDER BY 1"
    ).fetchall() == [("from-a", ["teacher-a"]), ("from-b", ["teacher-b"])]

    # The ledger: one row per model and model stage, each reply counted once, priced (both teachers have prices).
    ledger = con.execute(
        "SELECT stage, role, model, requests_ok, prompt_tokens, completion_tokens, cost FROM cost_ledger ORDER BY stage, model"
    ).fetchall()
    assert [row[:4] for row in ledger] == [
        ("annotations", "judge", "teacher-a", 80),
        ("annotations", "judge", "teacher-b", 160),
        ("cot_traces", "teacher", "teacher-a", 160),
        ("cot_traces", "teacher", "teacher-b", 80),
    ]
    tokens = con.execute("SELECT teacher, sum(n_prompt_tokens), sum(n_tokens) FROM cot_traces GROUP BY 1 ORDER BY 1").fetchall()
    assert [(row[2], row[4], row[5]) for row in ledger[2:]] == tokens
    prices = {"teacher-a": (0.20, 0.80), "teacher-b": (0.10, 0.40)}
    for stage, _role, model, _n, prompt, completion, cost in ledger:
        assert cost == pytest.approx((prompt * prices[model][0] + completion * prices[model][1]) / 1e6), (stage, model)

    # The report in the filtered set's metadata (plotted over time), on the command line and in the HTML report.
    metadata = instance.fetch_materializations(dg.AssetKey("filtered_set"), limit=1).records[0].asset_materialization.metadata
    assert "teachers" in metadata and all(f"teacher/{t}/{n}" in metadata for t in prices for n in ("accuracy", "kept_share", "pass_rate"))
    kept = dict(con.execute("SELECT teacher, count(*) FILTER (kept) FROM filter_decisions GROUP BY 1").fetchall())
    assert all((f"teacher/{t}/cost_per_1000_kept" in metadata) == (kept[t] > 0) for t in prices)
    traces_meta = instance.fetch_materializations(dg.AssetKey("cot_traces"), limit=1).records[0].asset_materialization.metadata
    assert {"ledger/teacher/teacher-a/tokens", "ledger/teacher/teacher-b/cost_USD"} <= set(traces_meta)
    runner = CliRunner()
    shown = runner.invoke(app, ["teachers", "--config", str(path), "--json"])
    assert shown.exit_code == 0, shown.output
    overall = [r for r in json.loads(shown.output)["rows"] if r["slice_kind"] == "all"]
    assert [(r["teacher"], r["traces"], r["judged_by"]) for r in overall] == [
        ("teacher-a", 160, "teacher-b"),
        ("teacher-b", 80, "teacher-a"),
    ]
    stats = runner.invoke(app, ["stats", "--config", str(path), "--json"])
    assert stats.exit_code == 0 and len(json.loads(stats.output)["costs"]) == 4
    html = write_report(store, tmp_path / "report.html").path.read_text()
    assert "<h2>Teachers</h2>" in html and "<h2>Costs</h2>" in html and "teacher-b" in html

    # A subset of teacher-a's traces holding one of teacher-b's fails its check.
    checks = run_partition_checks(config, instance, "sampled_subsets", "from-a")
    assert checks["members_are_kept"].passed
    other = con.execute("SELECT trace_id FROM filter_decisions WHERE teacher = 'teacher-b' AND kept LIMIT 1").fetchone()
    assert other is not None, "teacher-b kept nothing: no trace to plant"
    rewrite_partition(store, "subset_members", "from-a", lambda rows: [{**rows[0], "trace_id": other[0]}, *rows[1:]])
    assert not run_partition_checks(config, instance, "sampled_subsets", "from-a")["members_are_kept"].passed
