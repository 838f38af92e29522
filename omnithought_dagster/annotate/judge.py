"""The judge: its versioned prompt, the JSON schema it answers in, and a strict-but-forgiving parser.

The judge sees the problem (images, question, options, reference answer) and one candidate
solution, and rates difficulty (of the problem), verbosity and quality (of the reasoning), on
0-9 integer scales, tags the task from the taxonomy, and says whether the final answer matches
the reference. With constrained decoding the reply is that JSON object; elsewhere the parser
also finds a JSON object inside prose, or `key: value` lines. A reply that still does not
parse, or parses to out-of-range values or to no taxonomy tag, is an error - never guessed.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass

from omnithought_dagster.annotate.settings import AnnotationConfig
from omnithought_dagster.annotate.taxonomy import Taxonomy
from omnithought_dagster.markup import defuse, storable
from omnithought_dagster.teacher.settings import PromptConfig

JUDGE_V1 = PromptConfig(
    version="judge-v1",
    system=(
        "You are a meticulous grader of visual reasoning. You rate problems and candidate solutions honestly "
        "and consistently, and you reply only in the requested format."
    ),
    user=(
        "Problem:\n{question}{choices}\n\nReference answer: {reference}\n\n"
        "Candidate reasoning:\n<<<\n{reasoning}\n>>>\nCandidate final answer: {final_answer}\n\n"
        "Rate them:\n"
        "- difficulty: how cognitively demanding the problem is, 0 (trivial) to 9 (expert level);\n"
        "- verbosity: how long and detailed the reasoning is, 0 (a bare answer) to 9 (exhaustive);\n"
        "- quality: how logically sound and faithful to the image the reasoning is, 0 (nonsense) to 9 (rigorous);\n"
        "- tags: 1 to {max_tags} task labels from: {labels};\n"
        "- answer_correct: whether the candidate final answer means the same as the reference answer.\n"
        'Reply with a JSON object with the keys "difficulty", "verbosity", "quality", "tags", "answer_correct".'
    ),
)
SCORES = ("difficulty", "verbosity", "quality")
JUDGE_FENCES = ("<<<", ">>>")  # around the candidate reasoning in JUDGE_V1: what a reasoning may not write itself
_TRUE = {"true", "yes", "y", "correct", "1"}
_FALSE = {"false", "no", "n", "incorrect", "wrong", "0"}


@dataclass(frozen=True)
class JudgePrompt:
    config: PromptConfig

    @property
    def version(self) -> str:
        return self.config.version

    @property
    def text_hash(self) -> str:
        return hashlib.blake2b(json.dumps([self.config.system, self.config.user]).encode(), digest_size=8).hexdigest()

    def user_text(
        self,
        *,
        question: str,
        choices: list[str],
        reference: str,
        reasoning: str | None,
        final_answer: str | None,
        taxonomy: Taxonomy,
        settings: AnnotationConfig,
    ) -> str:
        # Every text from the dataset or the teacher is defused (markup.defuse): the judge's tokenizer reads no special
        # token, placeholder or delimiter out of it, and a reasoning cannot close the fence around it (<<< >>>).
        def text(value: str) -> str:
            return defuse(value, JUDGE_FENCES)

        options = "\nOptions:\n" + "\n".join(f"{chr(65 + i)}. {text(c)}" for i, c in enumerate(choices)) if choices else ""
        reasoning = (reasoning or "(none)")[: settings.reasoning_max_chars]
        return self.config.user.format(
            question=text(question),
            choices=options,
            reference=text(reference),
            reasoning=text(reasoning),
            final_answer=text(final_answer or "(none)"),
            labels=", ".join(taxonomy.names),
            max_tags=settings.max_tags,
        )


def judge_prompt(settings: AnnotationConfig) -> JudgePrompt:
    return JudgePrompt(settings.prompt or JUDGE_V1)


def judge_schema(taxonomy: Taxonomy, settings: AnnotationConfig) -> dict:
    score = {"type": "integer", "minimum": 0, "maximum": 9}
    return {
        "type": "object",
        "properties": {
            **{name: score for name in SCORES},
            "tags": {"type": "array", "items": {"type": "string", "enum": taxonomy.names}, "minItems": 1, "maxItems": settings.max_tags},
            "answer_correct": {"type": "boolean"},
        },
        "required": [*SCORES, "tags", "answer_correct"],
        "additionalProperties": False,
    }


@dataclass(frozen=True)
class Judgement:
    difficulty: int
    verbosity: int
    quality: int
    tags: list[str]  # taxonomy labels
    raw_tags: list[str]  # as the judge wrote them
    answer_correct: bool | None


class JudgeParseError(ValueError):
    """The reply could not be read as a valid judgement; the message says why."""


def parse_judgement(text: str | None, taxonomy: Taxonomy, settings: AnnotationConfig) -> Judgement:
    if not text or not text.strip():
        raise JudgeParseError("empty reply")
    data = _json_object(text)
    if data is None and "{" in text:
        raise JudgeParseError(f"the JSON object in the reply does not parse (truncated?): {text[-60:]!r}")
    data = data or _key_values(text)
    if not data:
        raise JudgeParseError(f"no JSON object or key: value lines in the reply: {text[:80]!r}")
    scores = {}
    for name in SCORES:
        if name not in data:
            raise JudgeParseError(f"missing {name!r}")
        scores[name] = _score(name, data[name])
    raw_tags = [storable(tag) for tag in _tag_list(data.get("tags"))]  # a `\ud800` escape: U+FFFD, never an unwritable row
    if not raw_tags:
        raise JudgeParseError("no tags")
    labels, mappings = taxonomy.map_tags(raw_tags, settings.tag_min_similarity, settings.max_tags)
    if not labels:
        raise JudgeParseError(f"no tag in the taxonomy: {raw_tags} ({', '.join(m.how for m in mappings)})")
    return Judgement(**scores, tags=labels, raw_tags=raw_tags, answer_correct=_boolean(data.get("answer_correct")))


def _json_object(text: str) -> dict | None:
    start, end = text.find("{"), text.rfind("}")
    if start < 0 or end <= start:
        return None
    try:
        data = json.loads(text[start : end + 1], strict=False)
    except ValueError:
        return None
    return {str(k).strip().lower(): v for k, v in data.items()} if isinstance(data, dict) else None


def _key_values(text: str) -> dict:
    data = {}
    for match in re.finditer(r"(?im)^\W*(difficulty|verbosity|quality|tags|answer_correct)\W*[:=]\s*(.+?)\s*$", text):
        data.setdefault(match.group(1).lower(), match.group(2))
    return data


def _score(name: str, value) -> int:
    if isinstance(value, bool):
        raise JudgeParseError(f"{name} is a boolean, not a 0-9 score")
    if isinstance(value, str):
        match = re.fullmatch(r"\s*(-?\d+(?:\.0+)?)\s*(?:/\s*9|/\s*10)?\s*", value)
        if not match:
            raise JudgeParseError(f"{name} is not a number: {value[:20]!r}")
        value = float(match.group(1))
    if not isinstance(value, (int, float)) or float(value) != int(value):
        raise JudgeParseError(f"{name} is not an integer: {value!r}")
    if not 0 <= int(value) <= 9:
        raise JudgeParseError(f"{name}={int(value)} is outside 0-9")
    return int(value)


def _tag_list(value) -> list[str]:
    if isinstance(value, str):
        value = [part for part in re.split(r"[,;\[\]\"']+", value) if part.strip()]
    if not isinstance(value, list):
        return []
    return [str(v).strip() for v in value if str(v).strip()]


def _boolean(value) -> bool | None:
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        word = value.strip().strip(".").lower()
        return True if word in _TRUE else False if word in _FALSE else None
    return None
