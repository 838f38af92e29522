"""Seed ingestion: every quarantine reason, dedup, near-duplicate marking, and row accounting."""

from __future__ import annotations

import json
import os

import pytest

from omnithought_dagster.config import SeedSettings, parse_config
from omnithought_dagster.seed.dedup import PriorSamples
from omnithought_dagster.seed.ingest import ingest_source
from omnithought_dagster.seed.sources import Candidate, ImageRef, make_reader

from conftest import png_bytes, write_image, write_json


def _run(records, tmp_path=None, prior=None, **settings):
    stored = {}
    result = ingest_source(
        "src",
        records,
        SeedSettings(**settings),
        image_root=tmp_path,
        prior=prior,
        put_image=lambda image_id, data: stored.setdefault(image_id, data) is data,
    )
    assert result.rows_read == result.rows_kept + result.rows_quarantined
    return result, stored


def _good(index=0, question="How many blocks?", answer="4", seed=None, **kwargs):
    seed = index if seed is None else seed
    return Candidate(
        record_index=index,
        native_id=f"n{index}",
        question=question,
        answer=answer,
        images=kwargs.pop("images", [ImageRef(data=png_bytes(seed))]),
        **kwargs,
    )


def _only_reason(result):
    (row,) = result.quarantine.to_pylist()
    return row["reason"], row["detail"]


@pytest.mark.parametrize(
    ("candidate", "settings", "reason", "detail"),
    [
        (_good(question="   "), {}, "empty_question", "empty or whitespace"),
        (_good(question=None), {}, "empty_question", "question is missing"),
        (_good(question="x" * 101), {"max_question_chars": 100}, "question_too_long", "101 characters, limit 100"),
        (_good(answer=""), {}, "missing_answer", "missing or empty"),
        (_good(answer=None), {}, "missing_answer", "missing or empty"),
        (_good(answer=["a", "b"]), {}, "malformed_record", "answer is a list"),
        (_good(question=b"caf\xe9?"), {}, "invalid_utf8", "question is not valid UTF-8"),
        (_good(answer="B", choices=["x"]), {}, "malformed_record", "at least two options"),
        (_good(answer="E", choices=["x", "y"]), {}, "answer_not_in_choices", "names none of the 2 options"),
        (_good(answer_type="essay"), {}, "malformed_record", "answer_type 'essay'"),
        (_good(images=[]), {}, "no_image", "no image"),
        (_good(images=[ImageRef(data=png_bytes(1))] * 3), {"max_images_per_sample": 2}, "too_many_images", "3 images, limit 2"),
        (_good(placeholder_count=2), {}, "image_placeholder_mismatch", "2 <image> placeholders but 1 images"),
        (_good(images=[ImageRef(data=b"")]), {}, "empty_image", "zero bytes"),
        (_good(images=[ImageRef(data=b"\x89PNG\r\n\x1a\ngarbage")]), {}, "corrupt_image", "does not decode"),
        (_good(images=[ImageRef(data=png_bytes(1)[:-40])]), {}, "corrupt_image", "does not decode"),
        (
            _good(images=[ImageRef(data=png_bytes(1, size=(200, 100)))]),
            {"max_image_pixels": 10_000},
            "oversized_image",
            "200x100 = 20000 pixels",
        ),
        (_good(images=[ImageRef(data=png_bytes(1))]), {"max_image_bytes": 10}, "oversized_image", "limit 10"),
    ],
)
def test_each_bad_record_is_quarantined_with_its_reason(candidate, settings, reason, detail):
    result, stored = _run([candidate], **settings)
    assert result.rows_kept == 0
    got_reason, got_detail = _only_reason(result)
    assert got_reason == reason
    assert detail in got_detail
    assert stored == {}  # nothing of a rejected record reaches the image store


def test_image_paths_missing_escaping_empty(tmp_path):
    root = tmp_path / "root"
    write_image(root / "ok.png", 1)
    (root / "zero.png").write_bytes(b"")
    write_image(tmp_path / "outside.png", 2)
    os.symlink(tmp_path / "outside.png", root / "link.png")
    cases = {
        "missing.png": "missing_image",
        "../outside.png": "path_escape",
        str(tmp_path / "outside.png"): "path_escape",  # absolute, outside the root
        "link.png": "path_escape",  # a symlink pointing out of the root
        "zero.png": "empty_image",
        "sub/../ok.png": None,
        str(root / "ok.png"): None,  # absolute but inside the root is fine
    }
    records = [_good(i, question=f"q{i}", images=[ImageRef(path=p)]) for i, p in enumerate(cases)]
    result, _ = _run(records, root)
    reasons = {row["record_index"]: row["reason"] for row in result.quarantine.to_pylist()}
    assert [reasons.get(i) for i in range(len(cases))] == list(cases.values())
    assert result.rows_kept == 2


def test_invalid_utf8_in_a_jsonl_line_quarantines_only_that_record(tmp_path):
    write_image(tmp_path / "a.png", 1)
    path = tmp_path / "d.jsonl"
    path.write_bytes(
        b'{"id": "good", "question": "Q?", "answer": "1", "image": "a.png"}\n'
        b'{"id": "bad", "question": "caf\xe9?", "answer": "1", "image": "a.png"}\n'
        b'{"id": "meta", "question": "Q2?", "answer": "1", "image": "a.png", "note": "\xff"}\n'
    )
    source = parse_config({"sources": [{"name": "s", "kind": "json", "path": str(path)}]}, base_dir=tmp_path).sources[0]
    reader = make_reader(source)
    result, _ = _run(reader.records(), reader.image_root)
    assert result.reasons == {"invalid_utf8": 1}
    assert result.quarantine.to_pylist()[0]["native_id"] == "bad"
    kept = {row["native_id"]: row for row in result.kept.to_pylist()}
    assert set(kept) == {"good", "meta"}
    assert json.loads(kept["meta"]["metadata"])["note"] == "\udcff"  # kept, escaped, not lost


