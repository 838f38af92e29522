"""Text from datasets and models is data, never markup: property-based tests over generated hostile text.

The text mixes special tokens of several model families, media placeholders, our reply format's delimiters, every
Unicode line and paragraph separator, control and format characters, private-use code points and lone surrogates,
and pushes it through each boundary: the markup policy itself (and its SQL twin), the teacher's and the judge's reply
parsers and prompts, the export's pre-flight (against a tokenizer that reads markup the way a client does), our
plain-text encoding for training, and the reading of lmms-eval's per-sample output.
"""

from __future__ import annotations

import json
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from omnithought_dagster import markup
from omnithought_dagster.markup import KINDS, TOKEN_KINDS, WORD_JOINER, clean, defuse, find_markup, markup_counts, storable

SPECIALS = [
    "<|im_end|>",
    "<|im_start|>",
    "<|image_pad|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|endoftext|>",
    "<|eot_id|>",
    "<|start_header_id|>",
    "</s>",
    "<s>",
    "[INST]",
    "[/INST]",
    "<start_of_turn>",
    "<｜end▁of▁sentence｜>",
    "<tool_call>",
]
PLACEHOLDERS = ["<image>", "<video>", "<audio>"]
DELIMITERS = ["<think>", "</think>", "\n</think>\n\nAnswer: ", "Answer: Z", "<<<", ">>>", "{", "}", '"', "\\"]
SEPARATORS = ["\n", "\r", "\r\n", "\u2028", "\u2029", "\x85", "\x0b", "\x0c", "\x1c", "\x1d", "\x1e"]
CONTROLS = ["\x00", "\x07", "\x7f", "\u200b", "\u200d", "\u202e", "\u2066", "\ufeff", "\u2060", "\u00ad", "\ue000", "\U000f0000"]
SURROGATES = ["\ud800", "\udcff"]
PIECES = SPECIALS + PLACEHOLDERS + DELIMITERS + SEPARATORS + CONTROLS + ["<", "|", ">", "im_end", "image"]


def hostile_text(surrogates: bool = True, max_pieces: int = 14) -> st.SearchStrategy[str]:
    pieces = PIECES + (SURROGATES if surrogates else [])
    return st.lists(st.one_of(st.sampled_from(pieces), st.text(max_size=6)), max_size=max_pieces).map("".join)


# -- the policy ----------------------------------------------------------------------------------------------------


@given(hostile_text())
@settings(deadline=None, max_examples=300)
def test_clean_leaves_no_markup_and_is_idempotent(text):
    cleaned = clean(text)
    assert find_markup(cleaned) == [] and clean(cleaned) == cleaned
    if not find_markup(text):
        assert cleaned == text


@given(hostile_text())
@settings(deadline=None, max_examples=300)
def test_defuse_leaves_no_token_a_tokenizer_matches_and_keeps_every_character(text):
    defused = defuse(text)
    assert find_markup(defused, TOKEN_KINDS) == []
    without_c0 = re.sub(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]", "", text)
    assert defused.replace(WORD_JOINER, "") == without_c0.replace(WORD_JOINER, "")
    if not find_markup(without_c0, TOKEN_KINDS):
        assert defused == without_c0


@given(st.lists(hostile_text(surrogates=False), min_size=1, max_size=20))
@settings(deadline=None, max_examples=60, suppress_health_check=[HealthCheck.too_slow])
def test_the_sql_patterns_count_what_the_python_twin_counts(texts):
    """Curation's rules run in DuckDB (RE2); its checks recompute them in Python: both must see the same markup."""
    import duckdb

    con = duckdb.connect()
    columns = ", ".join(f"len(regexp_extract_all(t, ?)), {markup.sql_shown(kind, 'regexp_extract(t, ?)')}" for kind in KINDS)
    params = [p for kind in KINDS for p in (markup.sql_pattern(kind), markup.sql_pattern(kind))]
    for text in texts:
        row = con.execute(f"SELECT {columns} FROM (SELECT ?::VARCHAR AS t)", [*params, text]).fetchone()
        sql = {kind: (row[2 * i], row[2 * i + 1] if row[2 * i] else None) for i, kind in enumerate(KINDS)}
        assert sql == markup_counts(text), text


