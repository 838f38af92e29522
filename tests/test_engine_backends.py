"""Generation at the engine's speed: the provider batch API (against a local stand-in), several endpoints behind one step,
and vLLM's offline engine (batch mode) - each counted where the work is done: at the stand-in, at the servers, in the
engine's own journal - across kills."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from batch_standin import BatchStandIn

from omnithought_dagster.config import GenerationConfig, SeedSettings
from omnithought_dagster.defs import SEED_JOB, TEACHER_JOB
from omnithought_dagster.llm.backends import OpenAIBackend
from omnithought_dagster.llm.choose import open_backend
from omnithought_dagster.llm.settings import LLMConfig
from omnithought_dagster.seed.ingest import ingest_source
from omnithought_dagster.seed.sources.synthetic import SyntheticReader
from omnithought_dagster.store import CorpusStore
from omnithought_dagster.teacher.prompt import teacher_prompt
from omnithought_dagster.teacher.traces import BackendPlan, generate_shard

from conftest import (
    VLLM_PYTHON,
    assert_none_left,
    materializations,
    processes_mentioning,
    run_job,
    served_config,
    start_run,
    wait_while_running,
)
from scripted_teacher import ScriptedTeacher

TESTS = Path(__file__).resolve().parent
GENERATION = GenerationConfig(rollouts=2, shards=1, max_tokens=64, reasoning_max_chars=120, answer_max_chars=16, flush_every=4)
PROMPT = teacher_prompt(GENERATION, "json")
PARTITION = {"source": "s", "shard": "000"}


def _store(tmp_path: Path, n: int = 6) -> CorpusStore:
    store = CorpusStore(str(tmp_path / "store"))
    seeded = ingest_source(
        "s", SyntheticReader(n, seed=5).records(), SeedSettings(near_duplicate_max_distance=-1), image_root=None, put_image=store.images.put
    )
    store.write_partition("seed_pool", "s", seeded.kept)
    return store


def _answers() -> ScriptedTeacher:
    return ScriptedTeacher({}, [lambda item: f"counted {item}", lambda item: f"measured {item}"])


def _batch_plan(api: BatchStandIn, **settings) -> BackendPlan:
    config = LLMConfig(
        backend="openai", mode="batch", base_url=api.base_url, model="scripted", name="batched", batch_poll_s=0.05, **settings
    )
    return BackendPlan("batched", True, lambda: open_backend(config, models_dir="unused"), names=("batched",), batched=True)


def _batch_teacher(api: BatchStandIn) -> dict:
    """A project file's teacher sent through the stand-in's batch API."""
    return {"backend": "openai", "mode": "batch", "base_url": api.base_url, "model": "scripted", "name": "batched", "batch_poll_s": 0.05}


def _generate(store, plan):
    return generate_shard(store, "s", "000", plan, PROMPT, GENERATION)


# -- the provider batch API ---------------------------------------------------------------------------------------------


def test_a_shard_goes_out_as_one_batch_and_a_rerun_sends_nothing(tmp_path):
    store = _store(tmp_path)
    with BatchStandIn(_answers().reply) as api:
        result = _generate(store, _batch_plan(api))
        assert (result.stats.sent, result.stats.failed, api.created, api.processed) == (12, 0, 1, 12)
        assert all(error is None for error in result.rows.column("error").to_pylist())
        assert {c.n_tokens for c in result.completions.values()} == {80}  # the usage of each line's reply
        (record,) = store.cache("generation-batches").load(PARTITION).values()
        assert record["batch_id"] == "batch-1" and sorted(record["keys"]) == sorted(result.completions)
        again = _generate(store, _batch_plan(api))
        assert (again.stats.cache_hits, again.stats.sent, api.created, api.processed) == (12, 0, 1, 12)


def test_batch_files_are_cut_at_the_request_and_byte_limits(tmp_path):
    store = _store(tmp_path)
    with BatchStandIn(_answers().reply) as api:
        result = _generate(store, _batch_plan(api, batch_max_requests=5))
        assert (result.stats.failed, api.created, api.processed) == (0, 3, 12)  # 5 + 5 + 2
        sizes = sorted(len(api.files[b["input_file_id"]].split(b"\n")) - 1 for b in api.batches.values())
        assert sizes == [2, 5, 5]
    with BatchStandIn(_answers().reply) as api:
        result = _generate(_store(tmp_path / "again"), _batch_plan(api, batch_max_bytes=1_000))  # every line is larger
        assert (result.stats.failed, api.created, api.processed) == (0, 12, 12)


def test_a_step_that_stopped_waiting_collects_its_batch_on_the_rerun_instead_of_paying_again(tmp_path):
    store = _store(tmp_path)
    with BatchStandIn(_answers().reply, hold=True) as api:
        first = _generate(store, _batch_plan(api, batch_timeout_s=0.3))
        assert (first.stats.failed, api.created, api.processed) == (12, 1, 0)
        assert all("still in_progress" in (e or "") for e in first.rows.column("error").to_pylist())
        api.release()
        second = _generate(store, _batch_plan(api))
        assert (second.stats.failed, api.created, api.processed) == (0, 1, 12)  # the same batch, paid once


def test_a_batch_created_before_the_journal_knew_its_id_is_found_by_its_input_file(tmp_path):
    store = _store(tmp_path)
    with BatchStandIn(_answers().reply, hold=True) as api:
        _generate(store, _batch_plan(api, batch_timeout_s=0.2))
        journal = store.cache("generation-batches")
        (record,) = journal.load(PARTITION).values()
        journal.append(PARTITION, [(record["input_file_id"], {**record, "batch_id": None})])  # as if killed right after creating it
        api.release()
        result = _generate(store, _batch_plan(api))
        assert (result.stats.failed, api.created, api.processed) == (0, 1, 12)


def test_requests_a_batch_failed_are_errors_then_go_out_in_a_new_batch(tmp_path):
    store = _store(tmp_path)
    first_batch = [True]
    doomed = set()

    def fail(custom_id: str) -> bool:
        if first_batch[0] and len(doomed) < 3:
            doomed.add(custom_id)
        return custom_id in doomed and first_batch[0]

    with BatchStandIn(_answers().reply, fail=fail) as api:
        first = _generate(store, _batch_plan(api))
        assert first.stats.failed == 3 and api.processed == 12
        assert sum("scripted failure" in (e or "") for e in first.rows.column("error").to_pylist()) == 3
        first_batch[0] = False
        second = _generate(store, _batch_plan(api))
        assert (second.stats.cache_hits, second.stats.sent, second.stats.failed) == (9, 3, 0)
        assert (api.created, api.processed) == (2, 15)  # only the failed three again


@pytest.mark.dagster
def test_the_ledger_prices_batch_requests_with_the_batch_discount(tmp_path, instance):
    with BatchStandIn(_answers().reply) as api:
        teacher = _batch_teacher(api)
        costs = {"prices": {"batched": {"input_per_million": 2.0, "output_per_million": 8.0, "batch_discount": 0.5}}}
        config = served_config(tmp_path, api.base_url, n_samples=4, teacher=teacher, generation={"shards": 1}, costs=costs)
        assert run_job(config, instance, SEED_JOB, "synthetic").success
        result = run_job(config, instance, TEACHER_JOB, "000|synthetic")
        assert result.success
        assert materializations(result)["cot_traces"]["requests_sent"] == 16 == api.processed and api.created == 1
    (row,) = CorpusStore(config.store.root).read_partition("cost_ledger", {"stage": "cot_traces", "partition": "000|synthetic"}).to_pylist()
    assert row["batched"] and row["batch_discount"] == 0.5
    full = (row["prompt_tokens"] * 2.0 + row["completion_tokens"] * 8.0) / 1e6
    assert row["token_cost"] == pytest.approx(full * 0.5)


@pytest.mark.slow
def test_a_batch_step_killed_while_its_batch_runs_resumes_the_batch(tmp_path, instance):
    """SIGKILL of the step while the provider holds its batch; the rerun collects that batch: paid once, at the stand-in."""
    with BatchStandIn(_answers().reply, hold=True) as api:
        teacher = _batch_teacher(api)
        config = served_config(tmp_path, api.base_url, n_samples=6, teacher=teacher, generation={"shards": 1})
        assert run_job(config, instance, SEED_JOB, "synthetic").success
        journal = CorpusStore(config.store.root).cache("generation-batches")
        partition = {"source": "synthetic", "shard": "000"}
        child = start_run(config, instance, TEACHER_JOB, "000|synthetic", start_new_session=True)
        wait_while_running(child, lambda: any(r.get("batch_id") for r in journal.load(partition).values()), 120)
        os.killpg(child.pid, signal.SIGKILL)
        child.wait()
        assert api.created == 1 and api.processed == 0
        api.release()
        result = run_job(config, instance, TEACHER_JOB, "000|synthetic")
        assert result.success
        assert (api.created, api.processed) == (1, 24)
        rows = CorpusStore(config.store.root).read_partition("cot_traces", partition)
        assert rows.num_rows == 24 and rows.column("error").null_count == 24


# -- several endpoints ---------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_one_of_two_endpoints_killed_mid_shard_costs_its_in_flight_requests_only(tmp_path):
    servers = [
        subprocess.Popen([sys.executable, str(TESTS / "scripted_teacher.py"), "0.05"], stdout=subprocess.PIPE, text=True, cwd=TESTS)
        for _ in range(2)
    ]
    try:
        urls = [server.stdout.readline().strip() for server in servers]
        store = _store(tmp_path, n=40)
        backend = OpenAIBackend(urls, "scripted", identity="pooled", max_concurrency=4, max_retries=2, retry_wait_s=(0.05, 0.2))

        def kill_one() -> None:
            time.sleep(0.6)
            servers[0].kill()

        import threading

        killer = threading.Thread(target=kill_one)
        killer.start()
        result = generate_shard(store, "s", "000", backend, PROMPT, GENERATION)
        killer.join()
        assert servers[0].poll() is not None  # it died while the shard was being generated
        assert (result.stats.sent, result.stats.failed) == (80, 0)
        assert all(error is None for error in result.rows.column("error").to_pylist())
        retried = result.stats.attempts - result.stats.sent
        assert 1 <= retried <= 2 * 4  # what the dead server held (at most its 4 in flight), each once more; not the shard
        dead, alive = backend.endpoints
        assert dead.failed_connections >= 1 and alive.sent > dead.sent
    finally:
        for server in servers:
            server.kill()


def test_endpoints_are_a_list_in_the_project_file_and_replicas_need_vllm_online():
    config = LLMConfig(backend="openai", base_url=["http://a/v1", "http://b/v1"], model="m")
    assert config.base_urls == ["http://a/v1", "http://b/v1"]
    assert LLMConfig(backend="vllm", replicas=2, tensor_parallel_size=2).gpus_needed == 4
    with pytest.raises(ValueError, match="replicas"):
        LLMConfig(backend="vllm", replicas=2, mode="batch")
    with pytest.raises(ValueError, match="gpus: 3 listed, 4 needed"):
        LLMConfig(backend="vllm", replicas=2, tensor_parallel_size=2, gpus="0,1,2")
    with pytest.raises(ValueError, match="mode: batch"):
        LLMConfig(backend="transformers", mode="batch")
    with pytest.raises(ValueError, match="base_url"):
        LLMConfig(backend="openai", base_url=[], model="m")


# -- vLLM's offline engine -------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_an_offline_engine_step_killed_mid_shard_leaves_no_engine_and_resumes_paying_at_most_a_flush_again(
    tiny_teacher, tmp_path, instance
):
    journal = tmp_path / "engine-journal.txt"
    teacher = {
        "backend": "vllm",
        "mode": "batch",
        "model": "tiny:teacher",
        "python": str(VLLM_PYTHON),
        "max_model_len": 1024,
        "batch_window": 8,  # a small window: the engine finishes requests a few at a time, the step flushes between
        "env": {"OMNITHOUGHT_ENGINE_JOURNAL": str(journal)},
    }
    generation = {"shards": 1, "flush_every": 4, "max_tokens": 96}
    config = served_config(tmp_path, "", n_samples=30, teacher=teacher, generation=generation, models_dir=str(tiny_teacher.parent))
    assert run_job(config, instance, SEED_JOB, "synthetic").success
    cache = CorpusStore(config.store.root).cache("generation")
    partition = {"source": "synthetic", "shard": "000"}
    child = start_run(config, instance, TEACHER_JOB, "000|synthetic", start_new_session=True)
    wait_while_running(child, lambda: cache.batch_count(partition) >= 3, 300)
    child.kill()  # the step's process alone: its engine must end by itself (the guard)
    child.wait()
    assert_none_left("vllm_worker.py", timeout=60)
    cached = len(cache.load(partition))
    assert 12 <= cached < 120

    result = run_job(config, instance, TEACHER_JOB, "000|synthetic")
    assert result.success
    assert materializations(result)["cot_traces"]["requests_sent"] == 120 - cached
    finished = journal.read_text().split("\n")[:-1]
    again = len(finished) - len(set(finished))
    print(f"engine finished {len(finished)} requests for {len(set(finished))} keys; {cached} cached when killed; {again} finished twice")
    assert set(finished) >= set(cache.load(partition)) and len(set(finished)) == 120
    assert again <= 4 + 8  # unflushed replies (under one flush) and what the engine had finished in its last steps
    assert not processes_mentioning("vllm_worker.py")


@pytest.mark.slow
def test_two_vllm_replicas_with_one_killed_complete_every_request(tiny_teacher, tmp_path):
    store = _store(tmp_path, n=30)
    config = LLMConfig(
        backend="vllm", model="tiny:teacher", python=str(VLLM_PYTHON), max_model_len=1024, replicas=2, max_concurrency=4, max_retries=2
    )
    with open_backend(config, models_dir=str(tiny_teacher.parent)) as backend:
        assert len(backend.endpoints) == 2
        port = backend.endpoints[0].base_url.split(":")[-1].split("/")[0]
        guards = [p for p in processes_mentioning("api_server", f"--port {port} ") if " -m omnithought_dagster.processes guard " in p]
        assert len(guards) == 1, guards
        import threading

        killer = threading.Timer(2.0, lambda: os.killpg(int(guards[0].split()[0]), signal.SIGKILL))
        killer.start()
        result = generate_shard(store, "s", "000", backend, PROMPT, GenerationConfig(**{**GENERATION.model_dump(), "max_tokens": 256}))
        killer.join()
    assert (result.stats.sent, result.stats.failed) == (60, 0)
    assert backend.endpoints[0].failed_connections >= 1


def test_a_key_handed_over_twice_at_once_is_answered_twice_from_one_line(tmp_path):
    import asyncio

    from omnithought_dagster.llm.backends import ChatRequest

    with BatchStandIn(_answers().reply) as api:
        config = LLMConfig(backend="openai", mode="batch", base_url=api.base_url, model="scripted", batch_poll_s=0.05)

        async def twice():
            with open_backend(config, models_dir="unused") as backend:
                request = ChatRequest("k", [{"role": "user", "content": "item 3"}], 16, 1.0, 1.0)
                replies = await asyncio.gather(backend.complete(request), backend.complete(request))
                await backend.aclose()
                return replies

        first, second = asyncio.run(twice())
    assert first.text == second.text and first.batched and api.processed == 1


def test_a_batch_the_provider_refuses_gives_its_keys_up_and_the_rerun_sends_them_anew(tmp_path):
    store = _store(tmp_path)
    with BatchStandIn(_answers().reply, hold=True) as api:
        _generate(store, _batch_plan(api, batch_timeout_s=0.2))  # journals file-1 and batch-1
        journal = store.cache("generation-batches")
        (record,) = journal.load(PARTITION).values()
        gone = {
            **record,
            "input_file_id": "file-gone",
            "batch_id": None,
            "created_at": record["created_at"] + 1,
        }  # a file the provider lost
        journal.append(
            PARTITION, [("file-gone", gone), (record["input_file_id"], {**record, "spent": dict.fromkeys(record["keys"], True)})]
        )
        api.release()
        refused = _generate(store, _batch_plan(api))  # the unknown file's batch: 400, every key an error, given up
        assert refused.stats.failed == 12 and api.created == 1
        assert all("refused" in (e or "") for e in refused.rows.column("error").to_pylist())
        after = _generate(store, _batch_plan(api))
        assert (after.stats.failed, api.created, api.processed) == (0, 2, 12 + 12)


def test_a_batch_whose_create_reply_was_lost_is_found_not_created_again(tmp_path):
    store = _store(tmp_path)
    with BatchStandIn(_answers().reply, lose_creates=1) as api:
        result = _generate(store, _batch_plan(api))
        assert (result.stats.failed, api.created, api.processed) == (0, 1, 12)


def test_the_ledger_prices_each_reply_as_it_was_paid():
    from omnithought_dagster.ledger.ledger import Payer, llm_row
    from omnithought_dagster.ledger.settings import CostsConfig, Price
    from omnithought_dagster.llm.backends import Completion

    replies = [Completion(str(i), "x", "stop", n_prompt_tokens=100, n_tokens=10, batched=i < 3) for i in range(5)]
    costs = CostsConfig(prices={"m": Price(input_per_million=1.0, output_per_million=10.0, batch_discount=0.5)})
    row = llm_row(Payer("cot_traces", "p", "teacher", "m", ("m",)), replies, None, None, costs)
    assert (row["batched"], row["batched_prompt_tokens"], row["batched_completion_tokens"]) == (True, 300, 30)
    assert row["token_cost"] == pytest.approx((200 * 1.0 + 20 * 10.0) / 1e6 + (300 * 1.0 + 30 * 10.0) / 1e6 * 0.5)
    again = Completion.from_payload("0", replies[0].to_payload())
    assert again.batched and "batched" not in replies[4].to_payload()  # an online reply's payload is as it was


def test_a_connection_that_cannot_be_made_in_time_is_unreachable_a_slow_reply_is_not():
    import httpx
    import openai

    from omnithought_dagster.llm.backends import _unreachable

    request = httpx.Request("POST", "http://x/v1/chat/completions")
    connect = openai.APITimeoutError(request)
    connect.__cause__ = httpx.ConnectTimeout("no connection")
    slow = openai.APITimeoutError(request)
    slow.__cause__ = httpx.ReadTimeout("no reply yet")
    assert _unreachable(connect) and not _unreachable(slow)
    assert _unreachable(openai.APIConnectionError(request=request))


FAKE_WORKER = """
import json, sys, time
print(json.dumps({"ready": True}), flush=True)
print("[1, 2]", flush=True)  # lines that are no reply: skipped
print('"text"', flush=True)
mode = sys.argv[1]
for line in sys.stdin:
    request = json.loads(line)
    if request["key"] == "answered":
        print(json.dumps({"id": request["id"], "text": "ok", "finish_reason": "stop", "n_prompt_tokens": 1, "n_tokens": 1}), flush=True)
    elif mode == "exit":
        sys.exit(3)
    # mode hang: holds the request and never answers
