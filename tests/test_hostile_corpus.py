"""A hostile corpus for the LLaVA, ShareGPT and HF (Parquet / Arrow) readers - the flat JSON reader has its own in
test_hostile_seeds.py. Every case is a real file beside two good records: the good ones are kept, the bad one gets
the reason of its class, and the records add up against the independent count (sources/recount.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from omnithought_dagster.config import SeedSettings, parse_config
from omnithought_dagster.seed.ingest import ingest_source
from omnithought_dagster.seed.sources import make_reader
from omnithought_dagster.seed.sources.recount import raw_record_count

from conftest import png_bytes, write_image


def _ingest(tmp_path: Path, source: dict):
    config = parse_config({"sources": [{"name": "s", **source}]}, base_dir=tmp_path).sources[0]
    reader = make_reader(config)
    result = ingest_source(
        "s",
        reader.records(),
        SeedSettings(near_duplicate_max_distance=-1),
        image_root=reader.image_root,
        put_image=lambda image_id, data: True,
        allowed_roots=config.allowed_image_roots,
    )
    rows = result.kept.to_pylist() + result.quarantine.to_pylist()
    assert result.rows_read == result.rows_kept + result.rows_quarantined
    assert {row["record_index"] for row in rows} == set(range(raw_record_count(config, reader)))  # every record, counted apart
    return result, {row["native_id"] or f"#{row['record_index']}": row["reason"] for row in result.quarantine.to_pylist()}


@pytest.fixture
def pictures(tmp_path):
    for i in range(2):
        write_image(tmp_path / f"g{i}.png", i)
    (tmp_path / "not-a-picture.png").write_bytes(b"GIF89a nothing")
    return tmp_path


# -- LLaVA ----------------------------------------------------------------------------------------------------------


def _llava(i: int, **extra) -> dict:
    return {
        "id": f"g{i}",
        "image": f"g{i}.png",
        "conversations": [{"from": "human", "value": f"<image>\nHow many blocks in {i}?"}, {"from": "gpt", "value": str(i)}],
        **extra,
    }


LLAVA_CASES = {
    "conversations is a string": ({"conversations": "hi"}, "malformed_record"),
    "conversations holds strings": ({"conversations": ["<image> q", "a"]}, "malformed_record"),
    "a turn without a role": ({"conversations": [{"value": "<image> q"}, {"from": "gpt", "value": "a"}]}, "malformed_record"),
    "the question is an object": (
        {"conversations": [{"from": "human", "value": {"text": "q"}}, {"from": "gpt", "value": "a"}]},
        "malformed_record",
    ),
    "the answer is null": ({"conversations": [{"from": "human", "value": "<image> q"}, {"from": "gpt", "value": None}]}, "missing_answer"),
    "the image is an object": ({"image": {"path": "g0.png"}}, "malformed_record"),
    "the image climbs out of the root": ({"image": "../../../../etc/passwd"}, "path_escape"),
    "two placeholders, one image": (
        {"conversations": [{"from": "human", "value": "<image><image> q"}, {"from": "gpt", "value": "a"}]},
        "image_placeholder_mismatch",
    ),
    "the image is no picture": ({"image": "not-a-picture.png"}, "corrupt_image"),
    "the image is missing": ({"image": "gone.png"}, "missing_image"),
    "the question is only a placeholder": (
        {"conversations": [{"from": "human", "value": "<image>\n  "}, {"from": "gpt", "value": "a"}]},
        "empty_question",
    ),
}


@pytest.mark.parametrize("case", list(LLAVA_CASES))
def test_llava_hostile_records(pictures, case):
    change, reason = LLAVA_CASES[case]
    records = [_llava(0), {**_llava(1), **change, "id": "bad"}, _llava(1, id="g1b")]
    (pictures / "llava.json").write_text(json.dumps(records))
    result, reasons = _ingest(pictures, {"kind": "json", "format": "llava", "path": str(pictures / "llava.json")})
    assert reasons == {"bad": reason} and result.rows_kept == 2


def test_llava_record_that_is_not_an_object(pictures):
    (pictures / "llava.json").write_text(json.dumps([_llava(0), ["not", "a", "record"], _llava(1)]))
    result, reasons = _ingest(pictures, {"kind": "json", "format": "llava", "path": str(pictures / "llava.json")})
    assert reasons == {"#1": "not_an_object"} and result.rows_kept == 2


# -- ShareGPT / LLaMA-Factory ------------------------------------------------------------------------------------------


def _sharegpt(i: int, **extra) -> dict:
    return {
        "id": f"g{i}",
        "messages": [{"role": "user", "content": f"<image>How many blocks in {i}?"}, {"role": "assistant", "content": str(i)}],
        "images": [f"g{i}.png"],
        **extra,
    }


SHAREGPT_CASES = {
    "no messages": ({"messages": None}, "malformed_record"),
    "OpenAI-style content parts": (
        {
            "messages": [
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "q"}]},
                {"role": "assistant", "content": "a"},
            ]
        },
        "malformed_record",
    ),
    "only a system prompt": ({"messages": [{"role": "system", "content": "be nice"}]}, "malformed_record"),
    "the assistant speaks first": (
        {"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "<image>q"}]},
        "malformed_record",
    ),
    "images is a number": ({"images": 7}, "malformed_record"),
    "an empty image path": ({"images": [""]}, "missing_image"),
    "an absolute image path": ({"images": ["/etc/hostname"]}, "path_escape"),
    "more images than placeholders": ({"images": ["g0.png", "g1.png"]}, "image_placeholder_mismatch"),
    "an empty answer": ({"messages": [{"role": "user", "content": "<image>q"}, {"role": "assistant", "content": "   "}]}, "missing_answer"),
    "a NUL byte in the image path": ({"images": ["g0\u0000.png"]}, "unreadable_image"),
}


@pytest.mark.parametrize("case", list(SHAREGPT_CASES))
def test_sharegpt_hostile_records(pictures, case):
    change, reason = SHAREGPT_CASES[case]
    lines = [_sharegpt(0), {**_sharegpt(1), **change, "id": "bad"}, _sharegpt(1, id="g1b")]
    (pictures / "sg.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    result, reasons = _ingest(pictures, {"kind": "sharegpt", "path": str(pictures / "sg.jsonl")})
    assert reasons == {"bad": reason} and result.rows_kept == 2


def test_sharegpt_roles_are_matched_without_case(pictures):
    record = _sharegpt(0)
    record["messages"] = [{"role": "User", "content": "<image>How many?"}, {"role": "ASSISTANT", "content": "3"}]
    (pictures / "sg.json").write_text(json.dumps([record]))
    result, reasons = _ingest(pictures, {"kind": "sharegpt", "path": str(pictures / "sg.json")})
    assert result.rows_kept == 1 and not reasons


# -- HF: Parquet and Arrow -------------------------------------------------------------------------------------------

IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def _parquet(path: Path, rows: list[dict], schema: pa.Schema | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    schema = schema or pa.schema([("id", pa.string()), ("question", pa.string()), ("answer", pa.string()), ("image", IMAGE)])
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
    return path


def _row(i: int, **extra) -> dict:
    return {
        "id": f"g{i}",
        "question": f"How many blocks in {i}?",
        "answer": str(i),
        "image": {"bytes": png_bytes(i), "path": None},
        **extra,
    }


HF_CASES = {
    "image bytes that are no picture": ({"image": {"bytes": b"%PDF-1.4 not an image", "path": None}}, "unsupported_image_format"),
    "a PNG cut short": ({"image": {"bytes": png_bytes(5)[:40], "path": None}}, "corrupt_image"),
    "no image at all": ({"image": None}, "no_image"),
    "a null question": ({"question": None}, "empty_question"),
    "a null answer": ({"answer": None}, "missing_answer"),
    "zero image bytes": ({"image": {"bytes": b"", "path": None}}, "empty_image"),
    "a path-only struct to nowhere": ({"image": {"bytes": None, "path": "nowhere.png"}}, "missing_image"),
}


@pytest.mark.parametrize("case", list(HF_CASES))
def test_parquet_hostile_rows(tmp_path, case):
    change, reason = HF_CASES[case]
    _parquet(tmp_path / "pq" / "train.parquet", [_row(0), {**_row(1), **change, "id": "bad"}, _row(2)])
    result, reasons = _ingest(tmp_path, {"kind": "hf", "path": str(tmp_path / "pq")})
    assert reasons == {"bad": reason} and result.rows_kept == 2


def test_parquet_invalid_utf8_in_a_binary_question_column(tmp_path):
    schema = pa.schema([("id", pa.string()), ("question", pa.binary()), ("answer", pa.string()), ("image", IMAGE)])
    rows = [{**_row(0), "question": b"fine?"}, {**_row(1), "id": "bad", "question": b"caf\xe9?"}, {**_row(2), "question": b"ok?"}]
    _parquet(tmp_path / "pq" / "train.parquet", rows, schema)
    result, reasons = _ingest(tmp_path, {"kind": "hf", "path": str(tmp_path / "pq")})
    assert reasons == {"bad": "invalid_utf8"} and result.rows_kept == 2


def test_parquet_image_list_with_a_null_entry(tmp_path):
    schema = pa.schema([("id", pa.string()), ("question", pa.string()), ("answer", pa.string()), ("images", pa.list_(IMAGE))])
    rows = [
        {"id": "g0", "question": "Q0?", "answer": "0", "images": [{"bytes": png_bytes(0), "path": None}]},
        {"id": "bad", "question": "Q1?", "answer": "1", "images": [{"bytes": png_bytes(1), "path": None}, None]},
        {"id": "g2", "question": "Q2?", "answer": "2", "images": [{"bytes": png_bytes(2), "path": None}]},
    ]
    _parquet(tmp_path / "pq" / "train.parquet", rows, schema)
    result, reasons = _ingest(tmp_path, {"kind": "hf", "path": str(tmp_path / "pq"), "fields": {"image": "images"}})
    assert reasons == {"bad": "malformed_record"} and result.rows_kept == 2


def test_an_answer_column_of_integers_is_read_as_numbers(tmp_path):
    schema = pa.schema([("id", pa.string()), ("question", pa.string()), ("answer", pa.int64()), ("image", IMAGE)])
    _parquet(tmp_path / "pq" / "train.parquet", [{**_row(0), "answer": 5}, {**_row(1), "answer": 2**62}], schema)
    result, reasons = _ingest(tmp_path, {"kind": "hf", "path": str(tmp_path / "pq")})
    assert not reasons and [(r["answer"], r["answer_type"]) for r in result.kept.to_pylist()] == [("5", "numeric"), (str(2**62), "numeric")]


def test_a_file_that_is_no_parquet_is_one_record_and_the_other_shards_are_read(tmp_path):
    _parquet(tmp_path / "pq" / "train-00000.parquet", [_row(0), _row(1)])
    (tmp_path / "pq" / "train-00001.parquet").write_bytes(b"PAR1 this is not parquet at all PAR1")
    _parquet(tmp_path / "pq" / "train-00002.parquet", [_row(2)])
    result, reasons = _ingest(tmp_path, {"kind": "hf", "path": str(tmp_path / "pq")})
    assert result.rows_kept == 3 and list(reasons.values()) == ["unreadable_file"]
    assert "train-00001.parquet" in result.quarantine.column("detail")[0].as_py()


def test_a_row_group_that_does_not_decode_sets_aside_exactly_its_rows(tmp_path):
    """Damage inside one row group: the footer still says how many rows it held; each becomes a quarantine row."""
    path = tmp_path / "pq" / "train.parquet"
    path.parent.mkdir(parents=True)
    table = pa.Table.from_pylist(
        [_row(i) for i in range(6)],
        schema=pa.schema([("id", pa.string()), ("question", pa.string()), ("answer", pa.string()), ("image", IMAGE)]),
    )
    pq.write_table(table, path, row_group_size=2, compression="none")
    metadata = pq.ParquetFile(path).metadata
    column = metadata.row_group(1).column(0)  # the id column of the second row group: overwrite its data pages
    data = bytearray(path.read_bytes())
    start = column.data_page_offset
    data[start : start + column.total_compressed_size] = b"\xff" * column.total_compressed_size
    path.write_bytes(bytes(data))
    result, reasons = _ingest(tmp_path, {"kind": "hf", "path": str(tmp_path / "pq")})
    assert result.rows_kept == 4 and list(reasons.values()) == ["unreadable_file", "unreadable_file"]
    assert sorted(result.quarantine.column("record_index").to_pylist()) == [2, 3]
    assert "row group 1" in result.quarantine.column("detail")[0].as_py()


def test_an_arrow_stream_cut_short_keeps_its_whole_batches(tmp_path):
    """A save_to_disk shard truncated mid-way (an interrupted copy): the batches before the cut are read."""
    import datasets

    folder = tmp_path / "ds"
    datasets.Dataset.from_list(
        [{"id": f"g{i}", "question": f"Q{i}?", "answer": str(i), "image": {"bytes": png_bytes(i), "path": None}} for i in range(4)],
        features=datasets.Features(
            {
                "id": datasets.Value("string"),
                "question": datasets.Value("string"),
                "answer": datasets.Value("string"),
                "image": datasets.Image(),
            }
        ),
    ).save_to_disk(str(folder), max_shard_size="1KB")
    shards = sorted(folder.glob("*.arrow"))
    assert len(shards) > 1
    shards[-1].write_bytes(shards[-1].read_bytes()[: len(shards[-1].read_bytes()) // 2])
    result, reasons = _ingest(tmp_path, {"kind": "hf", "path": str(folder)})
    assert set(reasons.values()) == {"unreadable_file"} and result.rows_kept >= 1


def test_a_mathvista_shaped_parquet_written_by_datasets(tmp_path):
    """AI4Math/MathVista's testmini layout: `decoded_image` (HF Image), `pid`, `choices` (list or null), `question_type`
    (multi_choice / free_form), `answer_type` (text / integer / float / list), `metadata` (a struct)."""
    import datasets

    features = datasets.Features(
        {
            "pid": datasets.Value("string"),
            "question": datasets.Value("string"),
            "image": datasets.Value("string"),
            "decoded_image": datasets.Image(),
            "choices": datasets.Sequence(datasets.Value("string")),
            "unit": datasets.Value("string"),
            "precision": datasets.Value("float64"),
            "answer": datasets.Value("string"),
            "question_type": datasets.Value("string"),
            "answer_type": datasets.Value("string"),
            "metadata": {"category": datasets.Value("string"), "skills": datasets.Sequence(datasets.Value("string"))},
        }
    )
    rows = [
        {
            "pid": "1",
            "question": "When a spring does work on an object, we cannot find the work by simply multiplying...",
            "image": "images/1.jpg",
            "choices": None,
            "unit": None,
            "precision": 1.0,
            "answer": "1.2",
            "question_type": "free_form",
            "answer_type": "float",
            "metadata": {"category": "math-targeted-vqa", "skills": ["scientific reasoning"]},
        },
        {
            "pid": "2",
            "question": "what is the total volume of the measuring cup?",
            "image": "images/2.jpg",
            "choices": None,
            "unit": "g",
            "precision": None,
            "answer": "1000",
            "question_type": "free_form",
            "answer_type": "integer",
            "metadata": {"category": "general-vqa", "skills": ["numeric commonsense"]},
        },
        {
            "pid": "5",
            "question": "Find $m\\angle H$",
            "image": "images/5.jpg",
            "choices": ["97", "102", "107", "122"],
            "unit": None,
            "precision": None,
            "answer": "97",
            "question_type": "multi_choice",
            "answer_type": "text",
            "metadata": {"category": "math-targeted-vqa", "skills": ["geometry reasoning"]},
        },
        {
            "pid": "9",
            "question": "Is the number of cyan things greater than 3?",
            "image": "images/9.jpg",
            "choices": ["Yes", "No"],
            "unit": None,
            "precision": None,
            "answer": "Maybe",
            "question_type": "multi_choice",
            "answer_type": "text",
            "metadata": {"category": "general-vqa", "skills": ["arithmetic reasoning"]},
        },
    ]
    for i, row in enumerate(rows):
        row["decoded_image"] = {"bytes": png_bytes(i), "path": None}
    (tmp_path / "mv").mkdir()
    datasets.Dataset.from_list(rows, features=features).to_parquet(str(tmp_path / "mv" / "testmini-00000-of-00001.parquet"))
    result, reasons = _ingest(tmp_path, {"kind": "hf", "path": str(tmp_path / "mv"), "fields": {"id": "pid", "image": "decoded_image"}})
    kept = {r["native_id"]: (r["answer_type"], r["answer"], r["choices"], len(r["image_ids"])) for r in result.kept.to_pylist()}
    assert kept == {
        "1": ("numeric", "1.2", [], 1),
        "2": ("numeric", "1000", [], 1),
        "5": ("multiple_choice", "A", ["97", "102", "107", "122"], 1),
    }
    assert reasons == {"9": "answer_not_in_choices"}
    assert json.loads(result.kept.to_pylist()[2]["metadata"])["metadata"]["skills"] == ["geometry reasoning"]
