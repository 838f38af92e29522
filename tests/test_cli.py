"""The omnithought CLI: demo (idempotent), stats, read-only query, lineage."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from omnithought_dagster.cli import app

from conftest import SERVED_NAME, write_config, write_image, write_json

runner = CliRunner()


@pytest.fixture
def demo_project(tmp_path, monkeypatch, vllm_server):
    """A small project, materialised with `omnithought demo` into a tmp DAGSTER_HOME (teacher: the session's vLLM server)."""
    write_image(tmp_path / "imgs/a.png", 1)
    records = [
        {"id": "keep-me", "question": "How many blocks?", "answer": "4", "image": "a.png"},
        {"id": "lost", "question": "Where?", "answer": "here", "image": "gone.png"},
    ]
    files = {"name": "files", "kind": "json", "path": str(write_json(tmp_path / "f.json", records)), "image_root": str(tmp_path / "imgs")}
    config = write_config(
        tmp_path,
        [{"name": "synthetic", "kind": "synthetic", "n_samples": 18}, files],
        teacher={"backend": "openai", "base_url": vllm_server.base_url, "model": SERVED_NAME, "name": "tiny-test"},
        generation={"rollouts": 4, "shards": 1, "max_tokens": 64, "reasoning_max_chars": 60, "answer_max_chars": 12},
    )
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster_home"))
    first = runner.invoke(app, ["demo", "--config", str(config)])
    assert first.exit_code == 0, first.output
    return config, first.output


def test_a_failing_stage_says_so_at_once_with_the_end_of_its_error(tmp_path, monkeypatch):
    missing = tmp_path / "nowhere" / "data.json"
    config = write_config(tmp_path, [{"name": "files", "kind": "json", "path": str(missing)}])
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster_home"))
    result = runner.invoke(app, ["demo", "--config", str(config)])
    assert result.exit_code != 0
    lines = result.output.split("\n")
    failed = next(i for i, line in enumerate(lines) if line.startswith("x seed_pool[files] FAILED in "))
    assert lines[failed - 1].startswith("> seed_pool[files] started") or "seed_pool" in lines[failed - 1]
    assert "nowhere" in "\n".join(lines[failed : failed + 5])  # the error itself, right there
    assert "cot_traces" not in result.output  # later stages build on it


def test_failure_text_keeps_the_first_and_the_last_lines():
    from omnithought_dagster.demo import StageOutcome, failure_text, outcome_line

    message = "lmms-eval wrote no results JSON; its last lines:\n" + "\n".join(f"line {i}" for i in range(100))
    text = failure_text(message, lines=5)
    assert text.split("\n") == [
        "lmms-eval wrote no results JSON; its last lines:",
        "... (96 lines)",
        "line 96",
        "line 97",
        "line 98",
        "line 99",
    ]
    assert failure_text("one\n\ntwo") == "one\ntwo"
    line = outcome_line(StageOutcome("benchmark_scores", "base|tiny", False, False, {"error": "boom\nlast words"}, seconds=3.25))
    assert line == "x benchmark_scores[base|tiny] FAILED in 3.2 s:\n    boom\n    last words"
    ok = outcome_line(
        StageOutcome("seed_pool", "s", False, True, {"input": 3, "output": 2, "flagged": 1}, {"a": "passed", "b": "warn"}, seconds=1)
    )
    assert ok == "< seed_pool[s] ran in 1.0 s: 3 in, 2 out, 1 flagged; checks 1/2 passed"


def _json(args):
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_demo_runs_everything_then_is_idempotent(demo_project):
    config, first = demo_project
    assert "seed_pool" in first and "6/6 passed" in first and "missing_image 1" in first
    assert "cot_traces" in first and "72 requests sent, 0 from cache" in first  # 18 samples x 4 rollouts
    assert "annotations" in first and "72 judge requests, 0 from cache" in first
    assert "filtered_set" in first and "traces kept" in first
    # It talks while it works: each partition's start, and its end with time and rows.
    lines = first.split("\n")
    assert sum(line.startswith("> ") for line in lines) == 8 and sum(line.startswith("< ") and " ran in " in line for line in lines) == 8
    assert "> seed_pool[synthetic] started" in first and "< seed_pool[synthetic] ran in " in first
    assert "18 in, 18 out, 0 flagged; checks 6/6 passed" in first
    assert "    ingest_seed_source: synthetic: reading 18 records (synthetic)" in first  # a step's own line
    assert "STEP_START" not in first and "ASSET_MATERIALIZATION" not in first  # no Dagster event lines
    second = runner.invoke(app, ["demo", "--config", str(config)])
    assert second.exit_code == 0, second.output
    assert second.output.count("] up to date") == 8, second.output  # nothing changed: every partition skipped
    forced = runner.invoke(app, ["demo", "--config", str(config), "--force"])
    assert forced.exit_code == 0 and "up to date" not in forced.output


def test_demo_reruns_a_partition_whose_input_changed(demo_project, tmp_path):
    config, _ = demo_project
    records = json.loads((tmp_path / "f.json").read_text()) + [{"id": "new", "question": "New?", "answer": "1", "image": "a.png"}]
    write_json(tmp_path / "f.json", records)
    result = runner.invoke(app, ["demo", "--config", str(config)])
    assert result.exit_code == 0, result.output
    # synthetic's four stages are skipped; files is re-ingested and its stages follow (only the new sample is sent)
    assert result.output.count("] up to date") == 4
    assert "4 requests sent, 4 from cache" in result.output and "4 judge requests, 4 from cache" in result.output


def test_stats_json_counts_tables_partitions_and_reasons(demo_project):
    config, _ = demo_project
    stats = _json(["stats", "--config", str(config), "--json"])
    assert stats["tables"]["seed_pool"] == {"rows": 19, "partitions": {"files": 1, "synthetic": 18}}
    assert stats["tables"]["quarantine"]["rows"] == 1
    assert stats["tables"]["cot_traces"] == {"rows": 76, "partitions": {"files/000": 4, "synthetic/000": 72}}
    assert stats["quarantine_reasons"] == {"files": {"missing_image": 1}}
    text = runner.invoke(app, ["stats", "--config", str(config)])
    assert text.exit_code == 0 and "quarantine reasons" in text.output


def test_query_json_and_read_only(demo_project):
    config, _ = demo_project
    rows = _json(["query", "SELECT source, count(*) AS n FROM seed_pool GROUP BY 1 ORDER BY 1", "--config", str(config), "--json"])
    assert rows == [{"source": "files", "n": 1}, {"source": "synthetic", "n": 18}]
    listed = _json(["query", "SELECT image_ids FROM seed_pool WHERE source = 'files'", "--config", str(config), "--json"])
    assert len(listed[0]["image_ids"]) == 1
    for statement in [
        "COPY seed_pool TO '/tmp/x.csv'",
        "CREATE TABLE t AS SELECT 1",
        "SELECT 1; DROP VIEW seed_pool",
        "ATTACH 'x.db'",
        "INSTALL httpfs",
    ]:
        refused = runner.invoke(app, ["query", statement, "--config", str(config)])
        assert refused.exit_code == 2 and "only read-only SELECT" in refused.output, statement
    broken = runner.invoke(app, ["query", "SELECT nope FROM seed_pool", "--config", str(config)])
    assert broken.exit_code == 2 and "query error" in broken.output


def test_lineage_of_a_kept_sample_by_id_prefix_and_native_id(demo_project):
    config, _ = demo_project
    (row,) = _json(["query", "SELECT sample_id, image_ids FROM seed_pool WHERE native_id = 'keep-me'", "--config", str(config), "--json"])
    story = _json(["lineage", row["sample_id"], "--config", str(config), "--json"])
    assert story["kind"] == "sample" and story["status"] == "kept"
    assert story["kept"]["source"] == "files" and story["kept"]["native_id"] == "keep-me"
    assert [i["image_id"] for i in story["images"]] == row["image_ids"] and story["images"][0]["in_store"]
    assert _json(["lineage", row["sample_id"][:10], "--config", str(config), "--json"])["sample_id"] == row["sample_id"]
    assert _json(["lineage", "files/keep-me", "--config", str(config), "--json"])["sample_id"] == row["sample_id"]
    assert [t["rollout"] for t in story["traces"]] == [0, 1, 2, 3]
    text = runner.invoke(app, ["lineage", row["sample_id"], "--config", str(config)])
    assert text.exit_code == 0 and "keep-me" in text.output and "How many blocks?" in text.output and "4 teacher trace(s)" in text.output
    trace = _json(["lineage", story["traces"][2]["trace_id"], "--config", str(config), "--json"])
    assert trace["kind"] == "trace" and trace["trace"]["rollout"] == 2 and trace["sample"]["kept"]["native_id"] == "keep-me"


def test_lineage_of_a_quarantined_record_and_of_an_image(demo_project):
    config, _ = demo_project
    story = _json(["lineage", "files/lost", "--config", str(config), "--json"])
    assert story["status"] == "quarantined" and story["quarantine"][0]["reason"] == "missing_image"
    assert "gone.png" in story["quarantine"][0]["detail"]
    (row,) = _json(
        ["query", "SELECT image_ids[1] AS image_id FROM seed_pool WHERE native_id = 'keep-me'", "--config", str(config), "--json"]
    )
    image = _json(["lineage", row["image_id"], "--config", str(config), "--json"])
    assert image["kind"] == "image" and image["used_by"][0]["native_id"] == "keep-me" and image["format"] == "PNG"


def test_lineage_errors(demo_project):
    config, _ = demo_project
    for ident, message in [
        ("ffffffffffff", "no sample, image, trace or checkpoint id"),
        ("abc", "not an id"),
        ("files/nobody", "no record 'nobody'"),
    ]:
        result = runner.invoke(app, ["lineage", ident, "--config", str(config)])
        assert result.exit_code == 1 and message in result.output, result.output


def test_bad_config_exits_2_with_the_field(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("sources:\n  - {name: x, kind: synthetic, n_samples: zero}\n")
    result = runner.invoke(app, ["stats", "--config", str(path)])
    assert result.exit_code == 2 and "n_samples" in result.output


def test_estimate_then_the_run_costs_about_what_it_said_and_reuses_its_replies(tmp_path, monkeypatch, vllm_server):
    prices = {"tiny-test": {"input_per_million": 0.5, "output_per_million": 2.0}}
    config = write_config(
        tmp_path,
        [{"name": "synthetic", "kind": "synthetic", "n_samples": 40}],
        teacher={"backend": "openai", "base_url": vllm_server.base_url, "model": SERVED_NAME, "name": "tiny-test"},
        generation={"rollouts": 2, "shards": 2, "max_tokens": 64, "reasoning_max_chars": 60, "answer_max_chars": 12},
        costs={"currency": "EUR", "prices": prices},
    )
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster_home"))
    estimate = _json(["estimate", "--config", str(config), "--share", "0.25", "--json"])
    assert (estimate["samples"], estimate["measured_samples"]) == (40, 10)
    planned = {(m["role"], m["model"]): m for m in estimate["models"]}
    assert planned[("teacher", "tiny-test")]["planned_requests"] == 80 and planned[("teacher", "tiny-test")]["measured_requests"] == 20
    assert planned[("judge", "tiny-test")]["planned_requests"] == 80

    run = runner.invoke(app, ["demo", "--config", str(config)])
    assert run.exit_code == 0, run.output
    from omnithought_dagster.config import load_config
    from omnithought_dagster.store import open_store

    con = open_store(load_config(config).store).catalog()
    reused = con.execute("SELECT stage, sum(cache_hits), sum(requests_sent) FROM cost_ledger GROUP BY 1 ORDER BY 1").fetchall()
    assert reused == [("annotations", 20, 60), ("cot_traces", 20, 60)]  # the estimate's replies, not paid for twice
    stats = _json(["stats", "--config", str(config), "--json"])
    recorded = {(c["role"], c["model"]): c for c in stats["costs"]}
    for key, guess in planned.items():
        ledger = recorded[key]
        assert ledger["requests_ok"] + ledger["requests_failed"] == guess["planned_requests"]
        for measure in ("prompt_tokens", "completion_tokens", "cost"):
            assert guess[measure] == pytest.approx(ledger[measure], rel=0.2), (key, measure)
    assert estimate["cost"] == pytest.approx(sum(c["cost"] for c in stats["costs"]), rel=0.2) and stats["costs"][0]["currency"] == "EUR"
