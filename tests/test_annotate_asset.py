"""annotations through the real Dagster jobs, with the session's vLLM server as teacher and judge."""

from __future__ import annotations

import shutil

import dagster as dg
import pytest
from typer.testing import CliRunner

from omnithought_dagster.annotate.taxonomy import Taxonomy
from omnithought_dagster.cli import app
from omnithought_dagster.defs import ANNOTATE_JOB, SEED_JOB, TEACHER_JOB
from omnithought_dagster.store import CorpusStore

from conftest import (
    check_evaluations,
    materializations,
    plot_image,
    requests_served,
    rewrite_partition,
    run_job,
    run_partition_checks,
    served_config,
)
from flaky_proxy import FlakyProxy

pytestmark = pytest.mark.slow
PARTITION = "000|synthetic"
ANNOTATION = {"max_tokens": 192, "temperature": 1.0, "flush_every": 4}


def _project(folder, base_url, judge_url=None, **annotation):
    judge = {
        "backend": "openai",
        "base_url": judge_url or base_url,
        "model": "tiny-teacher-test",
        "name": "tiny-judge",
        "max_retries": 1,
        "max_concurrency": 8,
    }
    return served_config(folder, base_url, n_samples=6, generation={"shards": 1}, judge=judge, annotation={**ANNOTATION, **annotation})


def _annotate(config, instance):
    assert run_job(config, instance, SEED_JOB, "synthetic").success
    assert run_job(config, instance, TEACHER_JOB, PARTITION).success
    return run_job(config, instance, ANNOTATE_JOB, PARTITION)


def test_annotations_for_every_trace_then_all_from_cache(vllm_server, instance, tmp_path):
    config = _project(tmp_path, vllm_server.base_url)
    before = requests_served(vllm_server)
    result = _annotate(config, instance)
    assert result.success
    checks = check_evaluations(result)
    assert len(checks) == 5 and all(c.passed for c in checks.values()), {k: c.description for k, c in checks.items()}
    meta = materializations(result)["annotations"]
    assert requests_served(vllm_server) - before == 24 + 24  # 24 traces generated, then 24 judged
    assert meta["dagster/row_count"] == 24 and meta["requests_sent"] == 24 and meta["annotator"] == "tiny-judge"
    assert meta["judge_parse_failure_rate"] == 0.0 and "quality_auc_vs_correct" in meta["agreement"]
    assert "| tags | rows |" in meta["tags_distribution"] and "pass rate" in meta["pass_rate_histogram"]
    assert all(plot_image(meta[f"plot/{name}"]) for name in ("difficulty", "tags", "pass_rate"))

    con = CorpusStore(config.store.root).catalog()
    rows = con.execute(
        "SELECT count(*), count(DISTINCT trace_id), count(difficulty), min(difficulty), max(difficulty) FROM annotations"
    ).fetchone()
    assert rows[0] == rows[1] == rows[2] == 24 and 0 <= rows[3] <= rows[4] <= 9
    labels = set(Taxonomy.load("builtin:tags-v1").names)
    assert {t for (tags,) in con.execute("SELECT tags FROM annotations").fetchall() for t in tags} <= labels
    # pass_rate is the share of correct rollouts of each sample, and every sample has 4
    assert (
        con.execute(
            "SELECT count(*) FROM (SELECT sample_id, avg(correct::INT) AS r, any_value(pass_rate) AS p, count(*) AS n "
            "FROM annotations GROUP BY 1) WHERE abs(r - p) > 1e-9 OR n != 4"
        ).fetchone()[0]
        == 0
    )

    before = requests_served(vllm_server)
    again = run_job(config, instance, ANNOTATE_JOB, PARTITION)
    assert again.success and requests_served(vllm_server) - before == 0
    assert materializations(again)["annotations"]["cache_hits"] == 24

    # Another judge prompt version is another annotation id: everything is judged again.
    edited = _project(
        tmp_path,
        vllm_server.base_url,
        prompt={
            "version": "judge-v2",
            "system": "Grade.",
            "user": "{question}{choices} ref {reference} reasoning {reasoning} answer {final_answer}; "
            "tags from {labels} (max {max_tags}). JSON.",
        },
    )
    before = requests_served(vllm_server)
    assert run_job(edited, instance, ANNOTATE_JOB, PARTITION).success
    assert requests_served(vllm_server) - before == 24


