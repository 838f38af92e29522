"""Several teachers and the cost ledger without a model: the `teachers:` list and its one-entry form, who judges whom,
replies stamped with the run that paid, a resumed run's ledger equal to an uninterrupted one's, prices (null where unknown),
the teacher report recomputed by hand, recipes restricted to a teacher, and the estimate's arithmetic."""

from __future__ import annotations

import asyncio
import contextlib

import pyarrow as pa
import pytest

from omnithought_dagster.annotate.annotations import annotate_shard
from omnithought_dagster.annotate.judge import judge_prompt
from omnithought_dagster.annotate.taxonomy import Taxonomy
from omnithought_dagster.config import AnnotationConfig, ConfigError, GenerationConfig, SeedSettings, SyntheticSourceConfig, parse_config
from omnithought_dagster.curation.sampling import draw
from omnithought_dagster.ledger.estimate import estimate, pick
from omnithought_dagster.ledger.ledger import PAID_COLUMNS, Payer, ledger_summary, llm_row, money, write_ledger
from omnithought_dagster.ledger.settings import CostsConfig, Price
from omnithought_dagster.llm.backends import ChatRequest, Completion
from omnithought_dagster.llm.runner import CacheView, PendingRequest, run_cached
from omnithought_dagster.seed.ingest import ingest_source
from omnithought_dagster.seed.sources import make_reader
from omnithought_dagster.store import CorpusStore
from omnithought_dagster.store.tables import ANNOTATIONS, COT_TRACES, FILTER_DECISIONS
from omnithought_dagster.teacher.prompt import teacher_prompt
from omnithought_dagster.teacher.report import TEACHER_REPORT_SQL, teacher_report
from omnithought_dagster.teacher.traces import BackendPlan, TeacherPlan, generate_teachers

from conftest import run_partition_checks, write_config

TEACHER = {"backend": "openai", "base_url": "http://127.0.0.1:9/v1", "model": "m-a"}


def _config(tmp_path, **extra):
    raw = {"sources": [{"name": "s", "kind": "synthetic", "n_samples": 4}], **extra}
    return parse_config(raw, base_dir=tmp_path)


# -- the project file ---------------------------------------------------------------------------------------------------


def test_one_teacher_is_the_one_entry_form_of_the_list(tmp_path):
    from omnithought_dagster.assets.annotate import annotations_settings
    from omnithought_dagster.assets.teacher import traces_settings

    single = _config(tmp_path, teacher=TEACHER)
    listed = _config(tmp_path, teachers=[TEACHER])
    assert [t.label for t in single.teachers] == [t.label for t in listed.teachers] == ["m-a"]
    assert single.teacher == listed.teacher == listed.teachers[0]
    # The same hashes: a project moving to the list form re-runs nothing.
    assert traces_settings(single) == traces_settings(listed) == {"teacher": single.teacher.output_settings(), **_generation(single)}
    assert annotations_settings(single) == annotations_settings(listed)
    assert "rollouts" not in single.teacher.output_settings()  # unset, it stays out of the hash
    default = _config(tmp_path)
    assert default.teachers == [default.teacher] and default.teacher.model == "tiny:teacher"


def _generation(config) -> dict:
    return {"generation": config.generation.output_settings()}


def test_a_judge_is_another_model_when_there_is_one(tmp_path):
    same = {**TEACHER, "name": "a2"}  # the same served model under a second name
    other = {**TEACHER, "model": "m-b", "name": "b"}
    config = _config(tmp_path, teachers=[TEACHER, same, other])
    assert [config.judge_for(t.label).label for t in config.teachers] == ["b", "b", "m-a"]
    alone = _config(tmp_path, teachers=[TEACHER, same])  # no other model: the next teacher
    assert [alone.judge_for(t.label).label for t in alone.teachers] == ["a2", "m-a"]


def test_each_model_gets_its_own_key_and_a_model_naming_none_gets_none(monkeypatch):
    from omnithought_dagster.config import LLMConfig
    from omnithought_dagster.resources import LLMResource

    monkeypatch.setenv("KEY_B", "secret-b")
    resource = LLMResource(api_key="secret-a", api_key_env="KEY_A")
    common = {"backend": "openai", "base_url": "http://127.0.0.1:9/v1"}
    assert resource.key_for(LLMConfig(**common, model="a", api_key_env="KEY_A")) == "secret-a"
    assert resource.key_for(LLMConfig(**common, model="b", api_key_env="KEY_B")) == "secret-b"
    assert resource.key_for(LLMConfig(**common, model="c")) is None
    assert resource.key_for(LLMConfig(**common, model="d", api_key_env="KEY_MISSING")) is None


