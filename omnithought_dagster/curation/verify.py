"""Answer verification by answer type: is a trace's final answer the reference answer?

- multiple_choice: the option letter in any common form ("B", "(B)", "B.", "b", "the answer
  is b", "Option B", "B. blue") or the option's text;
- numeric: numbers compared with a relative/absolute tolerance after stripping thousands
  separators, units, currency and %; fractions and LaTeX through math-verify;
- math: math-verify (sympy equivalence of LaTeX or plain expressions);
- free_form: normalised exact match (case, punctuation, articles, whitespace); numbers compare
  numerically. A mismatch is undecided here (correct=None): the judge decides it, if allowed.
A missing answer is simply wrong. Every verdict says how it was reached (`method`).
"""

from __future__ import annotations

import re
import string
import threading
import unicodedata
from dataclasses import dataclass

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
_NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:\s*/\s*\d+(?:\.\d+)?)?|[-+]?\.\d+")
_MC_ALONE = re.compile(r"^\(?\s*([A-Za-z])\s*\)?\s*[.:)]?$")
_MC_LEADING = re.compile(r"^\(?([A-Z])[.):]\s+\S")
_MC_PHRASE = re.compile(r"\b(?:answer|option|choice)\s*(?:is|:|=)?\s*(?:option\s+)?\(?([A-Za-z])\)?(?![A-Za-z])", re.IGNORECASE)
_UNIT_TAIL = re.compile(r"\s*[%°]?\s*(?:[A-Za-zµ°²³]+(?:\s*[\^/]\s*\d*[A-Za-z]*)*)?\s*[.]?\s*")
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_MARKUP = re.compile(r"[*_`$]|\\boxed\{|\\text\{|\\mathrm\{")


@dataclass(frozen=True)
class Verdict:
    correct: bool | None  # None: undecided (free-form mismatch left to the judge)
    method: str
    extracted: str | None = None


@dataclass(frozen=True)
class Tolerance:
    relative: float = 1e-4
    absolute: float = 1e-6


def verify(
    final_answer: str | None, reference: str, answer_type: str, choices: list[str] | None = None, tolerance: Tolerance = Tolerance()
) -> Verdict:
    """Compare a final answer with the reference the way its answer type asks."""
    if final_answer is None or not final_answer.strip():
        return Verdict(False, "no_answer")
    if answer_type == "multiple_choice":
        return _verify_choice(final_answer, reference, choices or [])
    if answer_type == "numeric":
        return _verify_numeric(final_answer, reference, tolerance)
    if answer_type == "math":
        ok = math_equal(final_answer, reference)
        return Verdict(ok, "math_verify", final_answer.strip())
    return _verify_free_form(final_answer, reference, tolerance)


# -- multiple choice -------------------------------------------------------------------------------


def choice_letter(answer: str, choices: list[str]) -> str | None:
    """The option letter an answer names, or None."""
    text = _strip_markup(answer).strip()
    valid = LETTERS[: len(choices)] if choices else LETTERS
    match = _MC_ALONE.match(text)
    if match and match.group(1).upper() in valid:
        return match.group(1).upper()
    match = _MC_LEADING.match(text)
    if match and match.group(1) in valid:
        return match.group(1)
    wanted = _normalise(text)
    for index, choice in enumerate(choices):
        if _normalise(choice) == wanted:
            return LETTERS[index]
    phrases = [m.group(1).upper() for m in _MC_PHRASE.finditer(text) if m.group(1).upper() in valid]
    if phrases:
        return phrases[-1]
    mentioned = [
        LETTERS[i] for i, choice in enumerate(choices) if _normalise(choice) and re.search(rf"\b{re.escape(_normalise(choice))}\b", wanted)
    ]
    return mentioned[0] if len(mentioned) == 1 else None