def test_failed_judge_requests_are_recorded(vllm_server, instance, tmp_path):
    with FlakyProxy(vllm_server.base_url, lambda attempt: ("status", 500)) as proxy:
        config = _project(tmp_path, vllm_server.base_url, judge_url=proxy.base_url)
        result = _annotate(config, instance)
    assert result.success  # request failures are not parse failures; each trace still has its record
    rows = CorpusStore(config.store.root).read_partition("annotations", {"source": "synthetic", "shard": "000"}).to_pylist()
    assert len(rows) == 24 and all(r["judge_error"].startswith("judge request failed: InternalServerError") for r in rows)
    assert all(r["difficulty"] is None and r["tags"] == [] for r in rows)
    assert all(r["verify_method"] != "judge" for r in rows)  # no judge to fall back on


def test_lineage_shows_traces_with_their_annotations(vllm_server, instance, tmp_path, monkeypatch):
    config = _project(tmp_path, vllm_server.base_url)
    assert _annotate(config, instance).success
    sample = CorpusStore(config.store.root).catalog().execute("SELECT sample_id FROM seed_pool LIMIT 1").fetchone()[0]
    runner = CliRunner()
    result = runner.invoke(app, ["lineage", sample, "--config", config.config_path, "--json"])
    assert result.exit_code == 0, result.output
    import json

    story = json.loads(result.stdout)
    assert len(story["traces"]) == 4
    for trace in story["traces"]:
        assert trace["annotation"]["annotator"] == "tiny-judge" and isinstance(trace["annotation"]["correct"], bool)
        assert trace["annotation"]["difficulty_label"] in ("easy", "medium", "hard")
    text = runner.invoke(app, ["lineage", sample, "--config", config.config_path])
    assert ("correct (" in text.output or "wrong (" in text.output) and "sample pass rate" in text.output
    assert "judge tiny-judge: difficulty" in text.output


# -- checks on planted bad annotations ------------------------------------------------------------------


@pytest.fixture(scope="module")
def annotated(vllm_server, tmp_path_factory):
    folder = tmp_path_factory.mktemp("annotated")
    config = _project(folder, vllm_server.base_url)
    with dg.instance_for_test(temp_dir=str(folder)) as inst:
        assert _annotate(config, inst).success
    return folder


@pytest.fixture
def planted(annotated, tmp_path, vllm_server):
    shutil.copytree(annotated / "store", tmp_path / "store")
    config = _project(tmp_path, vllm_server.base_url)
    store = CorpusStore(config.store.root)
    return config, lambda change: rewrite_partition(store, "annotations", {"source": "synthetic", "shard": "000"}, change)


def _failed(checks) -> dict[str, str]:
    return {name: c.severity.value for name, c in checks.items() if not c.passed}


def test_annotation_checks_pass_on_real_annotations(planted, instance):
    config, _ = planted
    checks = run_partition_checks(config, instance, "annotations", PARTITION)
    assert len(checks) == 5 and _failed(checks) == {}


def _flip_first_correct(rows):
    rows[0] = {**rows[0], "correct": not rows[0]["correct"]}
    return rows


@pytest.mark.parametrize(
    ("change", "failed"),
    [
        (lambda rows: rows[1:], {"every_trace_annotated", "pass_rate_consistent"}),  # a trace lost its annotation
        (lambda rows: rows + [rows[0]], {"every_trace_annotated", "pass_rate_consistent"}),
        (lambda rows: [{**rows[0], "trace_id": "f" * 32}] + rows[1:], {"every_trace_annotated"}),
        (lambda rows: [{**rows[0], "difficulty": None, "judge_error": None}] + rows[1:], {"every_trace_annotated"}),
        (lambda rows: [{**rows[0], "quality": 10}] + rows[1:], {"values_in_range"}),
        (lambda rows: [{**rows[0], "pass_rate": 1.5}] + rows[1:], {"values_in_range", "pass_rate_consistent"}),
        (lambda rows: [{**rows[0], "difficulty_label": "impossible"}] + rows[1:], {"values_in_range"}),
        (lambda rows: [{**rows[0], "tags": ["astrology"]}] + rows[1:], {"tags_in_taxonomy"}),
        (_flip_first_correct, {"pass_rate_consistent"}),
        (
            lambda rows: [{**r, "judge_error": "unparsable judge reply: x"} if i < 2 else r for i, r in enumerate(rows)],
            {"judge_parse_failure_rate"},
        ),  # 2/24 > 2% warn, < 10% fail: a warning
    ],
)
def test_annotation_checks_fail_on_planted_bad_rows(planted, instance, change, failed):
    config, plant = planted
    plant(change)
    checks = run_partition_checks(config, instance, "annotations", PARTITION)
    assert set(_failed(checks)) == failed
    if failed == {"judge_parse_failure_rate"}:
        assert _failed(checks)["judge_parse_failure_rate"] == "WARN"
