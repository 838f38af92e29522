"""Judge reply parsing and validation, pass rates, difficulty bins and agreement metrics (no model)."""

from __future__ import annotations

import json

import pytest

from omnithought_dagster.annotate.agreement import agreement, pass_rate_histogram
from omnithought_dagster.annotate.annotations import _per_sample, pass_rates
from omnithought_dagster.annotate.judge import JudgeParseError, judge_prompt, judge_schema, parse_judgement
from omnithought_dagster.annotate.taxonomy import Taxonomy
from omnithought_dagster.config import AnnotationConfig

TAX = Taxonomy.load("builtin:tags-v1")
SETTINGS = AnnotationConfig()


def _reply(**overrides):
    data = {"difficulty": 4, "verbosity": 6, "quality": 7, "tags": ["math/geometry"], "answer_correct": True, **overrides}
    return json.dumps(data)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (_reply(), (4, 6, 7, ["math/geometry"], True)),
        (
            'Here is my rating:\n{"difficulty": "5", "verbosity": 2.0, "quality": "8/9", "tags": "geometry, bar chart", '
            '"answer_correct": "no"}\nThanks.',
            (5, 2, 8, ["math/geometry", "chart/bar"], False),
        ),
        (
            "Difficulty: 3\nVerbosity: 1\nQuality: 9\nTags: counting, spatial reasoning\nAnswer_correct: yes",
            (3, 1, 9, ["counting", "spatial-relations"], True),
        ),
        (_reply(tags=["astrology", "table"], answer_correct=None), (4, 6, 7, ["table"], None)),
        (_reply(tags=["geometry", "math/geometry", "table", "counting", "chart"]), (4, 6, 7, ["math/geometry", "table", "counting"], True)),
    ],
)
def test_parse_valid_judgements(text, expected):
    j = parse_judgement(text, TAX, SETTINGS)
    assert (j.difficulty, j.verbosity, j.quality, j.tags, j.answer_correct) == expected


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "empty reply"),
        (None, "empty reply"),
        ("I cannot rate this.", "no JSON object"),
        (_reply(difficulty=12), "difficulty=12 is outside 0-9"),
        (_reply(quality=-1), "quality=-1 is outside 0-9"),
        (_reply(verbosity=6.5), "verbosity is not an integer"),
        (_reply(difficulty="hard"), "difficulty is not a number"),
        (_reply(quality=True), "quality is a boolean"),
        (json.dumps({"difficulty": 3, "verbosity": 3, "tags": ["table"]}), "missing 'quality'"),
        (_reply(tags=[]), "no tags"),
        (_reply(tags=["astrology", "cooking"]), "no tag in the taxonomy"),
        ('{"difficulty": 4, "verbosity": 6, "quality": 7, "tags": ["table"]', "does not parse"),  # truncated
    ],
)
def test_invalid_judgements_are_errors_not_guesses(text, reason):
    with pytest.raises(JudgeParseError, match=reason):
        parse_judgement(text, TAX, SETTINGS)


def test_schema_and_prompt_carry_the_taxonomy():
    schema = judge_schema(TAX, SETTINGS)
    assert schema["properties"]["tags"]["items"]["enum"] == TAX.names and schema["properties"]["quality"]["maximum"] == 9
    text = judge_prompt(SETTINGS).user_text(
        question="Q?", choices=["x", "y"], reference="B", reasoning="r" * 10_000, final_answer=None, taxonomy=TAX, settings=SETTINGS
    )
    assert "A. x\nB. y" in text and "math/geometry" in text and "Candidate final answer: (none)" in text
    assert text.count("r") < 6100  # the reasoning is cut to reasoning_max_chars


def _rows(spec):
    """spec: [(sample, correct, difficulty)]"""
    return [{"sample_id": s, "correct": c, "difficulty": d} for s, c, d in spec]


def test_pass_rates_and_sample_level_difficulty():
    rows = _rows([("a", True, 2), ("a", False, 4), ("a", True, None), ("a", True, 3), ("b", False, 8), ("b", False, 9)])
    assert pass_rates(rows) == {"a": (0.75, 4), "b": (0.0, 2)}
    _per_sample(rows, AnnotationConfig(difficulty_bins=[3.5, 6.5], pass_rate_weight=0.0))
    assert rows[0]["pass_rate"] == 0.75 and rows[0]["n_rollouts"] == 4 and rows[0]["sample_difficulty"] == 3.0
    assert {r["difficulty_label"] for r in rows[:4]} == {"easy"} and {r["difficulty_label"] for r in rows[4:]} == {"hard"}
    blended = _rows([("a", True, 2), ("a", False, 2)])
    _per_sample(blended, AnnotationConfig(pass_rate_weight=0.5))
    assert blended[0]["difficulty_score"] == 0.5 * 2 + 0.5 * 9 * 0.5  # 3.25 -> easy
    no_judge = _rows([("c", False, None)])
    _per_sample(no_judge, AnnotationConfig(pass_rate_weight=0.0))
    assert no_judge[0]["difficulty_score"] == 9.0 and no_judge[0]["difficulty_label"] == "hard"  # falls back on the pass rate


def test_agreement_metrics_see_a_judge_that_tracks_correctness_and_one_that_does_not():
    samples = {
        "a": {"source_tags": ["counting"], "source_difficulty": 1},
        "b": {"source_tags": ["table"], "source_difficulty": 2},
        "c": {"source_tags": ["chart/bar"], "source_difficulty": 3},
    }

    def row(sample, correct, quality, tags, judge_correct, difficulty):
        return {
            "sample_id": sample,
            "correct": correct,
            "quality": quality,
            "tags": tags,
            "judge_answer_correct": judge_correct,
            "verify_method": "numeric",
            "judge_error": None,
            "sample_difficulty": difficulty,
            "pass_rate": 0.5,
        }

    good = [
        row("a", True, 8, ["counting"], True, 1),
        row("b", True, 9, ["table"], True, 4),
        row("c", False, 2, ["chart/bar"], False, 7),
        row("c", False, 1, ["other"], False, 7),
    ]
    metrics = agreement(good, samples)
    assert metrics["quality_auc_vs_correct"] == 1.0 and metrics["judge_verifier_agreement"] == 1.0
    assert metrics["tag_hit_rate_vs_source"] == 0.75 and metrics["difficulty_spearman_vs_source"] == 1.0
    flat = [row("a", True, 5, ["other"], False, 5), row("b", False, 5, ["other"], True, 5), row("c", True, 5, ["other"], False, 5)]
    metrics = agreement(flat, samples)
    assert metrics["quality_auc_vs_correct"] == 0.5 and metrics["judge_verifier_agreement"] == 0.0
    assert metrics["tag_hit_rate_vs_source"] == 0.0 and metrics["difficulty_spearman_vs_source"] is None
    assert pass_rate_histogram([{"sample_id": s, "pass_rate": p} for s, p in [("a", 0), ("b", 0.25), ("c", 0.6), ("d", 1)]]) == {
        "0": 1,
        "(0.00, 0.25]": 1,
        "(0.50, 0.75]": 1,
        "1": 1,
    }
