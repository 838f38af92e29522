"""Dagster decides what is stale: an edited setting that changes a stage's output shows that stage's partitions
unsynced (a new code version), through the resolver the UI's GraphQL reads; a setting that changes no output
(a check's threshold, a flush size, DuckDB's memory) shows nothing."""

from __future__ import annotations

from pathlib import Path

import yaml
from test_curate_asset import RECIPES, _project

from omnithought_dagster.assets.inputs import (
    BENCHMARK_ITEMS_KEY,
    SEED_SOURCES_KEY,
    chained_versions,
    observe_job_name,
    seed_source_versions,
)
from omnithought_dagster.config import load_config
from omnithought_dagster.defs import FILTER_JOB, SUBSET_JOB, build_definitions
from omnithought_dagster.ids import code_version
from omnithought_dagster.resources import CorpusStoreResource
from omnithought_dagster.stages import stage
from omnithought_dagster.staleness import FRESH, MISSING, STALE, Staleness

from conftest import materialize_source, run_job, write_config, write_image, write_json

FILTERED = stage("filtered_set").key
SUBSETS = stage("sampled_subsets").key


def _edited(config, change) -> object:
    """The project file rewritten with `change(document)` applied, loaded again (as the next run or the UI would)."""
    path = Path(config.config_path)
    document = yaml.safe_load(path.read_text())
    change(document)
    path.write_text(yaml.safe_dump(document))
    return load_config(path)


def _statuses(instance, config) -> dict[str, str]:
    staleness = Staleness(instance, build_definitions(config))
    found = {f"filtered_set[{s}]": staleness.of(FILTERED, s) for s in config.source_names}
    found |= {f"sampled_subsets[{r.name}]": staleness.of(SUBSETS, r.name) for r in config.recipes}
    return {name: status.status for name, status in found.items()}


def test_an_edited_threshold_makes_its_stage_unsynced_and_an_edited_check_setting_does_not(tmp_path, instance):
    config = _project(tmp_path)
    assert _statuses(instance, config) == {
        "filtered_set[synthetic]": MISSING,
        "sampled_subsets[even]": MISSING,
        "sampled_subsets[big]": MISSING,
    }
    assert run_job(config, instance, FILTER_JOB, "synthetic").success
    for recipe in RECIPES:
        assert run_job(config, instance, SUBSET_JOB, recipe["name"]).success
    assert set(_statuses(instance, config).values()) == {FRESH}

    # settings no output depends on: a check's tolerance and sample limit, DuckDB's memory, the teacher's flush size
    def checks_only(document):
        document["recipes"][0]["tolerance"] = 0.2
        document["curation"]["check_sample_limit"] = 5
        document["curation"]["duckdb_memory_limit"] = "2GB"
        document.setdefault("generation", {})["flush_every"] = 3

    quiet = _edited(config, checks_only)
    assert set(_statuses(instance, quiet).values()) == {FRESH}

    # a rule threshold: filtered_set has a new code version; the subsets follow once it has new data (Dagster's rule:
    # a partition is stale for its own code version or an upstream's newer data, not for an upstream's staleness)
    louder = _edited(quiet, lambda document: document["curation"].setdefault("rules", {}).update(min_quality=5))
    filtered = Staleness(instance, build_definitions(louder)).of(FILTERED, "synthetic")
    assert filtered.status == STALE
    assert any("filtered_set[synthetic]" in cause and "code version" in cause for cause in filtered.causes), filtered.causes
    assert _statuses(instance, louder) == {"filtered_set[synthetic]": STALE, "sampled_subsets[even]": FRESH, "sampled_subsets[big]": FRESH}
    assert run_job(louder, instance, FILTER_JOB, "synthetic").success  # this data has no trace of quality 1-4: the same decisions,
    assert set(_statuses(instance, louder).values()) == {FRESH}  # the same data version, nothing for the subsets to redo

    # a selection setting that changes the decisions: a new data version, and then the subsets read stale data
    fewer = _edited(louder, lambda document: document["curation"]["selection"].update(max_traces_per_sample=1))
    assert _statuses(instance, fewer)["filtered_set[synthetic]"] == STALE
    assert run_job(fewer, instance, FILTER_JOB, "synthetic").success
    staleness = Staleness(instance, build_definitions(fewer))
    assert staleness.of(FILTERED, "synthetic").fresh
    for recipe in ("even", "big"):
        subset = staleness.of(SUBSETS, recipe)
        assert subset.status == STALE and any("filtered_set" in cause for cause in subset.causes), subset.causes
    for recipe in RECIPES:
        assert run_job(fewer, instance, SUBSET_JOB, recipe["name"]).success
    assert set(_statuses(instance, fewer).values()) == {FRESH}

    # one recipe's size: sampled_subsets has a new code version (one per asset: both recipes show it); filtered_set stays fresh
    resized = _edited(fewer, lambda document: document["recipes"][0].update(size=10))
    statuses = _statuses(instance, resized)
    assert statuses == {"filtered_set[synthetic]": FRESH, "sampled_subsets[even]": STALE, "sampled_subsets[big]": STALE}


