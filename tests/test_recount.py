"""The independent record count behind row_accounting agrees with the readers on well-formed and hostile files."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from omnithought_dagster.seed.sources.base import count_json_records, iter_json_records
from omnithought_dagster.seed.sources.recount import json_file_records


@pytest.mark.parametrize(
    ("name", "data", "expected"),
    [
        ("a.json", b'[{"a": 1}, {"b": "x,]}"}, 3, "s", null, [1, [2]]]', 6),
        ("a.json", b"[]", 0),
        ("a.json", b'\xef\xbb\xbf[{"a": 1}, {"a": 2}]', 2),
        ("a.json", b'{"a": [1, 2, 3]}', 1),
        ("a.json", b'[{"a": 1}, {"a": 2}', 1),  # truncated: one unreadable file
        ("a.json", b'[{"a": "unterminated}]', 1),
        ("a.json", b'{"a": 1}\n{"a": 2}\n{"a": 3}\n', 3),  # JSONL in a .json file
        ("a.jsonl", b'{"a": 1}\n\n  \n{"a": "x\xe2\x80\xa8y"}\n{"broken\n', 3),  # U+2028 is no line break; a bad line is a record
        ("a.jsonl", '{"a": 1}\n\u3000\n'.encode(), 2),  # a line of ideographic space is a (bad) record, not a blank
        ("a.jsonl", b'\xef\xbb\xbf{"a": 1}\r\n{"a": 2}\r\n', 2),
        ("a.json", b"[" * 5000 + b"]" * 5000, 1),
    ],
)
def test_raw_count_and_the_readers_agree(tmp_path, name, data, expected):
    path = tmp_path / name
    path.write_bytes(data)
    assert json_file_records(path) == expected
    assert count_json_records(path) == expected == sum(1 for _ in iter_json_records(path))


_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=10,
)


@settings(max_examples=150, deadline=None)
@given(
    records=st.lists(st.dictionaries(st.text(max_size=8), _values, max_size=4), max_size=8), jsonl=st.booleans(), ascii_only=st.booleans()
)
def test_generated_files_are_counted_alike_by_both_routes(tmp_path_factory, records, jsonl, ascii_only):
    path = tmp_path_factory.mktemp("gen") / ("g.jsonl" if jsonl else "g.json")
    if jsonl:
        text = "\n".join(json.dumps(r, ensure_ascii=ascii_only) for r in records)
    else:
        text = json.dumps(records, ensure_ascii=ascii_only, indent=1 if ascii_only else None)
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    parsed = list(iter_json_records(path))
    assert json_file_records(path) == len(parsed) == len(records)


@pytest.mark.parametrize(
    ("data", "reasons"),
    [
        ('[{"a": 1},, {"a": 2}]', [None, None]),  # an empty slot holds no record
        ('[{"a": 1}, {"a": }, {"a": 2}]', [None, "malformed_record", None]),
        ("[1, 2 3, 4]", [None, "malformed_record", None]),
        ('[{"a": 1}, {"a": 2}', ["unreadable_file"]),  # truncated: nothing can be trusted
        ('["x\\", 1]', ["unreadable_file"]),  # a string that never closes
    ],
)
def test_one_bad_element_of_a_json_array_loses_only_itself(tmp_path, data, reasons):
    path = tmp_path / "a.json"
    path.write_text(data)
    got = [problem[0].value if problem else None for _, problem in iter_json_records(path)]
    assert got == reasons
    assert json_file_records(path) == count_json_records(path) == len(reasons)


# -- the streamed reader across chunk boundaries ---------------------------------------------------------------------

_TRICKY_ARRAY = (
    '\ufeff[ {"q": "a \\"quoted\\" ]}, word", "n": [1, {"x": "\\\\"}]}, ,'
    ' 12.5e3 , "s\\u2028t" , true, null, {"bad": 01}, [[["deep"]]], {"emoji": "\U0001f600", "back": "\\\\\\""}'
    " , -0 ]\n"
).encode()


@pytest.mark.parametrize("chunk", [1, 2, 3, 5, 16, 1 << 20])
def test_arrays_read_in_small_chunks_give_the_same_records(tmp_path, monkeypatch, chunk):
    from omnithought_dagster.seed.sources import jsonstream

    path = tmp_path / "tricky.json"
    path.write_bytes(_TRICKY_ARRAY)
    reference = list(iter_json_records(path))
    monkeypatch.setattr(jsonstream, "CHUNK_BYTES", chunk)
    got = list(iter_json_records(path))
    assert [(repr(r), p) for r, p in got] == [(repr(r), p) for r, p in reference]
    assert len(got) == count_json_records(path) == json_file_records(path) == 9
    assert [p[0].value for _, p in got if p] == ["malformed_record"]  # {"bad": 01}
    assert got[0][0] == {"q": 'a "quoted" ]}, word', "n": [1, {"x": "\\"}]}


def test_arbitrary_bytes_in_tiny_chunks_match_the_independent_count(tmp_path, monkeypatch):
    """Bytes cut at every boundary: the streamed reader never crashes and counts what the byte scanner counts."""
    import random

    from omnithought_dagster.seed.sources import jsonstream

    monkeypatch.setattr(jsonstream, "CHUNK_BYTES", 3)
    pieces = [b"[", b"]", b"{", b"}", b",", b":", b'"', b"\\", b" ", b"\n", b"a", b"1", b'"x"', b"\xff", b"null", b"\xef\xbb\xbf"]
    rng = random.Random(7)
    path = tmp_path / "any.json"
    for _ in range(600):
        data = b"[" + b"".join(rng.choice(pieces) for _ in range(rng.randint(0, 30))) + rng.choice([b"]", b"", b"]]", b"] x"])
        path.write_bytes(data)
        records = list(iter_json_records(path))
        assert len(records) == count_json_records(path) == json_file_records(path), data
