"""One record checked: a seed row and its images, or a quarantine row with a reason (`check_record`)."""

from __future__ import annotations

import functools
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from omnithought_dagster.ids import sample_id
from omnithought_dagster.markup import IMAGE_PLACEHOLDER as PLACEHOLDER
from omnithought_dagster.markup import TOKEN_KINDS, first_markup
from omnithought_dagster.redact import redact
from omnithought_dagster.seed.answers import answer_text, choice_letter, classify_answer, split_options
from omnithought_dagster.seed.fields import Reject, field_text, metadata_json, safe_text
from omnithought_dagster.seed.images import CheckedImage, load_image
from omnithought_dagster.seed.settings import SeedSettings
from omnithought_dagster.seed.sources.base import (
    Candidate,
    QuarantineReason,
    Rejected,
    SeedRecord,
    bounded_excerpt,
    error_text,
)
from omnithought_dagster.store.tables import SEED_POOL


@dataclass
class Context:
    """What checking a record needs besides the record: the same in the step and in every worker."""

    source: str
    settings: SeedSettings
    image_root: Path | None
    allowed_roots: list[Path]
    read_roots: tuple[str, ...] | None = None  # a manifest's source: every image read lies inside these too


@dataclass
class Accepted:
    row: dict
    images: list[CheckedImage]


@dataclass
class SetAside:
    reason: QuarantineReason
    detail: str


def check_record(record: SeedRecord, context: Context) -> Accepted | SetAside:
    """One record's verdict: its row and images, or why it is set aside. Never raises for the record's sake."""
    if isinstance(record, Rejected):
        return SetAside(record.reason, record.detail)
    try:
        row, images = validate_record(
            context.source, record, context.settings, context.image_root, context.allowed_roots, context.read_roots
        )
        check_column_types(row)
    except Reject as problem:
        return SetAside(problem.reason, problem.detail)
    except Exception as exc:  # noqa: BLE001 - an unknown problem with one record quarantines that record, with what it was
        return SetAside(QuarantineReason.RECORD_ERROR, f"validating the record failed: {error_text(exc)}")
    return Accepted(row, images)


def validate_record(
    source: str,
    record: Candidate,
    settings: SeedSettings,
    image_root: Path | None,
    allowed_roots: list[Path],
    read_roots: tuple[str, ...] | None = None,
) -> tuple[dict, list[CheckedImage]]:
    native_id = field_text(record.native_id, "native_id")
    question = field_text(record.question, "question", empty=QuarantineReason.EMPTY_QUESTION)
    question = unicodedata.normalize("NFC", question).strip()
    if not question:
        raise Reject(QuarantineReason.EMPTY_QUESTION, "question is empty or whitespace")
    if record.placeholder_count is None and PLACEHOLDER in question:
        # A flat record's <image> placeholders mark where its images go, as LLaVA's do: as many as images, then removed.
        if question.count(PLACEHOLDER) != len(record.images):
            raise Reject(
                QuarantineReason.IMAGE_PLACEHOLDER_MISMATCH,
                f"{question.count(PLACEHOLDER)} {PLACEHOLDER} placeholders in the question but {len(record.images)} images",
            )
        question = question.replace(PLACEHOLDER, "").strip()
        if not question:
            raise Reject(QuarantineReason.EMPTY_QUESTION, "question holds nothing but <image> placeholders")
    answer = answer_text(record.answer)
    choices = [field_text(c, "choices") for c in record.choices] if record.choices else []
    _refuse_markup({"question": question, "answer": answer, **{f"option {i + 1}": c for i, c in enumerate(choices)}})
    if not choices:
        question, choices = split_options(question)
    if len(question) > settings.max_question_chars:
        raise Reject(QuarantineReason.QUESTION_TOO_LONG, f"question has {len(question)} characters, limit {settings.max_question_chars}")
    answer_type = classify_answer(record.answer_type, answer, choices)
    if answer_type == "multiple_choice" and len(choices) < 2:
        raise Reject(QuarantineReason.MALFORMED_RECORD, f"multiple choice needs at least two options, got {len(choices)}")
    if answer_type == "multiple_choice":
        answer = choice_letter(answer, choices)
    metadata = metadata_json(record.metadata)

    if not record.images and settings.require_image:
        raise Reject(QuarantineReason.NO_IMAGE, "the record has no image and seed.require_image is on")
    if len(record.images) > settings.max_images_per_sample:
        raise Reject(QuarantineReason.TOO_MANY_IMAGES, f"{len(record.images)} images, limit {settings.max_images_per_sample}")
    if record.placeholder_count and record.placeholder_count != len(record.images):
        raise Reject(
            QuarantineReason.IMAGE_PLACEHOLDER_MISMATCH, f"{record.placeholder_count} <image> placeholders but {len(record.images)} images"
        )
    images = [load_image(ref, position, image_root, settings, allowed_roots, read_roots) for position, ref in enumerate(record.images)]

    image_ids = [image.image_id for image in images]
    row = {
        "sample_id": sample_id(question, image_ids, answer, choices),
        "source": source,
        "native_id": native_id,
        "record_index": record.record_index,
        "turn": record.turn,
        "image_ids": image_ids,
        "image_phashes": [image.phash for image in images],
        "question": question,
        "answer": answer,
        "answer_type": answer_type,
        "choices": choices,
        "source_tags": [field_text(t, "tags") for t in record.tags],
        "source_difficulty": record.difficulty,
        "metadata": metadata,
        "near_duplicate_of": None,
        "near_duplicate_distance": None,
    }
    return row, images


