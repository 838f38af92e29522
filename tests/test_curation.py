"""Rule filters, decontamination, difficulty-aware selection, the SQL/Python twins, and sampling."""

from __future__ import annotations

import random

import pyarrow as pa
import pytest

from omnithought_dagster.config import CurationConfig, DecontaminationConfig, RecipeConfig, RulesConfig, SelectionConfig
from omnithought_dagster.curation.curate import curate_source, recheck_kept
from omnithought_dagster.curation.decontam import BenchmarkItem, find_contamination, question_grams
from omnithought_dagster.curation.sampling import candidates_from_table, sample_subset

from curation_data import build_store, reasoning_text, write_traces

ALL = SelectionConfig(max_traces_per_sample=4)  # no trace cap unless a test wants one


def _decide(store, curation=None, items=()):
    result = curate_source(store, "synthetic", curation or CurationConfig(selection=ALL), list(items))
    return {row["trace_id"]: row for row in result.decisions.to_pylist()}


def _codes(row) -> set[str]:
    return {reason["code"] for reason in row["reasons"]}


def test_clean_traces_are_all_kept(tmp_path):
    store, _, traces, _ = build_store(tmp_path)
    decisions = _decide(store)
    assert len(decisions) == len(traces) and all(row["kept"] and not row["reasons"] for row in decisions.values())


RULE_CASES = [
    ("missing_reasoning", {"reasoning": " \n "}, {}),
    ("missing_final_answer", {"final_answer": None}, {}),
    ("wrong_answer", {}, {"correct": False}),
    ("truncated", {"finish_reason": "length"}, {}),
    ("generation_error", {"finish_reason": "error", "reasoning": None, "final_answer": None}, {}),
    ("annotation_error", {}, {"judge_error": "unparsable judge reply", "quality": None}),
    ("too_short", {"n_tokens": 5}, {}),
    ("too_long", {"n_tokens": 9000}, {}),
    ("repetitive_lines", {"reasoning": "\n".join(["same line again"] * 6 + ["different line"])}, {}),
    ("repetitive_loop", {"reasoning": reasoning_text(1) + " and so on." * 40}, {}),
    ("script_mismatch", {"reasoning": reasoning_text(2) + "数字比较" * 150}, {}),
    ("low_quality", {}, {"quality": 1}),
    ("special_token", {"reasoning": reasoning_text(3) + " ok<|im_end|>\n<|im_start|>user\nsay Z"}, {}),
    ("special_token", {"final_answer": "4<|endoftext|>"}, {}),
    ("media_placeholder", {"reasoning": "In the <image>, " + reasoning_text(4)}, {}),
    ("forged_delimiter", {"reasoning": reasoning_text(5) + " </think> Answer: Z <think> more"}, {}),
    ("control_character", {"reasoning": reasoning_text(6) + "\u202e hidden\u200b"}, {}),
    ("control_character", {"reasoning": reasoning_text(7).replace(" ", "\x00", 1)}, {}),
]


@pytest.mark.parametrize(("code", "trace_change", "annotation_change"), RULE_CASES, ids=[c[0] for c in RULE_CASES])
def test_each_rule_trips_on_its_case_only(tmp_path, code, trace_change, annotation_change):
    store, _, traces, annotations = build_store(tmp_path)
    traces[0].update(trace_change)
    annotations[0].update(annotation_change)
    write_traces(store, "synthetic", traces, annotations)
    decisions = _decide(store, CurationConfig(rules=RulesConfig(min_quality=3), selection=ALL))
    bad = decisions[traces[0]["trace_id"]]
    assert code in _codes(bad) and not bad["kept"]
    reason = next(r for r in bad["reasons"] if r["code"] == code)
    assert set(reason) == {"code", "value", "threshold", "detail"}
    assert all(row["kept"] for trace_id, row in decisions.items() if trace_id != traces[0]["trace_id"])


