"""What a seed reader yields, the quarantine reason codes, and helpers shared by the readers.

A reader turns one source format into a stream of records, one per raw record, in order:
either a `Candidate` (fields pulled out, not yet validated) or a `Rejected` (the record could
not even be parsed, with a reason). Validation, image checks, ids and dedup are common to
every format and live in `curation.seed`, so each reader only knows its format.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, Protocol

from omnithought_dagster.fieldpath import get_path, path_head  # noqa: F401 - the readers' field paths

RAW_EXCERPT_CHARS = 500
JSON_WHITESPACE = " \t\r\n"  # what JSON itself counts as whitespace (str.strip() would take U+3000, U+2028, ...)


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


@dataclass
class Rejected:
    """A record that could not be parsed into a candidate."""

    record_index: int
    native_id: str | None
    reason: QuarantineReason
    detail: str
    raw_excerpt: str | None = None


SeedRecord = Candidate | Rejected


class SeedReader(Protocol):
    """One source format. `records()` yields one item per raw record, in a stable order."""

    image_root: Path | None

    def records(self) -> Iterator[SeedRecord]: ...

    def count(self) -> int:
        """How many raw records `records()` yields, counted without validating them (row accounting)."""
        ...

    def fingerprint(self) -> str:
        """Changes whenever the input would read differently (file sizes and mtimes, generator settings)."""
        ...


# -- shared helpers -----------------------------------------------------------------------------


def parse_guarded(parse: Callable[[int, Any], "SeedRecord"], index: int, record: Any) -> "SeedRecord":
    """A reader's parse of one record; whatever it raises becomes that record's record_error, never the partition's."""
    try:
        return parse(index, record)
    except Exception as exc:  # noqa: BLE001 - one record's surprise must not end the source
        return Rejected(index, None, QuarantineReason.RECORD_ERROR, f"reading the record failed: {error_text(exc)}", excerpt(record))


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
    return text[:RAW_EXCERPT_CHARS]


class NonStandardLiteral:
    """A NaN / Infinity / -Infinity in JSON (not JSON, but Python's parser accepts it): never a value we keep."""

    def __init__(self, literal: str):
        self.literal = literal

    def __repr__(self) -> str:
        return self.literal


def loads(text: str) -> Any:
    """json.loads with NaN / Infinity kept as NonStandardLiteral, so the field holding one is rejected, not read as a number."""
    return json.loads(text, parse_constant=NonStandardLiteral)


# Errors a hostile document raises from the JSON parser: bad syntax, nesting past the recursion limit,
# numbers too long to convert, memory.
JSON_ERRORS = (json.JSONDecodeError, RecursionError, ValueError, MemoryError)


def iter_json_records(path: Path) -> Iterator[tuple[Any, tuple[QuarantineReason, str] | None]]:
    """(record, problem) for each record of a .json array or a .jsonl file, in order.

    Bytes are decoded with surrogateescape, so a record holding invalid UTF-8 still parses and
    is caught per record (as lone surrogates) instead of failing the whole file; a leading
    byte-order mark is dropped. JSONL splits on newlines only: U+2028, U+2029 and U+0085 are
    legal inside JSON strings. An unparsable JSONL line is one malformed record; an unparsable
    (or unreadable) JSON file is one unreadable_file record.
    """
    try:
        data = read_json_text(path)
    except OSError as exc:
        yield str(path), (QuarantineReason.UNREADABLE_FILE, f"{path.name}: cannot read: {exc}")
        return
    if path.suffix.lower() == ".jsonl" or _looks_like_jsonl(data):
        for number, line in enumerate(data.split("\n"), start=1):
            if not line.strip(JSON_WHITESPACE):
                continue  # only JSON's own whitespace: a line of U+3000 is a bad record, not nothing
            try:
                yield loads(line), None
            except json.JSONDecodeError as exc:
                yield line, (QuarantineReason.MALFORMED_RECORD, f"{path.name} line {number}: invalid JSON: {exc.msg} at column {exc.colno}")
            except JSON_ERRORS as exc:
                yield line, (QuarantineReason.MALFORMED_RECORD, f"{path.name} line {number}: unparsable JSON: {type(exc).__name__}: {exc}")
        return
    try:
        parsed = loads(data)
    except JSON_ERRORS as exc:
        # One bad element must not take the file's other records with it: parse the array element by element.
        elements = _array_elements(data, path.name)
        if elements is not None:
            yield from elements
            return
        where = f"{exc.msg} at line {exc.lineno} column {exc.colno}" if isinstance(exc, json.JSONDecodeError) else f"{type(exc).__name__}: {exc}"
        yield data, (QuarantineReason.UNREADABLE_FILE, f"{path.name}: unparsable JSON: {where}")
        return
    if isinstance(parsed, list):
        yield from ((record, None) for record in parsed)
    else:
        yield parsed, None


