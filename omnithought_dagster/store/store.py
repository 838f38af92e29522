"""The corpus store: partitioned Parquet tables, a content-addressed image store, a DuckDB catalog.

Everything goes through a pyarrow FileSystem resolved from one root URI, so the same code
serves a local folder and an object store (s3://...). Layout under the root:

    tables/<table>/<key>=<value>[/<key>=<value>]/data.parquet   one file per partition
    images/<id[:2]>/<id>                                        image bytes, named by their hash

A partition is one file, replaced atomically: on a local disk the new file is written beside
the old one under a hidden temporary name and renamed over it (rename(2) is atomic); on an
object store a single PUT is atomic by itself. Readers therefore see the old partition or
the new one, never a mix or a half-written file.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from omnithought_dagster.store.files import STALE_TEMPORARY_S, sweep_temporaries
from omnithought_dagster.store.tables import DERIVED_VIEWS, TABLES, TableSpec, table_spec

PARTITION_FILE = "data.parquet"
PARQUET_COMPRESSION = "zstd"


class StoreError(RuntimeError):
    """A store operation that cannot proceed (bad partition key, schema mismatch, ...)."""


class PartitionBusy(StoreError):
    """Another run holds the partition's lock and did not let go in time."""


@dataclass(frozen=True)
class WrittenPartition:
    table: str
    partition: dict[str, str]
    uri: str
    rows: int
    bytes: int