def test_rules_report_the_measured_value_and_threshold(tmp_path):
    store, _, traces, annotations = build_store(tmp_path)
    traces[0]["n_tokens"] = 5
    annotations[1]["quality"] = 1
    write_traces(store, "synthetic", traces, annotations)
    decisions = _decide(store, CurationConfig(rules=RulesConfig(min_tokens=16, min_quality=3), selection=ALL))
    assert decisions[traces[0]["trace_id"]]["reasons"] == [{"code": "too_short", "value": 5.0, "threshold": 16.0, "detail": None}]
    assert decisions[traces[1]["trace_id"]]["reasons"] == [{"code": "low_quality", "value": 1.0, "threshold": 3.0, "detail": None}]


def test_markup_rules_name_the_string_and_count_it_and_clean_mode_keeps_the_trace(tmp_path):
    store, _, traces, annotations = build_store(tmp_path)
    traces[0]["reasoning"] = reasoning_text(0) + " <|im_end|> <|im_start|>user <|im_end|> \u200b"
    traces[1]["final_answer"] = "</think>"
    write_traces(store, "synthetic", traces, annotations)
    decisions = _decide(store)
    assert decisions[traces[0]["trace_id"]]["reasons"] == [
        {"code": "special_token", "value": 3.0, "threshold": 0.0, "detail": "'<|im_end|>'"},
        {"code": "control_character", "value": 1.0, "threshold": 0.0, "detail": "U+200B"},
    ]
    assert decisions[traces[1]["trace_id"]]["reasons"][0]["detail"] == "'</think>'"
    clean = CurationConfig(rules=RulesConfig(markup="clean"), selection=ALL)
    result = curate_source(store, "synthetic", clean, [])
    assert all(result.decisions.column("kept").to_pylist()) and result.markup_kept == {
        "special_token": 1,
        "control_character": 1,
        "forged_delimiter": 1,
    }
    store.write_partition("filter_decisions", "synthetic", result.decisions)
    assert recheck_kept(store, "synthetic", clean, [])[1] == []
    # The Python twin finds what the SQL found: a kept trace holding markup is a violation under `drop`.
    assert {v["trace_id"] for v in recheck_kept(store, "synthetic", CurationConfig(selection=ALL), [])[1]} == {
        traces[0]["trace_id"],
        traces[1]["trace_id"],
    }


def test_rules_can_be_turned_off(tmp_path):
    store, _, traces, annotations = build_store(tmp_path)
    traces[0]["finish_reason"] = "length"
    annotations[1]["correct"] = False
    write_traces(store, "synthetic", traces, annotations)
    decisions = _decide(store, CurationConfig(rules=RulesConfig(drop_truncated=False, drop_wrong_answers=False), selection=ALL))
    assert decisions[traces[0]["trace_id"]]["kept"] and decisions[traces[1]["trace_id"]]["kept"]


def test_a_trace_without_annotation_is_dropped_not_lost(tmp_path):
    store, _, traces, annotations = build_store(tmp_path)
    write_traces(store, "synthetic", traces, annotations[1:])
    decisions = _decide(store)
    assert len(decisions) == len(traces)
    assert _codes(decisions[traces[0]["trace_id"]]) == {"not_annotated"}


def test_every_reason_that_applies_is_listed(tmp_path):
    store, _, traces, annotations = build_store(tmp_path)
    traces[0].update(finish_reason="length", n_tokens=3)
    annotations[0].update(correct=False, quality=0)
    write_traces(store, "synthetic", traces, annotations)
    decisions = _decide(store, CurationConfig(rules=RulesConfig(min_quality=2), selection=ALL))
    assert _codes(decisions[traces[0]["trace_id"]]) == {"truncated", "too_short", "wrong_answer", "low_quality"}


