"""Source manifests: seed sources declared by files dropped into a watched folder or S3 prefix.

`operations.source_manifests` names a local folder or an s3:// prefix (read with the store's
endpoint, region and keys). Each `<name>.yaml` / `.yml` / `.json` file in it (not in sub-folders)
declares one source, written like an entry of `sources:` in the project file; the file name is
the source name (a `name:` inside must agree). Relative paths in a local manifest are relative
to its folder. The `source_manifests` sensor turns new or changed manifests into seed_pool
partitions and runs; the seed_pool step reads the manifest again when it runs. No Dagster here.

The trust boundary: the project file is the operator's and trusted; a manifest is not (people outside the team drop
them). A manifest reads only inside the roots the project file grants (`operations.manifest_roots`, default the
manifest folder): every path it names (`path`, `image_root`, `allowed_image_roots`) must resolve there with symlinks
followed, and a folder it names must hold no symlink that leads out. A manifest in S3 names no local path at all,
only objects under granted s3:// prefixes. A manifest that reaches further is refused with the reason, before
anything it names is opened; the seed step checks again when it runs.
"""

from __future__ import annotations

import hashlib
import json
import os
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
    local = isinstance(fs, pafs.LocalFileSystem)
    base_dir = str(Path(path).parent) if local else None
    if not local:  # before validation resolves anything: a relative path would be the worker's working folder
        local_paths = [value for _, value in _named_paths(raw) if isinstance(value, str) and "://" not in value]
        if local_paths:
            return invalid(f"a manifest in S3 names only s3:// objects, never a local path ({local_paths[0]!r})")
    try:
        source = _ADAPTER.validate_python(raw, context={"base_dir": base_dir} if base_dir else None)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or '(top level)'}: {e['msg']}" for e in exc.errors())
        return invalid(f"invalid source ({problems})")
    refused = outside_roots(source, granted_roots(config, path, local))
    if refused:
        return invalid(f"refused: {refused}")
    return Manifest(stem, path, digest, source)


PATH_FIELDS = ("path", "image_root")  # and each of allowed_image_roots


def _named_paths(source) -> list[tuple[str, object]]:
    """(field, value) of every path a source (a mapping or a SourceConfig) names."""
    get = source.get if isinstance(source, dict) else (lambda key, default=None: getattr(source, key, default))
    named = [(field, get(field)) for field in PATH_FIELDS if get(field) is not None]
    roots = get("allowed_image_roots") or []
    return named + [(f"allowed_image_roots[{i}]", root) for i, root in enumerate(roots if isinstance(roots, list) else [roots])]


def granted_roots(config: ProjectConfig, manifest_path: str, local: bool) -> list[str]:
    """The folders and s3:// prefixes a manifest may read: operations.manifest_roots, else its own folder."""
    if config.operations.manifest_roots is not None:
        return list(config.operations.manifest_roots)
    folder = posixpath.dirname(manifest_path)
    return [folder] if local else [f"s3://{folder}"]


def outside_roots(source: SourceConfig, roots: list[str]) -> str | None:
    """Why a manifest's source reaches outside `roots` (None when it does not): a path that resolves (symlinks followed)
    outside every local root, a URI under no granted prefix, a folder holding a symlink that leads out. Nothing is
    opened: only names are resolved and folders listed."""
    local_roots = [os.path.realpath(root) for root in roots if "://" not in root]
    uri_roots = [root.rstrip("/") for root in roots if "://" in root]
    shown = f"operations.manifest_roots: {roots}"
    for field, value in _named_paths(source):
        value = str(value)
        if "://" in value:
            scheme, _, rest = value.partition("://")
            normal = posixpath.normpath(rest)
            if scheme != "s3" or ".." in rest.split("/") or not any(f"s3://{normal}".startswith(root + "/") or f"s3://{normal}" == root
                                                                    for root in uri_roots):
                return f"{field} {value!r} is under no granted prefix ({shown})"
            continue
        real = os.path.realpath(value)
        if not any(_inside(real, root) for root in local_roots):
            return f"{field} {value!r} resolves to {real}, outside the folders manifests may read ({shown})"
        if os.path.isdir(real):
            escape = _symlink_out(real, local_roots)
            if escape:
                return f"{field} {value!r} holds {escape}, a symlink that leads outside the folders manifests may read ({shown})"
    return None


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def _symlink_out(folder: str, roots: list[str]) -> str | None:
    """The first entry under `folder` (not following links) that is a symlink resolving outside `roots`."""
    for current, dirs, files in os.walk(folder, followlinks=False):
        for name in dirs + files:
            entry = os.path.join(current, name)
            if os.path.islink(entry) and not any(_inside(os.path.realpath(entry), root) for root in roots):
                return entry
    return None


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