def test_two_teachers_judge_each_other_unless_a_judge_is_configured(tmp_path):
    b = {**TEACHER, "model": "m-b", "name": "b", "rollouts": 2}
    config = _config(tmp_path, teachers=[TEACHER, b])
    assert [config.judge_for(t.label).label for t in config.teachers] == ["b", "m-a"]
    assert [j.label for j in config.judges] == ["b", "m-a"]
    assert [config.rollouts_of(t) for t in config.teachers] == [4, 2]
    judged = _config(tmp_path, teachers=[TEACHER, b], judge={**TEACHER, "model": "judge"})
    assert {config.label for config in judged.judges} == {"judge"}
    assert _config(tmp_path, teacher=TEACHER).judge_for("m-a").label == "m-a"  # alone, a teacher judges itself


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"teacher": TEACHER, "teachers": [{**TEACHER, "model": "other"}]}, "teacher and teachers"),
        ({"teachers": [TEACHER, TEACHER]}, "give each teacher its own name"),
        ({"teachers": [TEACHER, {**TEACHER, "name": "m-a", "model": "x"}]}, "give each teacher its own name"),
        (
            {"teachers": [TEACHER], "recipes": [{"name": "r", "size": 2, "difficulty_mix": {"easy": 1}, "teachers": ["nobody"]}]},
            "no teacher",
        ),
        (
            {
                "teachers": [TEACHER],
                "recipes": [
                    {"name": "r", "size": 2, "difficulty_mix": {"easy": 1}, "controls": ["c"]},
                    {"name": "c", "kind": "random", "teachers": ["m-a"]},
                ],
            },
            "takes it from the recipe",
        ),
        ({"teachers": [{**TEACHER, "rollouts": 0}]}, "rollouts"),
        ({"costs": {"prices": {"m-a": {"batch_discount": 1.5}}}}, "batch_discount"),
    ],
)
def test_bad_teacher_settings_are_refused(tmp_path, extra, message):
    with pytest.raises(ConfigError, match=message):
        _config(tmp_path, **extra)


def test_a_recipe_without_teachers_keeps_its_hash(tmp_path):
    from omnithought_dagster.curation.settings import RecipeConfig

    recipe = RecipeConfig(name="r", size=2, difficulty_mix={"easy": 1})
    assert "teachers" not in recipe.output_settings()
    assert RecipeConfig(name="r", size=2, difficulty_mix={"easy": 1}, teachers=["a"]).output_settings()["teachers"] == ["a"]


# -- money ----------------------------------------------------------------------------------------------------------------


def _row(**values) -> dict:
    return {"prompt_tokens": 2_000_000, "completion_tokens": 500_000, "gpu_seconds": 7200.0, "batched": False, **values}


def test_money_is_null_without_a_price_and_exact_with_one():
    costs = CostsConfig(prices={"a": Price(input_per_million=0.5, output_per_million=2.0, batch_discount=0.5, gpu_hour=3.0)})
    unknown = money(_row(), costs.price("nobody"), costs)
    assert unknown["cost"] is None and unknown["token_cost"] is None and unknown["price_version"] is None
    assert money(_row(), Price(), costs)["cost"] is None  # a price that prices nothing is no price
    known = money(_row(), costs.price(None, "a"), costs)
    assert known["token_cost"] == pytest.approx(2 * 0.5 + 0.5 * 2.0)
    assert known["gpu_cost"] == pytest.approx(2 * 3.0)
    assert known["cost"] == pytest.approx(8.0) and known["price_version"] == costs.version
    everything_batched = _row(batched=True, batched_prompt_tokens=2_000_000, batched_completion_tokens=500_000)
    assert money(everything_batched, costs.price("a"), costs)["token_cost"] == pytest.approx(1.0)  # the batch discount
    half = _row(batched=True, batched_prompt_tokens=1_000_000, batched_completion_tokens=0)  # a mode switch: replies of both
    assert money(half, costs.price("a"), costs)["token_cost"] == pytest.approx(2.0 - 1 * 0.5 * 0.5)
    input_only = CostsConfig(prices={"a": Price(input_per_million=1.0)})
    assert money(_row(), input_only.price("a"), input_only)["cost"] is None  # completion tokens used, their price unknown
    assert money(_row(completion_tokens=0), input_only.price("a"), input_only)["cost"] == pytest.approx(2.0)  # GPU time: not by this price
    by_time = CostsConfig(prices={"a": Price(gpu_hour=4.0)})
    assert money(_row(), by_time.price("a"), by_time)["cost"] == pytest.approx(8.0)  # self-hosted: its tokens are not billed
    assert money(_row(unstamped=3), by_time.price("a"), by_time)["cost"] is None  # some engine time unknown: no guess
    assert by_time.version != costs.version


