"""Readers of seed formats: one per `kind` of source in the project file."""

from __future__ import annotations

from omnithought_dagster.seed.settings import HFSourceConfig, JsonSourceConfig, ShareGPTSourceConfig, SourceConfig, SyntheticSourceConfig
from omnithought_dagster.seed.sources.base import Candidate, ImageRef, QuarantineReason, Rejected, SeedReader, SeedRecord


def make_reader(source: SourceConfig) -> SeedReader:
    """The reader for a configured source. Raises FileNotFoundError when its files are missing."""
    if isinstance(source, SyntheticSourceConfig):
        from omnithought_dagster.seed.sources.synthetic import SyntheticReader

        return SyntheticReader(source.n_samples, source.seed, source.image_size, source.families, source.start_index, source.question_text)
    if isinstance(source, JsonSourceConfig):
        from omnithought_dagster.seed.sources.jsonfile import FlatJsonReader, LlavaJsonReader

        return LlavaJsonReader(source) if source.format == "llava" else FlatJsonReader(source)
    if isinstance(source, ShareGPTSourceConfig):
        from omnithought_dagster.seed.sources.jsonfile import ShareGPTReader

        return ShareGPTReader(source)
    if isinstance(source, HFSourceConfig):
        from omnithought_dagster.seed.sources.hf import HFReader

        return HFReader(source)
    raise TypeError(f"no reader for source kind {type(source).__name__}")


__all__ = ["Candidate", "ImageRef", "QuarantineReason", "Rejected", "SeedReader", "SeedRecord", "make_reader"]
