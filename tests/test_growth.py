"""Re-curation is incremental end to end: 1% more seed samples, everything re-run, requests only for the new ones - for
each of two teachers (and for each teacher's judge, the other one)."""

from __future__ import annotations

import pytest

from omnithought_dagster.demo import run_demo
from omnithought_dagster.store import open_store

from conftest import SERVED_NAME, requests_served, served_config

ROLLOUTS = 2
ROLLOUTS_B = 1  # the second teacher's own count
EXTRA = {
    "generation": {"rollouts": ROLLOUTS, "shards": 2},
    "annotation": {"max_tokens": 160, "temperature": 1.0},
    "curation": {"rules": {"min_tokens": 0, "min_quality": 0}, "selection": {"drop_unsolvable": False, "trivial_max_difficulty_bin": -1}},
    "recipes": [{"name": "mix", "size": 20, "difficulty_mix": {"easy": 1, "medium": 1, "hard": 1}}],
    "students": [{"name": "tiny"}],
    "training": {"max_steps": 4, "micro_batch_size": 4, "max_length": 1024},
}


def _teachers(base_url: str) -> list[dict]:
    """Two teachers on the session's server (two names: two sets of trace ids); each judges the other's traces."""
    common = {"backend": "openai", "base_url": base_url, "model": SERVED_NAME, "max_concurrency": 8, "max_retries": 1}
    return [{**common, "name": "tiny-test"}, {**common, "name": "tiny-test-b", "rollouts": ROLLOUTS_B}]


@pytest.mark.slow
def test_one_percent_more_samples_sends_requests_only_for_them_and_reuses_what_did_not_change(tmp_path, instance, vllm_server):
    config = served_config(tmp_path, vllm_server.base_url, n_samples=100, teachers=_teachers(vllm_server.base_url), **EXTRA)
    first = run_demo(config, instance)
    assert all(o.success for o in first), [(o.stage, o.partition, o.counts.get("error")) for o in first if not o.success]
    store = open_store(config.store)
    subset_before = store.read_partition("subset_members", "mix").column("subset_version")[0].as_py()
    checkpoint_before = store.read_partition("student_checkpoints", {"student": "tiny", "recipe": "mix"}).column("checkpoint_id")[0].as_py()

    served_before = requests_served(vllm_server)
    grown = served_config(tmp_path, vllm_server.base_url, n_samples=101, teachers=_teachers(vllm_server.base_url), **EXTRA)  # +1 sample
    second = run_demo(grown, instance)
    assert all(o.success for o in second)
    # Each teacher wrote its rollouts for the one new sample and the other teacher judged them; nothing else was sent.
    assert requests_served(vllm_server) - served_before == 2 * (ROLLOUTS + ROLLOUTS_B)
    ledger = (
        store.catalog(["cost_ledger"])
        .execute(
            "SELECT stage, model, sum(requests_sent), sum(requests_ok) FROM cost_ledger WHERE stage IN ('cot_traces', 'annotations') "
            "GROUP BY ALL ORDER BY ALL"
        )
        .fetchall()
    )
    assert ledger == [
        ("annotations", "tiny-test", ROLLOUTS_B, 101 * ROLLOUTS_B),  # tiny-test judges tiny-test-b's traces
        ("annotations", "tiny-test-b", ROLLOUTS, 101 * ROLLOUTS),
        ("cot_traces", "tiny-test", ROLLOUTS, 101 * ROLLOUTS),
        ("cot_traces", "tiny-test-b", ROLLOUTS_B, 101 * ROLLOUTS_B),
    ]
    by_stage = {}
    for outcome in second:
        by_stage.setdefault(outcome.stage, []).append(outcome)
    assert [o.skipped for o in by_stage["seed_pool"]] == [False]
    # seed_pool[synthetic] has a new data version and Dagster keeps one per source, so it calls both shards of both model
    # stages stale (they read seed_pool): both re-run, the shard without the new sample entirely from the caches - the
    # request count above is what that over-approximation costs: nothing.
    assert [o.skipped for o in by_stage["cot_traces"]] == [False, False]
    assert [o.skipped for o in by_stage["annotations"]] == [False, False]
    assert store.read_partition("seed_pool", "synthetic").num_rows == 101

    subset_after = store.read_partition("subset_members", "mix").column("subset_version")[0].as_py()
    (checkpoint,) = by_stage["student_checkpoints"]
    checkpoint_after = store.read_partition("student_checkpoints", {"student": "tiny", "recipe": "mix"}).column("checkpoint_id")[0].as_py()
    if subset_after == subset_before:  # the new sample did not enter the subset: the student is not retrained
        assert checkpoint_after == checkpoint_before and (checkpoint.skipped or checkpoint.counts.get("detail", "").endswith("reused"))
    else:
        assert checkpoint_after != checkpoint_before and store.checkpoints.exists(checkpoint_before)