# -- stamps, resume ---------------------------------------------------------------------------------------------------------


class FakeBackend:
    """Answers every request at once with tokens that depend on the key alone; counts what it was sent."""

    supports_structured_output = True

    def __init__(self, identity: str = "fake", fail: set[str] = frozenset(), devices: int = 0):
        self.identity, self.fail, self.devices = identity, set(fail), devices
        self.sent: list[str] = []
        self.max_concurrency = 4

    async def complete(self, request: ChatRequest) -> Completion:
        self.sent.append(request.key)
        await asyncio.sleep(0.001)
        if request.key in self.fail:
            return Completion(request.key, None, "error", attempts=3, error="boom")
        n = int(request.key[-2:], 16) if all(c in "0123456789abcdef" for c in request.key[-2:]) else 7
        return Completion(request.key, f"reply {request.key}", "stop", n_prompt_tokens=100 + n, n_tokens=10 + n, attempts=1 + n % 2)

    async def aclose(self) -> None:
        return None


class MemoryCache:
    def __init__(self):
        self.rows: dict[str, dict] = {}

    def view(self) -> CacheView:
        return CacheView(load=lambda: dict(self.rows), append=lambda batch: self.rows.update(batch) or len(batch))


def _pending(keys):
    return [PendingRequest(k, lambda k=k: ChatRequest(k, [], 8, 0.0, 1.0)) for k in keys]


def test_replies_are_stamped_and_a_resumed_run_costs_what_an_uninterrupted_one_does():
    keys = [f"k{i:02x}" for i in range(40)]
    payer = Payer("cot_traces", "0|s", "teacher", "fake", ("fake",))
    costs = CostsConfig(prices={"fake": Price(input_per_million=1.0, output_per_million=4.0)})

    whole_cache, whole = MemoryCache(), FakeBackend(devices=2)
    done = run_cached(_pending(keys), lambda: contextlib.nullcontext(whole), whole_cache.view(), flush_every=8, run_label="run-1")
    assert all(
        c.paid_by == "run-1" and c.engine_s is not None and c.gpu_s == pytest.approx(2 * c.engine_s, abs=1e-5)
        for c in done.completions.values()
    )
    assert all(p["paid_by"] == "run-1" for p in whole_cache.rows.values())  # stamped before they were cached
    uninterrupted = llm_row(payer, done.completions.values(), done.stats, "run-1", costs)

    # A run killed after 16 replies had flushed them; the next run sends only the rest and pays for nothing twice.
    cache, first, second = MemoryCache(), FakeBackend(), FakeBackend()
    run_cached(_pending(keys[:16]), lambda: contextlib.nullcontext(first), cache.view(), flush_every=8, run_label="killed")
    resumed = run_cached(_pending(keys), lambda: contextlib.nullcontext(second), cache.view(), flush_every=8, run_label="resume")
    assert len(second.sent) == 24 and resumed.stats.cache_hits == 16
    row = llm_row(payer, resumed.completions.values(), resumed.stats, "resume", costs)
    assert {c: row[c] for c in PAID_COLUMNS} == {c: uninterrupted[c] for c in PAID_COLUMNS}
    assert row["cost"] == pytest.approx(uninterrupted["cost"]) and row["cost"] > 0
    assert (row["paid_by_runs"], row["requests_sent"], row["cache_hits"]) == (2, 24, 16)
    assert (uninterrupted["paid_by_runs"], uninterrupted["requests_sent"], uninterrupted["cache_hits"]) == (1, 40, 0)
    # Independent route: the tokens summed from the cached payloads themselves.
    assert row["completion_tokens"] == sum(p["n_tokens"] for p in cache.rows.values())

    # A fully cached rerun sends nothing and its ledger row is the same again.
    again_backend = FakeBackend()
    again = run_cached(_pending(keys), lambda: contextlib.nullcontext(again_backend), cache.view(), run_label="rerun")
    assert again_backend.sent == [] and {
        c: llm_row(payer, again.completions.values(), again.stats, "rerun", costs)[c] for c in PAID_COLUMNS
    } == {c: uninterrupted[c] for c in PAID_COLUMNS}


