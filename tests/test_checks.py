"""Every seed check passes on good data and fails on the damage it guards against."""

from __future__ import annotations

import json

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from omnithought_dagster.checks.gx import Expect, gx_check_result, validate_frame
from omnithought_dagster.store import CorpusStore

from conftest import materialize_source, run_checks, write_image, write_json


@pytest.fixture
def materialised(project, instance, tmp_path):
    """Two sources materialised cleanly; returns (config, store)."""
    write_image(tmp_path / "imgs/a.png", 1)
    records = [
        {"id": "r1", "question": "Q?", "answer": "Pick B", "choices": ["Pick A", "Pick B"], "image": "a.png"},
        {"id": "r2", "question": "Missing?", "answer": "1", "image": "nope.png"},
    ]
    files = {"name": "files", "kind": "json", "path": str(write_json(tmp_path / "f.json", records)), "image_root": str(tmp_path / "imgs")}
    config = project([{"name": "synthetic", "kind": "synthetic", "n_samples": 12}, files])
    for source in config.source_names:
        assert materialize_source(config, instance, source).success
    return config, CorpusStore(config.store.root)


def _tamper(store: CorpusStore, table: str, partition: str, change) -> None:
    """Rewrite a partition file directly, bypassing the store's own schema validation."""
    path = f"{store.partition_dir(table, partition)}/data.parquet"
    rows = pq.read_table(path).to_pylist()
    rows = change(rows)
    schema = pa.schema([f.with_nullable(True) for f in pq.read_schema(path)])
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)


def _failed(checks: dict) -> set[str]:
    return {name for name, evaluation in checks.items() if not evaluation.passed}


def test_all_pass_on_good_data(materialised, instance):
    config, _ = materialised
    for source in config.source_names:
        checks = run_checks(config, instance, source)
        assert len(checks) == 6 and not _failed(checks)


def test_sample_id_unique_fails_within_a_partition(materialised, instance):
    config, store = materialised
    _tamper(store, "seed_pool", "synthetic", lambda rows: rows + [rows[0]])
    checks = run_checks(config, instance, "synthetic")
    assert "sample_id_unique" in _failed(checks)
    assert "expect_column_values_to_be_unique(sample_id)" in checks["sample_id_unique"].description


def test_sample_id_unique_fails_across_partitions(materialised, instance):
    config, store = materialised
    synthetic_row = store.read_partition("seed_pool", "synthetic").to_pylist()[0]
    _tamper(store, "seed_pool", "files", lambda rows: rows + [{**synthetic_row, "source": "files", "record_index": 99}])
    checks = run_checks(config, instance, "files")
    assert "sample_id_unique" in _failed(checks)
    assert checks["sample_id_unique"].metadata["in_other_sources"].value == 1
    assert "sample_id_unique" in _failed(run_checks(config, instance, "synthetic"))  # visible from both sides


@pytest.mark.parametrize(
    ("change", "expectation"),
    [
        (lambda r: {**r, "question": None}, "expect_column_values_to_not_be_null(question)"),
        (lambda r: {**r, "answer": ""}, "expect_column_value_lengths_to_be_between(answer)"),
        (lambda r: {**r, "sample_id": "not-a-hash"}, "expect_column_values_to_match_regex(sample_id)"),
        (lambda r: {**r, "image_ids": [], "image_phashes": []}, "expect_column_values_to_be_between(n_images)"),
    ],
)
def test_required_columns_present_fails(materialised, instance, change, expectation):
    config, store = materialised
    _tamper(store, "seed_pool", "synthetic", lambda rows: [change(rows[0])] + rows[1:])
    checks = run_checks(config, instance, "synthetic")
    assert "required_columns_present" in _failed(checks)
    assert expectation in checks["required_columns_present"].description


def test_answer_type_valid_fails(materialised, instance):
    config, store = materialised
    _tamper(store, "seed_pool", "synthetic", lambda rows: [{**rows[0], "answer_type": "essay"}] + rows[1:])
    assert "answer_type_valid" in _failed(run_checks(config, instance, "synthetic"))
    _tamper(store, "seed_pool", "files", lambda rows: [{**rows[0], "answer": "C"}])  # 2 options only
    checks = run_checks(config, instance, "files")
    assert _failed(checks) == {"answer_type_valid"}
    assert "choice_answer_ok" in checks["answer_type_valid"].description


def test_images_in_store_fails_when_an_image_object_is_gone(materialised, instance):
    config, store = materialised
    image_id = store.read_partition("seed_pool", "files").to_pylist()[0]["image_ids"][0]
    store.fs.delete_file(store.images.path(image_id))
    checks = run_checks(config, instance, "files")
    assert "images_in_store" in _failed(checks)
    assert checks["images_in_store"].metadata["missing_from_store"].value == [image_id]


