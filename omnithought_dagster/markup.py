"""Text from datasets and models is data, never markup: what counts as markup, and what a boundary does with it.

Four kinds of string turn text into something else when a tokenizer, a chat template or a training
format reads them:
- `special_token`: a model's control tokens written out (`<|im_end|>`, `<|image_pad|>`, `<|eot_id|>`,
  `</s>`, `[INST]`, `<start_of_turn>`, `<｜end▁of▁sentence｜>` ...). Tokenizers read them as the
  token itself: a seed row or a teacher reasoning holding `<|im_end|>\\n<|im_start|>user` opens a turn.
- `media_placeholder`: `<image>`, `<video>`, `<audio>` - where training formats (LLaMA-Factory,
  LLaVA, ShareGPT) put media; counted by the client, expanded into visual tokens.
- `forged_delimiter`: our own trace format's `<think>` / `</think>` (an added token in Qwen3's
  vocabulary): inside a reasoning it would end the thinking early.
- `control_character`: C0/C1 controls but tab, newline and carriage return; format characters
  (zero-width, bidi overrides, soft hyphen, word joiner, BOM); private-use code points; surrogates
  and noncharacters. They do not become tokens, but they hide or reorder what a reader sees.
  U+2028 / U+2029 are line breaks of text and stay (the seed stage keeps them).

What each boundary does (README "Text is data"): our own tokenization encodes text as plain text
(`models/vl_chat.py`: only the chat template and the delimiters we write are markup); prompts for
servers whose tokenizer we do not hold get `defuse` (a word joiner inside each markup string: the
characters stay, no tokenizer matches them); the seed stage sets rows holding special tokens or
delimiters aside; curation drops, or with `curation.rules.markup: clean` keeps and `clean`s, traces
whose reasoning or answer holds any kind; the export writes no markup into any turn it did not put
there itself.

The patterns are written once and compiled for Python (`re`) and for DuckDB (RE2) from the same
parts, so the curation rules in SQL and their Python twin agree. No imports beyond the standard
library: the lmms-eval environment loads this module too.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

SPECIAL_TOKEN = "special_token"
MEDIA_PLACEHOLDER = "media_placeholder"
FORGED_DELIMITER = "forged_delimiter"
CONTROL_CHARACTER = "control_character"
KINDS = (SPECIAL_TOKEN, MEDIA_PLACEHOLDER, FORGED_DELIMITER, CONTROL_CHARACTER)
TOKEN_KINDS = (SPECIAL_TOKEN, MEDIA_PLACEHOLDER, FORGED_DELIMITER)  # the strings a tokenizer or a format reads as markup

IMAGE_PLACEHOLDER = "<image>"  # where training formats (LLaVA, LLaMA-Factory) and seed records put an image
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"  # our reply format's delimiters (curation.export)
WORD_JOINER = "\u2060"  # what `defuse` puts inside a markup string: invisible, and it joins nothing a tokenizer matches

# Special tokens: the `<|...|>` family (ChatML, Qwen, Llama 3, Phi, GLM; DeepSeek's fullwidth bars) with any name,
# then the named ones of other families. Written so that Python's re and RE2 read them the same way.
_SPECIAL_PARTS = (
    r"<[|｜][^<>|｜\x00-\x20\x7f]{1,64}[|｜]>",
    r"</?s>",
    r"<unk>",
    r"<pad>",
    r"<bos>",
    r"<eos>",
    r"<mask>",
    r"<sop>",
    r"<eop>",
    r"\[gMASK\]",
    r"\[/?INST\]",
    r"<</?SYS>>",
    r"\[/?(?:AVAILABLE_TOOLS|TOOL_CALLS|TOOL_RESULTS|IMG|IMG_BREAK|IMG_END)\]",
    r"<(?:start|end)_of_(?:turn|image)>",
    r"<image_soft_token>",
    r"<end_of_utterance>",
    r"<fake_token_around_image>",
    r"</?tool_call>",
    r"</?tool_response>",
    r"</?img>",
    r"<IMG_CONTEXT>",
    r"<im_patch>",
    r"<im_start>",
    r"<im_end>",
)
_PLACEHOLDER_PARTS = (r"<(?:image|video|audio)>",)
_DELIMITER_PARTS = (r"</?think>",)

# Control characters, as inclusive code point ranges (Unicode 15.1's Cc but \t \n \r, Cf, Co, Cs, noncharacters).
_CONTROL_RANGES = (
    (0x00, 0x08),
    (0x0B, 0x0C),
    (0x0E, 0x1F),
    (0x7F, 0x9F),
    (0xAD, 0xAD),
    (0x600, 0x605),
    (0x61C, 0x61C),
    (0x6DD, 0x6DD),
    (0x70F, 0x70F),
    (0x890, 0x891),
    (0x8E2, 0x8E2),
    (0x180E, 0x180E),
    (0x200B, 0x200F),
    (0x202A, 0x202E),
    (0x2060, 0x2064),
    (0x2066, 0x206F),
    (0xFEFF, 0xFEFF),
    (0xFFF9, 0xFFFB),
    (0x110BD, 0x110BD),
    (0x110CD, 0x110CD),
    (0x13430, 0x1343F),
    (0x1BCA0, 0x1BCA3),
    (0x1D173, 0x1D17A),
    (0xE0001, 0xE0001),
    (0xE0020, 0xE007F),
    (0xE000, 0xF8FF),
    (0xF0000, 0xFFFFD),
    (0x100000, 0x10FFFD),  # private use
    (0xFDD0, 0xFDEF),
    *((plane + 0xFFFE, plane + 0xFFFF) for plane in range(0, 0x110000, 0x10000)),  # noncharacters
)
_SURROGATES = (0xD800, 0xDFFF)  # only Python strings hold them (JSON read with surrogateescape); never UTF-8, never SQL


def _py_class(ranges) -> str:
    return "[" + "".join(f"\\U{a:08x}" if a == b else f"\\U{a:08x}-\\U{b:08x}" for a, b in ranges) + "]"


def _re2_class(ranges) -> str:
    return "[" + "".join(f"\\x{{{a:X}}}" if a == b else f"\\x{{{a:X}}}-\\x{{{b:X}}}" for a, b in ranges) + "]"


_PARTS = {SPECIAL_TOKEN: _SPECIAL_PARTS, MEDIA_PLACEHOLDER: _PLACEHOLDER_PARTS, FORGED_DELIMITER: _DELIMITER_PARTS}


def sql_pattern(kind: str) -> str:
    """The kind's pattern for DuckDB's regexp functions (RE2); `sql_shown` writes a match as `Finding.shown` does."""
    if kind == CONTROL_CHARACTER:
        return _re2_class(_CONTROL_RANGES)
    return "|".join(_PARTS[kind])


def sql_shown(kind: str, match_sql: str) -> str:
    """SQL writing a match (`match_sql`, a VARCHAR expression) the way Finding.shown does."""
    if kind == CONTROL_CHARACTER:
        return f"printf('U+%04X', unicode({match_sql}))"
    return f"chr(39) || {match_sql} || chr(39)"


def _python_pattern(kind: str) -> str:
    if kind == CONTROL_CHARACTER:
        return _py_class((*_CONTROL_RANGES, _SURROGATES))
    return "|".join(_PARTS[kind])


_PATTERNS = {kind: re.compile(_python_pattern(kind)) for kind in KINDS}
_ANY = re.compile("|".join(f"(?P<{kind}>{_python_pattern(kind)})" for kind in KINDS))
_TOKENS = re.compile("|".join(f"(?:{_python_pattern(kind)})" for kind in TOKEN_KINDS))
_C0 = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


@dataclass(frozen=True)
class Finding:
    kind: str
    text: str
    start: int

    @property
    def shown(self) -> str:
        """`'<|im_end|>'`; a control character by its code point (`U+200B`)."""
        return f"U+{ord(self.text):04X}" if self.kind == CONTROL_CHARACTER else f"'{self.text}'"

    def describe(self) -> str:
        return f"{self.shown} ({self.kind})"


def find_markup(text: str | None, kinds: Iterable[str] = KINDS, extra: Iterable[str] = ()) -> list[Finding]:
    """Every markup string in `text`, in order, of the given kinds; `extra` strings (a tokenizer's own added tokens)
    count as special tokens."""
    if not text:
        return []
    wanted = set(kinds)
    found = [Finding(match.lastgroup, match.group(), match.start()) for match in _ANY.finditer(text) if match.lastgroup in wanted]
    if SPECIAL_TOKEN in wanted:
        taken = {(f.start, f.text) for f in found}
        for token in _extra_tokens(extra):
            start = text.find(token)
            while start >= 0:
                if (start, token) not in taken:
                    found.append(Finding(SPECIAL_TOKEN, token, start))
                start = text.find(token, start + 1)
        found.sort(key=lambda f: f.start)
    return found


def markup_counts(text: str | None) -> dict[str, tuple[int, str | None]]:
    """{kind: (how many, the first one as `describe` shows it)}, each kind matched on its own (curation's rules, in SQL
    through `sql_pattern`, count the same way)."""
    counts = {}
    for kind in KINDS:
        found = _PATTERNS[kind].findall(text or "")
        counts[kind] = (len(found), Finding(kind, found[0], 0).shown if found else None)
    return counts


def first_markup(text: str | None, kinds: Iterable[str] = KINDS, extra: Iterable[str] = ()) -> Finding | None:
    found = find_markup(text, kinds, extra)
    return found[0] if found else None


def clean(text: str | None, extra: Iterable[str] = ()) -> str | None:
    """`text` with every control character and then every markup string deleted, until none is left (deleting one can
    join the pieces of another: `<|im_<|x|>end|>`). Idempotent; text without markup comes back unchanged."""
    if text is None:
        return None
    text = _PATTERNS[CONTROL_CHARACTER].sub("", text)
    tokens = _extra_tokens(extra)
    while True:
        cleaned = _TOKENS.sub("", text)
        for token in tokens:
            cleaned = cleaned.replace(token, "")
        if cleaned == text:
            return text
        text = cleaned


def defuse(text: str | None, extra: Iterable[str] = ()) -> str | None:
    """`text` for a prompt whose tokenizer we do not hold (an OpenAI-compatible server): a word joiner after the first
    character of each markup string, so no tokenizer reads one as its token while the model still reads the characters;
    C0 controls (but tab, newline, carriage return) removed - they mean nothing to a model and some servers refuse them.
    Text without markup comes back unchanged."""
    if text is None:
        return None
    text = _C0.sub("", text)
    tokens = [token for token in _extra_tokens(extra) if len(token) > 1]
    for _ in range(len(text) + 1):  # each round breaks at least one string; new ones cannot form (a joiner joins nothing)
        found = find_markup(text, TOKEN_KINDS, tokens)
        if not found:
            return text
        pieces, last = [], 0
        for finding in found:
            if finding.start < last:
                continue  # overlaps one already broken
            cut = finding.start + 1
            pieces += [text[last:cut], WORD_JOINER]
            last = cut
        text = "".join(pieces) + text[last:]
    return text


_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def storable(text: str | None) -> str | None:
    """`text` with each lone surrogate (a JSON `\\ud800` escape in a reply, undecodable bytes read with surrogateescape)
    replaced by U+FFFD: Arrow, Parquet and every UTF-8 writer refuse them, and one such reply must not fail a partition."""
    if text is None or not _LONE_SURROGATE.search(text):
        return text
    return _LONE_SURROGATE.sub("\ufffd", text)


def _extra_tokens(extra: Iterable[str]) -> list[str]:
    """A tokenizer's own added tokens that the patterns do not cover (one-character ones are found, never defused: no
    joiner can be put inside them - our encoding refuses text holding one)."""
    return sorted({token for token in extra if token and not _TOKENS.fullmatch(token)}, key=len, reverse=True)