def test_failures_are_counted_not_cached_and_old_payloads_read_back():
    keys = [f"k{i:02x}" for i in range(6)]
    cache, backend = MemoryCache(), FakeBackend(fail={"k03"})
    result = run_cached(_pending(keys), lambda: contextlib.nullcontext(backend), cache.view(), flush_every=2, run_label="r")
    row = llm_row(Payer("annotations", "0|s", "judge", "fake"), result.completions.values(), result.stats, "r", CostsConfig())
    assert (row["requests_ok"], row["requests_failed"], row["cost"], row["price_version"]) == (5, 1, None, None)
    assert "k03" not in cache.rows and result.completions["k03"].paid_by == "r"
    old = Completion.from_payload(
        "x", {"text": "t", "finish_reason": "stop", "n_prompt_tokens": 1, "n_tokens": 2, "latency_s": 0.1, "attempts": 1}
    )
    assert old.paid_by is None and old.engine_s is None
    assert llm_row(Payer("s", "p", "teacher", "m"), [old], None, None, CostsConfig())["unstamped"] == 1


# -- several teachers through the domain functions --------------------------------------------------------------------------


@pytest.fixture
def seeded(tmp_path):
    """A store whose seed_pool holds 6 synthetic samples."""
    store = CorpusStore(str(tmp_path / "store"))
    source = SyntheticSourceConfig(name="s", kind="synthetic", n_samples=6)
    result = ingest_source("s", make_reader(source).records(), SeedSettings(), image_root=None, put_image=store.images.put)
    store.write_partition("seed_pool", "s", result.kept)
    return store


def _plan(backend: FakeBackend, names=()) -> BackendPlan:
    return BackendPlan(backend.identity, True, lambda: contextlib.nullcontext(backend), names=names or (backend.identity,))


def _teacher(backend: FakeBackend, rollouts: int) -> TeacherPlan:
    generation = GenerationConfig(rollouts=rollouts, shards=1)
    return TeacherPlan(backend.identity, _plan(backend), teacher_prompt(generation, "json"), generation)


def test_every_teacher_writes_its_rollouts_and_the_other_judges_them(seeded):
    a, b = FakeBackend("teacher-a"), FakeBackend("teacher-b")
    result = generate_teachers(seeded, "s", "000", [_teacher(a, 3), _teacher(b, 2)], run_label="r1")
    rows = result.rows.to_pylist()
    assert len(a.sent) == 18 and len(b.sent) == 12 and len(rows) == 30
    assert {(r["teacher"], r["rollout"]) for r in rows} == {("teacher-a", i) for i in range(3)} | {("teacher-b", i) for i in range(2)}
    assert len({r["trace_id"] for r in rows}) == 30
    seeded.write_partition("cot_traces", {"source": "s", "shard": "000"}, result.rows)

    # The 1% growth rule, per teacher: a rerun sends nothing to either.
    again = generate_teachers(seeded, "s", "000", [_teacher(FakeBackend("teacher-a"), 3), _teacher(FakeBackend("teacher-b"), 2)])
    assert again.stats.sent == 0 and again.stats.cache_hits == 30

    judges = {"teacher-a": FakeBackend("judge-of-a"), "teacher-b": FakeBackend("judge-of-b")}
    plans = {teacher: _plan(judge) for teacher, judge in judges.items()}
    settings = AnnotationConfig()
    annotated = annotate_shard(
        seeded,
        "s",
        "000",
        lambda teacher: plans[teacher],
        judge_prompt(settings),
        settings,
        Taxonomy.load(settings.taxonomy),
        run_label="r1",
    )
    by_trace = {r["trace_id"]: r["teacher"] for r in rows}
    annotators = {(by_trace[r["trace_id"]], r["annotator"]) for r in annotated.rows.to_pylist()}
    assert annotators == {("teacher-a", "judge-of-a"), ("teacher-b", "judge-of-b")}
    assert (len(judges["teacher-a"].sent), len(judges["teacher-b"].sent)) == (18, 12)
    assert [(p.identity, teachers) for p, _, teachers in annotated.runs] == [("judge-of-a", ["teacher-a"]), ("judge-of-b", ["teacher-b"])]


