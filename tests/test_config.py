"""The project file: the shipped demo config loads; bad files fail at load naming the field."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from omnithought_dagster.config import ConfigError, load_config, parse_config

REPO = Path(__file__).resolve().parents[1]


def test_shipped_demo_config_loads_with_paths_resolved_against_its_folder(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # the working directory must not matter
    config = load_config(REPO / "omnithought.yaml")
    assert config.store.root == str(REPO / ".omnithought")
    assert config.source_names[0] == "synthetic"
    llava = config.source("mini_llava")
    assert llava.path == str(REPO / "examples/mini_llava/data.json")


def test_env_var_then_cwd_lookup(monkeypatch, tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "custom.yaml").write_text(yaml.safe_dump({"sources": [{"name": "s1", "kind": "synthetic"}]}))
    monkeypatch.setenv("OMNITHOUGHT_CONFIG", str(tmp_path / "a" / "custom.yaml"))
    assert load_config().source_names == ["s1"]
    monkeypatch.delenv("OMNITHOUGHT_CONFIG")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="no config: set OMNITHOUGHT_CONFIG"):
        load_config()
    (tmp_path / "omnithought.yaml").write_text(yaml.safe_dump({"sources": [{"name": "s2", "kind": "synthetic"}]}))
    assert load_config().source_names == ["s2"]


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "nope.yaml")


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ({"sources": [{"name": "a", "kind": "synthetic", "n_sample": 5}]}, r"sources\[0\] \(name=a\)\.n_sample: unknown field"),
        (
            {"sources": [{"name": "a", "kind": "synthetic", "n_samples": -1}]},
            r"sources\[0\] \(name=a\)\.n_samples: Input should be greater than 0",
        ),
        ({"sources": [{"name": "a", "kind": "csv", "path": "x"}]}, r"sources\[0\] \(name=a\): unknown kind 'csv'"),
        ({"sources": [{"name": "a", "kind": "json"}]}, r"sources\[0\] \(name=a\)\.path: Field required"),
        ({"sources": [{"name": "Bad Name", "kind": "synthetic"}]}, r"sources\[0\] \(name=Bad Name\)\.name: String should match pattern"),
        (
            {"sources": [{"name": "a", "kind": "synthetic"}, {"name": "a", "kind": "synthetic"}]},
            r"sources\[1\]\.name: 'a' is used by an earlier source",
        ),
        ({"sources": []}, r"sources: at least one source, or operations.source_manifests to watch for them"),
        (
            {"sources": [{"name": "a", "kind": "synthetic"}], "seed": {"max_image_pixels": 0}},
            r"seed\.max_image_pixels: Input should be greater than 0",
        ),
        ({"sources": [{"name": "a", "kind": "synthetic"}], "stor": {}}, r"stor: unknown field"),
        (
            {"sources": [{"name": "a", "kind": "synthetic", "families": ["poetry"]}]},
            r"families: Value error, unknown task families \['poetry'\]",
        ),
        (
            {"sources": [{"name": "a", "kind": "json", "path": "x", "format": "csv"}]},
            r"sources\[0\] \(name=a\)\.format: Input should be 'flat' or 'llava'",
        ),
    ],
)
def test_bad_config_names_field_and_problem(raw, expected, tmp_path):
    with pytest.raises(ConfigError, match=expected):
        parse_config(raw, base_dir=tmp_path, origin="proj.yaml")


def test_not_a_mapping_and_not_yaml(tmp_path):
    path = tmp_path / "omnithought.yaml"
    path.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(path)
    path.write_text("sources: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)


def test_uris_are_not_resolved_as_paths(tmp_path):
    config = parse_config({"store": {"root": "s3://bucket/corpus"}, "sources": [{"name": "a", "kind": "synthetic"}]}, base_dir=tmp_path)
    assert config.store.root == "s3://bucket/corpus"
