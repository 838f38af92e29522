"""Seed ingestion: validate, normalise, identify and deduplicate the records of one source.

`ingest_source` takes any reader's records and returns the rows of three tables (seed_pool,
quarantine, images) plus the accounting. It is plain Python: no Dagster, and the only side
effect is the `put_image` callback that stores accepted images. Invariant, asserted before
returning: rows read = rows kept + rows quarantined.
"""

from __future__ import annotations

import io
import json
import math
import re
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from omnithought_dagster.config import SeedSettings
from omnithought_dagster.curation.near_dup import earliest_near_duplicates
from omnithought_dagster.ids import bytes_id, sample_id
from omnithought_dagster.sources.base import Candidate, ImageRef, NonStandardLiteral, QuarantineReason, Rejected, SeedRecord, error_text
from omnithought_dagster.store.tables import IMAGES, QUARANTINE, SEED_POOL

ANSWER_TYPES = ("multiple_choice", "numeric", "math", "free_form")
ANSWER_TYPE_ALIASES = {
    "multiple_choice": "multiple_choice", "multiple-choice": "multiple_choice", "multi_choice": "multiple_choice",
    "mc": "multiple_choice", "choice": "multiple_choice", "mcq": "multiple_choice",
    "numeric": "numeric", "number": "numeric", "numerical": "numeric", "integer": "numeric", "float": "numeric",
    "math": "math", "expression": "math", "latex": "math", "symbolic": "math",
    "free_form": "free_form", "free-form": "free_form", "freeform": "free_form", "open": "free_form", "text": "free_form",
    # MathVista-style answer_type is the answer's data type: text / integer / float / list.
    "list": "free_form", "string": "free_form", "str": "free_form", "int": "numeric",
}
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
# The raster formats a seed image may be in (PIL format names); anything else is unsupported_image_format.
SEED_IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")
_RASTER_SIGNATURES = (b"\x89PNG", b"\xff\xd8", b"GIF8", b"BM", b"II*\x00", b"MM\x00*")  # WEBP: RIFF....WEBP
# A number (thousands separators, decimals, a fraction, %) optionally followed by a short unit.
_NUMERIC = re.compile(r"^[-+]?(?:\d{1,3}(?:,\d{3})+|\d+|(?=\.\d))(?:\.\d+)?(?:\s*/\s*\d+)?\s*[%°]?\s*(?:[a-zA-Z][a-zA-Z0-9^²³/ ]{0,11})?$")
_LATEX_MARKERS = re.compile(r"\\|\$|\^|√|π|sqrt\(|frac")
_FORMULA = re.compile(r"^[\w\s+\-*/^().=]+$")
_OPTION_LINE = re.compile(r"^\s*\(?([A-Z])[\).:]\s+(.+?)\s*$")
_OPTIONS_HEADER = re.compile(r"^\s*(options|choices)\s*:?\s*$", re.IGNORECASE)
_LETTER_ANSWER = re.compile(r"^\(?([A-Z])[\).:]?$")


@dataclass
class PriorSamples:
    """Samples already kept by sources earlier in config order: the 'first' copies."""

    keys: dict[str, str] = field(default_factory=dict)  # sample_id -> "source/native_id"
    ordered_ids: list[str] = field(default_factory=list)  # sample ids in global order
    phashes: list[list[str]] = field(default_factory=list)  # aligned with ordered_ids

    @classmethod
    def from_rows(cls, rows: Iterable[dict]) -> "PriorSamples":
        """From seed_pool rows (sample_id, source, native_id, image_phashes) in global order."""
        prior = cls()
        for row in rows:
            prior.keys.setdefault(row["sample_id"], f"{row['source']}/{row['native_id']}")
            prior.ordered_ids.append(row["sample_id"])
            prior.phashes.append(list(row["image_phashes"] or []))
        return prior


