"""The corpus store (Parquet tables, image store, DuckDB catalog) and its table registry."""

from omnithought_dagster.store.store import CorpusStore, ImageStore, StoreError, WrittenPartition, open_store
from omnithought_dagster.store.tables import TABLES, Column, TableSpec, table_spec

__all__ = ["TABLES", "Column", "CorpusStore", "ImageStore", "StoreError", "TableSpec", "WrittenPartition", "open_store", "table_spec"]
