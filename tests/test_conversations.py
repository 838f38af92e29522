"""Multi-turn records (LLaVA, LLaMA-Factory / ShareGPT, LLaVA-OneVision parquet): which turn becomes which sample,
and which images it gets. Fixtures are written in each project's own layout (LLaVA's JSON array, LLaMA-Factory's
`mllm_demo.json`) or by the `datasets` library (parquet)."""

from __future__ import annotations

import json

import pytest

from omnithought_dagster.config import SeedSettings, parse_config
from omnithought_dagster.seed.ingest import ingest_source
from omnithought_dagster.seed.sources import make_reader

from conftest import materialize_source, png_bytes, run_checks, write_image, write_json


def _source(tmp_path, **source):
    return parse_config({"sources": [{"name": "s", **source}]}, base_dir=tmp_path).sources[0]


def _ingest(source):
    reader = make_reader(source)
    result = ingest_source(
        "s",
        reader.records(),
        SeedSettings(near_duplicate_max_distance=-1),
        image_root=reader.image_root,
        put_image=lambda image_id, data: True,
    )
    assert result.rows_read == result.rows_kept + result.rows_quarantined
    return result


def _images_by_name(tmp_path, names):
    """Write one distinct picture per name; returns {image_id: name} as ingestion will name them."""
    from omnithought_dagster.ids import bytes_id

    ids = {}
    for seed, name in enumerate(names):
        path = write_image(tmp_path / name, seed + 1)
        ids[bytes_id(path.read_bytes())] = name
    return ids


def _turn(human: str, gpt: str) -> list[dict]:
    return [{"from": "human", "value": human}, {"from": "gpt", "value": gpt}]


@pytest.fixture
def llava_file(tmp_path):
    """LLaVA-Instruct's layout: a JSON array of {id, image, conversations[{from, value}]}."""
    names = _images_by_name(tmp_path / "coco", ["a.jpg", "b.jpg", "c.jpg"])
    records = [
        # One picture shown in the first turn and asked about three times (LLaVA's usual record).
        {
            "id": "000000033471",
            "image": "a.jpg",
            "conversations": _turn("<image>\nWhat colour is the bus?", "Red.")
            + _turn("How many wheels can you see?", "4")
            + _turn("Is it moving?", "No."),
        },
        # Two pictures, each introduced by its own turn; the third turn compares them.
        {
            "id": "pair",
            "image": ["b.jpg", "c.jpg"],
            "conversations": _turn("<image>\nWhat is in this picture?", "A cat.")
            + _turn("And here? <image>", "A dog.")
            + _turn("Which animal is larger?", "The dog."),
        },
        # The last user turn was never answered.
        {"id": "open", "image": "a.jpg", "conversations": _turn("<image>\nWhat is this?", "A bus.") + [{"from": "human", "value": "Why?"}]},
    ]
    return write_json(tmp_path / "llava_instruct.json", records), tmp_path / "coco", names


def test_llava_first_turn_keeps_only_the_first_question_and_its_images(tmp_path, llava_file):
    path, root, names = llava_file
    result = _ingest(_source(tmp_path, kind="json", format="llava", path=str(path), image_root=str(root)))
    rows = {r["native_id"]: r for r in result.kept.to_pylist()}
    assert {k: (r["question"], r["answer"], [names[i] for i in r["image_ids"]], r["turn"]) for k, r in rows.items()} == {
        "000000033471": ("What colour is the bus?", "Red.", ["a.jpg"], 1),
        "pair": ("What is in this picture?", "A cat.", ["b.jpg"], 1),  # the second picture belongs to the second turn
        "open": ("What is this?", "A bus.", ["a.jpg"], 1),
    }
    metadata = json.loads(rows["pair"]["metadata"])
    assert metadata["extra_turn_images"] == ["c.jpg"] and len(metadata["extra_turns"]) == 4  # nothing is lost


def test_llava_each_turn_is_a_sample_with_the_images_it_references(tmp_path, llava_file):
    path, root, names = llava_file
    result = _ingest(_source(tmp_path, kind="json", format="llava", path=str(path), image_root=str(root), multi_turn="each"))
    rows = {
        r["native_id"]: (r["question"], r["answer"], [names[i] for i in r["image_ids"]], r["record_index"], r["turn"])
        for r in result.kept.to_pylist()
    }
    assert rows == {
        "000000033471#1": ("What colour is the bus?", "Red.", ["a.jpg"], 0, 1),
        "000000033471#2": ("How many wheels can you see?", "4", ["a.jpg"], 0, 2),  # still the picture shown before
        "000000033471#3": ("Is it moving?", "No.", ["a.jpg"], 0, 3),
        "pair#1": ("What is in this picture?", "A cat.", ["b.jpg"], 1, 1),
        "pair#2": ("And here?", "A dog.", ["c.jpg"], 1, 2),  # only its own picture
        "pair#3": ("Which animal is larger?", "The dog.", ["b.jpg", "c.jpg"], 1, 3),  # both were shown before it
        "open#1": ("What is this?", "A bus.", ["a.jpg"], 2, 1),
    }
    (unanswered,) = result.quarantine.to_pylist()
    assert (unanswered["native_id"], unanswered["turn"], unanswered["reason"]) == ("open#2", 2, "missing_answer")
    assert result.records_read == 3 and result.rows_read == 8


