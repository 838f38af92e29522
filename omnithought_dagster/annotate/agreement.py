"""How far the two kinds of evidence agree, and how the judge compares with ground truth.

A judge whose quality scores do not track verified correctness (AUC near 0.5), whose
answer_correct disagrees with the verifier, or whose tags miss a source's ground-truth tags,
is one whose annotations should not drive selection; these numbers make that visible.
"""

from __future__ import annotations

from collections import Counter
from statistics import mean


def agreement(rows: list[dict], samples: dict[str, dict]) -> dict[str, float | int | None]:
    judged = [r for r in rows if r["judge_error"] is None]
    correct_q = [r["quality"] for r in judged if r["correct"]]
    wrong_q = [r["quality"] for r in judged if not r["correct"]]
    decided = [r for r in judged if r["judge_answer_correct"] is not None and r["verify_method"] not in ("judge", "no_answer")]
    with_truth = [r for r in judged if samples.get(r["sample_id"], {}).get("source_tags")]
    per_sample = {r["sample_id"]: r["sample_difficulty"] for r in judged if r["sample_difficulty"] is not None}
    truth = [(d, samples[s]["source_difficulty"]) for s, d in per_sample.items() if samples.get(s, {}).get("source_difficulty") is not None]
    return {
        "quality_auc_vs_correct": _auc(correct_q, wrong_q),
        "mean_quality_correct": round(mean(correct_q), 3) if correct_q else None,
        "mean_quality_incorrect": round(mean(wrong_q), 3) if wrong_q else None,
        "judge_verifier_agreement": round(sum(r["judge_answer_correct"] == r["correct"] for r in decided) / len(decided), 4)
        if decided
        else None,
        "judge_verifier_compared": len(decided),
        "tag_hit_rate_vs_source": round(
            sum(bool(set(r["tags"]) & set(samples[r["sample_id"]]["source_tags"])) for r in with_truth) / len(with_truth), 4
        )
        if with_truth
        else None,
        "difficulty_spearman_vs_source": _spearman(truth),
    }


def distributions(rows: list[dict]) -> dict[str, Counter]:
    judged = [r for r in rows if r["judge_error"] is None]
    return {
        "difficulty": Counter(str(r["difficulty"]) for r in judged),
        "verbosity": Counter(str(r["verbosity"]) for r in judged),
        "quality": Counter(str(r["quality"]) for r in judged),
        "tags": Counter(t for r in judged for t in r["tags"]),
        "difficulty_label": Counter(r["difficulty_label"] for r in rows),
        "verify_method": Counter(r["verify_method"] for r in rows),
    }


# The buckets pass_rate_histogram uses, in order.
PASS_RATE_BUCKETS = ["0", "(0.00, 0.25]", "(0.25, 0.50]", "(0.50, 0.75]", "(0.75, 1.00]", "1"]


def pass_rate_histogram(rows: list[dict]) -> Counter:
    """Samples per pass-rate bucket (PASS_RATE_BUCKETS: 0, (0, .25], ..., 1)."""
    rates = {r["sample_id"]: r["pass_rate"] for r in rows}

    def bucket(rate: float) -> str:
        if rate == 0:
            return "0"
        if rate == 1:
            return "1"
        upper = min(1.0, -(-rate * 4 // 1) / 4)
        return f"({upper - 0.25:.2f}, {upper:.2f}]"

    return Counter(bucket(rate) for rate in rates.values())


def _auc(positives: list[float], negatives: list[float]) -> float | None:
    """Probability that a correct trace's quality beats an incorrect one's (ties count half)."""
    if not positives or not negatives:
        return None
    from scipy.stats import mannwhitneyu

    u = mannwhitneyu(positives, negatives, alternative="two-sided").statistic
    return round(float(u) / (len(positives) * len(negatives)), 4)


def _spearman(pairs: list[tuple[float, float]]) -> float | None:
    if len(pairs) < 3 or len({a for a, _ in pairs}) < 2 or len({b for _, b in pairs}) < 2:
        return None
    from scipy.stats import spearmanr

    return round(float(spearmanr([a for a, _ in pairs], [b for _, b in pairs]).statistic), 4)