def test_unreadable_json_file_is_one_quarantined_record(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[{"question": "q", ')
    source = parse_config({"sources": [{"name": "s", "kind": "json", "path": str(path)}]}, base_dir=tmp_path).sources[0]
    reader = make_reader(source)
    result, _ = _run(reader.records(), tmp_path)
    assert reader.count() == 1 and result.reasons == {"unreadable_file": 1}


def test_exact_duplicates_keep_the_first_and_record_the_rest():
    records = [_good(0, seed=1), _good(1, seed=1, question="How  many blocks? "), _good(2, seed=2)]
    result, stored = _run(records)
    assert result.kept.column("native_id").to_pylist() == ["n0", "n2"]
    (dup,) = result.quarantine.to_pylist()
    assert dup["reason"] == "duplicate" and dup["native_id"] == "n1" and dup["duplicate_of"] == "src/n0"
    assert dup["sample_id"] == result.kept.column("sample_id").to_pylist()[0]
    assert len(stored) == 2


def test_duplicates_of_an_earlier_source_are_quarantined():
    first, _ = _run([_good(0, seed=1)])
    prior = PriorSamples.from_rows([{**row, "source": "earlier"} for row in first.kept.to_pylist()])
    result, _ = _run([_good(5, seed=1), _good(6, seed=2)], prior=prior)
    assert result.kept.column("native_id").to_pylist() == ["n6"]
    assert result.quarantine.to_pylist()[0]["duplicate_of"] == "earlier/n0"


def test_near_duplicate_images_are_marked_not_dropped():
    shared = png_bytes(3)
    records = [
        _good(0, question="What colour is the top block?", images=[ImageRef(data=shared)]),
        _good(1, question="How many blocks are red?", images=[ImageRef(data=shared)]),
        _good(2, question="Unrelated", seed=40),
    ]
    result, _ = _run(records)
    rows = result.kept.to_pylist()
    assert len(rows) == 3
    assert rows[0]["near_duplicate_of"] is None
    assert rows[1]["near_duplicate_of"] == rows[0]["sample_id"] and rows[1]["near_duplicate_distance"] == 0
    assert rows[2]["near_duplicate_of"] is None
    assert result.near_duplicates == 1
    off, _ = _run(records, near_duplicate_max_distance=-1)
    assert off.near_duplicates == 0


def test_near_duplicates_across_sources_point_to_the_earlier_source():
    first, _ = _run([_good(0, seed=9)])
    prior = PriorSamples.from_rows([{**row, "source": "earlier"} for row in first.kept.to_pylist()])
    result, _ = _run([_good(0, seed=9, question="A different question about it")], prior=prior)
    assert result.kept.to_pylist()[0]["near_duplicate_of"] == first.kept.to_pylist()[0]["sample_id"]


@pytest.mark.parametrize(
    ("question", "answer", "choices", "answer_type", "expected"),
    [
        ("Pick one\nA. red\nB. blue", "B", None, None, ("Pick one", ["red", "blue"], "B", "multiple_choice")),
        ("Pick one\nOptions:\n(A) red\n(B) blue", "(b)", None, None, ("Pick one", ["red", "blue"], "B", "multiple_choice")),
        ("Pick one", "Blue", ["red", "blue"], None, ("Pick one", ["red", "blue"], "B", "multiple_choice")),
        ("Compute", 12.0, None, None, ("Compute", [], "12", "numeric")),
        ("Solve", "x = 3", None, None, ("Solve", [], "x = 3", "math")),
        ("Name it", "New York", None, None, ("Name it", [], "New York", "free_form")),
        ("Name it", "7", None, "free-form", ("Name it", [], "7", "free_form")),
        ("A. not options at the end\nsome text", "z", None, None, ("A. not options at the end\nsome text", [], "z", "free_form")),
    ],
)
def test_answers_and_choices_are_normalised(question, answer, choices, answer_type, expected):
    result, _ = _run([_good(question=question, answer=answer, choices=choices, answer_type=answer_type)])
    row = result.kept.to_pylist()[0]
    assert (row["question"], row["choices"], row["answer"], row["answer_type"]) == expected


def test_accounting_holds_over_a_messy_file(tmp_path):
    write_image(tmp_path / "a.png", 1)
    records = [{"question": f"q{i}", "answer": str(i), "image": "a.png"} for i in range(5)]
    records += [{"question": "", "answer": "1", "image": "a.png"}, 7, {"question": "q0", "answer": "0", "image": "a.png"}]
    path = write_json(tmp_path / "d.json", records)
    source = parse_config({"sources": [{"name": "s", "kind": "json", "path": str(path)}]}, base_dir=tmp_path).sources[0]
    reader = make_reader(source)
    result, _ = _run(reader.records(), reader.image_root)
    assert (result.rows_read, result.rows_kept, result.rows_quarantined) == (reader.count(), 5, 3)
    assert sorted(result.kept.column("record_index").to_pylist() + result.quarantine.column("record_index").to_pylist()) == list(range(8))
