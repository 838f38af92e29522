"""Content ids: stable under formatting noise, sensitive to content."""

from omnithought_dagster.ids import ID_PATTERN, bytes_id, content_id, sample_id, version_of


def test_sample_id_ignores_whitespace_and_unicode_form():
    a = sample_id("How many  cats\n are there?", ["i1"], " 3 ")
    b = sample_id("How many cats are there?", ["i1"], "3")
    c = sample_id("How many ｃａｔｓ are there?", ["i1"], "3")  # full-width letters, NFKC-equal
    assert a == b == c
    assert ID_PATTERN.match(a)


def test_sample_id_depends_on_every_part():
    base = sample_id("q", ["i1", "i2"], "a", ["x", "y"])
    assert base != sample_id("q2", ["i1", "i2"], "a", ["x", "y"])
    assert base != sample_id("q", ["i2", "i1"], "a", ["x", "y"])  # image order matters
    assert base != sample_id("q", ["i1", "i2"], "b", ["x", "y"])
    assert base != sample_id("q", ["i1", "i2"], "a", ["x", "z"])


def test_kinds_never_collide_and_versions_ignore_order():
    assert content_id("sample", "x") != content_id("trace", "x")
    assert bytes_id(b"abc") == bytes_id(b"abc") != bytes_id(b"abd")
    assert version_of(["b", "a"]) == version_of(["a", "b"]) != version_of(["a"])
