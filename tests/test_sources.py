"""Each reader on files the test writes in that format, through to ingested rows."""

from __future__ import annotations

import ast
import io
import json
from pathlib import Path

import pytest
from PIL import Image

from omnithought_dagster.config import SeedSettings, parse_config
from omnithought_dagster.seed.ingest import ingest_source
from omnithought_dagster.seed.sources import Candidate, Rejected, make_reader
from omnithought_dagster.seed.sources.synthetic import FAMILIES, SyntheticReader

from conftest import png_bytes, write_image, write_json


def _source(tmp_path, **source):
    return parse_config({"sources": [{"name": "s", **source}]}, base_dir=tmp_path).sources[0]


def _ingest(reader, **settings):
    stored = {}
    result = ingest_source(
        "s", reader.records(), SeedSettings(**settings), image_root=reader.image_root, put_image=lambda i, d: stored.setdefault(i, d) is d
    )
    return result, stored


# -- synthetic -------------------------------------------------------------------------------------


def test_the_config_names_the_families_the_synthetic_reader_draws():
    from omnithought_dagster.config import SYNTHETIC_FAMILIES
    from omnithought_dagster.seed.sources.synthetic import FAMILIES

    assert tuple(FAMILIES) == SYNTHETIC_FAMILIES
    with pytest.raises(ValueError, match=r"unknown task families \['maze'\]"):
        parse_config({"sources": [{"name": "s", "kind": "synthetic", "families": ["counting", "maze"]}]}, base_dir=Path("."))


def test_synthetic_is_deterministic_balanced_and_verifiable():
    a = list(SyntheticReader(60, seed=3).records())
    b = list(SyntheticReader(60, seed=3).records())
    assert [(r.question, r.answer, r.images[0].data) for r in a] == [(r.question, r.answer, r.images[0].data) for r in b]
    assert [r.images[0].data for r in a] != [r.images[0].data for r in SyntheticReader(60, seed=4).records()]
    # Growing the source never changes earlier samples.
    assert SyntheticReader(61, seed=3).sample(59).images[0].data == a[59].images[0].data
    families = [r.metadata["family"] for r in a]
    assert {f: families.count(f) for f in FAMILIES} == {f: 10 for f in FAMILIES}
    for record in a:
        assert record.tags == [FAMILIES[record.metadata["family"]][0]]
        assert record.difficulty in (1, 2, 3)
        image = Image.open(io.BytesIO(record.images[0].data))
        assert image.size == (320, 320) and image.format == "PNG"
        if record.metadata["family"] == "arithmetic":
            # The answer is the value of the expression drawn in the image.
            assert eval(compile(ast.parse(record.metadata["expression"], mode="eval"), "<expr>", "eval")) == int(record.answer)
        if record.answer_type == "multiple_choice":
            assert record.answer in "ABCDEFGH"[: len(record.choices)]


def test_the_with_content_variant_says_in_text_what_the_image_shows_and_leaves_the_default_as_it_was():
    plain = list(SyntheticReader(60, seed=3).records())
    text = list(SyntheticReader(60, seed=3, question_text="with_content").records())
    assert [r.images[0].data for r in plain] == [r.images[0].data for r in text]  # the same pictures, answers and choices
    assert [(r.answer, r.choices, r.difficulty) for r in plain] == [(r.answer, r.choices, r.difficulty) for r in text]
    assert all("solution" not in r.metadata for r in plain)  # the default's rows are what they were
    assert SyntheticReader(60, seed=3).fingerprint() != SyntheticReader(60, seed=3, question_text="with_content").fingerprint()
    for before, after in zip(plain, text, strict=True):
        family = after.metadata["family"]
        assert after.question.startswith(before.question) and after.metadata["solution"]
        assert after.metadata["content_in_text"] == (family not in ("counting", "spatial"))
        if family in ("counting", "spatial"):
            assert after.question == before.question  # only the image holds what is counted or placed
        else:
            assert after.question != before.question
        if family == "arithmetic":
            assert after.metadata["expression"] in after.question
        if after.answer_type != "multiple_choice":  # a worked solution ends at the answer
            assert after.metadata["solution"].rstrip(".").endswith(after.answer), after.metadata["solution"]
    with pytest.raises(ValueError, match="question_text"):
        SyntheticReader(4, question_text="both")


