"""Teacher pieces without a model: reply parsing, prompt versions in trace ids, the result cache."""

from __future__ import annotations

import json

import pytest

from omnithought_dagster.config import GenerationConfig, PromptConfig
from omnithought_dagster.ids import content_id, shard_keys, shard_of
from omnithought_dagster.llm.backends import image_data_url
from omnithought_dagster.store import CorpusStore
from omnithought_dagster.teacher.prompt import COT_V1, TeacherPrompt, json_schema, parse_reply, reply_regex, teacher_prompt
from omnithought_dagster.teacher.traces import constraint, sampling_params, trace_id

PATTERN = GenerationConfig().answer_pattern


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('{"reasoning": "two plus two", "final_answer": "4"}', ("two plus two", "4", "json")),
        ('{"reasoning":"a\x0cb","final_answer":" B "}', ("a\x0cb", "B", "json")),  # raw control chars from constrained decoding
        ("<think>count the dots: 3</think>\nAnswer: 3", ("count the dots: 3", "3", "think")),
        ("<think>so it is C</think>\n\nThe final answer is **C**.", ("so it is C", "C", "think")),
        ("<think>long</think> final answer: 12 cm", ("long", "12 cm", "think")),
        ("We add 2 and 2.\nFinal Answer: 4", ("We add 2 and 2.", "4", "pattern")),
        ("the area is \\boxed{\\frac{1}{2}} units", ("the area is \\boxed{\\frac{1}{2}} units", "\\frac{1}{2}", "boxed")),
        ("I am not sure what this is", ("I am not sure what this is", None, "unparsed")),
        ('{"reasoning": "cut off', ('{"reasoning": "cut off', None, "unparsed")),
        ("", (None, None, "unparsed")),
        (None, (None, None, "unparsed")),
    ],
)
def test_parse_reply_accepts_every_form(text, expected):
    parsed = parse_reply(text, PATTERN)
    assert (parsed.reasoning, parsed.final_answer, parsed.form) == expected


def test_custom_answer_pattern():
    assert parse_reply("blah\nRESULT => 42", r"RESULT => (\d+)").final_answer == "42"


def test_prompt_renders_choices_and_format():
    prompt = TeacherPrompt(COT_V1, "json")
    text = prompt.user_text("Which is red?", ["apple", "sky"], "multiple_choice")
    assert "Options:\nA. apple\nB. sky" in text and '"final_answer"' in text and "letter of the correct option" in text
    assert "<think>" in TeacherPrompt(COT_V1, "regex").user_text("Q", [], "numeric")


def test_trace_ids_change_with_teacher_prompt_sampling_and_rollout():
    generation = GenerationConfig()
    prompt = teacher_prompt(generation, "json")
    sampling = sampling_params(generation, "json")
    base = trace_id("s" * 32, "teacher-a", prompt, sampling, 0)
    assert base == trace_id("s" * 32, "teacher-a", prompt, sampling, 0)
    assert base != trace_id("s" * 32, "teacher-b", prompt, sampling, 0)
    assert base != trace_id("s" * 32, "teacher-a", prompt, sampling, 1)
    assert base != trace_id("s" * 32, "teacher-a", prompt, sampling_params(generation.model_copy(update={"temperature": 0.2}), "json"), 0)
    v2 = TeacherPrompt(PromptConfig(version="cot-v2", system=COT_V1.system, user=COT_V1.user), "json")
    edited = TeacherPrompt(PromptConfig(version="cot-v1", system=COT_V1.system + " Be brief.", user=COT_V1.user), "json")
    assert len({base, trace_id("s" * 32, "teacher-a", v2, sampling, 0), trace_id("s" * 32, "teacher-a", edited, sampling, 0)}) == 3


def test_constraints_follow_the_config_and_the_answer_type():
    generation = GenerationConfig(reasoning_max_chars=300, answer_max_chars=24)
    schema = json_schema(generation)
    assert schema["properties"]["reasoning"]["maxLength"] == 300 and schema["required"] == ["reasoning", "final_answer"]
    assert schema["properties"]["final_answer"]["maxLength"] == 24
    assert json_schema(generation, "multiple_choice", 3)["properties"]["final_answer"]["enum"] == ["A", "B", "C"]
    assert "pattern" in json_schema(generation, "numeric")["properties"]["final_answer"]
    assert "{1,300}" in reply_regex(generation) and "{1,24}" in reply_regex(generation)
    assert reply_regex(generation, "multiple_choice", 2).endswith("Answer: [AB]")
    # The constraint is part of the trace id: a sample's answer type shapes its traces.
    sampling = sampling_params(generation, "json")
    prompt = teacher_prompt(generation, "json")
    mc = {**sampling, **constraint(generation, "json", {"answer_type": "multiple_choice", "choices": ["x", "y"]})}
    free = {**sampling, **constraint(generation, "json", {"answer_type": "free_form", "choices": []})}
    assert trace_id("s" * 32, "t", prompt, mc, 0) != trace_id("s" * 32, "t", prompt, free, 0)


def test_shards_are_stable_hash_buckets():
    ids = [content_id("sample", i) for i in range(200)]
    counts = [sum(shard_of(i, 4) == s for i in ids) for s in range(4)]
    assert min(counts) > 25  # roughly balanced
    assert [shard_of(i, 4) for i in ids] == [shard_of(i, 4) for i in ids]
    assert shard_keys(3) == ["000", "001", "002"] and shard_keys(1500)[-1] == "1499"


def test_image_data_url_names_the_format():
    assert image_data_url(b"\x89PNG\r\n\x1a\nxxx").startswith("data:image/png;base64,")
    assert image_data_url(b"\xff\xd8\xff\xe0xx").startswith("data:image/jpeg;base64,")


def test_result_cache_appends_loads_and_compacts(tmp_path):
    cache = CorpusStore(str(tmp_path)).cache("generation")
    partition = {"source": "s", "shard": "000"}
    assert cache.load(partition) == {}
    assert cache.append(partition, [("k1", {"text": "a"}), ("k2", {"text": "b"})]) == 2
    assert cache.append(partition, [("k2", {"text": "newer"})]) == 1
    assert cache.append(partition, []) == 0
    assert cache.batch_count(partition) == 2
    assert cache.load(partition) == {"k1": {"text": "a"}, "k2": {"text": "newer"}}
    cache.compact(partition)
    assert cache.batch_count(partition) == 1
    assert cache.load(partition) == {"k1": {"text": "a"}, "k2": {"text": "newer"}}
    assert cache.load({"source": "s", "shard": "001"}) == {}
    files = list((tmp_path / "cache/generation/source=s/shard=000").iterdir())
    assert len(files) == 1 and files[0].suffix == ".parquet"
    assert json.loads(json.dumps(cache.load(partition)))  # payloads are plain JSON