time.sleep(3600)
"""


@pytest.mark.parametrize("mode", ["hang", "exit"])
def test_an_offline_engine_that_hangs_or_dies_answers_every_waiting_request_with_an_error(tmp_path, mode):
    import asyncio

    from omnithought_dagster.llm.backends import ChatRequest
    from omnithought_dagster.llm.vllm_offline import OfflineEngine, VLLMOfflineBackend

    worker = tmp_path / "worker.py"
    worker.write_text(FAKE_WORKER)
    engine = OfflineEngine(
        sys.executable, [mode], environment=dict(os.environ), startup_timeout_s=30, log_dir=tmp_path, stall_s=1.0, worker=worker
    )
    engine.start()
    try:
        backend = VLLMOfflineBackend(engine, identity="fake", window=8)

        async def ask():
            requests = [ChatRequest(key, [{"role": "user", "content": "q"}], 8, 1.0, 1.0) for key in ("answered", "held")]
            return await asyncio.gather(*(backend.complete(r) for r in requests))

        started = time.monotonic()
        answered, held = asyncio.run(ask())
        assert answered.text == "ok" and held.finish_reason == "error"
        assert ("finished nothing" if mode == "hang" else "exited") in held.error
        assert time.monotonic() - started < 40
        assert engine.process.poll() is not None  # a hung engine is stopped, not left running
    finally:
        engine.stop(grace_s=2)
