"""Benchmark decontamination: which seed samples look like a benchmark item.

A sample is contaminated by its question when at least `min_question_overlap` of its word
n-grams occur in some benchmark item's question (a question shorter than n words is compared
whole), and by its image when one of its images is within `image_max_distance` (pHash
Hamming distance) of a benchmark image. Benchmarks are read with the same readers and
validation as seed sources, so their questions and images are normalised the same way.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass

from omnithought_dagster.seed.near_dup import earliest_near_duplicates

_WORD = re.compile(r"\w+")


@dataclass(frozen=True)
class BenchmarkItem:
    benchmark: str
    item_id: str  # the benchmark sample's id
    question: str
    phashes: tuple[str, ...]


@dataclass(frozen=True)
class Contamination:
    code: str  # contaminated_question | contaminated_image
    value: float  # n-gram overlap share, or pHash distance
    threshold: float
    benchmark: str
    item_id: str


def question_grams(question: str, n: int) -> set[str]:
    # NFKC and casefold reduce to lower() on ASCII text, the common case (and 3x faster).
    text = question.lower() if question.isascii() else unicodedata.normalize("NFKC", question).casefold()
    words = _WORD.findall(text)
    if len(words) < n:
        return {" ".join(words)} if words else set()
    return {" ".join(words[i : i + n]) for i in range(len(words) - n + 1)}


def contamination_under(samples: Iterable[dict], items: list[BenchmarkItem], settings) -> dict[str, list[Contamination]]:
    """find_contamination with the project file's `curation.decontamination` settings."""
    return find_contamination(
        samples,
        items,
        ngram=settings.question_ngram,
        min_overlap=settings.min_question_overlap,
        image_max_distance=settings.image_max_distance,
        require=settings.require,
    )


def find_contamination(
    samples: Iterable[dict], items: list[BenchmarkItem], *, ngram: int, min_overlap: float, image_max_distance: int, require: str = "any"
) -> dict[str, list[Contamination]]:
    """sample_id -> what it matches. `samples` rows carry sample_id, question, image_phashes.

    require="both" keeps only samples whose question and image both match (the same benchmark
    item for the image; any item for the question - templated benchmarks share question texts).
    """
    samples = list(samples)
    if not items:
        return {}
    index: dict[str, BenchmarkItem] = {}
    for item in items:
        for gram in question_grams(item.question, ngram):
            index.setdefault(gram, item)
    found: dict[str, list[Contamination]] = {}
    for sample in samples:
        grams = question_grams(sample["question"], ngram)
        if not grams:
            continue
        hits = [index[g] for g in grams if g in index]
        overlap = len(hits) / len(grams)
        if overlap >= min_overlap:
            item = max(set(hits), key=hits.count)
            found.setdefault(sample["sample_id"], []).append(
                Contamination("contaminated_question", round(overlap, 4), min_overlap, item.benchmark, item.item_id)
            )
    if image_max_distance >= 0:
        hashes, owners = [], []
        for position, item in enumerate(items):
            hashes += [int(h, 16) for h in item.phashes]
            owners += [position] * len(item.phashes)
        offset = len(items)
        for position, sample in enumerate(samples):
            hashes += [int(h, 16) for h in sample["image_phashes"] or []]
            owners += [offset + position] * len(sample["image_phashes"] or [])
        for owner, (match, distance) in earliest_near_duplicates(hashes, owners, image_max_distance, first_owner=offset).items():
            if match < offset:  # matched a benchmark image, not another sample's
                item = items[match]
                found.setdefault(samples[owner - offset]["sample_id"], []).append(
                    Contamination("contaminated_image", float(distance), float(image_max_distance), item.benchmark, item.item_id)
                )
    if require == "both":
        found = {
            sample: hits for sample, hits in found.items() if {h.code for h in hits} == {"contaminated_question", "contaminated_image"}
        }
    return found


def load_benchmark_items(benchmarks: list, seed_settings) -> list[BenchmarkItem]:
    """Every item of the configured benchmarks, read and validated like a seed source."""
    from omnithought_dagster.seed.ingest import ingest_source
    from omnithought_dagster.seed.sources import make_reader

    items = []
    for spec in benchmarks:
        reader = make_reader(spec)
        result = ingest_source(
            spec.name,
            reader.records(),
            seed_settings.model_copy(update={"near_duplicate_max_distance": -1}),
            image_root=reader.image_root,
            put_image=lambda image_id, data: False,
        )
        items += [
            BenchmarkItem(spec.name, row["sample_id"], row["question"], tuple(row["image_phashes"]))
            for row in result.kept.select(["sample_id", "question", "image_phashes"]).to_pylist()
        ]
    return items