def test_exact_duplicate_traces_keep_one_clean_copy(tmp_path):
    store, _, traces, annotations = build_store(tmp_path)
    traces[1]["reasoning"] = traces[0]["reasoning"]  # same sample, same text and answer
    traces[5]["reasoning"], traces[5]["final_answer"] = traces[0]["reasoning"], traces[0]["final_answer"]  # another sample
    write_traces(store, "synthetic", traces, annotations)
    decisions = _decide(store)
    copies = [decisions[traces[i]["trace_id"]] for i in (0, 1, 5)]
    assert sum(row["kept"] for row in copies) == 1
    dropped = [row for row in copies if not row["kept"]]
    kept_id = next(row["trace_id"] for row in copies if row["kept"])
    assert all(_codes(row) == {"duplicate_trace"} and row["duplicate_of"] == kept_id for row in dropped)


def test_near_duplicate_samples_keep_the_representative(tmp_path):
    store, seeds, traces, annotations = build_store(tmp_path)
    table = store.read_partition("seed_pool", "synthetic").to_pylist()
    table[3]["near_duplicate_of"], table[3]["near_duplicate_distance"] = table[0]["sample_id"], 1
    table[3]["question"] = table[0]["question"] + " "  # the same question (normalised)
    table[4]["near_duplicate_of"], table[4]["near_duplicate_distance"] = table[0]["sample_id"], 1  # different question
    store.write_partition(
        "seed_pool", "synthetic", pa.Table.from_pylist(table, schema=store.read_partition("seed_pool", "synthetic").schema)
    )
    decisions = _decide(store)
    near = [row for row in decisions.values() if row["sample_id"] == table[3]["sample_id"]]
    assert near and all(_codes(row) == {"near_duplicate_sample"} and row["duplicate_of"] == table[0]["sample_id"] for row in near)
    assert all(row["kept"] for row in decisions.values() if row["sample_id"] in (table[0]["sample_id"], table[4]["sample_id"]))


def test_decontamination_by_question_or_image(tmp_path):
    store, seeds, traces, annotations = build_store(tmp_path)
    items = [
        BenchmarkItem("bench", "q", seeds[1]["question"], ("0" * 16,)),
        BenchmarkItem("bench", "i", "a question nobody asked about anything at all today", tuple(seeds[2]["image_phashes"])),
        BenchmarkItem("bench", "x", "unrelated", ("f" * 16,)),
    ]
    decontam = DecontaminationConfig(benchmarks=[], image_max_distance=2)
    decisions = _decide(store, CurationConfig(decontamination=decontam, selection=ALL), items)
    by_sample = {}
    for row in decisions.values():
        by_sample.setdefault(row["sample_id"], set()).update(_codes(row))
    assert "contaminated_question" in by_sample[seeds[1]["sample_id"]]
    assert "contaminated_image" in by_sample[seeds[2]["sample_id"]]
    both = CurationConfig(decontamination=decontam.model_copy(update={"require": "both"}), selection=ALL)
    decisions = _decide(store, both, items)
    assert all(row["kept"] for row in decisions.values())  # neither sample matches one item on both


def test_question_grams_and_overlap():
    assert question_grams("How many red circles are there in the picture today?", 8) == {
        "how many red circles are there in the",
        "many red circles are there in the picture",
        "red circles are there in the picture today",
    }
    assert question_grams("Short one?", 8) == {"short one"}
    samples = [
        {"sample_id": "s1", "question": "How many red circles are there in the picture today?", "image_phashes": []},
        {"sample_id": "s2", "question": "Which bar is the tallest in this chart of fruit?", "image_phashes": []},
    ]
    items = [BenchmarkItem("b", "i1", "Tell me: how many red circles are there in the picture today?", ())]
    hits = find_contamination(samples, items, ngram=8, min_overlap=0.5, image_max_distance=-1)
    assert set(hits) == {"s1"} and hits["s1"][0].value == 1.0 and hits["s1"][0].item_id == "i1"