class SeedRecorder(FakeBackend):
    """A FakeBackend that also keeps each request's seed."""

    def __init__(self, identity: str):
        super().__init__(identity)
        self.seeds: dict[str, int | None] = {}

    async def complete(self, request: ChatRequest) -> Completion:
        self.seeds[request.key] = request.seed
        return await super().complete(request)


@pytest.mark.parametrize("send_seed", [True, False])
def test_a_judge_sampling_sends_each_request_a_seed_of_its_own_id(seeded, tmp_path, send_seed):
    """A judge at temperature > 0 answers the same request the same way on a rerun, another machine or in a container:
    its seed is derived from the request's id (as a teacher's rollout's), unless the judge's send_seed is off."""
    result = generate_teachers(seeded, "s", "000", [_teacher(FakeBackend("t"), 2)])
    seeded.write_partition("cot_traces", {"source": "s", "shard": "000"}, result.rows)
    settings = AnnotationConfig(temperature=1.0, with_images=False)
    seeds = []
    for attempt in range(2):  # two stores' worth of caches: the second run sends again, with the same seeds
        judge = SeedRecorder(f"judge-{attempt}")
        plan = BackendPlan("judge", True, lambda judge=judge: contextlib.nullcontext(judge), send_seed=send_seed)
        store = CorpusStore(str(tmp_path / f"copy-{attempt}"))
        for table, partition in (("seed_pool", "s"), ("cot_traces", {"source": "s", "shard": "000"})):
            store.write_partition(table, partition, seeded.read_partition(table, partition))
        annotate_shard(store, "s", "000", plan, judge_prompt(settings), settings, Taxonomy.load(settings.taxonomy))
        assert len(judge.seeds) == 12
        seeds.append(judge.seeds)
    assert seeds[0] == seeds[1]
    if send_seed:
        assert all(seed == int(key[:8], 16) % (2**31) for key, seed in seeds[0].items()) and len(set(seeds[0].values())) == 12
    else:
        assert set(seeds[0].values()) == {None}


def test_two_teachers_with_one_identity_are_refused(seeded):
    with pytest.raises(ValueError, match="own name"):
        generate_teachers(seeded, "s", "000", [_teacher(FakeBackend("same"), 1), _teacher(FakeBackend("same"), 1)])


# -- the teacher report, recomputed by hand -----------------------------------------------------------------------------------


def _write(store: CorpusStore, table, partition, rows):
    spec = {"cot_traces": COT_TRACES, "annotations": ANNOTATIONS, "filter_decisions": FILTER_DECISIONS}[table]
    full = [{c: row.get(c, _default(spec, c)) for c in spec.column_names} for row in rows]
    store.write_partition(table, partition, pa.Table.from_pylist(full, schema=spec.schema))


def _default(spec, column):
    field = spec.schema.field(column)
    if pa.types.is_list(field.type):
        return []
    if field.nullable:
        return None
    return {pa.bool_(): False, pa.string(): "x", pa.int32(): 0, pa.float64(): 0.0}.get(field.type, None)


