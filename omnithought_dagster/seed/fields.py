"""A record's text fields checked: what sets a record aside (`Reject`) and the text checks every field goes through."""

from __future__ import annotations

import json
import re
from typing import Any

from omnithought_dagster.markup import storable
from omnithought_dagster.seed.sources.base import (
    NonStandardLiteral,
    QuarantineReason,
)

_SURROGATE = re.compile("[\ud800-\udfff]")


class Reject(Exception):
    def __init__(self, reason: QuarantineReason, detail: str):
        super().__init__(detail)
        self.reason, self.detail = reason, detail


def field_text(value: Any, name: str, empty: QuarantineReason | None = None) -> str:
    """A text field as valid Unicode, or a rejection naming the field."""
    if value is None and empty is not None:
        raise Reject(empty, f"{name} is missing")
    if isinstance(value, NonStandardLiteral):
        raise Reject(QuarantineReason.MALFORMED_RECORD, f"{name} is the non-standard JSON literal {value!r}, not a value")
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise Reject(QuarantineReason.INVALID_UTF8, f"{name} is not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        raise Reject(QuarantineReason.MALFORMED_RECORD, f"{name} is a {type(value).__name__}, not text")
    require_valid_unicode(value, name)
    return value


def require_valid_unicode(value: str, name: str) -> None:
    # JSON was decoded with surrogateescape: invalid UTF-8 bytes show up as lone surrogates.
    bad = _SURROGATE.search(value)
    if bad:
        raise Reject(QuarantineReason.INVALID_UTF8, f"{name} is not valid UTF-8 (bad byte near character {bad.start()})")


def safe_text(value: Any) -> str | None:
    """Text for a quarantine row: lone surrogates (invalid UTF-8 read with surrogateescape) as U+FFFD (markup.storable)."""
    return None if value is None else storable(str(value))


def metadata_json(metadata: dict) -> str:
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