@given(hostile_text())
@settings(deadline=None)
def test_storable_text_is_valid_unicode(text):
    stored = storable(text)
    stored.encode("utf-8")  # never raises
    assert len(stored) == len(text)


# -- the teacher's and the judge's replies and prompts -------------------------------------------------------------


@given(hostile_text(), hostile_text(max_pieces=4))
@settings(deadline=None, max_examples=200)
def test_teacher_replies_parse_without_raising_and_keep_json_strings_whole(reasoning, answer):
    from omnithought_dagster.config import GenerationConfig
    from omnithought_dagster.teacher.prompt import parse_reply

    pattern = GenerationConfig().answer_pattern
    for reply in (
        reasoning,
        json.dumps({"reasoning": reasoning, "final_answer": answer}, ensure_ascii=False),
        json.dumps({"reasoning": reasoning, "final_answer": answer}),
        f"<think>{reasoning}</think>\nAnswer: {answer}",
    ):
        parsed = parse_reply(storable(reply), pattern)  # what the backend hands over (ensure_ascii: surrogates as escapes)
        assert parsed.form in ("json", "think", "pattern", "boxed", "unparsed")
        f"{parsed.reasoning}{parsed.final_answer}".encode()  # writable: no lone surrogate out of a JSON escape
    parsed = parse_reply(storable(json.dumps({"reasoning": reasoning, "final_answer": answer}, ensure_ascii=False)), pattern)
    if answer.strip().strip("*").strip():
        assert parsed.form == "json" and parsed.reasoning == (storable(reasoning).strip() or None)


@given(hostile_text(max_pieces=6), st.sampled_from(["multiple_choice", "numeric", "math", "free_form"]))
@settings(deadline=None, max_examples=150)
def test_answers_are_verified_without_raising(answer, answer_type):
    from omnithought_dagster.curation.verify import verify

    verdict = verify(storable(answer), "B" if answer_type == "multiple_choice" else "4", answer_type, ["red", "blue"])
    assert verdict.correct in (True, False, None)


@given(hostile_text())
@settings(deadline=None, max_examples=200)
def test_judge_replies_raise_only_their_parse_error(reply):
    from omnithought_dagster.annotate.judge import JudgeParseError, parse_judgement
    from omnithought_dagster.annotate.taxonomy import Taxonomy
    from omnithought_dagster.config import AnnotationConfig

    settings_ = AnnotationConfig()
    taxonomy = Taxonomy.load(settings_.taxonomy)
    for text in (
        reply,
        '{"difficulty": 3, "verbosity": 2, "quality": 5, "tags": ["counting"], "answer_correct": true, "x": "' + reply + '"}',
        json.dumps({"difficulty": 3, "verbosity": 2, "quality": 5, "tags": ["counting", reply], "answer_correct": True}),
    ):
        try:
            judgement = parse_judgement(storable(text), taxonomy, settings_)
        except JudgeParseError:
            continue
        "".join(judgement.raw_tags + judgement.tags).encode("utf-8")  # writable


@given(hostile_text(), hostile_text(max_pieces=5))
@settings(deadline=None, max_examples=150)
def test_prompts_for_servers_carry_no_markup_from_the_data(question, reasoning):
    from omnithought_dagster.annotate.judge import JUDGE_FENCES, JUDGE_V1, JudgePrompt
    from omnithought_dagster.annotate.taxonomy import Taxonomy
    from omnithought_dagster.config import AnnotationConfig
    from omnithought_dagster.teacher.prompt import COT_V1, TeacherPrompt

    teacher = TeacherPrompt(COT_V1, "none").user_text(question, [question], "free_form")
    template = TeacherPrompt(COT_V1, "none").user_text("", [""], "free_form")
    # Only the project's own template may hold markup-like text (it names the <think> tags it asks for).
    assert len(find_markup(teacher, TOKEN_KINDS)) == len(find_markup(template, TOKEN_KINDS))
    settings_ = AnnotationConfig()
    taxonomy = Taxonomy.load(settings_.taxonomy)
    judge = JudgePrompt(JUDGE_V1).user_text(
        question=question,
        choices=[],
        reference=question,
        reasoning=reasoning,
        final_answer=reasoning,
        taxonomy=taxonomy,
        settings=settings_,
    )
    assert find_markup(judge, TOKEN_KINDS) == []
    body = judge.split("Candidate reasoning:\n<<<\n", 1)[1].split("\n>>>\nCandidate final answer:", 1)
    assert len(body) == 2 and not any(fence in body[0] for fence in JUDGE_FENCES)  # the reasoning cannot close its fence