@pytest.fixture
def reported(tmp_path):
    """Two teachers over four samples: a solves samples 0 and 1 (one of two rollouts each), b solves nothing; a's correct
    traces are kept; ledger: a priced, b not."""
    store = CorpusStore(str(tmp_path / "report"))
    traces, annotations, decisions = [], [], []
    for teacher, rollouts in (("a", 2), ("b", 1)):
        for sample in range(4):
            for rollout in range(rollouts):
                trace = f"{teacher}{sample}{rollout}"
                correct = teacher == "a" and sample < 2 and rollout == 0
                traces.append(
                    {
                        "trace_id": trace,
                        "sample_id": f"s{sample}",
                        "source": "src",
                        "shard": "000",
                        "teacher": teacher,
                        "rollout": rollout,
                        "finish_reason": "stop",
                        "n_tokens": 10 * (rollout + 1),
                        "latency_s": 1.0 + sample,
                    }
                )
                annotations.append(
                    {
                        "trace_id": trace,
                        "sample_id": f"s{sample}",
                        "source": "src",
                        "shard": "000",
                        "annotator": "b" if teacher == "a" else "a",
                        "correct": correct,
                        "quality": 8 if correct else 2,
                        "verbosity": 5,
                        "pass_rate": 0.5,
                        "difficulty_label": "easy" if sample < 2 else "hard",
                        "tags": ["counting"] if sample % 2 else ["chart", "ocr"],
                    }
                )
                reasons = [] if correct else [{"code": "wrong_answer", "value": 0.0, "threshold": None, "detail": None}]
                decisions.append(
                    {
                        "trace_id": trace,
                        "sample_id": f"s{sample}",
                        "source": "src",
                        "shard": "000",
                        "rollout": rollout,
                        "teacher": teacher,
                        "kept": correct,
                        "reasons": reasons,
                        "difficulty_label": "easy",
                        "preference": 0.0,
                    }
                )
    _write(store, "cot_traces", {"source": "src", "shard": "000"}, traces)
    _write(store, "annotations", {"source": "src", "shard": "000"}, annotations)
    _write(store, "filter_decisions", "src", decisions)
    costs = CostsConfig(prices={"a": Price(input_per_million=1000.0, output_per_million=1000.0)})
    completions = [Completion(f"x{i}", "t", "stop", n_prompt_tokens=60, n_tokens=40, engine_s=0.5) for i in range(8)]
    write_ledger(
        store,
        "cot_traces",
        "000|src",
        [
            llm_row(Payer("cot_traces", "000|src", "teacher", "a", ("a",)), completions, None, "r", costs),
            llm_row(Payer("cot_traces", "000|src", "teacher", "b", ("b",)), completions[:4], None, "r", costs),
        ],
    )
    return store


def test_the_teacher_report_matches_a_recount(reported):
    report = teacher_report(reported.catalog())
    a, b = report.overall
    assert (a["teacher"], a["traces"], a["samples"], b["traces"]) == ("a", 8, 4, 4)
    assert a["accuracy"] == pytest.approx(2 / 8) and b["accuracy"] == 0
    assert a["pass_rate"] == pytest.approx(2 / 4) and b["pass_rate"] == 0  # samples one of its rollouts solved
    assert (a["kept"], a["kept_share"], b["kept"]) == (2, pytest.approx(0.25), 0)
    assert a["judge_quality"] == pytest.approx((2 * 8 + 6 * 2) / 8) and a["judged_by"] == "b"
    assert a["tokens_per_trace"] == pytest.approx(15.0) and a["latency_s"] == pytest.approx(2.5)
    assert a["cost"] == pytest.approx(8 * 100 * 1000 / 1e6) and a["cost_per_1000_kept"] == pytest.approx(0.8 / 2 * 1000)
    assert b["cost"] is None and b["cost_per_1000_kept"] is None  # unpriced: unknown, not zero
    easy = next(r for r in report.rows if r["teacher"] == "a" and r["slice"] == "easy")
    assert (easy["traces"], easy["accuracy"], easy["pass_rate"]) == (4, pytest.approx(0.5), 1.0)
    chart = next(r for r in report.rows if r["teacher"] == "a" and r["slice_kind"] == "tag" and r["slice"] == "chart")
    assert chart["traces"] == 4 and chart["cost"] is None  # costs are overall only
    assert report.drop_reasons == {"a": {"wrong_answer": 6}, "b": {"wrong_answer": 4}}
    # A teacher whose traces no judge has seen has no pass rate (not 0).
    _write(
        reported,
        "cot_traces",
        {"source": "src", "shard": "001"},
        [{"trace_id": "c0", "sample_id": "s9", "source": "src", "shard": "001", "teacher": "c", "rollout": 0, "finish_reason": "stop"}],
    )
    unjudged = next(r for r in teacher_report(reported.catalog()).overall if r["teacher"] == "c")
    assert unjudged["accuracy"] is None and unjudged["pass_rate"] is None and unjudged["kept"] == 0
    # One source only; and the published SQL is what produced the numbers.
    assert teacher_report(reported.catalog(), ["nowhere"]).rows == []
    con = reported.catalog()
    assert con.execute(TEACHER_REPORT_SQL, {"sources": None}).fetchall()[0][:4] == ("a", "all", "all", 8)
    summary = {(r["role"], r["model"]): r for r in ledger_summary(reported.catalog())}
    assert summary[("teacher", "a")]["completion_tokens"] == 320 and summary[("teacher", "b")]["cost"] is None
    assert summary[("teacher", "a")]["cost"] == pytest.approx(0.8)
    # Partitions priced in two currencies do not add up to a number.
    euros = CostsConfig(currency="EUR", prices={"a": Price(input_per_million=1.0, output_per_million=1.0)})
    completions = [Completion("y", "t", "stop", n_prompt_tokens=1, n_tokens=1, engine_s=0.1)]
    write_ledger(
        reported, "cot_traces", "001|src", [llm_row(Payer("cot_traces", "001|src", "teacher", "a", ("a",)), completions, None, "r", euros)]
    )
    mixed = {(r["role"], r["model"]): r for r in ledger_summary(reported.catalog())}[("teacher", "a")]
    assert mixed["cost"] is None and mixed["currency"] == "mixed"
    assert next(r for r in teacher_report(reported.catalog()).overall if r["teacher"] == "a")["cost"] is None