_STRING_OR_BRACKET = re.compile(r'"(?:[^"\\]|\\.)*"|[\[\]{},]', re.DOTALL)


def _array_elements(data: str, name: str) -> list[tuple[Any, tuple[QuarantineReason, str] | None]] | None:
    """The elements of a top-level JSON array that does not parse as a whole: each good one parsed, each bad one a
    malformed record. None when the file is not such an array, or its brackets and strings do not close (truncated)."""
    decoder = json.JSONDecoder(parse_constant=NonStandardLiteral)
    position = len(data) - len(data.lstrip(JSON_WHITESPACE))
    if data[position:position + 1] != "[":
        return None
    position += 1
    out: list = []
    while True:
        position = _skip_whitespace(data, position)
        if position >= len(data):
            return None  # no closing bracket
        if data[position] == "]":
            return out if not data[position + 1:].strip(JSON_WHITESPACE) else None
        if data[position] == ",":
            position += 1  # an empty slot holds no record
            continue
        try:
            value, end = decoder.raw_decode(data, position)
            if data[_skip_whitespace(data, end):][:1] not in (",", "]"):
                raise ValueError("junk after the value")
            out.append((value, None))
        except JSON_ERRORS as exc:
            end = _element_end(data, position)
            if end is None:
                return None
            out.append((data[position:end], (QuarantineReason.MALFORMED_RECORD, f"{name} element {len(out)}: invalid JSON: {type(exc).__name__}: {exc}")))
        position = end


def _skip_whitespace(data: str, position: int) -> int:
    while position < len(data) and data[position] in JSON_WHITESPACE:
        position += 1
    return position


def _element_end(data: str, start: int) -> int | None:
    """Where the array element starting at `start` ends (the next ',' or ']' outside strings and brackets)."""
    depth, last = 0, start
    for match in _STRING_OR_BRACKET.finditer(data, start):
        if '"' in data[last:match.start()]:
            return None  # a string that never closes
        last = match.end()
        token = match.group()
        if token in "[{":
            depth += 1
        elif token in "]}":
            if depth == 0:
                return match.start() if token == "]" else None
            depth -= 1
        elif token == "," and depth == 0:
            return match.start()
    return None


def read_json_text(path: Path) -> str:
    """A JSON file's text: invalid UTF-8 kept as lone surrogates (caught per record), a byte-order mark dropped."""
    data = path.read_bytes().decode("utf-8", errors="surrogateescape")
    return data[1:] if data.startswith("\ufeff") else data


def count_json_records(path: Path) -> int:
    try:
        data = read_json_text(path)
    except OSError:
        return 1  # one unreadable_file record
    if path.suffix.lower() == ".jsonl" or _looks_like_jsonl(data):
        return sum(1 for line in data.split("\n") if line.strip(JSON_WHITESPACE))
    try:
        parsed = loads(data)
    except JSON_ERRORS:
        elements = _array_elements(data, path.name)
        return 1 if elements is None else len(elements)  # one unreadable_file record, or the array's elements
    return len(parsed) if isinstance(parsed, list) else 1


def _looks_like_jsonl(data: str) -> bool:
    head = data.lstrip(JSON_WHITESPACE)[:1]
    if head != "{":
        return False
    # A JSON file holding a single object spans the file; JSONL has one object per line.
    lines = [line for line in data.split("\n") if line.strip(JSON_WHITESPACE)]
    return len(lines) > 1 and lines[0].rstrip(JSON_WHITESPACE).endswith("}")


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
