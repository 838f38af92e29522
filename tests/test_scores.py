"""benchmark_scores: lmms-eval really evaluating the students in its own environment; parsing; deltas; checks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from omnithought_dagster.cli import app
from omnithought_dagster.config import load_config
from omnithought_dagster.defs import BASELINE_JOB, FILTER_JOB, SCORE_JOB, SUBSET_JOB, TRAIN_JOB
from omnithought_dagster.evaluation.run import EvalError, TaskScores, parse_results
from omnithought_dagster.evaluation.task_utils import extract_answer, is_correct
from omnithought_dagster.evaluation.tasks import LocalTask
from omnithought_dagster.store import CorpusStore

from conftest import check_evaluations, materializations, plot_image, rewrite_partition, run_job, run_partition_checks, write_config
from curation_data import build_store

REPO = Path(__file__).resolve().parents[1]
LMMS_PYTHON = str(REPO / ".venv-lmms/bin/python")  # built by `make test` (make env)
RECIPE = {"name": "even", "size": 12, "difficulty_mix": {"easy": 1, "medium": 1, "hard": 1}, "max_tag_share": 0.5}
BENCHMARK = {"name": "held", "kind": "synthetic", "n_samples": 6, "seed": 7, "start_index": 5000}


def _project(tmp_path, **evaluation):
    build_store(tmp_path / "store", n_samples=24)
    path = write_config(
        tmp_path,
        [{"name": "synthetic", "kind": "synthetic", "n_samples": 24}],
        recipes=[RECIPE],
        benchmarks=[BENCHMARK],
        students=[{"name": "tiny", "model": "tiny:student"}],
        training={"micro_batch_size": 4, "learning_rate": 0.005, "max_steps": 4, "max_length": 1024},
        evaluation={"python": LMMS_PYTHON, "benchmarks": ["held"], "max_new_tokens": 16, **evaluation},
    )
    return load_config(path)


@pytest.fixture
def scored(tmp_path, instance):
    config = _project(tmp_path)
    for job, partition in [(FILTER_JOB, "synthetic"), (SUBSET_JOB, "even"), (BASELINE_JOB, "tiny"), (TRAIN_JOB, "even|tiny")]:
        assert run_job(config, instance, job, partition).success, (job, partition)
    base = run_job(config, instance, SCORE_JOB, "base|tiny")
    even = run_job(config, instance, SCORE_JOB, "even|tiny")
    return config, CorpusStore(config.store.root), base, even


@pytest.mark.slow
def test_lmms_eval_scores_baseline_and_checkpoint_with_deltas_and_tag_slices(scored):
    config, store, base, even = scored
    assert base.success and even.success
    assert {n: c.passed for n, c in check_evaluations(base).items()} == {"scores_valid": True, "no_regression_vs_baseline": True}
    rows = store.read_partition("benchmark_scores", {"student": "tiny", "recipe": "even"}).to_pylist()
    overall = next(r for r in rows if r["slice"] == "all")
    assert overall["task"] == "omnithought_held" and overall["metric"] == "accuracy" and overall["n"] == 6 == overall["n_benchmark"]
    assert 0 <= overall["score"] <= 1 and overall["baseline_score"] is not None
    assert overall["delta"] == pytest.approx(overall["score"] - overall["baseline_score"])
    checkpoint = store.read_partition("student_checkpoints", {"student": "tiny", "recipe": "even"}).column("checkpoint_id")[0].as_py()
    assert {r["checkpoint_id"] for r in rows} == {checkpoint}
    tags = [r for r in rows if r["slice"].startswith("tag:")]
    assert tags and sum(r["n"] for r in tags) == 6  # the synthetic items carry their task family as tag
    samples = store.read_partition("benchmark_samples", {"student": "tiny", "recipe": "even"}).to_pylist()
    assert len(samples) == 6 and sorted(s["doc_index"] for s in samples) == list(range(6))
    assert sum(s["correct"] for s in samples) / 6 == pytest.approx(overall["score"])
    base_rows = store.read_partition("benchmark_scores", {"student": "tiny", "recipe": "base"}).to_pylist()
    assert all(r["delta"] == 0 for r in base_rows) and base_rows[0]["eval_config_hash"] == overall["eval_config_hash"]
    meta = materializations(even)["benchmark_scores"]
    assert "| benchmark | slice | score |" in meta["scores"] and meta["samples_kept"] == 6
    assert "score deltas against the baseline" in meta["plot/scores"] and plot_image(meta["plot/scores"])

    # Lineage: the checkpoint names what trained it and its scores; a trained-on sample reaches the checkpoint.
    runner = CliRunner()
    story = json.loads(runner.invoke(app, ["lineage", checkpoint, "--config", config.config_path, "--json"]).stdout)
    members = store.read_partition("subset_members", "even").to_pylist()
    assert story["kind"] == "checkpoint" and story["trained_on"]["subset_version"] == members[0]["subset_version"]
    assert story["trained_on"]["traces"] == 12 and sum(story["trained_on"]["samples_by_source"].values()) == len(
        {m["sample_id"] for m in members}
    )
    assert sum(story["trained_on"]["samples_by_difficulty"].values()) == story["trained_on"]["samples"]
    assert story["training"]["max_steps"] == 4 and {r["slice"] for r in story["scores"]} >= {"all"}
    sample = json.loads(runner.invoke(app, ["lineage", members[0]["sample_id"], "--config", config.config_path, "--json"]).stdout)
    assert {c["checkpoint_id"] for c in sample["checkpoints"]} == {checkpoint}
    text = runner.invoke(app, ["lineage", checkpoint[:10], "--config", config.config_path])
    assert text.exit_code == 0 and "trained on recipe even" in text.output and "by primary tag" in text.output


@pytest.mark.slow
def test_checks_fail_on_impossible_scores_and_warn_on_a_regression(scored, instance):
    config, store, _, _ = scored
    partition = {"student": "tiny", "recipe": "even"}
    rewrite_partition(
        store, "benchmark_scores", partition, lambda rows: [{**r, "score": 1.5, "n": 5} if r["slice"] == "all" else r for r in rows]
    )
    checks = run_partition_checks(config, instance, "benchmark_scores", "even|tiny")
    assert not checks["scores_valid"].passed and "outside [0, 1]" in checks["scores_valid"].description
    assert "n = 5 but the benchmark has 6 items" in checks["scores_valid"].description
    rewrite_partition(
        store,
        "benchmark_scores",
        partition,
        lambda rows: [{**r, "score": 0.0, "n": 6, "baseline_score": 0.5, "delta": -0.5} if r["slice"] == "all" else r for r in rows],
    )
    checks = run_partition_checks(config, instance, "benchmark_scores", "even|tiny")
    assert checks["scores_valid"].passed
    regression = checks["no_regression_vs_baseline"]
    assert not regression.passed and regression.severity.value == "WARN" and "vs baseline 0.500" in regression.description


@pytest.mark.slow
def test_a_failed_lmms_eval_run_fails_the_step_with_its_log(tmp_path, instance):
    config = _project(tmp_path, lmms_model="no_such_model")
    for job, partition in [(FILTER_JOB, "synthetic"), (SUBSET_JOB, "even"), (BASELINE_JOB, "tiny")]:
        assert run_job(config, instance, job, partition).success
    result = run_job(config, instance, SCORE_JOB, "base|tiny")
    assert not result.success
    failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE")
    message = str(failure.event_specific_data.error)
    assert "wrote no results JSON" in message and "no_such_model" in message  # lmms-eval's own complaint, from the log tail
    assert CorpusStore(config.store.root).read_partition("benchmark_scores", {"student": "tiny", "recipe": "base"}) is None


# -- parsing what lmms-eval wrote, without running it -----------------------------------------------


def _local(tmp_path) -> LocalTask:
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path / "task"
    folder.mkdir()
    pq.write_table(
        pa.table({"doc_id": ["s0", "s1", "s2"], "tag": ["counting", "counting", "table"], "answer": ["4", "4", "7"]}),
        folder / "data.parquet",
    )
    return LocalTask("held", "omnithought_held", folder, 3, "v")


def _write_run(out: Path, results: dict, samples: list[dict | str] | None) -> None:
    """lmms-eval's output as it writes it: JSON with ensure_ascii off (U+2028 and friends unescaped); a str is a raw line."""
    run = out / "model"
    run.mkdir(parents=True)
    (run / "20260101_results.json").write_text(
        json.dumps({"results": results, "n-samples": {"omnithought_held": {"original": 3, "effective": 3}}})
    )
    if samples is not None:
        lines = (s if isinstance(s, str) else json.dumps(s, ensure_ascii=False) for s in samples)
        (run / "20260101_samples_omnithought_held.jsonl").write_text("".join(line + "\n" for line in lines), encoding="utf-8")