def test_a_recipe_draws_from_its_teachers_only(reported):
    from omnithought_dagster.curation.settings import RecipeConfig

    _write(
        reported,
        "filter_decisions",
        "src",
        [
            {
                "trace_id": f"{t}{s}0",
                "sample_id": f"s{s}",
                "source": "src",
                "shard": "000",
                "rollout": 0,
                "kept": True,
                "tags": ["chart"],
                "difficulty_label": "easy",
                "preference": 0.0,
            }
            for t in ("a", "b")
            for s in range(4)
        ],
    )  # written before decisions carried the teacher: the teacher comes from cot_traces
    recipe = RecipeConfig(name="r", size=3, difficulty_mix={"easy": 1}, teachers=["A"])
    members = draw(reported, recipe, teachers={"A": "a", "B": "b"}).members.column("trace_id").to_pylist()
    assert len(members) == 3 and all(m.startswith("a") for m in members)
    both = draw(reported, recipe.model_copy(update={"teachers": None, "size": 8})).members.column("trace_id").to_pylist()
    assert {m[0] for m in both} == {"a", "b"}
    with pytest.raises(KeyError, match="no identity"):
        draw(reported, recipe, teachers={})

    # The teacher arm: a curated recipe as another's control keeps its own teachers and takes the recipe's realised size.
    arm = RecipeConfig(name="from-b", difficulty_mix={"easy": 1}, teachers=["B"], seed=3)
    drawn = draw(reported, arm, curated=recipe.model_copy(update={"size": 2}), teachers={"A": "a", "B": "b"})
    assert drawn.members.num_rows == 2 and all(m.startswith("b") for m in drawn.members.column("trace_id").to_pylist())
    # A random control of a teacher's recipe draws from that teacher's traces.
    control = RecipeConfig(name="c", kind="filtered")
    drawn = draw(reported, control, curated=recipe, teachers={"A": "a", "B": "b"})
    assert drawn.members.num_rows == 3 and all(m.startswith("a") for m in drawn.members.column("trace_id").to_pylist())


def test_a_teacher_arm_is_an_ordinary_experiment(tmp_path):
    b = {**TEACHER, "model": "m-b", "name": "b"}
    recipes = [
        {"name": "from-a", "size": 10, "difficulty_mix": {"easy": 1}, "teachers": ["m-a"], "controls": ["from-b"]},
        {"name": "from-b", "difficulty_mix": {"easy": 1}, "teachers": ["b"]},
    ]
    config = _config(
        tmp_path,
        teachers=[TEACHER, b],
        recipes=recipes,
        benchmarks=[{"name": "bench", "kind": "synthetic", "n_samples": 4}],
        evaluation={"benchmarks": ["bench"]},
        students=[{"name": "tiny"}],
        experiments=[{"name": "which-teacher", "recipes": ["from-a"], "students": ["tiny"], "seeds": [0, 1]}],
    )
    arms = [(a.arm, a.kind, a.seed, a.recipe_key, a.student_key) for a in config.arms("which-teacher")]
    assert arms == [
        ("from-a", "curated", 0, "from-a", "tiny"),
        ("from-b", "curated", 0, "from-b", "tiny"),
        ("from-a", "curated", 1, "from-a", "tiny-s1"),
        ("from-b", "curated", 1, "from-b-s1", "tiny-s1"),
    ]
    assert config.controlled_by("from-b-s1").name == "from-a" and config.recipe("from-b-s1").teachers == ["b"]