def test_synthetic_ingests_cleanly_with_images_stored():
    result, stored = _ingest(SyntheticReader(48, seed=0))
    assert result.rows_read == 48 and result.rows_quarantined == 0 and result.rows_kept == 48
    assert set(stored) == set(result.images.column("image_id").to_pylist())
    assert set(result.kept.column("answer_type").to_pylist()) <= {"numeric", "multiple_choice", "free_form"}
    assert all(result.kept.column("source_difficulty").to_pylist())


# -- JSON / JSONL (flat and LLaVA) -------------------------------------------------------------------


@pytest.mark.parametrize("jsonl", [False, True])
def test_flat_json_with_field_mapping(tmp_path, jsonl):
    write_image(tmp_path / "data/img/a.png", 1)
    write_image(tmp_path / "data/img/b.png", 2)
    records = [
        {
            "meta": {"uid": "q1"},
            "query": "Which is larger?",
            "label": "B",
            "options": ["2", "5"],
            "pics": ["img/a.png", "img/b.png"],
            "split": "train",
        },
        {"meta": {"uid": "q2"}, "query": "How tall is it?", "label": "1,250 m", "pics": "img/a.png"},
    ]
    path = write_json(tmp_path / ("data/set.jsonl" if jsonl else "data/set.json"), records, jsonl=jsonl)
    source = _source(
        tmp_path,
        kind="json",
        path=str(path),
        fields={"id": "meta.uid", "question": "query", "answer": "label", "image": "pics", "choices": "options"},
    )
    reader = make_reader(source)
    assert reader.count() == 2
    result, stored = _ingest(reader)
    rows = result.kept.to_pylist()
    assert [r["native_id"] for r in rows] == ["q1", "q2"]
    assert rows[0]["answer_type"] == "multiple_choice" and rows[0]["choices"] == ["2", "5"] and rows[0]["answer"] == "B"
    assert len(rows[0]["image_ids"]) == 2 and len(stored) == 2
    assert rows[1]["answer_type"] == "numeric" and rows[1]["image_ids"] == [rows[0]["image_ids"][0]]
    assert json.loads(rows[0]["metadata"]) == {"split": "train"}


def test_llava_conversations(tmp_path):
    write_image(tmp_path / "imgs/x.png", 5)
    records = [
        {
            "id": "l1",
            "image": "x.png",
            "conversations": [
                {"from": "human", "value": "<image>\nWhat is shown?\nA. a cat\nB. a dog"},
                {"from": "gpt", "value": "a dog"},
                {"from": "human", "value": "What colour?"},
                {"from": "gpt", "value": "brown"},
            ],
        },
        {"id": "l2", "image": "x.png", "conversations": [{"from": "gpt", "value": "hi"}, {"from": "human", "value": "?"}]},
    ]
    source = _source(
        tmp_path, kind="json", format="llava", path=str(write_json(tmp_path / "llava.json", records)), image_root=str(tmp_path / "imgs")
    )
    result, _ = _ingest(make_reader(source))
    (row,) = result.kept.to_pylist()
    assert row["question"] == "What is shown?" and row["choices"] == ["a cat", "a dog"]
    assert row["answer"] == "B"  # the option's text became its letter
    assert json.loads(row["metadata"])["extra_turns"] == [{"role": "human", "content": "What colour?"}, {"role": "gpt", "content": "brown"}]
    (bad,) = result.quarantine.to_pylist()
    assert bad["native_id"] == "l2" and bad["reason"] == "malformed_record" and "user turn then an assistant turn" in bad["detail"]


# -- ShareGPT / LLaMA-Factory ------------------------------------------------------------------------


def test_sharegpt_messages_and_images(tmp_path):
    write_image(tmp_path / "mm/1.jpg", 7, fmt="JPEG")
    records = [
        {
            "messages": [
                {"role": "system", "content": "You are helpful."},
                {"role": "user", "content": "<image>How many blocks?"},
                {"role": "assistant", "content": "4"},
            ],
            "images": ["mm/1.jpg"],
        },
    ]
    source = _source(tmp_path, kind="sharegpt", path=str(write_json(tmp_path / "sg.json", records)))
    result, _ = _ingest(make_reader(source))
    (row,) = result.kept.to_pylist()
    assert row["native_id"] == "#0" and row["question"] == "How many blocks?" and row["answer"] == "4"
    assert json.loads(row["metadata"])["system"] == ["You are helpful."]