@dataclass
class IngestResult:
    source: str
    kept: pa.Table
    quarantine: pa.Table
    images: pa.Table
    rows_read: int
    reasons: Counter
    images_stored: int  # new objects written to the image store
    images_reused: int  # images already in the store (content dedup)
    near_duplicates: int

    @property
    def rows_kept(self) -> int:
        return self.kept.num_rows

    @property
    def rows_quarantined(self) -> int:
        return self.quarantine.num_rows


class _Reject(Exception):
    def __init__(self, reason: QuarantineReason, detail: str):
        super().__init__(detail)
        self.reason, self.detail = reason, detail


@dataclass
class _Image:
    image_id: str
    data: bytes
    width: int
    height: int
    format: str
    mode: str
    phash: str


def ingest_source(
    source: str,
    records: Iterable[SeedRecord],
    settings: SeedSettings,
    *,
    image_root: Path | None,
    put_image: Callable[[str, bytes], bool],
    prior: PriorSamples | None = None,
    progress: Callable[[int], None] | None = None,
    allowed_roots: Iterable[str | Path] = (),
) -> IngestResult:
    """Turn one source's records into kept rows, quarantine rows and image rows.

    Image paths resolve under `image_root`, or under one of `allowed_roots` (absolute paths a dataset holds).
    """
    roots = [Path(root) for root in allowed_roots]
    prior = prior or PriorSamples()
    kept: list[dict] = []
    quarantined: list[dict] = []
    image_rows: dict[str, dict] = {}
    seen: dict[str, str] = {}
    stored = reused = rows_read = 0

    for record in records:
        rows_read += 1
        if progress is not None and rows_read % 1000 == 0:
            progress(rows_read)
        if isinstance(record, Rejected):
            quarantined.append(_quarantine_row(source, record.record_index, record.native_id, record.reason, record.detail, record.raw_excerpt))
            continue
        try:
            row, images = _validate(source, record, settings, image_root, roots)
            _check_column_types(row)
        except _Reject as problem:
            quarantined.append(_quarantine_row(source, record.record_index, _safe_text(record.native_id), problem.reason, problem.detail, record.raw_excerpt))
            continue
        except Exception as exc:  # noqa: BLE001 - an unknown problem with one record quarantines that record, with what it was
            quarantined.append(_quarantine_row(source, record.record_index, _safe_text(record.native_id), QuarantineReason.RECORD_ERROR,
                                               f"validating the record failed: {error_text(exc)}", record.raw_excerpt))
            continue
        first = prior.keys.get(row["sample_id"]) or seen.get(row["sample_id"])
        if first is not None:
            quarantined.append(
                _quarantine_row(source, record.record_index, row["native_id"], QuarantineReason.DUPLICATE,
                                f"same sample_id as {first}, which is kept", record.raw_excerpt, row["sample_id"], first)
            )
            continue
        seen[row["sample_id"]] = f"{source}/{row['native_id']}"
        for image in images:
            if put_image(image.image_id, image.data):
                stored += 1
            else:
                reused += 1
            image_rows.setdefault(image.image_id, {
                "image_id": image.image_id, "source": source, "width": image.width, "height": image.height,
                "format": image.format, "mode": image.mode, "n_bytes": len(image.data), "phash": image.phash,
            })
        kept.append(row)

    near = _mark_near_duplicates(kept, prior, settings.near_duplicate_max_distance)
    if rows_read != len(kept) + len(quarantined):
        raise AssertionError(f"{source}: row accounting broken: read {rows_read} != kept {len(kept)} + quarantined {len(quarantined)}")
    return IngestResult(
        source=source,
        kept=pa.Table.from_pylist(kept, schema=SEED_POOL.schema),
        quarantine=pa.Table.from_pylist(quarantined, schema=QUARANTINE.schema),
        images=pa.Table.from_pylist(list(image_rows.values()), schema=IMAGES.schema),
        rows_read=rows_read,
        reasons=Counter(row["reason"] for row in quarantined),
        images_stored=stored,
        images_reused=reused,
        near_duplicates=near,
    )