# -- the estimate -------------------------------------------------------------------------------------------------------------


def test_pick_is_deterministic_and_bounded():
    ids = [f"{i:032x}" for i in range(100)]
    assert pick(ids, 0.1, 8) == set(sorted(ids)[:10]) == pick(list(reversed(ids)), 0.1, 8)
    assert len(pick(ids, 0.01, 8)) == 8 and len(pick(ids[:5], 0.5, 8)) == 5


def test_the_estimate_scales_the_sample_to_the_run(seeded):
    a, b = FakeBackend("teacher-a"), FakeBackend("teacher-b")
    judge = FakeBackend("judge")
    settings = AnnotationConfig()
    costs = CostsConfig(prices={"teacher-a": Price(input_per_million=1.0, output_per_million=2.0)})
    result = estimate(
        seeded,
        ["s"],
        ["000"],
        [_teacher(a, 3), _teacher(b, 2)],
        lambda _t: _plan(judge),
        judge_prompt(settings),
        settings,
        Taxonomy.load(settings.taxonomy),
        costs,
        share=0.34,
        min_samples=1,
    )
    assert (result.samples, result.measured_samples) == (6, 3)
    models = {(m.role, m.model): m for m in result.models}
    assert (len(a.sent), len(b.sent), len(judge.sent)) == (9, 6, 15)  # the sample's requests, each once
    assert models[("teacher", "teacher-a")].planned_requests == 18 and models[("teacher", "teacher-b")].planned_requests == 12
    assert models[("judge", "judge")].planned_requests == 30
    ma = models[("teacher", "teacher-a")]
    assert ma.prompt_tokens == round(ma.prompt_tokens_per_request * 18) or abs(ma.prompt_tokens - ma.prompt_tokens_per_request * 18) < 1
    assert ma.cost == pytest.approx((ma.prompt_tokens * 1.0 + ma.completion_tokens * 2.0) / 1e6)
    assert models[("teacher", "teacher-b")].cost is None and result.cost is None
    # The run later finds the sample's replies in the cache: nothing measured is paid twice.
    run = generate_teachers(seeded, "s", "000", [_teacher(FakeBackend("teacher-a"), 3), _teacher(FakeBackend("teacher-b"), 2)])
    assert run.stats.cache_hits == 15 and run.stats.sent == 15


# -- the per-teacher rollouts check ------------------------------------------------------------------------------------------


def test_rollouts_complete_holds_every_teacher_to_its_own_count(tmp_path, instance):
    from omnithought_dagster.config import load_config

    teachers = [{**TEACHER, "name": "ta", "rollouts": 2}, {**TEACHER, "model": "m-b", "name": "tb", "rollouts": 1}]
    config = load_config(
        write_config(tmp_path, [{"name": "s", "kind": "synthetic", "n_samples": 3}], teachers=teachers, generation={"shards": 1})
    )
    store = CorpusStore(config.store.root)
    source = SyntheticSourceConfig(name="s", kind="synthetic", n_samples=3)
    seed = ingest_source("s", make_reader(source).records(), SeedSettings(), image_root=None, put_image=store.images.put)
    store.write_partition("seed_pool", "s", seed.kept)
    samples = seed.kept.column("sample_id").to_pylist()
    good = [
        {
            "trace_id": f"{teacher}-{sample}-{rollout}",
            "sample_id": sample,
            "source": "s",
            "shard": "000",
            "teacher": teacher,
            "rollout": rollout,
        }
        for sample in samples
        for teacher, n in (("ta", 2), ("tb", 1))
        for rollout in range(n)
    ]

    def verdict(rows) -> bool:
        _write(store, "cot_traces", {"source": "s", "shard": "000"}, rows)
        return run_partition_checks(config, instance, "cot_traces", "000|s")["rollouts_complete"].passed

    assert verdict(good)
    assert not verdict([r for r in good if r["teacher"] != "tb"])  # a teacher's traces missing
    assert not verdict([{**r, "rollout": 1} if r["teacher"] == "tb" else r for r in good])  # its rollouts not 0..N-1
    assert not verdict([*good, {**good[0], "trace_id": "x", "teacher": "stranger"}])  # a teacher the project does not have
