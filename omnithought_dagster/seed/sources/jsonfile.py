"""JSON / JSONL readers: flat question-answer-image records, LLaVA conversations, ShareGPT messages.

All three read files the same way (`iter_json_records`) and differ only in how a record maps
to a question, an answer and images:

- flat:      {"id", "question", "answer", "image": "a.png" | ["a.png", ...], "choices": [...]}
             with any field renamed through the source's `fields` mapping (dotted paths allowed);
- llava:     {"id", "image": "a.png" | [...], "conversations": [{"from": "human", "value": "<image>\\nQ"},
             {"from": "gpt", "value": "A"}, ...]};
- sharegpt:  {"messages": [{"role": "user", "content": "<image>Q"}, {"role": "assistant", "content": "A"}],
             "images": ["a.png"]}  (LLaMA-Factory's layout; keys and role names configurable).

Conversations with several user turns follow the source's `multi_turn` policy: `first` keeps the
first question/answer pair (the remaining turns, and images no kept turn references, go to
`metadata.extra_turns` / `extra_turn_images`, so nothing is lost); `each` makes every user turn a
sample of its own (`turn` 1, 2, ...; native id `<id>#<turn>`) with only the images that turn
references (`conversation_records`).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from omnithought_dagster import markup
from omnithought_dagster.ids import content_id
from omnithought_dagster.seed.settings import FieldMap, JsonSourceConfig, ShareGPTSourceConfig
from omnithought_dagster.seed.sources.base import (
    Candidate,
    ImageRef,
    QuarantineReason,
    Rejected,
    SeedRecord,
    count_json_records,
    excerpt,
    expand_paths,
    files_fingerprint,
    get_path,
    iter_json_records,
    parse_guarded,
    path_head,
)
from omnithought_dagster.seed.sources.confine import check_all, source_roots

IMAGE_PLACEHOLDER = re.compile(re.escape(markup.IMAGE_PLACEHOLDER))
JSON_SUFFIXES = (".json", ".jsonl")


class _JsonReaderBase:
    """Files, record iteration and accounting shared by the JSON-based formats."""

    def __init__(self, path: str, image_root: str | None, roots: tuple[str, ...] | None = None):
        self.roots = roots  # a manifest's source reads only inside these (sources/confine.py); None: anywhere
        self.files = check_all(expand_paths(path, JSON_SUFFIXES), roots)
        self.image_root = Path(image_root) if image_root else self.files[0].parent if self.files else None

    def records(self) -> Iterator[SeedRecord]:
        index = 0
        for path in self.files:
            for record, problem in iter_json_records(path, self.roots):
                if problem is not None:
                    yield Rejected(index, None, problem[0], problem[1], excerpt(record))
                elif not isinstance(record, dict):
                    yield Rejected(
                        index, None, QuarantineReason.NOT_AN_OBJECT, f"record is a {type(record).__name__}, not an object", excerpt(record)
                    )
                else:
                    yield from parse_guarded(self.parse, index, record)
                index += 1

    def count(self) -> int:
        return sum(count_json_records(path, self.roots) for path in self.files)

    def fingerprint(self) -> str:
        return content_id("json-source", {"files": files_fingerprint(self.files), "reader": self.settings()})

    def parse(self, index: int, record: dict) -> SeedRecord | list[SeedRecord]:  # pragma: no cover - abstract
        raise NotImplementedError

    def settings(self) -> dict:  # pragma: no cover - abstract
        raise NotImplementedError


class FlatJsonReader(_JsonReaderBase):
    """`kind: json, format: flat`."""

    def __init__(self, config: JsonSourceConfig):
        super().__init__(config.path, config.image_root, source_roots(config))
        self.format = config.format
        self.fields = config.fields
        self.allowed_image_roots = config.allowed_image_roots
        self.multi_turn = config.multi_turn

    def settings(self) -> dict:
        return {
            "format": self.format,
            "fields": self.fields.model_dump(),
            "allowed_image_roots": self.allowed_image_roots,
            "multi_turn": self.multi_turn,
        }

    def parse(self, index: int, record: dict) -> SeedRecord | list[SeedRecord]:
        return candidate_from_mapping(index, record, self.fields)


class LlavaJsonReader(FlatJsonReader):
    """`kind: json, format: llava`: the id and image fields come from the field mapping."""

    def parse(self, index: int, record: dict) -> SeedRecord | list[SeedRecord]:
        return llava_records(index, record, self.fields, _image_list(get_path(record, self.fields.image)), self.multi_turn)


class ShareGPTReader(_JsonReaderBase):
    """`kind: sharegpt` (LLaMA-Factory's multimodal layout)."""

    def __init__(self, config: ShareGPTSourceConfig):
        super().__init__(config.path, config.image_root, source_roots(config))
        self.config = config

    def settings(self) -> dict:
        return self.config.model_dump(exclude={"name", "description", "path", "image_root"})

    def parse(self, index: int, record: dict) -> SeedRecord | list[SeedRecord]:
        c = self.config
        native_id = _native_id(record.get(c.id_key) if c.id_key else None, index)
        turns = record.get(c.messages_key)
        if not isinstance(turns, list) or not all(isinstance(t, dict) for t in turns):
            return Rejected(
                index, native_id, QuarantineReason.MALFORMED_RECORD, f"{c.messages_key!r} is not a list of messages", excerpt(record)
            )
        messages = [(str(t.get(c.role_key, "")).lower(), t.get(c.content_key)) for t in turns]
        return conversation_records(
            index,
            native_id,
            record,
            messages,
            user_roles={c.user_role.lower()},
            assistant_roles={c.assistant_role.lower()},
            system_roles={c.system_role.lower()},
            images=_image_list(record.get(c.images_key)),
            consumed={c.messages_key, c.images_key, c.id_key or ""},
            multi_turn=c.multi_turn,
        )


# -- mapping helpers (shared with the HF reader) -----------------------------------------------


def llava_records(index: int, record: dict, fields: FieldMap, images: list[ImageRef] | None, multi_turn: str) -> list[SeedRecord]:
    """A LLaVA record ({id, image(s), conversations: [{from, value}, ...]}) -> its samples."""
    native_id = _native_id(get_path(record, fields.id), index)
    turns = record.get("conversations")
    if not isinstance(turns, list) or not all(isinstance(t, dict) for t in turns):
        return [Rejected(index, native_id, QuarantineReason.MALFORMED_RECORD, "'conversations' is not a list of turns", excerpt(record))]
    messages = [(str(t.get("from", "")).lower(), t.get("value")) for t in turns]
    return conversation_records(
        index,
        native_id,
        record,
        messages,
        user_roles={"human", "user"},
        assistant_roles={"gpt", "assistant"},
        system_roles={"system"},
        images=images,
        consumed={"conversations", path_head(fields.id or ""), path_head(fields.image)},
        multi_turn=multi_turn,
    )


def candidate_from_mapping(index: int, record: dict, fields: FieldMap, images: list[ImageRef] | None = None) -> SeedRecord:
    """A flat record -> Candidate, through a field mapping. Unmapped fields go to metadata."""
    native_id = _native_id(get_path(record, fields.id), index)
    if images is None:
        found = get_path(record, fields.image)
        images = _image_list(found)
        if images is None:
            problem = _nothing_at(fields.image, record) if found is None else f"field {fields.image!r} is not a path or a list of paths"
            return Rejected(index, native_id, QuarantineReason.MALFORMED_RECORD, problem, excerpt(record))
    question, answer = get_path(record, fields.question), get_path(record, fields.answer)
    if question is None:
        return Rejected(
            index,
            native_id,
            QuarantineReason.EMPTY_QUESTION,
            f"question is missing: {_nothing_at(fields.question, record)}",
            excerpt(record),
        )
    if answer is None:
        return Rejected(
            index, native_id, QuarantineReason.MISSING_ANSWER, f"answer is missing: {_nothing_at(fields.answer, record)}", excerpt(record)
        )
    choices = get_path(record, fields.choices)
    if choices is not None and not isinstance(choices, list):
        return Rejected(index, native_id, QuarantineReason.MALFORMED_RECORD, f"field {fields.choices!r} is not a list", excerpt(record))
    tags = get_path(record, fields.tags)
    if isinstance(tags, str):
        tags = [tags]
    difficulty = get_path(record, fields.difficulty)
    consumed = _consumed_heads(fields)
    return Candidate(
        record_index=index,
        native_id=native_id,
        question=question,
        answer=answer,
        images=images,
        choices=choices,
        answer_type=_declared_type(record, fields),
        tags=[str(t) for t in tags] if isinstance(tags, list) else [],
        difficulty=difficulty if isinstance(difficulty, int) and not isinstance(difficulty, bool) else None,
        metadata={k: v for k, v in record.items() if k not in consumed},
        raw_excerpt=excerpt(record),
    )


@functools.lru_cache(maxsize=64)
def _consumed_heads(fields: FieldMap) -> frozenset[str]:
    """The top-level keys a mapping's paths read (left out of the metadata); computed once per mapping."""
    return frozenset(path_head(path) for path in fields.model_dump().values() if path)


def _declared_type(record: dict, fields: FieldMap) -> Any:
    """The declared answer type; a question type that declares multiple choice wins (MathVista: multi_choice + answer_type text)."""
    question_type = get_path(record, fields.question_type)
    if isinstance(question_type, str) and question_type.strip().lower().replace("-", "_") in ("multi_choice", "multiple_choice", "mcq"):
        return "multiple_choice"
    return get_path(record, fields.answer_type)


def _nothing_at(path: str, record: dict) -> str:
    return f"the field path {path!r} found nothing (the record's keys: {', '.join(sorted(map(str, record))[:12])})"


def conversation_records(
    index: int,
    native_id: str,
    record: dict,
    messages: list[tuple[str, Any]],
    *,
    user_roles: set[str],
    assistant_roles: set[str],
    system_roles: set[str],
    images: list[ImageRef] | None,
    consumed: set[str],
    multi_turn: str = "first",
) -> list[SeedRecord]:
    """A conversation -> its samples: the first user turn (`first`) or every user turn (`each`).

    A turn gets the images its own <image> placeholders reference, in order; a turn with none refers to the
    images shown before it (LLaVA puts `<image>` in the first turn and asks later turns about the same picture);
    a conversation with no placeholder at all gives every turn all of its images. More or fewer placeholders than
    images is the record's image_placeholder_mismatch: which image belongs to which turn cannot be told.
    """

    def reject(reason: QuarantineReason, detail: str) -> list[SeedRecord]:
        return [Rejected(index, native_id, reason, detail, excerpt(record))]

    if images is None:
        return reject(QuarantineReason.MALFORMED_RECORD, "images are not a path or a list of paths")
    system = [content for role, content in messages if role in system_roles]
    dialogue = [(role, content) for role, content in messages if role not in system_roles]
    if len(dialogue) < 2 or dialogue[0][0] not in user_roles or dialogue[1][0] not in assistant_roles:
        return reject(
            QuarantineReason.MALFORMED_RECORD, f"expected a user turn then an assistant turn, got roles {[r for r, _ in dialogue[:2]]}"
        )
    turns, problem = _pair_turns(dialogue, user_roles, assistant_roles, strict=multi_turn == "each")
    if problem:
        return reject(QuarantineReason.MALFORMED_RECORD, problem)
    counts = [len(IMAGE_PLACEHOLDER.findall(question)) if isinstance(question, str) else 0 for question, _ in turns]
    if multi_turn != "each":  # placeholders of the turns kept only in metadata count too
        counts += [len(IMAGE_PLACEHOLDER.findall(c)) for r, c in dialogue[2 * len(turns) :] if r in user_roles and isinstance(c, str)]
    if sum(counts) and sum(counts) != len(images):
        return reject(
            QuarantineReason.IMAGE_PLACEHOLDER_MISMATCH, f"{sum(counts)} <image> placeholders in the user turns but {len(images)} images"
        )
    turn_images = _images_by_turn(counts, images)

    metadata = {k: v for k, v in record.items() if k not in consumed}
    if system:
        metadata["system"] = system
    if multi_turn != "each":
        if len(dialogue) > 2:
            metadata["extra_turns"] = [{"role": r, "content": c} for r, c in dialogue[2:]]
        unused = [image.describe() for image in images if not any(image is shown for shown in turn_images[0])]
        if unused:
            metadata["extra_turn_images"] = unused
        turns, turn_images = turns[:1], turn_images[:1]
    else:
        metadata["turns"] = len(turns)
    out: list[SeedRecord] = []
    for number, ((question, answer), its_images) in enumerate(zip(turns, turn_images, strict=True), start=1):
        out.append(
            Candidate(
                record_index=index,
                native_id=native_id if multi_turn != "each" else f"{native_id}#{number}",
                question=IMAGE_PLACEHOLDER.sub("", question).strip() if isinstance(question, str) else question,
                answer=answer,
                images=its_images,
                metadata=metadata,
                raw_excerpt=excerpt(record),
                placeholder_count=counts[number - 1],
                turn=number,
            )
        )
    return out


def _pair_turns(
    dialogue: list[tuple[str, Any]], user_roles: set[str], assistant_roles: set[str], *, strict: bool
) -> tuple[list[tuple[Any, Any]], str | None]:
    """(question, answer) per user turn; a last user turn nobody answered has answer None (its sample is then
    missing_answer). Not strict: pairs up to the first turn out of place (the rest is metadata)."""
    pairs: list[tuple[Any, Any]] = []
    position = 0
    while position < len(dialogue):
        role, content = dialogue[position]
        if role not in user_roles:
            if not strict:
                break
            return pairs, f"turn {position + 1}: expected a user turn, got role {role!r}"
        answered = position + 1 < len(dialogue) and dialogue[position + 1][0] in assistant_roles
        if not answered and position + 1 < len(dialogue):
            if not strict:
                break
            return pairs, f"turn {position + 2}: expected an assistant turn, got role {dialogue[position + 1][0]!r}"
        pairs.append((content, dialogue[position + 1][1] if answered else None))
        position += 2
    return pairs, None


def _images_by_turn(counts: list[int], images: list[ImageRef]) -> list[list[ImageRef]]:
    if not sum(counts):
        return [list(images) for _ in counts]
    out, shown, offset = [], [], 0
    for n in counts:
        if n:
            own = images[offset : offset + n]
            offset += n
            shown += own
            out.append(own)
        else:
            out.append(list(shown))
    return out


def _image_list(value: Any) -> list[ImageRef] | None:
    """None / "" -> []; "a.png" -> [a.png]; ["a.png", ...] -> [...]; anything else -> None (malformed)."""
    if value is None or value == "":
        return []
    if isinstance(value, str):
        return [ImageRef(path=value)]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return [ImageRef(path=v) for v in value]
    return None


def _native_id(value: Any, index: int) -> str:
    if value is None or value == "":
        return f"#{index}"
    return str(value)