# -- validation ----------------------------------------------------------------------------------


def _validate(source: str, record: Candidate, settings: SeedSettings, image_root: Path | None,
              allowed_roots: list[Path]) -> tuple[dict, list[_Image]]:
    native_id = _text(record.native_id, "native_id")
    question = _text(record.question, "question", empty=QuarantineReason.EMPTY_QUESTION)
    question = unicodedata.normalize("NFC", question).strip()
    if not question:
        raise _Reject(QuarantineReason.EMPTY_QUESTION, "question is empty or whitespace")
    answer = _answer_text(record.answer)
    choices = [_text(c, "choices") for c in record.choices] if record.choices else []
    if not choices:
        question, choices = _split_options(question)
    if len(question) > settings.max_question_chars:
        raise _Reject(QuarantineReason.QUESTION_TOO_LONG, f"question has {len(question)} characters, limit {settings.max_question_chars}")
    answer_type = _answer_type(record.answer_type, answer, choices)
    if answer_type == "multiple_choice" and len(choices) < 2:
        raise _Reject(QuarantineReason.MALFORMED_RECORD, f"multiple choice needs at least two options, got {len(choices)}")
    if answer_type == "multiple_choice":
        answer = _choice_letter(answer, choices)
    metadata = _metadata_json(record.metadata)

    if not record.images and settings.require_image:
        raise _Reject(QuarantineReason.NO_IMAGE, "the record has no image and seed.require_image is on")
    if len(record.images) > settings.max_images_per_sample:
        raise _Reject(QuarantineReason.TOO_MANY_IMAGES, f"{len(record.images)} images, limit {settings.max_images_per_sample}")
    if record.placeholder_count and record.placeholder_count != len(record.images):
        raise _Reject(QuarantineReason.IMAGE_PLACEHOLDER_MISMATCH, f"{record.placeholder_count} <image> placeholders but {len(record.images)} images")
    images = [_load_image(ref, position, image_root, settings, allowed_roots) for position, ref in enumerate(record.images)]

    image_ids = [image.image_id for image in images]
    row = {
        "sample_id": sample_id(question, image_ids, answer, choices),
        "source": source,
        "native_id": native_id,
        "record_index": record.record_index,
        "image_ids": image_ids,
        "image_phashes": [image.phash for image in images],
        "question": question,
        "answer": answer,
        "answer_type": answer_type,
        "choices": choices,
        "source_tags": [_text(t, "tags") for t in record.tags],
        "source_difficulty": record.difficulty,
        "metadata": metadata,
        "near_duplicate_of": None,
        "near_duplicate_distance": None,
    }
    return row, images


def _check_column_types(row: dict) -> None:
    """The row against its seed_pool column types, now: a value that does not fit (an integer past int32, a
    list where text goes) is this record's quarantine, not a failed partition write after the loop.
    Checked in Python from the Arrow schema (a one-row Arrow conversion costs ~250 us, 7% of an image's decode)."""
    for column in SEED_POOL.schema:
        problem = _misfit(row.get(column.name), column.type, column.nullable)
        if problem:
            raise _Reject(QuarantineReason.MALFORMED_RECORD, f"a value does not fit its column: {column.name} {problem}")


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