def test_sharegpt_with_conversations_from_value_keys(tmp_path):
    write_image(tmp_path / "1.png", 8)
    records = [{"conversations": [{"from": "human", "value": "<image>Q?"}, {"from": "gpt", "value": "yes"}], "images": ["1.png"], "id": 9}]
    source = _source(
        tmp_path,
        kind="sharegpt",
        path=str(write_json(tmp_path / "sg.jsonl", records, jsonl=True)),
        messages_key="conversations",
        role_key="from",
        content_key="value",
        user_role="human",
        assistant_role="gpt",
    )
    result, _ = _ingest(make_reader(source))
    assert result.kept.to_pylist()[0]["native_id"] == "9"


# -- Parquet and HF datasets on disk -----------------------------------------------------------------


def _hf_dataset():
    import datasets

    features = datasets.Features(
        {
            "id": datasets.Value("string"),
            "question": datasets.Value("string"),
            "answer": datasets.Value("string"),
            "image": datasets.Image(),
            "subject": datasets.Value("string"),
        }
    )
    return datasets.Dataset.from_dict(
        {
            "id": ["h1", "h2"],
            "question": ["What colour?", "How many?"],
            "answer": ["red", "3"],
            "image": [{"bytes": png_bytes(11), "path": None}, {"bytes": png_bytes(12), "path": None}],
            "subject": ["art", "math"],
        },
        features=features,
    )


def test_parquet_shards_with_hf_image_struct(tmp_path):
    _hf_dataset().to_parquet(str(tmp_path / "shards/train-00000.parquet"))
    _hf_dataset().select([1]).to_parquet(str(tmp_path / "shards/train-00001.parquet"))
    source = _source(tmp_path, kind="hf", path=str(tmp_path / "shards"))
    reader = make_reader(source)
    assert reader.count() == 3
    result, stored = _ingest(reader)
    assert result.rows_kept == 2 and result.reasons == {"duplicate": 1}  # the second shard repeats h2
    rows = result.kept.to_pylist()
    assert [r["native_id"] for r in rows] == ["h1", "h2"]
    assert json.loads(rows[0]["metadata"]) == {"subject": "art"}
    assert len(stored) == 2


def test_save_to_disk_folders_and_splits(tmp_path):
    import datasets

    _hf_dataset().save_to_disk(str(tmp_path / "ds"))
    result, _ = _ingest(make_reader(_source(tmp_path, kind="hf", path=str(tmp_path / "ds"))))
    assert result.rows_kept == 2
    datasets.DatasetDict({"train": _hf_dataset(), "test": _hf_dataset().select([0])}).save_to_disk(str(tmp_path / "dd"))
    test_only = make_reader(_source(tmp_path, kind="hf", path=str(tmp_path / "dd"), split="test"))
    assert test_only.count() == 1
    both = make_reader(_source(tmp_path, kind="hf", path=str(tmp_path / "dd")))
    assert both.count() == 3
    with pytest.raises(FileNotFoundError, match="no split 'dev'"):
        make_reader(_source(tmp_path, kind="hf", path=str(tmp_path / "dd"), split="dev"))


def test_hf_image_struct_with_path_only(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    write_image(tmp_path / "pq/pics/p.png", 13)
    table = pa.table(
        {
            "question": ["Q?", "Q2?"],
            "answer": ["a", "b"],
            "image": pa.array(
                [{"bytes": None, "path": "pics/p.png"}, {"bytes": None, "path": "pics/gone.png"}],
                pa.struct([("bytes", pa.binary()), ("path", pa.string())]),
            ),
        }
    )
    pq.write_table(table, tmp_path / "pq/data.parquet")
    result, _ = _ingest(make_reader(_source(tmp_path, kind="hf", path=str(tmp_path / "pq/data.parquet"))))
    assert result.rows_kept == 1 and result.reasons == {"missing_image": 1}


def test_reader_yields_one_item_per_raw_record(tmp_path):
    path = tmp_path / "mixed.jsonl"
    path.write_text('{"question": "q", "answer": "a", "image": "x.png"}\nnot json\n[1, 2]\n\n"str"\n')
    reader = make_reader(_source(tmp_path, kind="json", path=str(path)))
    records = list(reader.records())
    assert reader.count() == len(records) == 4
    assert isinstance(records[0], Candidate)
    assert [r.reason.value for r in records[1:]] == ["malformed_record", "not_an_object", "not_an_object"]
    assert all(isinstance(r, Rejected) for r in records[1:])


def test_missing_source_files_fail_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file, folder or matching glob"):
        make_reader(_source(tmp_path, kind="json", path=str(tmp_path / "absent.json")))