def _refuse_markup(fields: dict[str, str]) -> None:
    """Text from a dataset is data: a field holding a string a tokenizer or a training format reads as markup (a special
    token, a placeholder, the reply format's delimiters) sets the record aside, naming the string. Control characters
    stay (they are text to a tokenizer; curation and the reply format deal with them where models write them)."""
    for name, text in fields.items():
        found = first_markup(text, TOKEN_KINDS)
        if found is not None:
            raise Reject(QuarantineReason.MARKUP_IN_TEXT, f"{name} holds {found.describe()}: text from a dataset is data, never markup")


def check_column_types(row: dict) -> None:
    """The row against its seed_pool column types, now: a value that does not fit (an integer past int32, a
    list where text goes) is this record's quarantine, not a failed partition write after the loop.
    Checked in Python from the Arrow schema (a one-row Arrow conversion costs ~250 us, 7% of an image's decode)."""
    for name, arrow_type, nullable, common in _seed_columns():
        value = row.get(name)
        if type(value) is common or (common is _STRINGS and type(value) is list and all(type(v) is str for v in value)):
            continue  # the common case, decided without the general walk below
        problem = _misfit(value, arrow_type, nullable)
        if problem:
            raise Reject(QuarantineReason.MALFORMED_RECORD, f"a value does not fit its column: {name} {problem}")


_STRINGS = object()  # marks list<string> columns in _seed_columns


@functools.cache
def _seed_columns() -> tuple:
    """(name, type, nullable, the Python type that always fits) per seed_pool column: text is str, lists of text are
    checked item by item; integers always go through the bounds."""

    def common(arrow_type: pa.DataType):
        if pa.types.is_string(arrow_type):
            return str
        if pa.types.is_list(arrow_type) and pa.types.is_string(arrow_type.value_type):
            return _STRINGS
        return None

    return tuple((f.name, f.type, f.nullable, common(f.type)) for f in SEED_POOL.schema)


_INT_BOUNDS = {pa.int32(): 2**31, pa.int64(): 2**63}


def _misfit(value: Any, arrow_type: pa.DataType, nullable: bool) -> str | None:
    """Why `value` cannot be stored as `arrow_type` (None when it can)."""
    if value is None:
        return None if nullable else "is missing"
    if pa.types.is_string(arrow_type):
        return None if isinstance(value, str) else f"holds a {type(value).__name__}, not text"
    if arrow_type in _INT_BOUNDS:
        bound = _INT_BOUNDS[arrow_type]
        if not isinstance(value, int) or isinstance(value, bool):
            return f"holds a {type(value).__name__}, not an integer"
        return None if -bound <= value < bound else f"= {value} does not fit {arrow_type}"
    if pa.types.is_list(arrow_type):
        if not isinstance(value, list):
            return f"holds a {type(value).__name__}, not a list"
        return next((f"[{i}] {why}" for i, item in enumerate(value) if (why := _misfit(item, arrow_type.value_type, False))), None)
    return None  # a type this table does not use


def quarantine_row(
    source: str, record: SeedRecord, reason: QuarantineReason, detail: str, sample: str | None = None, duplicate_of: str | None = None
) -> dict:
    return {
        "source": source,
        "native_id": safe_text(record.native_id),
        "record_index": record.record_index,
        "turn": record.turn,
        "reason": str(reason),
        "detail": safe_text(redact(detail)) or "",
        "sample_id": sample,
        "duplicate_of": duplicate_of,
        "raw_excerpt": safe_text(bounded_excerpt(record.raw_excerpt)),  # whoever made the excerpt
    }
