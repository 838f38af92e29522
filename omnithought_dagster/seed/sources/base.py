"""What a seed reader yields, the quarantine reason codes, and helpers shared by the readers.

A reader turns one source format into a stream of records, one per raw record, in order:
either a `Candidate` (fields pulled out, not yet validated) or a `Rejected` (the record could
not even be parsed, with a reason). Validation, image checks, ids and dedup are common to
every format and live in the seed package (`validate`, `answers`, `images`): each reader knows only its format.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, Protocol

from omnithought_dagster.fieldpath import get_path, path_head  # noqa: F401 - the readers' field paths
from omnithought_dagster.seed.sources import jsonstream
from omnithought_dagster.seed.sources.jsonstream import JSON_ERRORS, NonStandardLiteral, loads  # noqa: F401 - part of this module's API

# A quarantine row's excerpt of its record: enough to see the record's shape and what was wrong with it, bounded so a
# huge record (or a file that is not a dataset) is never copied whole; redacted of what looks like a credential (redact.py).
RAW_EXCERPT_CHARS = 500


class QuarantineReason(StrEnum):
    """Why a seed record was set aside. Every quarantine row carries exactly one of these."""

    NOT_AN_OBJECT = "not_an_object"  # the record is a list/string/number, not a mapping
    MALFORMED_RECORD = "malformed_record"  # invalid JSON line, or fields of the wrong shape
    UNREADABLE_FILE = "unreadable_file"  # a whole data file that cannot be parsed
    INVALID_UTF8 = "invalid_utf8"  # text that is not valid UTF-8
    EMPTY_QUESTION = "empty_question"
    QUESTION_TOO_LONG = "question_too_long"
    MISSING_ANSWER = "missing_answer"
    ANSWER_NOT_IN_CHOICES = "answer_not_in_choices"  # multiple choice whose answer names no option
    ANSWER_TYPE_CONFLICT = "answer_type_conflict"  # a declared non-choice type, options, and an answer naming none of them
    NO_IMAGE = "no_image"  # a record without any image while images are required
    TOO_MANY_IMAGES = "too_many_images"
    IMAGE_PLACEHOLDER_MISMATCH = "image_placeholder_mismatch"  # <image> tokens != images given
    MARKUP_IN_TEXT = "markup_in_text"  # a question, option or answer holding a special token, a placeholder or a delimiter
    PATH_ESCAPE = "path_escape"  # an image path that leaves the source root (../, absolute, symlink)
    MISSING_IMAGE = "missing_image"  # the image file does not exist
    EMPTY_IMAGE = "empty_image"  # zero-byte image
    CORRUPT_IMAGE = "corrupt_image"  # bytes that do not decode as an image
    UNSUPPORTED_IMAGE_FORMAT = "unsupported_image_format"  # an image in a format a seed pool may not hold (EPS, PDF, SVG, ...)
    UNREADABLE_IMAGE = "unreadable_image"  # an image path the OS cannot resolve or read (loops, bad names, permissions)
    OVERSIZED_IMAGE = "oversized_image"  # over the configured pixel or byte limit
    DUPLICATE = "duplicate"  # same sample_id as an earlier record (this source or an earlier one)
    RECORD_ERROR = "record_error"  # anything else that went wrong with this one record: the exception's type and message


@dataclass
class ImageRef:
    """An image as a record gives it: a path relative to the source's image root, or inline bytes."""

    path: str | None = None
    data: bytes | None = None

    def describe(self) -> str:
        return self.path if self.path is not None else f"<{len(self.data or b'')} inline bytes>"


@dataclass
class Candidate:
    """A parsed record: fields pulled out of the format, not yet validated."""

    record_index: int
    native_id: str
    question: Any
    answer: Any
    images: list[ImageRef]
    choices: list[Any] | None = None
    answer_type: str | None = None
    tags: list[str] = field(default_factory=list)
    difficulty: int | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    raw_excerpt: str | None = None
    placeholder_count: int | None = None  # <image> tokens seen in the text, when the format has them
    turn: int | None = None  # the conversation turn (1-based) a sample came from; None for formats without turns


