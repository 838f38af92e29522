"""cot_traces through the real Dagster jobs: generation, the cache (counted at the server), errors,
kill-and-resume, a pipeline-started vLLM server, and every check failing on bad data."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess

import dagster as dg
import pytest

from omnithought_dagster.defs import SEED_JOB, TEACHER_JOB, build_definitions
from omnithought_dagster.ledger.ledger import PAID_COLUMNS
from omnithought_dagster.store import CorpusStore

from conftest import (
    SERVED_NAME,
    VLLM_PYTHON,
    check_evaluations,
    materializations,
    requests_served,
    rewrite_partition,
    run_job,
    run_partition_checks,
    served_config,
    start_run,
    wait_while_running,
)
from flaky_proxy import FlakyProxy

pytestmark = pytest.mark.slow
_config = served_config
_run = run_job


def _generate_all(config, instance) -> dict[str, dict]:
    """Materialise seed_pool, then every cot_traces partition; {partition: metadata}."""
    assert _run(config, instance, SEED_JOB, "synthetic").success
    out = {}
    for partition in build_definitions(config).resolve_job_def(TEACHER_JOB).partitions_def.get_partition_keys():
        result = _run(config, instance, TEACHER_JOB, partition)
        assert result.success, [e.event_specific_data for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
        checks = check_evaluations(result)
        assert len(checks) == 6 and all(c.passed for c in checks.values()), {k: c.description for k, c in checks.items()}
        out[partition] = materializations(result)["cot_traces"]
    return out


def test_generation_cache_and_incremental_runs(vllm_server, instance, tmp_path):
    config = _config(tmp_path, vllm_server.base_url)
    before = requests_served(vllm_server)
    first = _generate_all(config, instance)
    sent = requests_served(vllm_server) - before
    assert sent == 8 * 4 == sum(m["requests_sent"] for m in first.values())
    assert sum(m["dagster/row_count"] for m in first.values()) == 32
    con = CorpusStore(config.store.root).catalog()
    assert con.execute("SELECT count(*), count(DISTINCT trace_id), count(DISTINCT sample_id) FROM cot_traces").fetchone() == (32, 32, 8)
    assert con.execute("SELECT count(*) FROM cot_traces t ANTI JOIN seed_pool s USING (sample_id)").fetchone()[0] == 0

    # Same samples again: everything comes from the cache, the server sees nothing.
    before = requests_served(vllm_server)
    second = _generate_all(config, instance)
    assert requests_served(vllm_server) - before == 0
    assert all(m["requests_sent"] == 0 and m["cache_hits"] == m["dagster/row_count"] for m in second.values())

    # Four more samples: only their 16 traces are generated.
    grown = _config(tmp_path, vllm_server.base_url, n_samples=12)
    before = requests_served(vllm_server)
    _generate_all(grown, instance)
    assert requests_served(vllm_server) - before == 16

    # Another teacher name (or prompt version) is another trace id: a full miss.
    renamed = _config(
        tmp_path,
        vllm_server.base_url,
        n_samples=12,
        teacher={"backend": "openai", "base_url": vllm_server.base_url, "model": SERVED_NAME, "name": "tiny-test-v2"},
    )
    before = requests_served(vllm_server)
    _generate_all(renamed, instance)
    assert requests_served(vllm_server) - before == 48
    assert con.execute("SELECT DISTINCT teacher FROM cot_traces").fetchall() == [("tiny-test-v2",)]


def test_failed_requests_are_recorded_not_dropped_and_retried_next_run(vllm_server, instance, tmp_path):
    with FlakyProxy(vllm_server.base_url, lambda attempt: ("status", 503)) as proxy:
        config = _config(tmp_path, proxy.base_url, n_samples=3, generation={"shards": 1})
        assert _run(config, instance, SEED_JOB, "synthetic").success
        result = _run(config, instance, TEACHER_JOB, "000|synthetic")
        assert not result.success  # the blocking error_rate check fails with ERROR severity
        checks = check_evaluations(result)
        assert not checks["error_rate"].passed and checks["error_rate"].severity == dg.AssetCheckSeverity.ERROR
        rows = CorpusStore(config.store.root).read_partition("cot_traces", {"source": "synthetic", "shard": "000"}).to_pylist()
        assert len(rows) == 12 and {r["finish_reason"] for r in rows} == {"error"}
        assert all("503" in r["error"] and r["attempts"] == 2 for r in rows)
        assert sum(proxy.attempts.values()) == 24  # one retry each (max_retries: 1)
    # Errors were not cached: with a healthy endpoint the next run sends exactly those 12.
    healthy = _config(tmp_path, vllm_server.base_url, n_samples=3, generation={"shards": 1})
    before = requests_served(vllm_server)
    result = _run(healthy, instance, TEACHER_JOB, "000|synthetic")
    assert result.success and requests_served(vllm_server) - before == 12


def test_kill_mid_shard_then_resume_without_duplicates(vllm_server, instance, tmp_path):
    config = _config(
        tmp_path,
        vllm_server.base_url,
        n_samples=40,
        generation={"shards": 1, "flush_every": 4},
        teacher={"backend": "openai", "base_url": vllm_server.base_url, "model": SERVED_NAME, "name": "tiny-test", "max_concurrency": 4},
    )
    assert _run(config, instance, SEED_JOB, "synthetic").success
    cache = CorpusStore(config.store.root).cache("generation")
    partition = {"source": "synthetic", "shard": "000"}
    child = start_run(config, instance, TEACHER_JOB, "000|synthetic", start_new_session=True)
    wait_while_running(child, lambda: cache.batch_count(partition) >= 3, 240)
    os.killpg(child.pid, signal.SIGKILL)
    child.wait()
    cached = len(cache.load(partition))
    assert 12 <= cached < 160  # whole batches survived; the shard was not finished
    assert not CorpusStore(config.store.root).has_partition("cot_traces", partition)

    before = requests_served(vllm_server)
    result = _run(config, instance, TEACHER_JOB, "000|synthetic")
    assert result.success
    assert requests_served(vllm_server) - before == 160 - cached  # only what the killed run had not flushed
    meta = materializations(result)["cot_traces"]
    assert meta["cache_hits"] == cached and meta["requests_sent"] == 160 - cached
    rows = CorpusStore(config.store.root).read_partition("cot_traces", partition)
    assert rows.num_rows == 160 and len(set(rows.column("trace_id").to_pylist())) == 160

    # The ledger counts each reply once, whichever run paid for it: what an uninterrupted run records (the partition's
    # replies summed), with both runs named; a rerun from the cache records the same again.
    ledger = _ledger(config)
    assert ledger["requests_ok"] == 160 and ledger["paid_by_runs"] == 2
    assert (ledger["requests_sent"], ledger["cache_hits"]) == (160 - cached, cached)
    assert ledger["prompt_tokens"] == sum(rows.column("n_prompt_tokens").to_pylist())
    assert ledger["completion_tokens"] == sum(rows.column("n_tokens").to_pylist())
    assert ledger["retries"] == sum(rows.column("attempts").to_pylist()) - 160 and ledger["engine_seconds"] > 0
    assert _run(config, instance, TEACHER_JOB, "000|synthetic").success
    again = _ledger(config)
    assert {k: again[k] for k in PAID_COLUMNS} == {k: ledger[k] for k in PAID_COLUMNS} and again["requests_sent"] == 0


def _ledger(config) -> dict:
    table = CorpusStore(config.store.root).read_partition("cost_ledger", {"stage": "cot_traces", "partition": "000|synthetic"})
    (row,) = table.to_pylist()
    return row


def test_pipeline_starts_and_stops_its_own_vllm_server(tiny_teacher, instance, tmp_path):
    teacher = {"backend": "vllm", "model": "tiny:teacher", "python": str(VLLM_PYTHON), "max_model_len": 1024, "max_concurrency": 8}
    config = _config(tmp_path, "", n_samples=3, teacher=teacher, generation={"shards": 1}, models_dir=str(tiny_teacher.parent))
    assert _run(config, instance, SEED_JOB, "synthetic").success
    result = _run(config, instance, TEACHER_JOB, "000|synthetic")
    assert result.success
    logs = [e.user_message for e in instance.all_logs(result.run_id)]
    started = next(m for m in logs if m.startswith("vLLM server starting"))
    assert any(m.startswith("vLLM server stopped") for m in logs)
    pid = started.split("pid ")[1].split(",")[0]
    assert subprocess.run(["pgrep", "-g", pid], capture_output=True, text=True).stdout.strip() == ""
    meta = materializations(result)["cot_traces"]
    assert meta["requests_sent"] == 12 and meta["teacher"].startswith("tiny-qwen2vl-teacher@")
    # All cached now: the second run does not even start a server.
    again = _run(config, instance, TEACHER_JOB, "000|synthetic")
    assert again.success and not any("vLLM server" in e.user_message for e in instance.all_logs(again.run_id))


# -- checks -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def generated(vllm_server, tmp_path_factory):
    """One materialised shard, generated once; each test gets its own copy of the store to damage."""
    folder = tmp_path_factory.mktemp("generated")
    config = _config(folder, vllm_server.base_url, n_samples=6, generation={"shards": 1})
    with dg.instance_for_test(temp_dir=str(folder)) as inst:
        assert _run(config, inst, SEED_JOB, "synthetic").success
        assert _run(config, inst, TEACHER_JOB, "000|synthetic").success
    return folder


@pytest.fixture
def damaged(generated, tmp_path, vllm_server):
    shutil.copytree(generated / "store", tmp_path / "store")
    config = _config(tmp_path, vllm_server.base_url, n_samples=6, generation={"shards": 1})
    store = CorpusStore(config.store.root)
    return config, lambda change: rewrite_partition(store, "cot_traces", {"source": "synthetic", "shard": "000"}, change)


def _checks(config, instance):
    return run_partition_checks(config, instance, "cot_traces", "000|synthetic")


def _failed(checks) -> dict[str, str]:
    return {name: c.severity.value for name, c in checks.items() if not c.passed}


def test_trace_checks_pass_on_generated_data(damaged, instance):
    config, _ = damaged
    checks = _checks(config, instance)
    assert len(checks) == 6 and _failed(checks) == {}


@pytest.mark.parametrize(
    ("change", "failed"),
    [
        (lambda rows: rows + [rows[0]], {"trace_id_unique": "ERROR", "rollouts_complete": "ERROR"}),
        (lambda rows: [{**rows[0], "sample_id": "f" * 32}] + rows[1:], {"samples_in_seed_pool": "ERROR", "rollouts_complete": "ERROR"}),
        (lambda rows: rows[1:], {"rollouts_complete": "ERROR"}),
        (
            lambda rows: [{**r, "finish_reason": "error", "text": None, "final_answer": None} if i < 2 else r for i, r in enumerate(rows)],
            {"error_rate": "ERROR"},
        ),  # 2/24 > 5%
        (lambda rows: [{**r, "finish_reason": "length"} if i < 2 else r for i, r in enumerate(rows)], {"truncation_rate": "WARN"}),
        (lambda rows: [{**r, "finish_reason": "length"} if i < 8 else r for i, r in enumerate(rows)], {"truncation_rate": "ERROR"}),
        (lambda rows: [{**rows[0], "final_answer": None}] + rows[1:], {"final_answer_present": "WARN"}),
        (lambda rows: [{**r, "final_answer": ""} for r in rows], {"final_answer_present": "ERROR"}),
    ],
)
def test_trace_checks_fail_on_damage(damaged, instance, change, failed):
    config, damage = damaged
    damage(change)
    checks = _checks(config, instance)
    assert _failed(checks) == failed
    for name in failed:
        assert checks[name].description


def test_two_runs_of_one_partition_pay_once_and_both_succeed(vllm_server, instance, tmp_path):
    """Before: two runs of one partition at once both sent every request, and the loser failed in cache compaction
    after its write. Now the second waits on the partition's lock, then serves everything from the cache."""
    config = _config(
        tmp_path,
        vllm_server.base_url,
        n_samples=50,
        generation={"shards": 1, "flush_every": 4},
        teacher={"backend": "openai", "base_url": vllm_server.base_url, "model": SERVED_NAME, "name": "tiny-test", "max_concurrency": 4},
    )
    assert _run(config, instance, SEED_JOB, "synthetic").success
    before = requests_served(vllm_server)
    runs = [start_run(config, instance, TEACHER_JOB, "000|synthetic", stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outcomes = [(run.wait(timeout=600), run.stderr.read()) for run in runs]
    assert [code for code, _ in outcomes] == [0, 0], [err[-2000:] for _, err in outcomes]
    assert requests_served(vllm_server) - before == 200  # 50 samples x 4 rollouts, sent once between the two runs
    assert any("is being written by pid" in err for _, err in outcomes)  # the second said what it waited for
    rows = CorpusStore(config.store.root).read_partition("cot_traces", {"source": "synthetic", "shard": "000"})
    assert rows.num_rows == 200 and len(set(rows.column("trace_id").to_pylist())) == 200
