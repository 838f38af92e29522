"""Tag mapping onto the versioned taxonomy."""

import pytest

from omnithought_dagster.annotate.taxonomy import Taxonomy, TaxonomyError

TAX = Taxonomy.load("builtin:tags-v1")


@pytest.mark.parametrize(
    ("raw", "label", "how"),
    [
        ("math/geometry", "math/geometry", "exact"),
        ("Math / Geometry", "math/geometry", "exact"),
        ("bar chart", "chart/bar", "alias"),
        ("OCR", "document/ocr", "alias"),
        ("spatial_reasoning", "spatial-relations", "alias"),
        ("arithmetic", "math/arithmetic", "alias"),
        ("geometry", "math/geometry", "alias"),
        ("bar", "chart/bar", "leaf"),
        ("counting objects", "counting", "nearest"),
        ("geometery", "math/geometry", "nearest"),
        ("tables", "table", "nearest"),
        ("astrology", None, "rejected"),
        ("", None, "rejected"),
        ("!!!", None, "rejected"),
    ],
)
def test_map_tag(raw, label, how):
    mapping = TAX.map_tag(raw)
    assert (mapping.label, mapping.how) == (label, how)


def test_map_tags_dedupes_caps_and_reports():
    labels, mappings = TAX.map_tags(["geometry", "math/geometry", "astrology", "table", "counting", "chart"], max_tags=3)
    assert labels == ["math/geometry", "table", "counting"]
    assert [m.how for m in mappings] == ["alias", "exact", "rejected", "exact", "exact", "alias"]


def test_synthetic_ground_truth_tags_are_labels():
    from omnithought_dagster.seed.sources.synthetic import FAMILIES

    assert {tag for tag, _ in FAMILIES.values()} <= set(TAX.names)
    assert TAX.version == "tags-v1" and len(TAX.names) >= 15


def test_bad_taxonomy_files(tmp_path):
    with pytest.raises(TaxonomyError, match="cannot read"):
        Taxonomy.load(str(tmp_path / "missing.yaml"))
    (tmp_path / "t.yaml").write_text("labels: {a: {}}\n")
    with pytest.raises(TaxonomyError, match="needs `version`"):
        Taxonomy.load(str(tmp_path / "t.yaml"))
    (tmp_path / "t.yaml").write_text("version: x\nlabels: {'Bad Label': {}}\n")
    with pytest.raises(TaxonomyError, match="must be lowercase"):
        Taxonomy.load(str(tmp_path / "t.yaml"))