class CorpusStore:
    """Tables, images and the catalog under one root URI."""

    def __init__(self, root_uri: str, filesystem: pafs.FileSystem | None = None):
        self.root_uri = root_uri
        if filesystem is None:
            if "://" not in root_uri:
                Path(root_uri).mkdir(parents=True, exist_ok=True)
                root_uri = str(Path(root_uri).resolve())
            filesystem, root_path = pafs.FileSystem.from_uri(root_uri)
        else:
            root_path = root_uri.split("://", 1)[-1]
        self.fs: pafs.FileSystem = filesystem
        self.root = root_path.rstrip("/")
        self.images = ImageStore(self)
        self.checkpoints = CheckpointStore(self)

    @property
    def is_local(self) -> bool:
        return self.fs.type_name == "local"

    def path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    # -- tables -----------------------------------------------------------------------------

    def partition_dir(self, table: str, partition: str | Mapping[str, str]) -> str:
        spec = table_spec(table)
        keys = _partition_keys(spec, partition)
        return self.path("tables", table, *(f"{column}={keys[column]}" for column in spec.partition_by))

    def write_partition(self, table: str, partition: str | Mapping[str, str], data: pa.Table) -> WrittenPartition:
        """Replace one partition of a table with `data`, atomically. Columns are cast to the spec."""
        with self.partition_writer(table, partition) as writer:
            writer.write(data)
        return writer.written

    def partition_writer(self, table: str, partition: str | Mapping[str, str]) -> PartitionWriter:
        """Replace one partition with rows written batch by batch (memory bounded by one batch), atomically:
        readers see the old partition until the writer commits; a writer that fails or is killed leaves it."""
        return PartitionWriter(self, table, partition)

    def read_partition(self, table: str, partition: str | Mapping[str, str], columns: list[str] | None = None) -> pa.Table | None:
        """One partition, or None when it was never written."""
        final = f"{self.partition_dir(table, partition)}/{PARTITION_FILE}"
        if self.fs.get_file_info(final).type != pafs.FileType.File:
            return None
        return pq.read_table(final, filesystem=self.fs, columns=columns)

    def has_partition(self, table: str, partition: str | Mapping[str, str]) -> bool:
        final = f"{self.partition_dir(table, partition)}/{PARTITION_FILE}"
        return self.fs.get_file_info(final).type == pafs.FileType.File

    def list_partitions(self, table: str) -> list[dict[str, str]]:
        """Partitions that exist, as {column: value} in path order."""
        spec = table_spec(table)
        base = self.path("tables", table)
        found = []
        for info in self._list_files(base):
            if not info.base_name == PARTITION_FILE:
                continue
            # Some filesystems answer "/bucket/..." for "bucket/...": compare without the slash.
            parts = info.path.lstrip("/")[len(base.lstrip("/")) + 1 :].split("/")[:-1]
            if len(parts) != len(spec.partition_by):
                continue
            keys = dict(part.split("=", 1) for part in parts if "=" in part)
            if list(keys) == list(spec.partition_by):
                found.append(keys)
        return sorted(found, key=lambda k: [k[c] for c in spec.partition_by])

    def partition_files(self, table: str) -> list[str]:
        spec = table_spec(table)
        return [f"{self.partition_dir(spec.name, keys)}/{PARTITION_FILE}" for keys in self.list_partitions(table)]

    def read_table(self, table: str, columns: list[str] | None = None) -> pa.Table:
        """All partitions of a table (empty with the spec's schema when there are none)."""
        spec = table_spec(table)
        files = self.partition_files(table)
        if not files:
            empty = spec.schema.empty_table()
            return empty.select(columns) if columns else empty
        pieces = [pq.read_table(path, filesystem=self.fs, columns=columns) for path in files]
        return pa.concat_tables(pieces, promote_options="default")

    def delete_partition(self, table: str, partition: str | Mapping[str, str]) -> None:
        _delete_quietly(self.fs, f"{self.partition_dir(table, partition)}/{PARTITION_FILE}")

    @contextlib.contextmanager
    def partition_lock(
        self, table: str, partition: str | Mapping[str, str], *, wait_s: float = 3600.0, log=None, poll_s: float = 2.0
    ) -> Iterator[None]:
        """Hold the one-writer lock of a partition for the block: a second run of the same partition waits for the
        first (then finds its results in the cache) instead of paying for every request again, and fails with a clear
        message after `wait_s`. An flock: the kernel releases it when its holder dies, however it dies. The lock files
        live under `<root>/locks/` for a local store; an object store has no flock, so its runs lock on this machine's
        `~/.cache/omnithought/locks/<root>` - they exclude each other only on one machine."""
        import fcntl
        import socket

        keys = _partition_keys(table_spec(table), partition)
        base = Path(self.path("locks")) if self.is_local else Path.home() / ".cache" / "omnithought" / "locks" / self.root.strip("/")
        path = base.joinpath(table, *(f"{k}={v}" for k, v in keys.items())).with_suffix(".lock")
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a+") as handle:
            started, said = time.monotonic(), 0.0
            while True:
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    handle.seek(0)
                    holder = handle.read().strip() or "another run"
                    waited = time.monotonic() - started
                    if waited >= wait_s:
                        raise PartitionBusy(
                            f"{table}[{keys}] is being written by {holder}; waited {waited:.0f} s for it "
                            f"(two runs of one partition would pay for every request twice)"
                        ) from None
                    if log is not None and (said == 0.0 or waited - said >= 60):
                        said = max(waited, 1e-9)
                        log.info(f"{table}[{keys}] is being written by {holder}: waiting for it")
                    time.sleep(poll_s)
            handle.seek(0)
            handle.truncate()
            handle.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}")
            handle.flush()
            try:
                yield
            finally:
                handle.seek(0)
                handle.truncate()
                handle.flush()
                fcntl.flock(handle, fcntl.LOCK_UN)

    def cache(self, name: str):
        """The result cache `name` (generation, annotation, ...) under cache/<name>/."""
        from omnithought_dagster.store.cache import ResultCache

        return ResultCache(self, name)

    # -- catalog ----------------------------------------------------------------------------

    def catalog(self, tables: list[str] | None = None):
        """A DuckDB connection with one view per table, named after it.

        Local stores get views over `read_parquet` globs (new partitions appear without
        rebuilding the catalog); other filesystems are scanned through pyarrow datasets, so
        DuckDB needs no extension or credentials of its own.
        """
        import duckdb
        import pyarrow.dataset as ds

        con = duckdb.connect(database=":memory:")
        for name in tables or list(TABLES):
            spec = TABLES[name]
            files = self.partition_files(name)
            if not files:
                con.register(f"_empty_{name}", spec.schema.empty_table())
                con.execute(f'CREATE VIEW "{name}" AS SELECT * FROM "_empty_{name}"')
            elif self.is_local:
                depth = "/".join(["*"] * len(spec.partition_by))
                pattern = f"{self.path('tables', name)}/{depth}/{PARTITION_FILE}".replace("'", "''")
                con.execute(
                    f"CREATE VIEW \"{name}\" AS SELECT * FROM read_parquet('{pattern}', union_by_name = true, hive_partitioning = false)"
                )
            else:
                dataset = ds.dataset(files, filesystem=self.fs, format="parquet", schema=spec.schema)
                con.register(f"_ds_{name}", dataset)
                con.execute(f'CREATE VIEW "{name}" AS SELECT * FROM "_ds_{name}"')
        if tables is None:
            for name, sql in DERIVED_VIEWS.items():
                con.execute(f'CREATE VIEW "{name}" AS {sql}')
        return con

    # -- helpers ----------------------------------------------------------------------------

    def _list_files(self, base: str) -> list[pafs.FileInfo]:
        if self.fs.get_file_info(base).type != pafs.FileType.Directory:
            return []
        selector = pafs.FileSelector(base, recursive=True)
        return [info for info in self.fs.get_file_info(selector) if info.type == pafs.FileType.File]

    def _uri(self, path: str) -> str:
        if self.is_local:
            return path
        scheme = self.root_uri.split("://", 1)[0]
        return f"{scheme}://{path}"


