"""Experiments: arms (a recipe or one of its controls, a student, a seed) scored on the same items, and what their
differences are worth (stats.py: paired bootstrap intervals any reader can recompute with DuckDB). No Dagster here."""