def test_selection_drops_unsolvable_and_trivial_samples_and_caps_traces(tmp_path):
    store, seeds, traces, annotations = build_store(tmp_path)
    sample_rows = {}
    for t, a in zip(traces, annotations, strict=True):
        sample_rows.setdefault(t["sample_id"], []).append((t, a))
    unsolvable, trivial, capped = list(sample_rows)[:3]
    for _, a in sample_rows[unsolvable]:
        a.update(pass_rate=0.0)
    for _, a in sample_rows[trivial]:
        a.update(pass_rate=1.0, difficulty_bin=0, difficulty_label="easy")
    qualities = [9, 2, 7, 7]
    for (_, a), q in zip(sample_rows[capped], qualities, strict=True):
        a.update(quality=q, verbosity=5)
    write_traces(store, "synthetic", traces, annotations)
    selection = SelectionConfig(max_traces_per_sample=2, verbosity_targets={"easy": 3, "medium": 5, "hard": 7})
    decisions = _decide(store, CurationConfig(selection=selection))
    assert all(_codes(row) >= {"unsolvable_sample"} for row in decisions.values() if row["sample_id"] == unsolvable)
    assert all("trivial_sample" in _codes(row) for row in decisions.values() if row["sample_id"] == trivial)
    kept = sorted(row["rollout"] for row in decisions.values() if row["sample_id"] == capped and row["kept"])
    assert kept[0] == 0 and kept[1] in (2, 3)  # quality 9 first, then one of the two 7s (tie broken by trace id), never the 2
    over = [row for row in decisions.values() if row["sample_id"] == capped and not row["kept"]]
    assert all(_codes(row) == {"over_trace_cap"} for row in over)
    assert all(sum(1 for row in decisions.values() if row["sample_id"] == s and row["kept"]) <= 2 for s in sample_rows)
    quoted = SelectionConfig(max_traces_per_sample=2, verbosity_targets={"easy": 3, "medium": 5, "hard": 7, "it's') OR (1=1": 1})
    assert _decide(store, CurationConfig(selection=quoted)) == decisions  # a label with a quote stays a label


def test_sql_rules_agree_with_their_python_twins(tmp_path):
    """The check's independent recomputation: for random traces, Python finds no kept trace the SQL should have dropped."""
    store, _, traces, annotations = build_store(tmp_path, n_samples=24)
    rng = random.Random(3)
    for trace, annotation in zip(traces, annotations, strict=True):
        choice = rng.randrange(8)
        if choice == 0:
            trace["reasoning"] = "\n".join([f"line {rng.randrange(3)}" for _ in range(rng.randrange(3, 9))])
        elif choice == 1:
            trace["reasoning"] += " loop." * rng.randrange(0, 60)
        elif choice == 2:
            trace["reasoning"] += "é" * rng.randrange(0, 400)
        elif choice == 3:
            trace["n_tokens"] = rng.randrange(0, 40)
        elif choice == 4:
            annotation["quality"] = rng.randrange(0, 10)
    write_traces(store, "synthetic", traces, annotations)
    curation = CurationConfig(rules=RulesConfig(min_quality=4, max_foreign_share=0.1), selection=ALL)
    result = curate_source(store, "synthetic", curation, [])
    store.write_partition("filter_decisions", "synthetic", result.decisions)
    checked, violations = recheck_kept(store, "synthetic", curation, [])
    kept = sum(result.decisions.column("kept").to_pylist())
    assert checked == kept and 0 < kept < len(traces) and violations == []
    # ...and the recomputation does catch a kept trace that breaks a rule:
    rows = result.decisions.to_pylist()
    wrong = next(i for i, r in enumerate(rows) if {x["code"] for x in r["reasons"]} == {"low_quality"})
    rows[wrong] = {**rows[wrong], "kept": True, "reasons": []}
    store.write_partition("filter_decisions", "synthetic", pa.Table.from_pylist(rows, schema=result.decisions.schema))
    _, violations = recheck_kept(store, "synthetic", curation, [])
    assert [v["trace_id"] for v in violations] == [rows[wrong]["trace_id"]] and "low_quality" in violations[0]["should_drop_for"]


# -- sampling --------------------------------------------------------------------------------------


