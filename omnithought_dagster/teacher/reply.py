"""A model's reply read as reasoning and a final answer, in any of the forms teachers and students write: the
structured JSON object, `<think>...</think>` then the answer line, a free-text answer pattern, or `\\boxed{}`.

No config here: the training process (grpo's reward, opsd's privileged context) reads replies with it too.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from omnithought_dagster.markup import storable

_THINK = re.compile(r"<think>(.*?)</think>(.*)", re.DOTALL)


_BOXED = re.compile(r"\\boxed\{([^{}]*(?:\{[^{}]*\}[^{}]*)*)\}")


@dataclass(frozen=True)
class ParsedReply:
    reasoning: str | None
    final_answer: str | None
    form: str  # json | think | pattern | boxed | unparsed


def parse_reply(text: str | None, answer_pattern: str) -> ParsedReply:
    """Reasoning and final answer from a reply in any of the accepted forms."""
    if not text:
        return ParsedReply(None, None, "unparsed")
    stripped = text.strip()
    if stripped.startswith("{"):
        try:
            # strict=False: constrained decoders may emit raw control characters inside strings.
            data = json.loads(stripped, strict=False)
        except ValueError:
            data = None
        if isinstance(data, dict) and isinstance(data.get("final_answer"), str):
            reasoning = data.get("reasoning")
            # A `\ud800` escape decodes to a lone surrogate no UTF-8 writer takes: stored as U+FFFD (markup.storable).
            return ParsedReply(
                storable(reasoning.strip() or None) if isinstance(reasoning, str) else None, storable(_clean(data["final_answer"])), "json"
            )
    pattern = re.compile(answer_pattern)
    think = _THINK.search(stripped)
    if think:
        reasoning, rest = think.group(1).strip(), think.group(2)
        answer = _answer_in(rest, pattern) or _clean(rest)
        return ParsedReply(reasoning or None, answer, "think")
    match = pattern.search(stripped)
    if match and _clean(match.group(1)):
        return ParsedReply(stripped[: match.start()].strip() or None, _clean(match.group(1)), "pattern")
    boxed = _BOXED.findall(stripped)
    if boxed and _clean(boxed[-1]):
        return ParsedReply(stripped, _clean(boxed[-1]), "boxed")
    return ParsedReply(stripped, None, "unparsed")


def _answer_in(text: str, pattern: re.Pattern) -> str | None:
    match = pattern.search(text)
    if match and _clean(match.group(1)):
        return _clean(match.group(1))
    boxed = _BOXED.findall(text)
    return _clean(boxed[-1]) if boxed else None


def _clean(text: str | None) -> str | None:
    if text is None:
        return None
    text = text.strip().strip("*").strip()
    return text or None
