"""Curation logic as plain Python over Arrow tables and DuckDB: no Dagster imports here."""