def test_a_conversation_whose_placeholders_do_not_match_its_images_is_set_aside_whole(tmp_path):
    _images_by_name(tmp_path, ["a.png", "b.png"])
    records = [
        {"id": "x", "image": ["a.png", "b.png"], "conversations": _turn("<image> one", "1") + _turn("<image> <image> two", "2")},
        {"id": "y", "image": ["a.png"], "conversations": _turn("<image> fine", "1")},
    ]
    for mode in ("first", "each"):
        result = _ingest(
            _source(tmp_path, kind="json", format="llava", path=str(write_json(tmp_path / "m.json", records)), multi_turn=mode)
        )
        (row,) = result.quarantine.to_pylist()
        assert (row["native_id"], row["reason"]) == ("x", "image_placeholder_mismatch") and "3 <image> placeholders" in row["detail"]
        assert result.rows_kept == 1


def test_turns_out_of_order_are_malformed_when_each_turn_counts(tmp_path):
    _images_by_name(tmp_path, ["a.png"])
    records = [{"id": "z", "image": "a.png", "conversations": _turn("<image> q", "a") + [{"from": "gpt", "value": "again"}]}]
    path = write_json(tmp_path / "o.json", records)
    first = _ingest(_source(tmp_path, kind="json", format="llava", path=str(path)))
    assert first.rows_kept == 1 and json.loads(first.kept.to_pylist()[0]["metadata"])["extra_turns"] == [
        {"role": "gpt", "content": "again"}
    ]
    each = _ingest(_source(tmp_path, kind="json", format="llava", path=str(path), multi_turn="each"))
    (row,) = each.quarantine.to_pylist()
    assert row["reason"] == "malformed_record" and "turn 3: expected a user turn, got role 'gpt'" in row["detail"]


def test_llama_factory_multi_turn_sharegpt(tmp_path):
    """LLaMA-Factory's data/mllm_demo.json layout: messages with role/content, images listed per record."""
    names = _images_by_name(tmp_path / "mllm_demo_data", ["1.jpg", "2.jpg"])
    records = [
        {
            "messages": [
                {"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": "<image>Who are they?"},
                {"role": "assistant", "content": "They're two players."},
                {"role": "user", "content": "What are they doing?<image>"},
                {"role": "assistant", "content": "Celebrating."},
            ],
            "images": ["mllm_demo_data/1.jpg", "mllm_demo_data/2.jpg"],
        }
    ]
    path = write_json(tmp_path / "mllm_demo.json", records)
    first = _ingest(_source(tmp_path, kind="sharegpt", path=str(path)))
    (row,) = first.kept.to_pylist()
    assert (row["question"], [names[i] for i in row["image_ids"]]) == ("Who are they?", ["1.jpg"])
    each = _ingest(_source(tmp_path, kind="sharegpt", path=str(path), multi_turn="each"))
    assert [(r["native_id"], r["question"], r["answer"], [names[i] for i in r["image_ids"]]) for r in each.kept.to_pylist()] == [
        ("#0#1", "Who are they?", "They're two players.", ["1.jpg"]),
        ("#0#2", "What are they doing?", "Celebrating.", ["2.jpg"]),
    ]
    assert json.loads(each.kept.to_pylist()[1]["metadata"])["system"] == ["You are a helpful assistant."]


def test_llava_onevision_parquet_written_by_datasets(tmp_path):
    """LLaVA-OneVision-Data's parquet: an `image` column of HF Images and `conversations` of {from, value}."""
    import datasets

    features = datasets.Features(
        {
            "id": datasets.Value("string"),
            "image": datasets.Image(),
            "conversations": [{"from": datasets.Value("string"), "value": datasets.Value("string")}],
            "data_source": datasets.Value("string"),
        }
    )
    rows = {
        "id": ["ov-1", "ov-2"],
        "image": [{"bytes": png_bytes(1), "path": None}, {"bytes": png_bytes(2), "path": None}],
        "conversations": [
            _turn("<image>\nWhat is the total?\nA. 3\nB. 5", "B") + _turn("Explain.", "2 + 3 = 5."),
            _turn("<image>\nName the shape.", "triangle"),
        ],
        "data_source": ["geo", "shapes"],
    }
    (tmp_path / "ov").mkdir()
    datasets.Dataset.from_dict(rows, features=features).to_parquet(str(tmp_path / "ov" / "train-00000-of-00001.parquet"))
    result = _ingest(_source(tmp_path, kind="hf", path=str(tmp_path / "ov"), format="llava", multi_turn="each"))
    kept = [(r["native_id"], r["question"], r["answer"], r["answer_type"], len(r["image_ids"])) for r in result.kept.to_pylist()]
    assert kept == [
        ("ov-1#1", "What is the total?", "B", "multiple_choice", 1),
        ("ov-1#2", "Explain.", "2 + 3 = 5.", "free_form", 1),
        ("ov-2#1", "Name the shape.", "triangle", "free_form", 1),
    ]
    assert json.loads(result.kept.to_pylist()[0]["metadata"])["data_source"] == "geo"


def test_multi_turn_each_needs_a_conversation_format(tmp_path):
    with pytest.raises(Exception, match="multi_turn: each splits conversations"):
        _source(tmp_path, kind="json", path=str(tmp_path / "x.json"), multi_turn="each")


def test_row_accounting_counts_each_record_once_per_turn(project, instance, tmp_path, llava_file):
    path, root, _ = llava_file
    config = project(
        [{"name": "llava", "kind": "json", "format": "llava", "path": str(path), "image_root": str(root), "multi_turn": "each"}]
    )
    assert materialize_source(config, instance, "llava").success
    checks = run_checks(config, instance, "llava")
    accounting = checks["row_accounting"]
    assert accounting.passed, accounting.description
    assert accounting.metadata["read"].value == 3 and accounting.metadata["turn_rows_beyond_one_per_record"].value == 5
