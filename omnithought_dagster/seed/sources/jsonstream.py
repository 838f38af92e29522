"""JSON and JSONL files read a record at a time, so a source's memory does not grow with its file.

- JSONL: lines split on b"\\n" only (U+2028, U+2029 and U+0085 are legal inside JSON strings), read
  from the file as they come.
- A top-level JSON array (LLaVA's 665k-record file is one): scanned twice with the same byte-level
  scanner, never loaded whole. The first pass checks that the array closes - its strings end, its
  brackets match, nothing follows it - and counts its elements; an array that does not close (a
  truncated download) is one unreadable_file record, as a whole-file parse would make it. The
  second pass hands out each element's bytes, parsed on their own: one bad element is one
  malformed record, the rest are kept.
- Any other document (one object, one scalar) is small by nature and parsed whole.

Bytes are decoded as UTF-8 with surrogateescape, so invalid UTF-8 inside a record becomes lone
surrogates that the validation catches per field; a leading byte-order mark is dropped.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

BOM = b"\xef\xbb\xbf"
WHITESPACE = b" \t\r\n"  # JSON's own whitespace (bytes.strip() would also take \x0b, \x0c)
CHUNK_BYTES = 1 << 20
# Structural bytes outside strings; a string's rest after its opening quote (escapes included).
_STRUCTURE = re.compile(rb'["\[\]{},]')
_STRING_REST = re.compile(rb'(?:[^"\\]|\\.)*"', re.DOTALL)
_CLOSES = {ord("]"): ord("["), ord("}"): ord("{")}


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


def decode(data: bytes) -> str:
    return data.decode("utf-8", errors="surrogateescape")


def records(path: Path, roots: tuple[str, ...] | None = None) -> Iterator[tuple[Any, tuple[str, str] | None]]:
    """(record, problem) per record of a .json / .jsonl file, in order. problem = (reason, detail), reason being
    'malformed_record' (one bad line or element) or 'unreadable_file' (the file as a whole); record is then the raw text.
    `roots`: the folders the file must lie in (sources/confine.py; None: anywhere)."""
    from omnithought_dagster.seed.sources.confine import open_data

    try:
        handle = open_data(path, roots)
    except OSError as exc:
        yield str(path), ("unreadable_file", f"{path.name}: cannot read: {exc}")
        return
    with handle:
        try:
            kind = _kind(handle, path)
            if kind == "jsonl":
                yield from _jsonl_records(handle, path.name)
            elif kind == "array":
                yield from _array_records(handle, path.name)
            else:
                yield from _document_records(handle, path.name)
        except OSError as exc:  # the file went away or failed mid-read
            yield str(path), ("unreadable_file", f"{path.name}: read failed: {exc}")


def count(path: Path, roots: tuple[str, ...] | None = None) -> int:
    """How many items `records` yields for the file (the reader's own count: progress totals, not accounting)."""
    from omnithought_dagster.seed.sources.confine import open_data

    try:
        with open_data(path, roots) as handle:
            kind = _kind(handle, path)
            if kind == "jsonl":
                return sum(1 for _ in jsonl_lines(handle))
            if kind == "array":
                elements, closed = _scan_array(handle, keep=False)
                n = sum(1 for _ in elements)
                return n if closed() else 1
            return 1
    except OSError:
        return 1


def _kind(handle: IO[bytes], path: Path) -> str:
    """jsonl | array | document, from the suffix and the first bytes; leaves the handle at the start."""
    if path.suffix.lower() == ".jsonl":
        return "jsonl"
    first = _first_byte(handle)
    if first == b"[":
        return "array"
    if first == b"{" and _looks_like_jsonl(handle):
        return "jsonl"
    return "document"


def _first_byte(handle: IO[bytes]) -> bytes:
    handle.seek(0)
    head = handle.read(len(BOM))
    if head != BOM:
        handle.seek(0)
    while chunk := handle.read(4096):
        stripped = chunk.lstrip(WHITESPACE)
        if stripped:
            handle.seek(0)
            return stripped[:1]
    handle.seek(0)
    return b""


def _looks_like_jsonl(handle: IO[bytes]) -> bool:
    """One object per line in a file named .json: its first non-blank line is a whole object and another follows."""
    lines = (line for _, line in jsonl_lines(handle) if line)
    first = next(lines, None)
    second = next(lines, None)
    handle.seek(0)
    return first is not None and second is not None and first.rstrip(WHITESPACE).endswith(b"}")


def jsonl_lines(handle: IO[bytes]) -> Iterator[tuple[int, bytes]]:
    """(line number, bytes) of every line that holds more than JSON whitespace; split on b"\\n" only."""
    handle.seek(0)
    for number, line in enumerate(handle, start=1):
        if number == 1 and line.startswith(BOM):
            line = line[len(BOM) :]
        if line.strip(WHITESPACE):
            yield number, line


def jsonl_file(path: str | Path) -> Iterator[tuple[int, Any, str | None]]:
    """(line number, record, None) or (line number, raw text, why it does not parse) for every non-blank line of a JSONL
    file we read whole (lmms-eval's per-sample log, our model class's problem log; the seed readers stream through
    `records`, the example index seeks to its own offsets): lines end at b"\\n" only, never at U+2028, U+2029 or
    U+0085, which JSON strings may hold unescaped (`str.splitlines()` splits on them and cuts a record in two). Bytes
    that are not UTF-8 become lone surrogates; a leading byte-order mark is dropped."""
    with open(path, "rb") as handle:
        for number, line in jsonl_lines(handle):
            yield number, *_parse_line(line, f"line {number}")


def _parse_line(line: bytes, where: str) -> tuple[Any, str | None]:
    text = decode(line.rstrip(b"\r\n"))
    try:
        return loads(text), None
    except json.JSONDecodeError as exc:
        return text, f"{where}: invalid JSON: {exc.msg} at column {exc.colno}"
    except JSON_ERRORS as exc:
        return text, f"{where}: unparsable JSON: {type(exc).__name__}: {exc}"


def _jsonl_records(handle: IO[bytes], name: str) -> Iterator[tuple[Any, tuple[str, str] | None]]:
    for number, line in jsonl_lines(handle):
        record, problem = _parse_line(line, f"{name} line {number}")
        yield record, None if problem is None else ("malformed_record", problem)


def _document_records(handle: IO[bytes], name: str) -> Iterator[tuple[Any, tuple[str, str] | None]]:
    data = handle.read()
    text = decode(data[len(BOM) :] if data.startswith(BOM) else data)
    try:
        yield loads(text), None
    except JSON_ERRORS as exc:
        where = (
            f"{exc.msg} at line {exc.lineno} column {exc.colno}"
            if isinstance(exc, json.JSONDecodeError)
            else f"{type(exc).__name__}: {exc}"
        )
        yield text[:2000], ("unreadable_file", f"{name}: unparsable JSON: {where}")


def _array_records(handle: IO[bytes], name: str) -> Iterator[tuple[Any, tuple[str, str] | None]]:
    elements, closed = _scan_array(handle, keep=False)
    for _ in elements:
        pass
    if not closed():
        yield name, ("unreadable_file", f"{name}: unparsable JSON: {closed.why}")
        return
    elements, _ = _scan_array(handle, keep=True)
    for position, element in enumerate(elements):
        text = decode(element)
        try:
            yield loads(text), None
        except JSON_ERRORS as exc:
            what = f"{exc.msg} at column {exc.colno}" if isinstance(exc, json.JSONDecodeError) else f"{type(exc).__name__}: {exc}"
            yield text, ("malformed_record", f"{name} element {position}: invalid JSON: {what}")


class _Closed:
    """Whether the scanned array closed properly (known once its elements are consumed), and if not, why."""

    def __init__(self):
        self.value, self.why = False, "not scanned"

    def __call__(self) -> bool:
        return self.value


def _scan_array(handle: IO[bytes], keep: bool) -> tuple[Iterator[bytes], _Closed]:
    closed = _Closed()
    return _array_elements(handle, keep, closed), closed


def _array_elements(handle: IO[bytes], keep: bool, closed: _Closed) -> Iterator[bytes]:
    """The top-level array's elements (their bytes when `keep`, else b""), read CHUNK_BYTES at a time. Empty slots
    (`[1,,2]`) hold no element. `closed` is set when the array ends with its strings and brackets matched and
    nothing after it but whitespace."""
    handle.seek(0)
    if handle.read(len(BOM)) != BOM:
        handle.seek(0)
    buf = b""
    while not buf:  # the caller saw '[' as the first byte that is not whitespace
        buf = handle.read(CHUNK_BYTES).lstrip(WHITESPACE)
    eof = False
    pos = 1
    stack = [ord("[")]
    start: int | None = None  # where the current top-level element begins

    def refill() -> bool:
        nonlocal buf, pos, start, eof
        if eof:
            return False
        keep_from = start if start is not None else pos
        more = handle.read(CHUNK_BYTES)
        eof = not more
        buf = buf[keep_from:] + more
        pos -= keep_from
        if start is not None:
            start -= keep_from
        return bool(more)

    def fail(why: str) -> None:
        closed.value, closed.why = False, why

    while True:
        match = _STRUCTURE.search(buf, pos)
        if match is None:
            if len(stack) == 1 and start is None and buf[pos:].strip(WHITESPACE):
                start = pos + len(buf[pos:]) - len(buf[pos:].lstrip(WHITESPACE))
            pos = len(buf)
            if not refill():
                return fail("the file ends inside the array (truncated?)")
            continue
        at = match.start()
        if len(stack) == 1 and start is None and buf[pos:at].strip(WHITESPACE):
            start = pos + len(buf[pos:at]) - len(buf[pos:at].lstrip(WHITESPACE))  # a number or a literal begins
        byte = buf[at]
        if byte == 0x22:  # '"'
            rest = _STRING_REST.match(buf, at + 1)
            if rest is None:
                pos = at
                if not refill():
                    return fail("the file ends inside a string (truncated?)")
                continue
            if len(stack) == 1 and start is None:
                start = at
            pos = rest.end()
        elif byte in (0x5B, 0x7B):  # '[' '{'
            if len(stack) == 1 and start is None:
                start = at
            stack.append(byte)
            pos = at + 1
        elif byte in (0x5D, 0x7D):  # ']' '}'
            if stack[-1] != _CLOSES[byte]:
                return fail(f"a {chr(byte)!r} closes a {chr(stack[-1])!r} at byte {handle.tell() - len(buf) + at}")
            stack.pop()
            pos = at + 1
            if not stack:  # the array itself closed
                if start is not None:
                    yield buf[start:at].rstrip(WHITESPACE) if keep else b""
                tail = buf[pos:]
                while not tail.strip(WHITESPACE):
                    tail = handle.read(CHUNK_BYTES)
                    if not tail:
                        closed.value, closed.why = True, ""
                        return
                return fail("something follows the array's closing bracket")
        else:  # ','
            if len(stack) == 1:
                if start is not None:
                    yield buf[start:at].rstrip(WHITESPACE) if keep else b""
                    start = None
            pos = at + 1