def _verify_choice(answer: str, reference: str, choices: list[str]) -> Verdict:
    letter = choice_letter(answer, choices)
    expected = choice_letter(reference, choices) or reference.strip().upper()
    if letter is None:
        return Verdict(False, "choice_unreadable")
    return Verdict(letter == expected, "choice", letter)


# -- numbers ---------------------------------------------------------------------------------------


def parse_number(text: str) -> float | None:
    """The number a short answer states: the whole answer if it is one (units ignored), else the last number."""
    cleaned = _strip_markup(text).replace("−", "-").strip()
    cleaned = re.sub(r"^[$€£¥]\s*", "", cleaned)
    matches = list(_NUMBER.finditer(cleaned))
    if not matches:
        return None
    # "12 cm^2": a number first, then its unit - the unit's digits are not the answer.
    chosen = matches[0] if matches[0].start() == 0 and _UNIT_TAIL.fullmatch(cleaned[matches[0].end() :]) else matches[-1]
    value = chosen.group(0).replace(",", "").replace(" ", "")
    try:
        if "/" in value:
            numerator, denominator = value.split("/")
            return float(numerator) / float(denominator) if float(denominator) else None
        return float(value)
    except ValueError:
        return None


def numbers_close(a: float, b: float, tolerance: Tolerance = Tolerance()) -> bool:
    return abs(a - b) <= max(tolerance.absolute, tolerance.relative * max(abs(a), abs(b)))


def _verify_numeric(answer: str, reference: str, tolerance: Tolerance) -> Verdict:
    got, want = parse_number(answer), parse_number(reference)
    latex = "\\" in answer or "\\" in reference
    if got is not None and want is not None and not latex:
        return Verdict(numbers_close(got, want, tolerance), "numeric", _format(got))
    ok = math_equal(answer, reference)  # fractions, roots, LaTeX
    return Verdict(ok, "math_verify", answer.strip())


def _format(value: float) -> str:
    return str(int(value)) if value.is_integer() else repr(value)


# -- free form -------------------------------------------------------------------------------------


def _verify_free_form(answer: str, reference: str, tolerance: Tolerance) -> Verdict:
    if _normalise(answer) == _normalise(reference):
        return Verdict(True, "exact_normalised", answer.strip())
    got, want = parse_number(answer), parse_number(reference)
    if got is not None and want is not None and _NUMBER.fullmatch(_strip_markup(reference).strip().replace(" ", "")):
        return Verdict(numbers_close(got, want, tolerance), "numeric", _format(got))
    return Verdict(None, "free_form_mismatch", answer.strip())


def _normalise(text: str) -> str:
    text = unicodedata.normalize("NFKC", _strip_markup(text)).casefold()
    text = "".join(" " if ch in string.punctuation else ch for ch in text)
    return " ".join(_ARTICLES.sub(" ", text).split())


def _strip_markup(text: str) -> str:
    text = _MARKUP.sub("", text)
    return text.replace("}", "") if "{" not in text else text


# -- math ------------------------------------------------------------------------------------------


def math_equal(answer: str, reference: str) -> bool:
    """Symbolic equivalence through math-verify (LaTeX or plain expressions)."""
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse
    from math_verify import verify as math_verify

    config = [LatexExtractionConfig(), ExprExtractionConfig()]
    # math-verify's timeouts use signals, which only the main thread may set.
    main = threading.current_thread() is threading.main_thread()
    timeout = {"parsing_timeout": 5} if main else {"parsing_timeout": None}
    try:
        gold = parse(_as_latex(reference), extraction_config=config, **timeout)
        pred = parse(_as_latex(answer), extraction_config=config, **timeout)
        if not gold or not pred:
            return False
        return bool(math_verify(gold, pred, **({"timeout_seconds": 5} if main else {"timeout_seconds": None})))
    except Exception:  # an expression sympy cannot handle is not a match
        return False


def _as_latex(text: str) -> str:
    text = text.strip()
    if "$" in text or "\\boxed" in text:
        return text
    return f"${text}$" if any(marker in text for marker in ("\\", "^", "{")) else text
