"""Source manifests: seed sources declared by files dropped into a watched folder or S3 prefix.

`operations.source_manifests` names a local folder or an s3:// prefix (read with the store's
endpoint, region and keys). Each `<name>.yaml` / `.yml` / `.json` file in it (not in sub-folders)
declares one source, written like an entry of `sources:` in the project file; the file name is
the source name (a `name:` inside must agree). Relative paths in a local manifest are relative
to its folder. The `source_manifests` sensor turns new or changed manifests into seed_pool
partitions and runs; the seed_pool step reads the manifest again when it runs. No Dagster here.

The trust boundary: the project file is the operator's and trusted; a manifest is not (people outside the team drop
them). A manifest reads only inside the folders the project file grants (`operations.manifest_roots`, default the
manifest folder): every path it names (`path`, `image_root`, `allowed_image_roots`) must resolve there with symlinks
followed, and a folder it names must hold no symlink that leads out; no URI (the readers read local files). A
manifest in S3 names no path at all (synthetic sources only), and a manifest file may not be a symlink. A manifest
that reaches further is refused with the reason, before anything it names is opened; the seed step checks again when
it runs, and its reader checks every file it lists and opens (a glob's matches, a `datasets` folder's state.json
names, a symlink swapped in after the check: sources/confine.py).
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
from omnithought_dagster.redact import redact
from omnithought_dagster.seed.sources.confine import inside

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


def manifest_filesystem(
    config: ProjectConfig, *, access_key: str | None = None, secret_key: str | None = None
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
    """Every manifest file directly under the folder, sorted by name; invalid ones carry their error (one manifest
    never stops the scan of the others).

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


MAX_MANIFEST_BYTES = 64 * 1024  # a manifest is a few lines; more is not one
ERROR_CHARS = 500


def read_manifest(config: ProjectConfig, fs: pafs.FileSystem, path: str) -> Manifest:
    """The manifest at `path`: its source (confined to the granted roots), or why it cannot be used."""
    stem, _ = posixpath.splitext(posixpath.basename(path))
    local = isinstance(fs, pafs.LocalFileSystem)
    if local and os.path.islink(path):  # its target could be any file the worker can read
        return Manifest(stem, path, "", None, f"{path}: refused: a manifest may not be a symlink")
    try:
        with fs.open_input_stream(path) as stream:
            data = stream.read(MAX_MANIFEST_BYTES + 1)
    except OSError as exc:
        return Manifest(stem, path, "", None, f"{path}: cannot be read: {type(exc).__name__}")
    digest = hashlib.sha256(data).hexdigest()

    def invalid(message: str) -> Manifest:
        return Manifest(stem, path, digest, None, redact(f"{path}: {message}")[:ERROR_CHARS])

    if len(data) > MAX_MANIFEST_BYTES:
        return invalid(f"refused: over {MAX_MANIFEST_BYTES} bytes")
    try:
        return _parse_manifest(config, path, stem, data, digest, local, invalid)
    except (ValueError, OSError, RecursionError) as exc:  # NUL bytes in a path, names too long, nesting too deep...
        return invalid(f"refused: {type(exc).__name__}: {str(exc)[:200]}")


def _parse_manifest(config: ProjectConfig, path: str, stem: str, data: bytes, digest: str, local: bool, invalid) -> Manifest:
    if not re.fullmatch(SOURCE_NAME_PATTERN, stem):
        return invalid(f"the file name is the source name and must match {SOURCE_NAME_PATTERN}")
    if stem in config.source_names:
        return invalid(f"source {stem!r} is already in the project file; a manifest cannot replace it")
    try:
        raw = json.loads(data) if path.endswith(".json") else yaml.safe_load(data)
    except (ValueError, yaml.YAMLError) as exc:
        return invalid(f"not valid {'JSON' if path.endswith('.json') else 'YAML'}: {str(exc)[:200]}")
    if not isinstance(raw, dict):
        return invalid(f"a manifest is one mapping (a `sources:` entry), got {type(raw).__name__}")
    name = raw.setdefault("name", stem)
    if name != stem:
        shown = repr(name)[:80] if isinstance(name, str) else f"a {type(name).__name__}"
        return invalid(f"names source {shown} but the file name says {stem!r}")
    named = [(field, value) for field, value in _named_paths(raw)]
    if not all(isinstance(value, str) for _, value in named):
        return invalid("refused: a path that is not a string")
    uris = [value for _, value in named if "://" in value]
    if uris:  # the readers read local files: a URI would be read as a local path
        return invalid(f"refused: sources read local files; a manifest may not name a URI ({uris[0][:200]!r})")
    walked = [value for _, value in named if any(ch in part for part in value.split("/")[:-1] for ch in "*?[")]
    if walked:  # a pattern in a folder name would walk whatever folders it matches, symlinked ones too
        return invalid(f"refused: a manifest's glob may match file names in one folder only ({walked[0][:200]!r})")
    if not local and named:  # a relative path would be the worker's working folder, an absolute one anything
        return invalid(f"refused: a manifest in S3 names no local path ({named[0][0]} {named[0][1][:200]!r})")
    base_dir = str(Path(path).parent) if local else None
    try:
        source = _ADAPTER.validate_python(raw, context={"base_dir": base_dir} if base_dir else None)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or '(top level)'}: {e['msg']}" for e in exc.errors())
        return invalid(f"invalid source ({problems})")
    roots = granted_roots(config, path, local)
    refused = outside_roots(source, roots)
    if refused:
        return invalid(f"refused: {refused}")
    if hasattr(source, "_read_roots"):
        source._read_roots = tuple(os.path.realpath(root) for root in roots)  # its reader checks every file too
        refused = _listing_outside(source)
        if refused:
            return invalid(f"refused: {refused}")
    return Manifest(stem, path, digest, source)


