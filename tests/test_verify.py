"""The answer verifier on the formats models really produce."""

from __future__ import annotations

import pytest

from omnithought_dagster.curation.verify import Tolerance, choice_letter, parse_number, verify

CHOICES = ["red", "blue", "green", "dark blue"]


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        ("B", True),
        ("(B)", True),
        ("B.", True),
        ("b", True),
        ("B)", True),
        ("( b )", True),
        ("the answer is b", True),
        ("The answer is (B).", True),
        ("Answer: B", True),
        ("Option B", True),
        ("**B**", True),
        ("B. blue", True),
        ("blue", True),
        ("Blue.", True),
        ("I think it is blue", True),
        ("A", False),
        ("(C)", False),
        ("red", False),
        ("the answer is a", False),
        ("E", False),  # not an option: unreadable, hence wrong
        ("blue or green", False),  # two options named: not readable as one
        ("", False),
        (None, False),
    ],
)
def test_multiple_choice(answer, expected):
    assert verify(answer, "B", "multiple_choice", CHOICES).correct is expected


def test_multiple_choice_reports_how():
    assert verify("the answer is b", "B", "multiple_choice", CHOICES).extracted == "B"
    assert verify("purple", "B", "multiple_choice", CHOICES).method == "choice_unreadable"
    assert verify(None, "B", "multiple_choice", CHOICES).method == "no_answer"
    assert choice_letter("dark blue", CHOICES) == "D"  # a longer option text is not mistaken for "blue"


@pytest.mark.parametrize(
    ("answer", "reference", "expected"),
    [
        ("1,234.0", "1234", True),
        ("1234", "1,234", True),
        ("12 cm", "12", True),
        ("12", "12 cm^2", True),
        ("$12", "12", True),
        ("50%", "50", True),
        ("3.14", "3.1400", True),
        ("0.333333", "1/3", True),
        ("1/2", "0.5", True),
        ("\\frac{1}{2}", "0.5", True),
        ("0.5", "\\frac{1}{2}", True),
        ("-7", "−7", True),
        ("The area is 27 square centimetres", "27", True),
        ("about 12.00001", "12", True),
        ("13", "12", False),
        ("12.1", "12", False),
        ("1,234", "1,243", False),
        ("no idea", "4", False),
        ("\\sqrt{2}", "1.41421356", True),
        ("\\sqrt{2}", "1.5", False),
    ],
)
def test_numeric(answer, reference, expected):
    assert verify(answer, reference, "numeric").correct is expected


def test_numeric_tolerance_is_configurable():
    assert verify("100.5", "100", "numeric", tolerance=Tolerance(relative=0.01)).correct is True
    assert verify("100.5", "100", "numeric").correct is False
    assert parse_number("1,234,567.5 people") == 1234567.5 and parse_number("none") is None


@pytest.mark.parametrize(
    ("answer", "reference", "expected"),
    [
        ("\\frac{1}{2}", "0.5", True),
        ("x^2+2x+1", "(x+1)^2", True),
        ("2\\sqrt{2}", "\\sqrt{8}", True),
        ("$\\frac{\\pi}{2}$", "\\frac{\\pi}{2}", True),
        ("x = 3", "3", True),
        ("\\boxed{4}", "4", True),
        ("x^2", "x^3", False),
        ("\\pi", "3", False),
        ("garbage )(", "1", False),
    ],
)
def test_math(answer, reference, expected):
    assert verify(answer, reference, "math").correct is expected


@pytest.mark.parametrize(
    ("answer", "reference", "expected", "method"),
    [
        ("Alice", "alice", True, "exact_normalised"),
        ("The Eiffel Tower.", "eiffel tower", True, "exact_normalised"),
        ("  new   york ", "New York", True, "exact_normalised"),
        ("42", "42.0", True, "numeric"),
        ("Bob", "Alice", None, "free_form_mismatch"),
        ("a red car", "red", None, "free_form_mismatch"),
    ],
)
def test_free_form(answer, reference, expected, method):
    verdict = verify(answer, reference, "free_form")
    assert (verdict.correct, verdict.method) == (expected, method)