# -- the export, read as a client reads it -------------------------------------------------------------------------


class _Images:
    def exists(self, image_id):
        return True


class _Store:
    images = _Images()


@given(
    hostile_text(surrogates=False),
    hostile_text(surrogates=False, max_pieces=4),
    hostile_text(surrogates=False, max_pieces=6),
    st.booleans(),
)
@settings(deadline=None, max_examples=200, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
def test_an_exported_example_holds_no_markup_a_client_reads(student_tokenizer, reasoning, answer, question, clean_markup):
    """What the pre-flight lets through, a client that tokenizes whole turns with special tokens parsed (LLaMA-Factory)
    reads with exactly one image token per image and no added token in the reply but our two delimiters."""
    from omnithought_dagster.curation.export import _problem, assistant_text, user_text

    vl = student_tokenizer
    if clean_markup:
        reasoning, answer = clean(reasoning), clean(answer)
    example = {
        "id": "t",
        "image_ids": ["i"],
        "reasoning": reasoning,
        "final_answer": answer,
        "user": user_text(question, [], 1),
        "question": user_text(question, [], 0),
        "assistant": assistant_text(reasoning, answer),
    }
    problem, _ = _problem(_Store(), example, vl, tuple(vl.added_tokens), None)
    if problem is not None:
        assert problem[0] in ("markup_in_text", "image_placeholder_mismatch")
        return
    turns = example["user"] + example["assistant"]
    assert turns.count("<image>") == 1
    reply_ids = vl.tokenizer(example["assistant"], add_special_tokens=False)["input_ids"]
    added = [vl.tokenizer.convert_ids_to_tokens(i) for i in reply_ids if i in vl.added_ids]
    assert added == ["<think>", "</think>"]
    user_ids = vl.tokenizer(example["user"], add_special_tokens=False)["input_ids"]
    assert not vl.added_ids.intersection(user_ids)


# -- our own encoding for training ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def student_tokenizer(tmp_path_factory):
    from omnithought_dagster.models.tiny import TINY_STUDENT, build_tiny_model
    from omnithought_dagster.models.vl_chat import VLTokenizer

    return VLTokenizer.load(build_tiny_model(TINY_STUDENT, tmp_path_factory.mktemp("models") / TINY_STUDENT.name))


@given(hostile_text(surrogates=False))
@settings(deadline=None, max_examples=200, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_plain_text_is_its_characters_and_never_a_token(student_tokenizer, text):
    vl = student_tokenizer
    ids = vl.plain_ids(text)
    assert not vl.added_ids.intersection(ids)
    assert vl.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False) == text


def test_a_one_character_added_token_is_refused_not_looped_on(student_tokenizer):
    """No cut can break a one-character added token: the text is refused (the example set aside), never a hang."""
    from omnithought_dagster.models.vl_chat import MarkupError, VLTokenizer

    vl = student_tokenizer
    tokenizer = type(vl.tokenizer).from_pretrained(vl.tokenizer.name_or_path)
    tokenizer.add_tokens(["§"])
    one = VLTokenizer(tokenizer, vl.image_processor, vl.image_token_id)
    with pytest.raises(MarkupError, match="one-character added token"):
        one.plain_ids("see § 3 <|im_end|>")
    assert one.plain_ids("no such token <|im_end|>") == vl.plain_ids("no such token <|im_end|>")
    assert defuse("a § b", ["§"]) == "a § b" and find_markup("a § b", extra=["§"])[0].text == "§"


@given(hostile_text(surrogates=False), hostile_text(surrogates=False, max_pieces=6))
@settings(deadline=None, max_examples=120, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
def test_a_training_example_labels_only_the_reply_and_its_own_delimiters(student_tokenizer, reasoning, question):
    """Whatever the texts hold, the label span carries no special or added token but <think>, </think> and the final
    end of turn, and the prompt exactly one image token per visual token; or the example is set aside with a reason."""
    from PIL import Image

    from omnithought_dagster.curation.export import assistant_text, conversation, user_text
    from omnithought_dagster.models.vl_chat import ImageTokensError, MarkupError

    vl = student_tokenizer
    record = {
        "messages": [
            {"role": "user", "content": user_text(question, [], 1)},
            {"role": "assistant", "content": assistant_text(reasoning, "4")},
        ],
        "images": ["a.png"],
    }
    try:
        messages, _ = conversation(record)
        encoded = vl.encode_example(messages, [Image.new("RGB", (56, 56), (10, 200, 30))])
    except (MarkupError, ImageTokensError) as exc:  # what build_index sets aside (markup_in_text, image_token_mismatch)
        assert find_markup(reasoning, ["forged_delimiter"]) or "<image>" in question, exc
        return
    labels = [i for i in encoded["labels"] if i != -100]
    specials = [vl.tokenizer.convert_ids_to_tokens(i) for i in labels if i in vl.added_ids]
    assert specials == ["<think>", "</think>", "<|im_end|>"]
    prompt = encoded["input_ids"][: len(encoded["input_ids"]) - len(labels)]
    grid = encoded["vision"]["image_grid_thw"]
    assert prompt.count(vl.image_token_id) == int(grid.prod()) // vl.image_processor.merge_size**2


# -- reading what the evaluator wrote --------------------------------------------------------------------------------


@given(
    st.lists(hostile_text(max_pieces=8), min_size=1, max_size=6),
    st.lists(st.sampled_from(["", "{", "[1]", '{"doc_id": 0}', "\u2028"]), max_size=3),
)
@settings(deadline=None, max_examples=80, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_per_sample_records_are_read_whole_whatever_the_replies_hold(tmp_path_factory, replies, garbage):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from omnithought_dagster.evaluation.run import parse_results
    from omnithought_dagster.evaluation.task_utils import extract_answer
    from omnithought_dagster.evaluation.tasks import LocalTask

    folder = tmp_path_factory.mktemp("eval")
    n = len(replies)
    (folder / "task").mkdir()
    pq.write_table(
        pa.table({"doc_id": [f"s{i}" for i in range(n)], "tag": ["t"] * n, "answer": ["4"] * n}), folder / "task" / "data.parquet"
    )
    run = folder / "out" / "model"
    run.mkdir(parents=True)
    (run / "r_results.json").write_text(
        json.dumps({"results": {"omnithought_h": {"accuracy,none": 0.5}}, "n-samples": {"omnithought_h": {"original": n, "effective": n}}})
    )
    # As a JSON writer with ensure_ascii off writes them: every character raw but lone surrogates, which only an escape can carry.
    lines = [
        re.sub(
            "[\ud800-\udfff]",
            lambda m: f"\\u{ord(m.group()):04x}",
            json.dumps({"doc_id": i, "target": "4", "resps": [[reply]], "accuracy": float(i % 2)}, ensure_ascii=False),
        )
        for i, reply in enumerate(replies)
    ]
    body = "\n".join(lines + garbage) + "\n"
    (run / "r_samples_omnithought_h.jsonl").write_bytes(body.encode("utf-8") + b"\xff\xfe not utf-8\n")
    entry = parse_results(folder / "out", ["omnithought_h"], {"omnithought_h": LocalTask("h", "omnithought_h", folder / "task", n, "v")})
    [entry] = entry.values()
    # what a JSON reader reads from each line (an escaped high surrogate then low one is one character, as in any JSON)
    assert [s["response"] for s in entry.samples] == [storable(json.loads(line)["resps"][0][0]) for line in lines]
    assert [s["correct"] for s in entry.samples] == [bool(i % 2) for i in range(n)] and entry.score == sum(i % 2 for i in range(n)) / n
    pa.Table.from_pylist(entry.samples)  # storable: no lone surrogate reaches Arrow
    for reply in replies:
        extract_answer(reply)