def _listing_outside(source: SourceConfig) -> str | None:
    """Why the files the source's reader would read reach outside its roots (a glob's matches, a `datasets` folder's
    state.json or split names), found by listing them as the reader does (no data read); None when they do not, or
    when they cannot be listed yet (the run says why)."""
    from omnithought_dagster.seed.sources import make_reader
    from omnithought_dagster.seed.sources.confine import OutsideRoots

    try:
        make_reader(source)
    except OutsideRoots:  # named without the file: its name is outside's business
        return "files it lists (a glob's matches, a datasets folder's data files or splits) lead outside the folders manifests may read"
    except Exception:  # missing files, unreadable metadata: the seed run reports them
        return None
    return None


PATH_FIELDS = ("path", "image_root")  # and each of allowed_image_roots


def _named_paths(source) -> list[tuple[str, object]]:
    """(field, value) of every path a source (a mapping or a SourceConfig) names."""
    get = source.get if isinstance(source, dict) else (lambda key, default=None: getattr(source, key, default))
    named = [(field, get(field)) for field in PATH_FIELDS if get(field) is not None]
    roots = get("allowed_image_roots") or []
    return named + [(f"allowed_image_roots[{i}]", root) for i, root in enumerate(roots if isinstance(roots, list) else [roots])]


def granted_roots(config: ProjectConfig, manifest_path: str, local: bool) -> list[str]:
    """The folders a manifest may read: operations.manifest_roots, else its own folder (none for a manifest in S3)."""
    if config.operations.manifest_roots is not None:
        return [root for root in config.operations.manifest_roots if "://" not in root]
    return [posixpath.dirname(manifest_path)] if local else []


def outside_roots(source: SourceConfig, roots: list[str]) -> str | None:
    """Why a manifest's source reaches outside `roots` (None when it does not): a path that resolves (symlinks followed)
    outside every root, or a folder holding a symlink that leads out. Nothing is opened: names are resolved and
    folders listed. (The reader checks each file it lists and opens again: sources/confine.py.)"""
    real_roots = [os.path.realpath(root) for root in roots]
    shown = f"operations.manifest_roots: {roots}"
    for field, value in _named_paths(source):
        real = os.path.realpath(str(value))
        if not any(inside(real, root) for root in real_roots):
            return f"{field} {str(value)[:200]!r} resolves outside the folders manifests may read ({shown})"
        if os.path.isdir(real):
            escape = _symlink_out(real, real_roots)
            if escape:
                return f"{field} {str(value)[:200]!r} holds {escape}, a symlink that leads outside the folders manifests may read ({shown})"
    return None


def _symlink_out(folder: str, roots: list[str]) -> str | None:
    """The first entry under `folder` (not following links) that is a symlink resolving outside `roots`."""
    for current, dirs, files in os.walk(folder, followlinks=False):
        for name in dirs + files:
            entry = os.path.join(current, name)
            if os.path.islink(entry) and not any(inside(os.path.realpath(entry), root) for root in roots):
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
    raise KeyError(
        f"no source named {name!r}: not in the project file ({config.source_names}) and no manifest "
        f"{name}.yaml|yml|json in {config.operations.source_manifests}"
    )