@dataclass
class Rejected:
    """A record that could not be parsed into a candidate."""

    record_index: int
    native_id: str | None
    reason: QuarantineReason
    detail: str
    raw_excerpt: str | None = None
    turn: int | None = None


SeedRecord = Candidate | Rejected


class SeedReader(Protocol):
    """One source format. `records()` yields, in a stable order, one item per raw record - or, for a conversation
    split with `multi_turn: each`, one per user turn, all with the record's index and their own `turn`."""

    image_root: Path | None

    def records(self) -> Iterator[SeedRecord]: ...

    def count(self) -> int:
        """How many raw records `records()` yields, counted without validating them (row accounting)."""
        ...

    def fingerprint(self) -> str:
        """Changes whenever the input would read differently (file sizes and mtimes, generator settings)."""
        ...


# -- shared helpers -----------------------------------------------------------------------------


def parse_guarded(parse: Callable[[int, Any], SeedRecord | list[SeedRecord]], index: int, record: Any) -> list[SeedRecord]:
    """A reader's parse of one record, as a list (a split conversation gives several); whatever it raises becomes
    that record's record_error, never the partition's."""
    try:
        parsed = parse(index, record)
    except Exception as exc:  # noqa: BLE001 - one record's surprise must not end the source
        return [Rejected(index, None, QuarantineReason.RECORD_ERROR, f"reading the record failed: {error_text(exc)}", excerpt(record))]
    return parsed if isinstance(parsed, list) else [parsed]


def error_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc)[:300]}"


def excerpt(value: Any) -> str:
    if isinstance(value, bytes):
        text = value.decode("utf-8", errors="replace")
    elif isinstance(value, str):
        text = value
    else:
        try:
            text = json.dumps(value, ensure_ascii=False, default=repr)
        except (TypeError, ValueError):
            text = repr(value)
    return bounded_excerpt(text)


def bounded_excerpt(text: str | None) -> str | None:
    """At most RAW_EXCERPT_CHARS of `text`, credentials redacted (a secret cut in half by the bound is judged whole)."""
    from omnithought_dagster.redact import redact

    if text is None:
        return None
    return redact(text[: RAW_EXCERPT_CHARS + 200])[:RAW_EXCERPT_CHARS]


def iter_json_records(path: Path, roots: tuple[str, ...] | None = None) -> Iterator[tuple[Any, tuple[QuarantineReason, str] | None]]:
    """(record, problem) for each record of a .json array or a .jsonl file, in order, read a record at a time
    (sources/jsonstream.py): an unparsable JSONL line or array element is one malformed record; a file that cannot
    be read, or whose array does not close, is one unreadable_file record."""
    for record, problem in jsonstream.records(path, roots):
        yield record, None if problem is None else (QuarantineReason(problem[0]), problem[1])


def count_json_records(path: Path, roots: tuple[str, ...] | None = None) -> int:
    return jsonstream.count(path, roots)


def files_fingerprint(paths: list[Path]) -> list[tuple[str, int, int]]:
    return [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in paths]


def expand_paths(path: str, suffixes: tuple[str, ...]) -> list[Path]:
    """A file, a folder (its files with these suffixes, sorted) or a glob."""
    candidate = Path(path)
    if candidate.is_file():
        return [candidate]
    if candidate.is_dir():
        return sorted(p for p in candidate.rglob("*") if p.is_file() and p.suffix.lower() in suffixes)
    matches = sorted(Path(candidate.anchor or ".").glob(str(candidate.relative_to(candidate.anchor or "."))))
    if matches:
        return [p for p in matches if p.is_file()]
    raise FileNotFoundError(f"{path}: no such file, folder or matching glob")