def test_parse_results_scores_and_tag_slices(tmp_path):
    local = _local(tmp_path)
    samples = [
        {"doc_id": i, "target": "4", "resps": [[reply]], "accuracy": acc}
        for i, (reply, acc) in enumerate([("<think>x</think>\n\nAnswer: 4", 1.0), ("Answer: 5", 0.0), ("\\boxed{7}", 1.0)])
    ]
    _write_run(tmp_path / "out", {"omnithought_held": {"accuracy,none": 2 / 3, "accuracy_stderr,none": 0.3}}, samples)
    scores = parse_results(tmp_path / "out", ["omnithought_held"], {"omnithought_held": local})
    entry = scores["omnithought_held"]
    assert isinstance(entry, TaskScores) and entry.score == pytest.approx(2 / 3) and entry.n == 3 and entry.n_total == 3
    assert entry.by_tag == {"counting": (0.5, 2), "table": (1.0, 1)}
    assert [s["extracted_answer"] for s in entry.samples] == ["4", "5", "7"] and entry.samples[2]["item_id"] == "s2"


def test_a_generation_holding_line_separators_is_one_record(tmp_path):
    """The bug that failed a fresh `make demo`: str.splitlines() cut a record whose reply held U+2028 in two."""
    local = _local(tmp_path)
    replies = ["Answer: 4\u2028and more", "x\u2029y\x85z\x0b\x0c\x1c\x1d\x1e Answer: 4", "\u2028\u2028\\boxed{7}"]
    samples = [{"doc_id": i, "target": "4", "resps": [[reply]], "accuracy": 1.0} for i, reply in enumerate(replies)]
    _write_run(tmp_path / "out", {"omnithought_held": {"accuracy,none": 1.0}}, samples)
    entry = parse_results(tmp_path / "out", ["omnithought_held"], {"omnithought_held": local})["omnithought_held"]
    assert [s["response"] for s in entry.samples] == replies and entry.score == 1.0 and not any(s["problem"] for s in entry.samples)


