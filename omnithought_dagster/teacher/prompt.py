"""The teacher's prompt (versioned), the structured-output constraint, and the reply parser.

The prompt asks for reasoning first and a clearly delimited final answer, in the form the
constraint enforces: a JSON object {"reasoning", "final_answer"} (structured_output: json), or
`<think>...</think>` then `Answer: ...` (regex, and the free-text form for backends without
constrained decoding). The parser accepts either form from any model, plus the answer in a
configurable pattern or a \\boxed{...}.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from omnithought_dagster.markup import defuse
from omnithought_dagster.teacher.reply import ParsedReply, parse_reply  # noqa: F401 - where they were always imported from
from omnithought_dagster.teacher.settings import GenerationConfig, PromptConfig

COT_V1 = PromptConfig(
    version="cot-v1",
    system=(
        "You are an expert at visual reasoning. Study the image(s) carefully and solve the problem step by step: "
        "describe what you see that matters, reason to the result, and check it. Give the complete reasoning first, "
        "then the final answer on its own."
    ),
    user="{question}{choices}\n\n{format}",
)

FORMAT_JSON = 'Reply with a JSON object: {{"reasoning": "<your step-by-step reasoning>", "final_answer": "<{answer_kind}>"}}.'
FORMAT_TEXT = 'Think step by step inside <think> and </think>, then write "Answer: " followed by {answer_kind}.'
ANSWER_KIND = {
    "multiple_choice": "the letter of the correct option only",
    "numeric": "the number only",
    "math": "the final expression only",
    "free_form": "the answer only, as briefly as possible",
}


@dataclass(frozen=True)
class TeacherPrompt:
    config: PromptConfig
    mode: str  # json | regex | none

    @property
    def version(self) -> str:
        return self.config.version

    @property
    def text_hash(self) -> str:
        """Part of the trace id with the version: editing the text without bumping it still misses the cache."""
        text = json.dumps([self.config.system, self.config.user, self.mode, FORMAT_JSON, FORMAT_TEXT, ANSWER_KIND], sort_keys=True)
        return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()

    def user_text(self, question: str, choices: list[str], answer_type: str) -> str:
        """The user turn: the prompt's template (the project's, trusted) around the sample's text, defused - the server's
        tokenizer reads no special token, placeholder or delimiter out of a question (markup.defuse)."""
        question, choices = defuse(question), [defuse(c) for c in choices]
        options = "\n\nOptions:\n" + "\n".join(f"{chr(65 + i)}. {c}" for i, c in enumerate(choices)) if choices else ""
        kind = ANSWER_KIND.get(answer_type, ANSWER_KIND["free_form"])
        fmt = FORMAT_JSON if self.mode == "json" else FORMAT_TEXT
        return self.config.user.format(question=question, choices=options, format=fmt.format(answer_kind=kind))


def teacher_prompt(generation: GenerationConfig, mode: str) -> TeacherPrompt:
    return TeacherPrompt(generation.prompt or COT_V1, mode)


# xgrammar refuses a string schema that has both a pattern and length bounds: the pattern bounds it.
NUMBER_PATTERN = r"^-?[0-9]{1,8}(\.[0-9]{1,3})?$"


def json_schema(generation: GenerationConfig, answer_type: str = "free_form", n_choices: int = 0) -> dict:
    """The reply's JSON schema; the final answer is shaped by the answer type (option letter, number, text)."""
    return {
        "type": "object",
        "properties": {
            "reasoning": {"type": "string", "minLength": 1, "maxLength": generation.reasoning_max_chars},
            "final_answer": _answer_schema(generation, answer_type, n_choices),
        },
        "required": ["reasoning", "final_answer"],
        "additionalProperties": False,
    }


def _answer_schema(generation: GenerationConfig, answer_type: str, n_choices: int) -> dict:
    if answer_type == "multiple_choice" and n_choices:
        return {"type": "string", "enum": [chr(65 + i) for i in range(n_choices)]}
    if answer_type == "numeric":
        return {"type": "string", "pattern": NUMBER_PATTERN}
    return {"type": "string", "minLength": 1, "maxLength": generation.answer_max_chars}


def reply_regex(generation: GenerationConfig, answer_type: str = "free_form", n_choices: int = 0) -> str:
    if answer_type == "multiple_choice" and n_choices:
        answer = "[" + "".join(chr(65 + i) for i in range(n_choices)) + "]"
    elif answer_type == "numeric":
        answer = r"-?[0-9]{1,8}(\.[0-9]{1,3})?"
    else:
        answer = rf"[^\n<]{{1,{generation.answer_max_chars}}}"
    return rf"<think>[^<]{{1,{generation.reasoning_max_chars}}}</think>\nAnswer: {answer}"