def _text(value: Any, name: str, empty: QuarantineReason | None = None) -> str:
    """A text field as valid Unicode, or a rejection naming the field."""
    if value is None and empty is not None:
        raise _Reject(empty, f"{name} is missing")
    if isinstance(value, NonStandardLiteral):
        raise _Reject(QuarantineReason.MALFORMED_RECORD, f"{name} is the non-standard JSON literal {value!r}, not a value")
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise _Reject(QuarantineReason.INVALID_UTF8, f"{name} is not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        raise _Reject(QuarantineReason.MALFORMED_RECORD, f"{name} is a {type(value).__name__}, not text")
    _require_valid_unicode(value, name)
    return value


def _require_valid_unicode(value: str, name: str) -> None:
    # JSON was decoded with surrogateescape: invalid UTF-8 bytes show up as lone surrogates.
    for position, char in enumerate(value):
        if "\ud800" <= char <= "\udfff":
            raise _Reject(QuarantineReason.INVALID_UTF8, f"{name} is not valid UTF-8 (bad byte near character {position})")


def _safe_text(value: Any) -> str | None:
    if value is None:
        return None
    text = str(value)
    return text.encode("utf-8", errors="replace").decode("utf-8") if any("\ud800" <= c <= "\udfff" for c in text) else text


def _answer_text(value: Any) -> str:
    if value is None or (isinstance(value, str) and not value.strip()):
        raise _Reject(QuarantineReason.MISSING_ANSWER, "answer is missing or empty")
    if isinstance(value, float) and not math.isfinite(value):
        raise _Reject(QuarantineReason.MALFORMED_RECORD, f"answer is {value!r}, not a value")
    if isinstance(value, bool):
        value = "Yes" if value else "No"
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    text = unicodedata.normalize("NFC", _text(value, "answer")).strip()
    return text


def _answer_type(declared: Any, answer: str, choices: list[str]) -> str:
    if declared not in (None, ""):
        answer_type = ANSWER_TYPE_ALIASES.get(str(declared).strip().lower())
        if answer_type is None:
            raise _Reject(QuarantineReason.MALFORMED_RECORD, f"answer_type {declared!r} is not one of {list(ANSWER_TYPES)} (or an alias)")
        if answer_type == "multiple_choice" and not choices:
            raise _Reject(QuarantineReason.MALFORMED_RECORD, "answer_type is multiple_choice but the record gives no options")
        if choices and answer_type != "multiple_choice":
            # Options and another declared type: a data type of the option (MathVista's `text`) when the answer
            # names an option; otherwise the record contradicts itself, and no guess is made.
            if _names_an_option(answer, choices):
                return "multiple_choice"
            raise _Reject(QuarantineReason.ANSWER_TYPE_CONFLICT, f"declared {declared!r}, but the record gives {len(choices)} options "
                                                                 f"and its answer {answer[:80]!r} names none of them")
        return answer_type
    if choices:
        return "multiple_choice"
    if _NUMERIC.match(answer):
        return "numeric"
    if _LATEX_MARKERS.search(answer) or (
        _FORMULA.match(answer) and re.search(r"\d", answer) and re.search(r"[a-zA-Z]", answer) and re.search(r"[+*/=^]", answer)
    ):
        return "math"
    return "free_form"


def _names_an_option(answer: str, choices: list[str]) -> bool:
    try:
        _choice_letter(answer, choices)
    except _Reject:
        return False
    return True


def _choice_letter(answer: str, choices: list[str]) -> str:
    """The option letter the answer names (letter, '(B)', 'B.', or the option's text)."""
    match = _LETTER_ANSWER.match(answer.strip().upper())
    if match and LETTERS.index(match.group(1)) < len(choices):
        return match.group(1)
    wanted = " ".join(answer.split()).casefold()
    for index, choice in enumerate(choices):
        if " ".join(choice.split()).casefold() == wanted:
            return LETTERS[index]
    raise _Reject(QuarantineReason.ANSWER_NOT_IN_CHOICES, f"answer {answer[:80]!r} names none of the {len(choices)} options")


def _split_options(question: str) -> tuple[str, list[str]]:
    """Options listed at the end of the question ('A. ...' / '(B) ...' lines) become choices."""
    lines = question.split("\n")  # not splitlines(): U+2028 and friends are text here, not option breaks
    found: list[tuple[str, str]] = []
    end = len(lines)
    while end > 0:
        match = _OPTION_LINE.match(lines[end - 1])
        if not match:
            break
        found.insert(0, (match.group(1), match.group(2)))
        end -= 1
    if len(found) < 2 or [letter for letter, _ in found] != list(LETTERS[: len(found)]):
        return question, []
    if end > 0 and _OPTIONS_HEADER.match(lines[end - 1]):
        end -= 1
    stem = "\n".join(lines[:end]).strip()
    return (stem, [text for _, text in found]) if stem else (question, [])


def _metadata_json(metadata: dict) -> str:
    def default(value: Any) -> Any:
        if isinstance(value, bytes):
            return f"<{len(value)} bytes>"
        return repr(value)

    text = json.dumps(metadata, ensure_ascii=False, sort_keys=True, default=default)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        # Invalid UTF-8 in a field we do not interpret: keep it, escaped, rather than lose the record.
        text = json.dumps(metadata, ensure_ascii=True, sort_keys=True, default=default)
    return text


def _load_image(ref: ImageRef, position: int, image_root: Path | None, settings: SeedSettings, allowed_roots: list[Path] = ()) -> _Image:
    """Read, bound-check, decode and hash one image, or reject the record with the reason."""
    label = f"image {position} ({ref.describe()})"
    data = ref.data if ref.data is not None else _read_image_file(ref.path or "", label, image_root, settings, allowed_roots)
    if not data:
        raise _Reject(QuarantineReason.EMPTY_IMAGE, f"{label} is zero bytes")
    if len(data) > settings.max_image_bytes:
        raise _Reject(QuarantineReason.OVERSIZED_IMAGE, f"{label} is {len(data)} bytes, limit {settings.max_image_bytes}")

    import imagehash
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        # Only the raster formats a seed pool holds are tried: without `formats`, PIL tries every plugin it
        # has, and some (EPS) run external programs.
        with Image.open(io.BytesIO(data), formats=SEED_IMAGE_FORMATS) as image:
            width, height = image.size
            if width * height > settings.max_image_pixels:
                raise _Reject(QuarantineReason.OVERSIZED_IMAGE, f"{label} is {width}x{height} = {width * height} pixels, limit {settings.max_image_pixels}")
            image.load()
            fmt = image.format or "unknown"
            # What a person sees: the EXIF orientation applied before the size and the hash are taken.
            upright = ImageOps.exif_transpose(image) or image
            width, height = upright.size
            phash = str(imagehash.phash(upright))
            mode = upright.mode
    except _Reject:
        raise
    except Image.DecompressionBombError as exc:
        raise _Reject(QuarantineReason.OVERSIZED_IMAGE, f"{label}: {exc}") from None
    except UnidentifiedImageError:
        if not data.startswith(_RASTER_SIGNATURES) and data[8:12] != b"WEBP":
            raise _Reject(QuarantineReason.UNSUPPORTED_IMAGE_FORMAT,
                          f"{label} is not one of {', '.join(SEED_IMAGE_FORMATS)} (starts {data[:12]!r})") from None
        raise _Reject(QuarantineReason.CORRUPT_IMAGE, f"{label} does not decode as the format its header names") from None
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, struct.error... on bad bytes
        raise _Reject(QuarantineReason.CORRUPT_IMAGE, f"{label} does not decode: {type(exc).__name__}: {exc}") from None
    return _Image(bytes_id(data), data, width, height, fmt, mode, phash)


def _read_image_file(path: str, label: str, image_root: Path | None, settings: SeedSettings, allowed_roots: list[Path] = ()) -> bytes:
    if image_root is None:
        raise _Reject(QuarantineReason.MALFORMED_RECORD, f"{label}: a path, but this source has no image root")
    if not path.strip():
        raise _Reject(QuarantineReason.MISSING_IMAGE, f"{label}: empty path")
    try:
        root = image_root.resolve()
        target = (root / path).resolve()  # absolute paths replace root; symlinks are followed
        if not any(target.is_relative_to(allowed) for allowed in [root, *(r.resolve() for r in allowed_roots)]):
            hint = ("; an absolute path - if the source's images live there, list that folder in its allowed_image_roots"
                    if Path(path).is_absolute() else "")
            raise _Reject(QuarantineReason.PATH_ESCAPE, f"{label} resolves to {target}, outside the source root {root}{hint}")
        if not target.is_file():
            raise _Reject(QuarantineReason.MISSING_IMAGE, f"{label}: no file at {target}")
        size = target.stat().st_size
        if size == 0:
            raise _Reject(QuarantineReason.EMPTY_IMAGE, f"{label} is zero bytes")
        if size > settings.max_image_bytes:
            raise _Reject(QuarantineReason.OVERSIZED_IMAGE, f"{label} is {size} bytes, limit {settings.max_image_bytes}")
        return target.read_bytes()
    except (OSError, RuntimeError, ValueError) as exc:  # symlink loops, names too long, NUL bytes, permissions
        raise _Reject(QuarantineReason.UNREADABLE_IMAGE, f"{label} cannot be read: {error_text(exc)}") from None


def _quarantine_row(source, record_index, native_id, reason, detail, raw_excerpt, sample=None, duplicate_of=None) -> dict:
    return {
        "source": source,
        "native_id": _safe_text(native_id),
        "record_index": record_index,
        "reason": str(reason),
        "detail": _safe_text(detail) or "",
        "sample_id": sample,
        "duplicate_of": duplicate_of,
        "raw_excerpt": _safe_text(raw_excerpt),
    }


def _mark_near_duplicates(kept: list[dict], prior: PriorSamples, max_distance: int) -> int:
    """Fill near_duplicate_of / _distance on kept rows; returns how many were marked."""
    if max_distance < 0 or not kept:
        return 0
    hashes, owners = [], []
    for position, phashes in enumerate(prior.phashes):
        hashes += [int(h, 16) for h in phashes]
        owners += [position] * len(phashes)
    offset = len(prior.ordered_ids)
    for position, row in enumerate(kept):
        hashes += [int(h, 16) for h in row["image_phashes"]]
        owners += [offset + position] * len(row["image_phashes"])
    matches = earliest_near_duplicates(hashes, owners, max_distance, first_owner=offset)
    ids = prior.ordered_ids + [row["sample_id"] for row in kept]
    for owner, (match, distance) in matches.items():
        row = kept[owner - offset]
        row["near_duplicate_of"], row["near_duplicate_distance"] = ids[match], distance
    return len(matches)


# -- reading what earlier sources kept -----------------------------------------------------------


def earlier_sources(source_names: list[str], source: str) -> list[str]:
    """Sources before this one in config order: their copies of a sample win."""
    return source_names[: source_names.index(source)]


def prior_samples(store, sources: list[str]) -> PriorSamples:
    """The kept samples of these sources (in this order) from the store; unmaterialised ones are skipped."""
    rows: list[dict] = []
    for name in sources:
        table = store.read_partition("seed_pool", name, columns=["sample_id", "source", "native_id", "record_index", "image_phashes"])
        if table is not None:
            rows += sorted(table.to_pylist(), key=lambda row: row["record_index"])
    return PriorSamples.from_rows(rows)


def input_fingerprint(reader_fingerprint: str, settings: SeedSettings, earlier_versions: dict[str, str | None], code_version: str) -> str:
    """What a seed_pool partition is computed from; equal fingerprints give equal partitions."""
    from omnithought_dagster.ids import content_id

    return content_id(
        "seed-input",
        {"reader": reader_fingerprint, "settings": settings.model_dump(), "earlier": earlier_versions, "code": code_version},
    )


def partition_version(store, source: str) -> str | None:
    """Data version of a materialised seed_pool partition: the hash of its sample ids."""
    from omnithought_dagster.ids import version_of

    table = store.read_partition("seed_pool", source, columns=["sample_id"])
    return None if table is None else version_of(table.column("sample_id").to_pylist())