def test_a_code_version_is_the_tag_and_a_hash_of_the_settings():
    assert code_version("curation-v2", {"a": 1}) == code_version("curation-v2", {"a": 1})
    assert code_version("curation-v2", {"a": 1}) != code_version("curation-v2", {"a": 2})
    assert code_version("curation-v2", {"a": 1}).startswith("curation-v2+")


# -- the files the pipeline reads: observed source assets ------------------------------------------------------------------


def _observe(config, instance, key) -> None:
    job = build_definitions(config).resolve_job_def(observe_job_name(key))
    assert job.execute_in_process(instance=instance).success


def _seed_status(config, instance) -> dict[str, str]:
    staleness = Staleness(instance, build_definitions(config))
    return {source: staleness.of(stage("seed_pool").key, source).status for source in config.source_names}


def test_an_edited_seed_file_makes_its_source_and_the_sources_after_it_stale(tmp_path, instance):
    write_image(tmp_path / "imgs" / "a.png")
    files = []
    for name in ("first", "second"):
        path = write_json(tmp_path / f"{name}.json", [{"id": f"{name}-1", "question": f"{name}?", "answer": "1", "image": "a.png"}])
        files.append({"name": name, "kind": "json", "path": str(path), "image_root": str(tmp_path / "imgs")})
    synthetic = {"name": "synthetic", "kind": "synthetic", "n_samples": 4}
    config = load_config(write_config(tmp_path, [synthetic, *files]))
    _observe(config, instance, SEED_SOURCES_KEY)
    assert set(_seed_status(config, instance).values()) == {MISSING}
    for source in config.source_names:
        assert materialize_source(config, instance, source).success
    _observe(config, instance, SEED_SOURCES_KEY)
    assert set(_seed_status(config, instance).values()) == {FRESH}

    # the last source edited: only it; the first file edited: it and the one after it (its kept samples are the later one's
    # duplicates); an edit Dagster has not observed yet shows nothing
    write_json(tmp_path / "second.json", [{"id": "second-2", "question": "again?", "answer": "2", "image": "a.png"}])
    assert set(_seed_status(config, instance).values()) == {FRESH}
    _observe(config, instance, SEED_SOURCES_KEY)
    second = Staleness(instance, build_definitions(config)).of(stage("seed_pool").key, "second")
    assert second.status == STALE and second.causes == ("seed_pool[second]: has a new dependency data version (seed_sources[second])",)
    assert _seed_status(config, instance) == {"synthetic": FRESH, "first": FRESH, "second": STALE}
    assert materialize_source(config, instance, "second").success
    write_json(tmp_path / "first.json", [{"id": "first-2", "question": "first again?", "answer": "3", "image": "a.png"}])
    _observe(config, instance, SEED_SOURCES_KEY)
    assert _seed_status(config, instance) == {"synthetic": FRESH, "first": STALE, "second": STALE}

    # a source that cannot be opened has a version saying so: stale until it opens, and its run says why
    (tmp_path / "first.json").unlink()
    versions = seed_source_versions(config, CorpusStoreResource(root_uri=config.store.root), config.source_names)
    assert versions["first"] != versions["second"] and len(set(versions.values())) == 3


def test_chained_versions_change_with_an_earlier_source_and_not_a_later_one():
    before = chained_versions([("a", "1"), ("b", "2"), ("c", "3")])
    after = chained_versions([("a", "1"), ("b", "9"), ("c", "3")])
    assert before["a"] == after["a"] and before["b"] != after["b"] and before["c"] != after["c"]
    assert chained_versions([("b", "2"), ("a", "1")])["a"] != before["a"]  # the order is part of it


def test_an_edited_benchmark_file_makes_filtered_set_stale_once_observed(tmp_path, instance):
    write_image(tmp_path / "imgs" / "b.png", seed=3)
    items = tmp_path / "held.json"
    write_json(items, [{"id": "h1", "question": "Which block is red?", "answer": "2", "image": "b.png"}])

    def file_benchmark(document):
        document["benchmarks"] = [{"name": "held", "kind": "json", "path": str(items), "image_root": str(tmp_path / "imgs")}]

    config = _edited(_project(tmp_path), file_benchmark)
    assert BENCHMARK_ITEMS_KEY in build_definitions(config).resolve_asset_graph().get(FILTERED).parent_keys
    _observe(config, instance, BENCHMARK_ITEMS_KEY)
    assert run_job(config, instance, FILTER_JOB, "synthetic").success
    assert Staleness(instance, build_definitions(config)).of(FILTERED, "synthetic").fresh
    write_json(
        items,
        [
            {"id": "h1", "question": "Which block is red?", "answer": "2", "image": "b.png"},
            {"id": "h2", "question": "Late?", "answer": "1"},
        ],
    )
    assert Staleness(instance, build_definitions(config)).of(FILTERED, "synthetic").fresh  # not observed yet
    _observe(config, instance, BENCHMARK_ITEMS_KEY)
    filtered = Staleness(instance, build_definitions(config)).of(FILTERED, "synthetic")
    assert filtered.status == STALE and any("benchmark_items" in cause for cause in filtered.causes), filtered.causes