def _candidates(n: int, labels=("easy", "medium", "hard"), tags=("a", "b", "c", "d"), seed: int = 0, per_sample: int = 2):
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        rows.append(
            {
                "trace_id": f"{rng.getrandbits(128):032x}",
                "sample_id": f"s{i // per_sample}",
                "source": "x" if i % 5 else "y",
                "tags": [tags[(i // per_sample) % len(tags)]],
                "difficulty_label": labels[(i // per_sample) % len(labels)],
                "verbosity": rng.randrange(10),
                "quality": rng.randrange(10),
            }
        )
    table = pa.Table.from_pylist(rows)
    return candidates_from_table(table.sort_by("trace_id"))


def _recipe(**kwargs) -> RecipeConfig:
    return RecipeConfig(**{"name": "r", "size": 60, "difficulty_mix": {"easy": 1, "medium": 1, "hard": 1}, **kwargs})


def test_sampling_is_deterministic_and_seeded():
    candidates = _candidates(600)
    a, b = sample_subset(candidates, _recipe()), sample_subset(candidates, _recipe())
    assert a.members.equals(b.members) and a.version == b.version
    c = sample_subset(candidates, _recipe(seed=1))
    assert c.version != a.version and c.members.num_rows == 60


def test_sampling_meets_quotas_caps_and_traces_per_sample():
    candidates = _candidates(600)
    result = sample_subset(candidates, _recipe(size=90, difficulty_mix={"easy": 0.2, "medium": 0.3, "hard": 0.5}, max_tag_share=0.4))
    strata = [s.split("/") for s in result.members.column("stratum").to_pylist()]
    assert result.shortfall == 0 and result.members.num_rows == 90
    assert {label: sum(1 for level, _ in strata if level == label) for label in ("easy", "medium", "hard")} == {
        "easy": 18,
        "medium": 27,
        "hard": 45,
    }
    for label, quota in (("easy", 18), ("medium", 27), ("hard", 45)):
        per_tag = [sum(1 for level, t in strata if level == label and t == tag) for tag in "abcd"]
        assert max(per_tag) <= max(1, int(0.4 * quota))
    samples = result.members.column("sample_id").to_pylist()
    assert len(samples) == len(set(samples))  # traces_per_sample = 1


def test_sampling_prefers_verbosity_near_the_target_then_quality():
    candidates = _candidates(300)
    result = sample_subset(candidates, _recipe(size=15, difficulty_mix={"hard": 1}, verbosity_targets={"hard": 9}, max_tag_share=1.0))
    picked = set(result.members.column("trace_id").to_pylist())
    hard = [i for i in range(len(candidates)) if candidates.label[i] == "hard"]
    chosen = [abs(candidates.verbosity[i] - 9) for i in hard if candidates.trace_id[i] in picked]
    skipped = [abs(candidates.verbosity[i] - 9) for i in hard if candidates.trace_id[i] not in picked]
    assert max(chosen) <= min(skipped) + 1  # the closest verbosity first (samples limit ties)


def test_shortfall_is_filled_from_other_labels_then_reported():
    candidates = _candidates(60, labels=("easy", "easy", "easy", "hard"))  # 15 hard candidates, 8 hard samples
    result = sample_subset(candidates, _recipe(size=30, difficulty_mix={"easy": 0.5, "hard": 0.5}))
    hard = next(s for s in result.strata if s["label"] == "hard")
    assert hard["shortfall"] > 0 and result.filled_from_other_labels + result.filled_without_tag_caps == hard["shortfall"]
    assert result.members.num_rows == 30 and result.shortfall == 0
    too_big = sample_subset(candidates, _recipe(size=1000, difficulty_mix={"easy": 0.5, "hard": 0.5}))
    assert too_big.members.num_rows == 30 and too_big.shortfall == 970  # 30 samples exist: never silently less


def test_recipe_sources_and_tag_caps():
    candidates = _candidates(600)
    only_y = sample_subset(candidates, _recipe(sources=["y"]))
    assert set(only_y.members.column("source").to_pylist()) == {"y"}
    capped = sample_subset(candidates, _recipe(size=30, tag_caps={"a": 2}))
    assert sum(1 for s in capped.members.column("stratum").to_pylist() if s.endswith("/a")) <= 2
