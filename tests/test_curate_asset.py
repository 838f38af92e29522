"""filtered_set and sampled_subsets through the real Dagster jobs; export; checks failing on planted violations."""

from __future__ import annotations

import json

import pyarrow as pa
import pytest
from typer.testing import CliRunner

from conftest import check_evaluations, materializations, plot_image, rewrite_partition, run_job, run_partition_checks, write_config
from curation_data import build_store
from omnithought_dagster.cli import app
from omnithought_dagster.config import load_config
from omnithought_dagster.curation.export import ExportError, export_subset
from omnithought_dagster.defs import FILTER_JOB, SUBSET_JOB
from omnithought_dagster.store import CorpusStore

RECIPES = [
    {"name": "even", "size": 12, "difficulty_mix": {"easy": 1, "medium": 1, "hard": 1}, "max_tag_share": 0.5, "traces_per_sample": 1},
    {"name": "big", "size": 500, "difficulty_mix": {"easy": 1, "hard": 1}, "traces_per_sample": 2},  # cannot be met: a shortfall
]


def _project(tmp_path, **curation):
    build_store(tmp_path / "store", n_samples=24)
    path = write_config(tmp_path, [{"name": "synthetic", "kind": "synthetic", "n_samples": 24}],
                        benchmarks=[{"name": "held", "kind": "synthetic", "n_samples": 4, "seed": 0, "start_index": 22}],
                        curation={"decontamination": {"benchmarks": ["held"], "require": "both", "image_max_distance": 0},
                                  "selection": {"max_traces_per_sample": 2}, **curation},
                        recipes=RECIPES)
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
    report = export_subset(store, "even", fmt, tmp_path / fmt, cutoff_len=4096)
    assert report.examples == 12 and (tmp_path / fmt / "manifest.json").exists()
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
        info = json.loads((tmp_path / fmt / "dataset_info.json").read_text())["omnithought"]
        assert info["formatting"] == "sharegpt" and info["columns"] == {"messages": "messages", "images": "images"}


def test_export_refuses_bad_subsets(curated, tmp_path):
    config, store, _ = curated
    with pytest.raises(ExportError, match="over the cutoff of 50"):
        export_subset(store, "even", "sharegpt", tmp_path / "a", cutoff_len=50)
    member = store.read_partition("subset_members", "even").to_pylist()[0]
    seed = store.read_partition("seed_pool", "synthetic")
    rows = seed.to_pylist()
    for row in rows:
        if row["sample_id"] == member["sample_id"]:
            row["question"] = "Look at <image> and answer."
    store.write_partition("seed_pool", "synthetic", pa.Table.from_pylist(rows, schema=seed.schema))
    with pytest.raises(ExportError, match="2 <image> placeholders but 1 images"):
        export_subset(store, "even", "llamafactory", tmp_path / "b")
    store.write_partition("seed_pool", "synthetic", seed)
    image = next(r["image_ids"][0] for r in rows if r["sample_id"] == member["sample_id"])
    store.fs.delete_file(store.images.path(image))
    with pytest.raises(ExportError, match=f"image {image} is missing"):
        export_subset(store, "even", "hf", tmp_path / "c")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists() and not (tmp_path / "c").exists()
    result = CliRunner().invoke(app, ["export", "even", "--format", "sharegpt", "--out", str(tmp_path / "d"), "--config", config.config_path])
    assert result.exit_code == 1 and "export refused" in result.output
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