class PartitionWriter:
    """One partition written in batches, committed as a whole (use as a context manager: commit on success,
    nothing on failure). Every batch is checked against the table's spec and partition key as it comes.

    Local stores write a hidden temporary file beside the partition and rename it over the old one at commit;
    object stores get a local temporary file uploaded at commit (the upload completes, or nothing is visible).
    """

    def __init__(self, store: CorpusStore, table: str, partition: str | Mapping[str, str]):
        self.store, self.spec = store, table_spec(table)
        self.keys = _partition_keys(self.spec, partition)
        self.directory = store.partition_dir(table, self.keys)
        self.final = f"{self.directory}/{PARTITION_FILE}"
        self.rows = 0
        self.written: WrittenPartition | None = None
        if store.is_local:
            store.fs.create_dir(self.directory, recursive=True)
            sweep_temporaries(self.directory)
            self._temporary, self._local = f"{self.directory}/.{PARTITION_FILE}.{uuid.uuid4().hex}.tmp", None
        else:
            import tempfile

            handle, self._local = tempfile.mkstemp(prefix=f"omnithought-{table}-", suffix=".parquet")
            os.close(handle)
            self._temporary = self._local
        self._filesystem = store.fs if store.is_local else pafs.LocalFileSystem()
        self._writer = pq.ParquetWriter(self._temporary, self.spec.schema, filesystem=self._filesystem, compression=PARQUET_COMPRESSION)

    def write(self, data: pa.Table) -> None:
        data = _conform(self.spec, data)
        for column in self.spec.partition_by:
            values = set(data.column(column).to_pylist())
            if values - {self.keys[column]}:
                raise StoreError(
                    f"{self.spec.name}[{self.keys}]: rows carry {column}={sorted(values - {self.keys[column]})}, not the partition's"
                )
        self._writer.write_table(data)
        self.rows += data.num_rows

    def commit(self) -> WrittenPartition:
        fs = self.store.fs
        try:
            self._writer.close()
            if self.store.is_local:
                fs.move(self._temporary, self.final)
            else:
                fs.create_dir(self.directory, recursive=True)
                pafs.copy_files(self._local, self.final, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
                os.unlink(self._local)
        except BaseException:
            _delete_quietly(self._filesystem, self._temporary)
            raise
        size = fs.get_file_info(self.final).size or 0
        self.written = WrittenPartition(self.spec.name, self.keys, self.store._uri(self.final), self.rows, size)
        return self.written

    def abort(self) -> None:
        try:
            self._writer.close()
        finally:
            _delete_quietly(self._filesystem, self._temporary)

    def __enter__(self) -> PartitionWriter:
        return self

    def __exit__(self, kind, value, traceback) -> None:
        if kind is None:
            self.commit()
        else:
            self.abort()


class ImageStore:
    """Image bytes named by their content hash: writing the same bytes twice stores them once."""

    def __init__(self, store: CorpusStore):
        self._store = store

    def path(self, image_id: str) -> str:
        return self._store.path("images", image_id[:2], image_id)

    def uri(self, image_id: str) -> str:
        return self._store._uri(self.path(image_id))

    def exists(self, image_id: str) -> bool:
        return self._store.fs.get_file_info(self.path(image_id)).type == pafs.FileType.File

    def put(self, image_id: str, data: bytes) -> bool:
        """Store bytes under their id; False when they were already there (deduplicated)."""
        if self._store.is_local:
            return self._put_local(image_id, data)
        fs = self._store.fs
        final = self.path(image_id)
        if fs.get_file_info(final).type == pafs.FileType.File:
            return False
        directory = final.rsplit("/", 1)[0]
        fs.create_dir(directory, recursive=True)
        target = f"{directory}/.{image_id}.{uuid.uuid4().hex}.tmp" if self._store.is_local else final
        try:
            with fs.open_output_stream(target) as out:
                out.write(data)
            if target != final:
                fs.move(target, final)
        except BaseException:
            if target != final:
                _delete_quietly(fs, target)
            raise
        return True

    def _put_local(self, image_id: str, data: bytes) -> bool:
        # Plain os calls: the seed stage stores one image per record, and each pyarrow fs call costs ~50 us more.
        final = self.path(image_id)
        if os.path.isfile(final):
            return False
        directory = os.path.dirname(final)
        os.makedirs(directory, exist_ok=True)
        temporary = f"{directory}/.{image_id}.{uuid.uuid4().hex}.tmp"
        try:
            with open(temporary, "wb") as out:
                out.write(data)
            os.replace(temporary, final)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            raise
        return True

    def get(self, image_id: str) -> bytes:
        with self._store.fs.open_input_stream(self.path(image_id)) as stream:
            return stream.read()

    def sweep_temporaries(self, max_age_s: float = STALE_TEMPORARY_S) -> int:
        """Stale temporaries of puts killed mid-write, in every folder of a local image store (the seed step runs it)."""
        root = self._store.path("images")
        if not self._store.is_local or not os.path.isdir(root):
            return 0
        return sum(sweep_temporaries(entry.path, max_age_s) for entry in os.scandir(root) if entry.is_dir())

    def ids(self) -> set[str]:
        """Every stored image id (one listing, cheap on object stores too)."""
        return {info.base_name for info in self._store._list_files(self._store.path("images")) if not info.base_name.startswith(".")}


def open_store(config, *, access_key: str | None = None, secret_key: str | None = None) -> CorpusStore:
    """The store a StoreConfig names. s3:// roots get an Arrow S3 filesystem (endpoint, region, and
    keys given here or read from the env vars the config names; else the AWS credential chain)."""
    if not config.root.startswith("s3://"):
        return CorpusStore(config.root)
    return CorpusStore(config.root, filesystem=s3_filesystem(config, access_key=access_key, secret_key=secret_key))


def s3_filesystem(config, *, access_key: str | None = None, secret_key: str | None = None) -> pafs.S3FileSystem:
    """An Arrow S3 filesystem with a StoreConfig's endpoint, region and keys (the store's, and the source manifests')."""
    import os
    from urllib.parse import urlparse

    options: dict = {"region": config.region} if config.region else {}
    if config.endpoint_url:
        endpoint = urlparse(config.endpoint_url)
        options.update(endpoint_override=endpoint.netloc or endpoint.path, scheme=endpoint.scheme or "https")
    access_key = access_key or (os.environ.get(config.access_key_env) if config.access_key_env else None)
    secret_key = secret_key or (os.environ.get(config.secret_key_env) if config.secret_key_env else None)
    if access_key and secret_key:
        options.update(access_key=access_key, secret_key=secret_key)
    return pafs.S3FileSystem(**options)


class CheckpointStore:
    """Model folders under checkpoints/<checkpoint_id>/, committed by a manifest written last.

    A folder without its manifest is an interrupted upload: it does not exist for readers and
    the next put replaces it.
    """

    MANIFEST = "omnithought_checkpoint.json"

    def __init__(self, store: CorpusStore):
        self._store = store

    def path(self, checkpoint_id: str) -> str:
        return self._store.path("checkpoints", checkpoint_id)

    def uri(self, checkpoint_id: str) -> str:
        return self._store._uri(self.path(checkpoint_id))

    def exists(self, checkpoint_id: str) -> bool:
        return self._store.fs.get_file_info(f"{self.path(checkpoint_id)}/{self.MANIFEST}").type == pafs.FileType.File

    def manifest(self, checkpoint_id: str) -> dict | None:
        if not self.exists(checkpoint_id):
            return None
        with self._store.fs.open_input_stream(f"{self.path(checkpoint_id)}/{self.MANIFEST}") as stream:
            return json.loads(stream.read())

    def put(self, checkpoint_id: str, folder: str | Path, manifest: dict) -> str:
        """Upload a local model folder, then its manifest; returns the checkpoint's URI."""
        fs, target = self._store.fs, self.path(checkpoint_id)
        if fs.get_file_info(target).type != pafs.FileType.NotFound:
            fs.delete_dir(target)
        fs.create_dir(target, recursive=True)
        pafs.copy_files(str(Path(folder).resolve()), target, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
        with fs.open_output_stream(f"{target}/{self.MANIFEST}") as out:
            out.write(json.dumps(manifest, indent=2, sort_keys=True).encode())
        return self.uri(checkpoint_id)

    def local_dir(self, checkpoint_id: str, cache_dir: str | Path) -> Path:
        """A local folder holding the checkpoint: the store's own on a local store, else a downloaded copy."""
        if not self.exists(checkpoint_id):
            raise StoreError(f"checkpoint {checkpoint_id} is not in the store")
        if self._store.is_local:
            return Path(self.path(checkpoint_id))
        local = Path(cache_dir) / checkpoint_id
        if not (local / self.MANIFEST).is_file():
            local.mkdir(parents=True, exist_ok=True)
            pafs.copy_files(
                self.path(checkpoint_id), str(local), source_filesystem=self._store.fs, destination_filesystem=pafs.LocalFileSystem()
            )
        return local


def _partition_keys(spec: TableSpec, partition: str | Mapping[str, str]) -> dict[str, str]:
    if isinstance(partition, str):
        if len(spec.partition_by) != 1:
            raise StoreError(f"{spec.name} is partitioned by {spec.partition_by}: pass a mapping")
        partition = {spec.partition_by[0]: partition}
    keys = {column: str(partition.get(column, "")) for column in spec.partition_by}
    for column, value in keys.items():
        if not value or "/" in value or value.startswith(".") or "=" in value:
            raise StoreError(f"{spec.name}: bad partition value {column}={value!r}")
    extra = set(partition) - set(spec.partition_by)
    if extra:
        raise StoreError(f"{spec.name}: not partitioned by {sorted(extra)}")
    return keys


def _conform(spec: TableSpec, data: pa.Table) -> pa.Table:
    missing = [c for c in spec.column_names if c not in data.column_names]
    extra = [c for c in data.column_names if c not in spec.column_names]
    if missing or extra:
        raise StoreError(f"{spec.name}: columns differ from the spec (missing {missing}, unexpected {extra})")
    nulls = [c.name for c in spec.columns if not c.nullable and data.column(c.name).null_count]
    if nulls:
        raise StoreError(f"{spec.name}: nulls in required columns {nulls}")
    try:
        return data.select(spec.column_names).cast(spec.schema)
    except (pa.ArrowInvalid, pa.ArrowTypeError, ValueError) as exc:
        raise StoreError(f"{spec.name}: rows do not fit the schema: {exc}") from exc


def _delete_quietly(fs: pafs.FileSystem, path: str) -> None:
    try:
        fs.delete_file(path)
    except (FileNotFoundError, OSError):
        pass
