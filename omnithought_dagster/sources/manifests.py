"""Source manifests: seed sources declared by files dropped into a watched folder or S3 prefix.

`operations.source_manifests` names a local folder or an s3:// prefix (read with the store's
endpoint, region and keys). Each `<name>.yaml` / `.yml` / `.json` file in it (not in sub-folders)
declares one source, written like an entry of `sources:` in the project file; the file name is
the source name (a `name:` inside must agree). Relative paths in a local manifest are relative
to its folder. The `source_manifests` sensor turns new or changed manifests into seed_pool
partitions and runs; the seed_pool step reads the manifest again when it runs. No Dagster here.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import re
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs
import yaml
from pydantic import TypeAdapter, ValidationError

from omnithought_dagster.config import SOURCE_NAME_PATTERN, ConfigError, ProjectConfig, SourceConfig

SUFFIXES = (".yaml", ".yml", ".json")
_ADAPTER: TypeAdapter = TypeAdapter(SourceConfig)


@dataclass(frozen=True)
class Manifest:
    """One manifest file as found: its source, or why it cannot be used."""

    name: str
    uri: str
    digest: str  # sha256 of the file's bytes: a changed manifest is a new version of the source
    source: SourceConfig | None
    error: str | None = None


def manifest_filesystem(config: ProjectConfig, *, access_key: str | None = None, secret_key: str | None = None
                        ) -> tuple[pafs.FileSystem, str]:
    """The filesystem and the path inside it of `operations.source_manifests`."""
    uri = config.operations.source_manifests
    if uri is None:
        raise ConfigError("operations.source_manifests is not set: no manifest folder to read")
    if uri.startswith("s3://"):
        from omnithought_dagster.store.store import s3_filesystem

        return s3_filesystem(config.store, access_key=access_key, secret_key=secret_key), uri.removeprefix("s3://").rstrip("/")
    return pafs.LocalFileSystem(), uri.rstrip("/")


def scan_manifests(config: ProjectConfig, fs: pafs.FileSystem, folder: str) -> list[Manifest]:
    """Every manifest file directly under the folder, sorted by name; invalid ones carry their error.

    A missing folder is an empty one (the folder may be created after the project).
    """
    try:
        infos = fs.get_file_info(pafs.FileSelector(folder, recursive=False, allow_not_found=True))
    except OSError as exc:
        raise ConfigError(f"operations.source_manifests: cannot list {folder}: {exc}") from exc
    found = []
    for info in sorted(infos, key=lambda i: i.base_name):
        stem, suffix = posixpath.splitext(info.base_name)
        if info.type != pafs.FileType.File or suffix.lower() not in SUFFIXES or stem.startswith("."):
            continue
        found.append(read_manifest(config, fs, info.path))
    return found


def read_manifest(config: ProjectConfig, fs: pafs.FileSystem, path: str) -> Manifest:
    stem, _ = posixpath.splitext(posixpath.basename(path))
    with fs.open_input_stream(path) as stream:
        data = stream.read()
    digest = hashlib.sha256(data).hexdigest()

    def invalid(message: str) -> Manifest:
        return Manifest(stem, path, digest, None, f"{path}: {message}")

    if not re.fullmatch(SOURCE_NAME_PATTERN, stem):
        return invalid(f"the file name is the source name and must match {SOURCE_NAME_PATTERN}")
    if stem in config.source_names:
        return invalid(f"source {stem!r} is already in the project file; a manifest cannot replace it")
    try:
        raw = json.loads(data) if path.endswith(".json") else yaml.safe_load(data)
    except (ValueError, yaml.YAMLError) as exc:
        return invalid(f"not valid {'JSON' if path.endswith('.json') else 'YAML'}: {exc}")
    if not isinstance(raw, dict):
        return invalid(f"a manifest is one mapping (a `sources:` entry), got {type(raw).__name__}")
    if raw.setdefault("name", stem) != stem:
        return invalid(f"names source {raw['name']!r} but the file name says {stem!r}")
    base_dir = str(Path(path).parent) if isinstance(fs, pafs.LocalFileSystem) else None
    try:
        source = _ADAPTER.validate_python(raw, context={"base_dir": base_dir} if base_dir else None)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or '(top level)'}: {e['msg']}" for e in exc.errors())
        return invalid(f"invalid source ({problems})")
    return Manifest(stem, path, digest, source)


def resolve_source(config: ProjectConfig, name: str, *, access_key: str | None = None, secret_key: str | None = None) -> SourceConfig:
    """A source by name: from the project file, else from its manifest. KeyError says where it looked."""
    try:
        return config.source(name)
    except KeyError:
        if config.operations.source_manifests is None:
            raise
    fs, folder = manifest_filesystem(config, access_key=access_key, secret_key=secret_key)
    for suffix in SUFFIXES:
        path = f"{folder}/{name}{suffix}"
        if fs.get_file_info(path).type == pafs.FileType.File:
            manifest = read_manifest(config, fs, path)
            if manifest.source is None:
                raise KeyError(manifest.error)
            return manifest.source
    raise KeyError(f"no source named {name!r}: not in the project file ({config.source_names}) and no manifest "
                   f"{name}.yaml|yml|json in {config.operations.source_manifests}")