def test_images_in_store_fails_when_the_images_table_lacks_a_row(materialised, instance):
    config, store = materialised
    _tamper(store, "images", "synthetic", lambda rows: rows[1:])
    assert "images_in_store" in _failed(run_checks(config, instance, "synthetic"))


def test_row_accounting_fails_when_a_row_is_lost_or_counted_twice(materialised, instance):
    config, store = materialised
    _tamper(store, "seed_pool", "synthetic", lambda rows: rows[:-1])
    checks = run_checks(config, instance, "synthetic")
    assert "row_accounting" in _failed(checks)
    assert checks["row_accounting"].metadata["unaccounted"].value == 1
    # Same totals, but one record is both kept and quarantined and another is in neither.
    assert store.read_partition("seed_pool", "files").column("record_index").to_pylist() == [0]
    _tamper(store, "quarantine", "files", lambda rows: [{**rows[0], "record_index": 0}])
    checks = run_checks(config, instance, "files")
    assert "row_accounting" in _failed(checks)
    assert checks["row_accounting"].metadata["records_never_accounted"].value == 1
    assert checks["row_accounting"].metadata["records_counted_twice"].value == 1


def test_reasons_known_fails_on_an_unknown_reason(materialised, instance):
    config, store = materialised
    _tamper(store, "quarantine", "files", lambda rows: [{**rows[0], "reason": "felt_like_it"}])
    checks = run_checks(config, instance, "files")
    assert "reasons_known" in _failed(checks)
    assert "felt_like_it" in checks["reasons_known"].description


def test_checks_fail_when_the_partition_was_never_materialised(project, instance):
    config = project([{"name": "synthetic", "kind": "synthetic", "n_samples": 3}])
    checks = run_checks(config, instance, "synthetic")
    assert _failed(checks) == {
        "sample_id_unique",
        "required_columns_present",
        "answer_type_valid",
        "images_in_store",
        "row_accounting",
        "reasons_known",
    }
    assert "materialise it first" in checks["sample_id_unique"].description


def test_gx_helper_reports_each_expectation():
    frame = pd.DataFrame({"x": [1, 2, 2], "t": ["a", "b", "zz"]})
    validation = validate_frame(
        frame,
        [
            Expect("expect_column_values_to_be_unique", column="x"),
            Expect("expect_column_values_to_be_in_set", column="t", value_set=["a", "b"]),
            Expect("expect_column_values_to_not_be_null", column="t"),
        ],
    )
    assert [o.success for o in validation.outcomes] == [False, False, True]
    assert validation.outcomes[1].examples == ["zz"] and validation.outcomes[0].unexpected_count == 2
    result = gx_check_result(frame, [Expect("expect_column_values_to_be_in_set", column="t", value_set=["a", "b"])])
    assert not result.passed and result.metadata["failed_expectations"].value == 1
    assert "zz" in result.description
    with pytest.raises(ValueError, match="no expectation 'expect_magic'"):
        validate_frame(frame, [Expect("expect_magic")])


def test_row_accounting_catches_a_reader_that_splits_a_record(project, instance, tmp_path, monkeypatch):
    """The reader's own count cannot vouch for the reader: a line split on U+2028 (the old bug) is caught."""
    from omnithought_dagster.seed.sources import jsonstream

    write_image(tmp_path / "imgs/a.png", 1)
    lines = [
        json.dumps({"id": "r1", "question": "Two\u2028lines?", "answer": "1", "image": "a.png"}, ensure_ascii=False),
        json.dumps({"id": "r2", "question": "One?", "answer": "2", "image": "a.png"}),
    ]
    (tmp_path / "f.jsonl").write_text("\n".join(lines), encoding="utf-8")
    files = {"name": "files", "kind": "json", "path": str(tmp_path / "f.jsonl"), "image_root": str(tmp_path / "imgs")}
    config = project([files])
    real_lines = jsonstream.jsonl_lines

    def splitlines_bug(handle):  # what str.splitlines() did: U+2028 inside a string taken for a line break
        for number, line in real_lines(handle):
            yield from ((number, part) for part in line.split("\u2028".encode()))

    monkeypatch.setattr(jsonstream, "jsonl_lines", splitlines_bug)
    assert not materialize_source(config, instance, "files").success  # the blocking check stops the run
    checks = run_checks(config, instance, "files")
    assert "row_accounting" in _failed(checks)
    assert checks["row_accounting"].metadata["read"].value == 2  # counted on the bytes
    monkeypatch.undo()
    assert materialize_source(config, instance, "files").success
    assert "row_accounting" not in _failed(run_checks(config, instance, "files"))
