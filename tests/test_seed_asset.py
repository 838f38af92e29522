"""seed_pool materialised through the real Dagster job: metadata, checks, replace, cross-source dedup."""

from __future__ import annotations

import dagster as dg

from omnithought_dagster.store import CorpusStore

from conftest import check_evaluations, materializations, materialize_source, plot_image, write_image, write_json


def _json_source(tmp_path, name="files", records=None):
    write_image(tmp_path / "imgs/a.png", 1)
    write_image(tmp_path / "imgs/b.png", 2)
    records = (
        records
        if records is not None
        else [
            {"id": "ok-1", "question": "How many blocks?", "answer": "4", "image": "a.png"},
            {"id": "ok-2", "question": "Which colour?", "answer": "red", "image": "b.png"},
            {"id": "gone", "question": "Q?", "answer": "1", "image": "missing.png"},
            {"id": "esc", "question": "Q?", "answer": "1", "image": "../../etc/passwd"},
            {"id": "empty-q", "question": " ", "answer": "1", "image": "a.png"},
            {"id": "ok-1-again", "question": "How many blocks?", "answer": "4", "image": "a.png"},
        ]
    )
    path = write_json(tmp_path / f"{name}.json", records)
    return {"name": name, "kind": "json", "path": str(path), "image_root": str(tmp_path / "imgs")}


def test_materialise_reports_accounting_and_passes_checks(project, instance, tmp_path):
    config = project([{"name": "synthetic", "kind": "synthetic", "n_samples": 24}, _json_source(tmp_path)])
    for source in config.source_names:
        result = materialize_source(config, instance, source)
        assert result.success
        checks = check_evaluations(result)
        assert len(checks) == 6 and all(c.passed for c in checks.values()), {k: c.description for k, c in checks.items()}

    meta = materializations(materialize_source(config, instance, "files"))
    seed = meta["seed_pool"]
    assert (seed["rows_read"], seed["rows_kept"], seed["rows_quarantined"]) == (6, 2, 4)
    assert seed["dagster/row_count"] == 2
    assert "| reason | rows |" in seed["quarantined_by_reason"]
    assert plot_image(meta["quarantine"]["plot/quarantine_reasons"])
    assert "How many blocks?" in seed["preview"]
    assert meta["quarantine"]["reason/duplicate"] == 1 and meta["quarantine"]["reason/path_escape"] == 1
    assert meta["images"]["dagster/row_count"] == 2

    store = CorpusStore(config.store.root)
    con = store.catalog()
    assert con.execute("SELECT source, count(*) FROM seed_pool GROUP BY 1 ORDER BY 1").fetchall() == [("files", 2), ("synthetic", 24)]
    reasons = con.execute("SELECT reason FROM quarantine ORDER BY record_index").fetchall()
    assert [r[0] for r in reasons] == ["missing_image", "path_escape", "empty_question", "duplicate"]

    # Data versions are content hashes: the same input gives the same version.
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey("seed_pool"), asset_partitions=["files"]), limit=2
    ).records
    versions = {r.event_log_entry.dagster_event.event_specific_data.materialization.tags["dagster/data_version"] for r in records}
    assert len(records) == 2 and len(versions) == 1


def test_rematerialising_replaces_the_partition(project, instance, tmp_path):
    config = project([{"name": "synthetic", "kind": "synthetic", "n_samples": 12}])
    assert materialize_source(config, instance, "synthetic").success
    store = CorpusStore(config.store.root)
    assert store.read_partition("seed_pool", "synthetic").num_rows == 12
    smaller = project([{"name": "synthetic", "kind": "synthetic", "n_samples": 6}])
    assert materialize_source(smaller, instance, "synthetic").success
    assert store.read_partition("seed_pool", "synthetic").num_rows == 6
    assert store.catalog().execute("SELECT count(*) FROM seed_pool").fetchone()[0] == 6


def test_cross_source_duplicates_go_to_the_later_source(project, instance, tmp_path):
    first = _json_source(tmp_path, "first", [{"id": "x", "question": "Q1?", "answer": "1", "image": "a.png"}])
    second = _json_source(
        tmp_path,
        "second",
        [
            {"id": "y", "question": "Q1?", "answer": "1", "image": "a.png"},
            {"id": "z", "question": "Q2?", "answer": "2", "image": "b.png"},
        ],
    )
    config = project([first, second])
    assert materialize_source(config, instance, "first").success
    result = materialize_source(config, instance, "second")
    assert result.success
    store = CorpusStore(config.store.root)
    (dup,) = store.read_partition("quarantine", "second").to_pylist()
    assert dup["reason"] == "duplicate" and dup["duplicate_of"] == "first/x"
    assert store.read_partition("seed_pool", "second").column("native_id").to_pylist() == ["z"]


def test_out_of_order_materialisation_is_detected_and_fixable(project, instance, tmp_path):
    first = _json_source(tmp_path, "first", [{"id": "x", "question": "Q1?", "answer": "1", "image": "a.png"}])
    second = _json_source(tmp_path, "second", [{"id": "y", "question": "Q1?", "answer": "1", "image": "a.png"}])
    config = project([first, second])
    assert materialize_source(config, instance, "second").success  # nothing earlier yet: keeps y
    result = materialize_source(config, instance, "first")  # first keeps x; the blocking check sees y too
    assert not result.success
    checks = check_evaluations(result)
    assert not checks["sample_id_unique"].passed
    assert materializations(result)["seed_pool"]["later_source_conflicts"] == {"second": 1}
    # The fix the warning names: re-materialise the later source.
    assert materialize_source(config, instance, "second").success
    assert all(c.passed for c in check_evaluations(materialize_source(config, instance, "first")).values())


def test_missing_source_file_fails_the_run_with_a_clear_message(project, instance, tmp_path):
    source = _json_source(tmp_path)
    config = project([source])
    (tmp_path / "files.json").unlink()
    result = materialize_source(config, instance, "files")
    assert not result.success
    failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE")
    assert "source 'files'" in failure.event_specific_data.error.message or "no such file" in str(failure.event_specific_data)


def test_a_dataset_folder_that_cannot_be_opened_fails_the_run_naming_it(project, instance, tmp_path):
    """A save_to_disk folder whose dataset_dict.json is garbage: the source cannot be opened at all - the one case
    that fails the step - and the message says which source and where."""
    folder = tmp_path / "ds"
    folder.mkdir()
    (folder / "dataset_dict.json").write_text("{not json")
    config = project([{"name": "broken", "kind": "hf", "path": str(folder)}])
    result = materialize_source(config, instance, "broken")
    assert not result.success
    failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE")
    message = str(failure.event_specific_data.error.message)
    assert "source 'broken' cannot be opened" in message and str(folder) in message and "JSONDecodeError" in message
