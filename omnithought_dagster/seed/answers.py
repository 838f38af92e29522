"""Reference answers: their type (multiple choice, numeric, math, free form), options split out of a question, letters."""

from __future__ import annotations

import math
import re
import unicodedata
from typing import Any

from omnithought_dagster.seed.fields import Reject, field_text
from omnithought_dagster.seed.sources.base import (
    QuarantineReason,
)

ANSWER_TYPES = ("multiple_choice", "numeric", "math", "free_form")


ANSWER_TYPE_ALIASES = {
    "multiple_choice": "multiple_choice",
    "multiple-choice": "multiple_choice",
    "multi_choice": "multiple_choice",
    "mc": "multiple_choice",
    "choice": "multiple_choice",
    "mcq": "multiple_choice",
    "numeric": "numeric",
    "number": "numeric",
    "numerical": "numeric",
    "integer": "numeric",
    "float": "numeric",
    "math": "math",
    "expression": "math",
    "latex": "math",
    "symbolic": "math",
    "free_form": "free_form",
    "free-form": "free_form",
    "freeform": "free_form",
    "open": "free_form",
    "text": "free_form",
    # MathVista-style answer_type is the answer's data type: text / integer / float / list.
    "list": "free_form",
    "string": "free_form",
    "str": "free_form",
    "int": "numeric",
}


LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


# A number (thousands separators, decimals, a fraction, %) optionally followed by a short unit.
_NUMERIC = re.compile(r"^[-+]?(?:\d{1,3}(?:,\d{3})+|\d+|(?=\.\d))(?:\.\d+)?(?:\s*/\s*\d+)?\s*[%°]?\s*(?:[a-zA-Z][a-zA-Z0-9^²³/ ]{0,11})?$")


_LATEX_MARKERS = re.compile(r"\\|\$|\^|√|π|sqrt\(|frac")


_FORMULA = re.compile(r"^[\w\s+\-*/^().=]+$")


_OPTION_LINE = re.compile(r"^\s*\(?([A-Z])[\).:]\s+(.+?)\s*$")


_OPTIONS_HEADER = re.compile(r"^\s*(options|choices)\s*:?\s*$", re.IGNORECASE)


_LETTER_ANSWER = re.compile(r"^\(?([A-Z])[\).:]?$")


def answer_text(value: Any) -> str:
    if value is None or (isinstance(value, str) and not value.strip()):
        raise Reject(QuarantineReason.MISSING_ANSWER, "answer is missing or empty")
    if isinstance(value, float) and not math.isfinite(value):
        raise Reject(QuarantineReason.MALFORMED_RECORD, f"answer is {value!r}, not a value")
    if isinstance(value, bool):
        value = "Yes" if value else "No"
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    text = unicodedata.normalize("NFC", field_text(value, "answer")).strip()
    return text


def classify_answer(declared: Any, answer: str, choices: list[str]) -> str:
    if declared not in (None, ""):
        answer_type = ANSWER_TYPE_ALIASES.get(str(declared).strip().lower())
        if answer_type is None:
            raise Reject(QuarantineReason.MALFORMED_RECORD, f"answer_type {declared!r} is not one of {list(ANSWER_TYPES)} (or an alias)")
        if answer_type == "multiple_choice" and not choices:
            raise Reject(QuarantineReason.MALFORMED_RECORD, "answer_type is multiple_choice but the record gives no options")
        if choices and answer_type != "multiple_choice":
            # Options and another declared type: a data type of the option (MathVista's `text`) when the answer
            # names an option; otherwise the record contradicts itself, and no guess is made.
            if _names_an_option(answer, choices):
                return "multiple_choice"
            raise Reject(
                QuarantineReason.ANSWER_TYPE_CONFLICT,
                f"declared {declared!r}, but the record gives {len(choices)} options and its answer {answer[:80]!r} names none of them",
            )
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
        choice_letter(answer, choices)
    except Reject:
        return False
    return True


def choice_letter(answer: str, choices: list[str]) -> str:
    """The option letter the answer names (letter, '(B)', 'B.', or the option's text)."""
    match = _LETTER_ANSWER.match(answer.strip().upper())
    if match and LETTERS.index(match.group(1)) < len(choices):
        return match.group(1)
    wanted = " ".join(answer.split()).casefold()
    for index, choice in enumerate(choices):
        if " ".join(choice.split()).casefold() == wanted:
            return LETTERS[index]
    raise Reject(QuarantineReason.ANSWER_NOT_IN_CHOICES, f"answer {answer[:80]!r} names none of the {len(choices)} options")


def split_options(question: str) -> tuple[str, list[str]]:
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
