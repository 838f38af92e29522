"""filtered_set and sampled_subsets through the real Dagster jobs; export; checks failing on planted violations."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pytest
from typer.testing import CliRunner

from omnithought_dagster.cli import app
from omnithought_dagster.config import load_config
from omnithought_dagster.curation.export import ExportError, export_subset
from omnithought_dagster.defs import FILTER_JOB, SUBSET_JOB
from omnithought_dagster.store import CorpusStore

from conftest import check_evaluations, materializations, plot_image, rewrite_partition, run_job, run_partition_checks, write_config
from curation_data import build_store

RECIPES = [
    {"name": "even", "size": 12, "difficulty_mix": {"easy": 1, "medium": 1, "hard": 1}, "max_tag_share": 0.5, "traces_per_sample": 1},
    {"name": "big", "size": 500, "difficulty_mix": {"easy": 1, "hard": 1}, "traces_per_sample": 2},  # cannot be met: a shortfall
]


def _project(tmp_path, recipes=RECIPES, **curation):
    build_store(tmp_path / "store", n_samples=24)
    path = write_config(
        tmp_path,
        [{"name": "synthetic", "kind": "synthetic", "n_samples": 24}],
        benchmarks=[{"name": "held", "kind": "synthetic", "n_samples": 4, "seed": 0, "start_index": 22}],
        curation={
            "decontamination": {"benchmarks": ["held"], "require": "both", "image_max_distance": 0},
            "selection": {"max_traces_per_sample": 2},
            **curation,
        },
        recipes=recipes,
    )
    return load_config(path)


@pytest.fixture
def curated(tmp_path, instance):
    config = _project(tmp_path)
    results = {"filter": run_job(config, instance, FILTER_JOB, "synthetic")}
    for recipe in RECIPES:
        results[recipe["name"]] = run_job(config, instance, SUBSET_JOB, recipe["name"])
    return config, CorpusStore(config.store.root), results


def _status(checks) -> dict[str, str]:
    return {name: ("passed" if c.passed else c.severity.value) for name, c in checks.items()}


def test_filter_and_subsets_materialise_with_their_checks(curated):
    config, store, results = curated
    assert results["filter"].success
    assert _status(check_evaluations(results["filter"])) == {"one_decision_per_trace": "passed", "kept_traces_pass_the_rules": "passed"}
    meta = materializations(results["filter"])["filtered_set"]
    # 24 samples x 4 rollouts; the held-out benchmark overlaps samples 22 and 23; 2 traces kept per sample
    assert meta["traces"] == 96 and meta["contaminated_samples"] == 2 and meta["kept"] == 22 * 2
    assert meta["reason/contaminated_question"] == 8 and meta["reason/over_trace_cap"] == 22 * 2
    assert "| reason | traces |" in meta["drop_reasons"]
    assert "drop reasons" in meta["plot/drop_reasons"] and plot_image(meta["plot/drop_reasons"])
    assert plot_image(meta["plot/kept_by_difficulty"])

    even = materializations(results["even"])["sampled_subsets"]
    assert results["even"].success and even["size"] == 12 and even["shortfall"] == 0
    assert plot_image(even["plot/composition"]) and plot_image(even["plot/tags"])
    assert all(s == "passed" for s in _status(check_evaluations(results["even"])).values())
    big = results["big"]
    assert big.success  # a shortfall warns, it does not block
    assert _status(check_evaluations(big))["size_matches_recipe"] == "WARN"
    meta = materializations(big)["sampled_subsets"]
    # every eligible trace (easy and hard samples only: 15 of them, 2 traces each), and the rest reported
    assert meta["size"] == 30 and meta["shortfall"] == 470

    # Same inputs and recipe: same members and version.
    store_rows = store.read_partition("subset_members", "even")
    config2 = load_config(config.config_path)
    from omnithought_dagster.curation.sampling import load_candidates, sample_subset

    again = sample_subset(load_candidates(store, None), config2.recipes[0])
    assert again.version == store_rows.column("subset_version")[0].as_py() and again.members.equals(store_rows)


def test_lineage_shows_verdicts_subsets_and_a_subset_summary(curated):
    config, store, _ = curated
    member = store.read_partition("subset_members", "even").to_pylist()[0]
    runner = CliRunner()
    story = json.loads(runner.invoke(app, ["lineage", member["sample_id"], "--config", config.config_path, "--json"]).stdout)
    verdicts = {t["trace_id"]: t for t in story["traces"]}
    assert verdicts[member["trace_id"]]["verdict"]["kept"] and "even" in verdicts[member["trace_id"]]["subsets"]
    dropped = [t for t in story["traces"] if not t["verdict"]["kept"]]
    assert dropped and all(r["code"] == "over_trace_cap" for t in dropped for r in t["verdict"]["reasons"])
    text = runner.invoke(app, ["lineage", member["sample_id"], "--config", config.config_path]).output
    assert "dropped: over_trace_cap (3 vs 2)" in text or "dropped: over_trace_cap (4 vs 2)" in text
    summary = json.loads(runner.invoke(app, ["lineage", "--subset", "even", "--config", config.config_path, "--json"]).stdout)
    assert summary["members"] == 12 and sum(summary["by_difficulty"].values()) == 12 and sum(summary["by_tag"].values()) == 12
    assert "by primary tag" in runner.invoke(app, ["lineage", "--subset", "even", "--config", config.config_path]).output


@pytest.mark.parametrize("fmt", ["sharegpt", "llamafactory", "hf"])
def test_export_formats(curated, tmp_path, fmt):
    config, store, _ = curated
    report = export_subset(store, "even", fmt, tmp_path / fmt)
    assert report.examples == 12 and not report.set_aside and (tmp_path / fmt / "manifest.json").exists()
    images = list((tmp_path / fmt / "images").iterdir())
    assert len(images) == report.images == 12
    if fmt == "hf":
        import datasets

        dataset = datasets.load_from_disk(str(tmp_path / fmt / "dataset"))
        assert len(dataset) == 12 and dataset[0]["images"][0].size == (320, 320)
        assert dataset[0]["messages"][1]["content"].startswith("<think>\n")
        return
    data = json.loads((tmp_path / fmt / "data.json").read_text())
    example = data[0]
    turns = example["conversations"] if fmt == "sharegpt" else example["messages"]
    user = turns[0]["value" if fmt == "sharegpt" else "content"]
    assistant = turns[1]["value" if fmt == "sharegpt" else "content"]
    assert user.count("<image>") == len(example["images"]) == 1 and (tmp_path / fmt / example["images"][0]).exists()
    assert assistant.startswith("<think>\n") and "\n</think>\n\nAnswer: " in assistant
    if fmt == "llamafactory":
        info = json.loads((tmp_path / fmt / "dataset_info.json").read_text())
        assert list(info) == [report.dataset_name] and report.dataset_name == f"omnithought_even_{report.subset_version[:12]}"
        entry = info[report.dataset_name]
        assert entry["formatting"] == "sharegpt" and entry["columns"] == {"messages": "messages", "images": "images"}


def test_the_cutoff_counts_the_template_and_the_image_tokens_as_the_trainer_does(curated, tmp_path, tiny_teacher):
    """The old chars/4 estimate fell below the real count for every example (LLaMA-Factory then cut them): the cutoff now
    counts with the student's chat template and image expansion, and an over-long example is set aside, not cut."""
    from omnithought_dagster.models.vl_chat import VLTokenizer
    from omnithought_dagster.train.data import build_index

    config, store, _ = curated
    with pytest.raises(ExportError, match="needs the student's model folder"):
        export_subset(store, "even", "llamafactory", tmp_path / "x", cutoff_len=4096)
    report = export_subset(store, "even", "llamafactory", tmp_path / "all", cutoff_len=4096, tokenizer=str(tiny_teacher))
    index = build_index(tmp_path / "all", tmp_path / "index", VLTokenizer.load(tiny_teacher), 4096, "skip")
    lengths = sorted(index.lengths)
    assert report.max_tokens_seen == lengths[-1] and lengths[0] > 100  # 320x320 images: ~100 visual tokens each
    cutoff = lengths[len(lengths) // 2]
    cut = export_subset(store, "even", "llamafactory", tmp_path / "cut", cutoff_len=cutoff, tokenizer=str(tiny_teacher))
    assert cut.examples == sum(n <= cutoff for n in lengths) and len(cut.set_aside) == sum(n > cutoff for n in lengths)
    assert {a.reason for a in cut.set_aside} == {"over_cutoff"} and cut.max_tokens_seen == lengths[-1]
    manifest = json.loads((tmp_path / "cut" / "manifest.json").read_text())
    assert len(manifest["set_aside"]) == len(cut.set_aside) and manifest["cutoff_len"] == cutoff
    # A stored image that no longer decodes is that example's problem, not the export's.
    member = store.read_partition("subset_members", "even").to_pylist()[0]
    image = next(
        r["image_ids"][0] for r in store.read_partition("seed_pool", "synthetic").to_pylist() if r["sample_id"] == member["sample_id"]
    )
    Path(store.images.path(image)).write_bytes(b"\x89PNG\r\n\x1a\n not a picture")
    broken = export_subset(store, "even", "llamafactory", tmp_path / "broken", cutoff_len=4096, tokenizer=str(tiny_teacher))
    assert [(a.id, a.reason) for a in broken.set_aside] == [(member["trace_id"], "unreadable_image")] and broken.examples == 11


def test_the_preflight_sets_bad_examples_aside_and_writes_the_rest(curated, tmp_path, instance):
    config, store, _ = curated
    members = store.read_partition("subset_members", "even").to_pylist()
    seed = store.read_partition("seed_pool", "synthetic")
    traces = store.read_partition("cot_traces", {"source": "synthetic", "shard": "000"})
    rows = seed.to_pylist()
    by_sample = {m["sample_id"]: m["trace_id"] for m in members}
    questions = {members[0]["sample_id"]: "Look at <image> and answer.", members[1]["sample_id"]: "How many? <|im_end|>\n<|im_start|>user"}
    for row in rows:
        row["question"] = questions.get(row["sample_id"], row["question"])
    store.write_partition("seed_pool", "synthetic", pa.Table.from_pylist(rows, schema=seed.schema))
    trace_rows = traces.to_pylist()
    for row in trace_rows:
        if row["trace_id"] == members[2]["trace_id"]:
            row["reasoning"] = "We count.\u202e then </think> Answer: 9"
    store.write_partition("cot_traces", {"source": "synthetic", "shard": "000"}, pa.Table.from_pylist(trace_rows, schema=traces.schema))
    image = next(r["image_ids"][0] for r in rows if r["sample_id"] == members[3]["sample_id"])
    store.fs.delete_file(store.images.path(image))
    report = export_subset(store, "even", "llamafactory", tmp_path / "b")
    assert report.examples == 8 and {a.id: a.reason for a in report.set_aside} == {
        by_sample[members[0]["sample_id"]]: "image_placeholder_mismatch",
        by_sample[members[1]["sample_id"]]: "markup_in_text",
        members[2]["trace_id"]: "markup_in_text",
        by_sample[members[3]["sample_id"]]: "missing_image",
    }
    details = {a.id: a.detail for a in report.set_aside}
    assert details[members[2]["trace_id"]] == "its reasoning holds U+202E (control_character)"
    assert "'<|im_end|>' (special_token)" in details[by_sample[members[1]["sample_id"]]]
    data = json.loads((tmp_path / "b" / "data.json").read_text())
    assert len(data) == 8 and not any("<|" in m["content"] or "\u202e" in m["content"] for e in data for m in e["messages"])
    # With markup cleaned (curation.rules.markup: clean) the reply is written without it; the question is still set aside.
    cleaned = export_subset(store, "even", "llamafactory", tmp_path / "c", clean_markup=True)
    assert members[2]["trace_id"] not in {a.id for a in cleaned.set_aside} and cleaned.examples == 9
    reply = next(e for e in json.loads((tmp_path / "c" / "data.json").read_text()) if e["id"] == members[2]["trace_id"])["messages"][1]
    assert reply["content"] == "<think>\nWe count. then  Answer: 9\n</think>\n\nAnswer: " + reply["content"].rsplit("Answer: ", 1)[1]
    # The subset's check reports the same: 4 of 12 is over the 5% threshold, so it fails; under a 50% threshold it warns.
    checks = _status(run_partition_checks(config, instance, "sampled_subsets", "even"))
    assert checks["exportable"] == "ERROR"
    lenient = load_config(
        write_config(
            tmp_path / "lenient",
            [{"name": "synthetic", "kind": "synthetic", "n_samples": 24}],
            store_root=str(store.root_uri),
            recipes=RECIPES,
            curation={"max_set_aside_share": 0.5},
        )
    )
    assert _status(run_partition_checks(lenient, instance, "sampled_subsets", "even"))["exportable"] == "WARN"
    assert not (tmp_path / "a").exists()
    result = CliRunner().invoke(
        app, ["export", "even", "--format", "sharegpt", "--out", str(tmp_path / "d"), "--config", config.config_path]
    )
    assert result.exit_code == 0 and "set aside" in result.output and "missing_image" in result.output
    with pytest.raises(ExportError, match="no members"):
        export_subset(store, "nope", "hf", tmp_path / "e")


# -- checks on planted violations -------------------------------------------------------------------


def test_filter_checks_fail_on_planted_violations(curated, instance):
    config, store, _ = curated
    plant = lambda change: rewrite_partition(store, "filter_decisions", {"source": "synthetic"}, change)  # noqa: E731
    rows = store.read_partition("filter_decisions", "synthetic").to_pylist()
    dropped = next(i for i, r in enumerate(rows) if {x["code"] for x in r["reasons"]} == {"contaminated_question", "contaminated_image"})
    plant(lambda rs: [{**r, "kept": True, "reasons": []} if i == dropped else r for i, r in enumerate(rs)])
    checks = _status(run_partition_checks(config, instance, "filtered_set", "synthetic"))
    assert checks == {"one_decision_per_trace": "passed", "kept_traces_pass_the_rules": "ERROR"}
    plant(lambda rs: rs[1:])
    checks = _status(run_partition_checks(config, instance, "filtered_set", "synthetic"))
    assert checks["one_decision_per_trace"] == "ERROR"
    plant(lambda rs: rs + [rs[0]])
    assert _status(run_partition_checks(config, instance, "filtered_set", "synthetic"))["one_decision_per_trace"] == "ERROR"


def test_subset_checks_fail_on_planted_violations(curated, instance):
    config, store, _ = curated
    members = store.read_partition("subset_members", "even").to_pylist()
    decisions = store.read_partition("filter_decisions", "synthetic").to_pylist()

    def check(change) -> dict[str, str]:
        rewrite_partition(store, "subset_members", {"subset": "even"}, lambda rs: change([dict(r) for r in members]))
        return {k: v for k, v in _status(run_partition_checks(config, instance, "sampled_subsets", "even")).items() if v != "passed"}

    assert check(lambda rs: rs) == {}
    assert check(lambda rs: rs[:-1]) == {"size_matches_recipe": "ERROR"}  # silently smaller than the recipe
    assert check(lambda rs: [{**r, "stratum": "easy/x"} for r in rs]) == {"strata_within_tolerance": "ERROR"}
    dropped = next(d for d in decisions if not d["kept"] and d["sample_id"] not in {m["sample_id"] for m in members})
    swap = lambda rs: rs[:-1] + [{**rs[-1], "trace_id": dropped["trace_id"], "sample_id": dropped["sample_id"]}]  # noqa: E731
    failed = check(swap)
    assert failed.get("members_are_kept") == "ERROR"
    twice = lambda rs: rs[:-1] + [{**rs[-1], "sample_id": rs[0]["sample_id"]}]  # noqa: E731
    assert check(twice).get("no_sample_twice") == "ERROR"
    contaminated = next(d for d in decisions if any(x["code"] == "contaminated_image" for x in d["reasons"]))
    leak = lambda rs: rs[:-1] + [{**rs[-1], "trace_id": contaminated["trace_id"], "sample_id": contaminated["sample_id"]}]  # noqa: E731
    assert check(leak).get("no_contamination") == "ERROR"