def test_an_unreadable_or_missing_record_is_scored_wrong_with_its_reason(tmp_path):
    local = _local(tmp_path)
    samples = [
        '{"doc_id": 0, "resps": [["Answer: 4"]], "accur',
        {"doc_id": 2, "target": "7", "resps": [["Answer: 7"]], "accuracy": 1.0},
        {"doc_id": "two", "accuracy": 1.0},
        {"doc_id": 1, "accuracy": "NaN"},
    ]
    _write_run(tmp_path / "out", {"omnithought_held": {"accuracy,none": 1.0}}, samples)
    entry = parse_results(tmp_path / "out", ["omnithought_held"], {"omnithought_held": local})["omnithought_held"]
    assert [s["doc_index"] for s in entry.samples] == [0, 1, 2] and [s["correct"] for s in entry.samples] == [False, False, True]
    assert entry.samples[0]["problem"].startswith("no readable per-sample record") and "invalid JSON" in entry.samples[0]["problem"]
    assert entry.samples[2]["problem"] is None and entry.score == pytest.approx(1 / 3) and entry.lmms_eval_score == 1.0
    assert entry.by_tag == {"counting": (0.0, 2), "table": (1.0, 1)}


@pytest.mark.parametrize(
    ("results", "samples", "message"),
    [
        (None, None, "wrote no results JSON"),
        ({"other_task": {"accuracy,none": 1.0}}, [], "no results for omnithought_held"),
        ({"omnithought_held": {"accuracy,none": None}}, [], "has no numeric accuracy"),
        ({"omnithought_held": {"accuracy,none": 0.5}}, None, "no per-sample file"),
    ],
)
def test_parse_results_refuses_incomplete_runs(tmp_path, results, samples, message):
    local = _local(tmp_path)
    if results is not None:
        _write_run(tmp_path / "out", results, samples)
    else:
        (tmp_path / "out").mkdir()
    with pytest.raises(EvalError, match=message):
        parse_results(tmp_path / "out", ["omnithought_held"], {"omnithought_held": local})


@pytest.mark.parametrize(
    ("reply", "doc", "correct"),
    [
        ("<think>\ncount\n</think>\n\nAnswer: 4", {"answer": "4", "answer_type": "numeric", "choices": []}, True),
        ("Answer: 4.0", {"answer": "4", "answer_type": "numeric", "choices": []}, True),
        ("Answer: B", {"answer": "B", "answer_type": "multiple_choice", "choices": ["red", "blue"]}, True),
        ("Answer: blue", {"answer": "B", "answer_type": "multiple_choice", "choices": ["red", "blue"]}, True),
        ("Answer: A", {"answer": "B", "answer_type": "multiple_choice", "choices": ["red", "blue"]}, False),
        ("the answer is \\boxed{12}", {"answer": "12", "answer_type": "numeric", "choices": []}, True),
        ("\n\n\n", {"answer": "12", "answer_type": "numeric", "choices": []}, False),
        ("Answer: Left", {"answer": "left", "answer_type": "free_form", "choices": []}, True),
    ],
)
def test_task_scoring_reads_the_trained_answer_format(reply, doc, correct):
    assert is_correct(extract_answer(reply), doc) is correct
