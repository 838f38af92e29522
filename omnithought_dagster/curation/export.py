"""Export a subset as training data for VLM trainers, after a pre-flight that sets aside what a client would misread.

Formats (each example: the images, a user turn with one `<image>` placeholder per image then
the question and options, and the assistant turn - the teacher's reasoning and final answer in
the structured form `<think>\\n...\\n</think>\\n\\nAnswer: ...`):
- sharegpt:     data.json - [{"id", "conversations": [{"from": "human"|"gpt", "value"}], "images": [...]}]
- llamafactory: data.json - [{"id", "messages": [{"role": "user"|"assistant", "content"}], "images": [...],
                "reference": {"answer", "answer_type", "choices"}} (the reference answer: the RL methods' reward)
                and dataset_info.json registering it as `omnithought_<subset>_<version>` (formatting sharegpt, the
                messages/images columns and tags): names of two exports never collide
- hf:           a datasets.save_to_disk folder with columns id, messages, images (a sequence of Image)
Images are copied to images/<image_id>.<ext> beside the data (paths in the data are relative to the
export folder: LLaMA-Factory's `dataset_dir`, whose `media_dir` defaults to it).

Pre-flight (`preflight`): an example is set aside, with its reason, when an image is missing from
the store (`missing_image`), its turns hold more or fewer `<image>` than it has images (LLaMA-Factory
counts them across all messages: `image_placeholder_mismatch`), its text holds markup the client
would read as tokens or placeholders - or, in the reply, any markup at all (`markup_in_text`; README
"Text is data"; with `curation.rules.markup: clean` the reply is cleaned first), or it is longer than
`cutoff_len` tokens (`over_cutoff`) counted as the client counts: the student's chat template and
image expansion (models/vl_chat.py, the trainer's own encoding), never a character estimate. The
others are written; one bad example never refuses a subset. manifest.json lists what was set aside.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from omnithought_dagster.markup import FORGED_DELIMITER, KINDS, THINK_CLOSE, THINK_OPEN, TOKEN_KINDS, clean, find_markup
from omnithought_dagster.markup import IMAGE_PLACEHOLDER as PLACEHOLDER
from omnithought_dagster.store import CorpusStore

FORMATS = ("sharegpt", "llamafactory", "hf")
SET_ASIDE_REASONS = ("missing_image", "unreadable_image", "image_placeholder_mismatch", "markup_in_text", "over_cutoff")


class ExportError(RuntimeError):
    """The subset cannot be exported at all (no members, every example set aside, no tokenizer for a cutoff)."""


@dataclass(frozen=True)
class SetAside:
    id: str  # the trace id
    reason: str  # one of SET_ASIDE_REASONS
    detail: str


@dataclass
class Preflight:
    examples: list[dict]  # what will be written
    subset_version: str
    set_aside: list[SetAside]
    token_counter: str
    max_tokens_seen: int = 0

    @property
    def considered(self) -> int:
        return len(self.examples) + len(self.set_aside)


@dataclass
class ExportReport:
    subset: str
    subset_version: str
    format: str
    examples: int
    images: int
    out: Path
    token_counter: str
    dataset_name: str
    max_tokens_seen: int = 0
    set_aside: list[SetAside] = field(default_factory=list)


_ASSISTANT = re.compile(r"<think>(\n.*\n)</think>(\n\nAnswer: .*)", re.DOTALL)


def assistant_text(reasoning: str | None, final_answer: str | None) -> str:
    return f"{THINK_OPEN}\n{(reasoning or '').strip()}\n{THINK_CLOSE}\n\nAnswer: {(final_answer or '').strip()}"


def assistant_parts(text: str) -> list[dict]:
    """An exported assistant turn as chat parts for our tokenization: the two delimiters this format writes are markup,
    everything else is text (models/vl_chat.py encodes it as plain text). A turn in another form is text alone. A
    delimiter inside the reasoning or the answer is a forged one: MarkupError (the trainer sets the example aside)."""
    from omnithought_dagster.models.vl_chat import MarkupError

    match = _ASSISTANT.fullmatch(text)
    if match is None:
        return [{"type": "text", "text": text}]
    forged = find_markup(match.group(1) + match.group(2), [FORGED_DELIMITER])
    if forged:
        raise MarkupError(f"the reply holds {forged[0].describe()} inside its reasoning or answer")
    return [
        {"type": "markup", "text": THINK_OPEN},
        {"type": "text", "text": match.group(1)},
        {"type": "markup", "text": THINK_CLOSE},
        {"type": "text", "text": match.group(2)},
    ]


def conversation(record: dict) -> tuple[list[dict], list[str]]:
    """An exported record's chat messages for our tokenization (images where its placeholders are, the reply format's
    delimiters as markup, every other character as text; models/vl_chat.py) and its image paths; a leading system turn
    is kept (the sandbox teacher learns the teacher stage's prompt, models/sandbox.py). What the trainer
    reads, and what the pre-flight counts tokens of."""
    from omnithought_dagster.models.vl_chat import user_content

    images = list(record.get("images") or [])
    turns = record["messages"]
    system = [{"role": "system", "content": turns[0]["content"]}] if turns and turns[0]["role"] == "system" else []
    turns = turns[len(system) :]
    if len(turns) < 2 or turns[-1]["role"] != "assistant":
        raise ValueError("a training record must end with the assistant's turn")
    return (
        [
            *system,
            {"role": "user", "content": user_content(turns[0]["content"], len(images))},
            {"role": "assistant", "content": assistant_parts(turns[-1]["content"])},
        ],
        images,
    )


def user_text(question: str, choices: list[str], n_images: int) -> str:
    options = "\nOptions:\n" + "\n".join(f"{chr(65 + i)}. {c}" for i, c in enumerate(choices)) if choices else ""
    return PLACEHOLDER * n_images + "\n" + question + options


def dataset_name(subset: str, version: str) -> str:
    """The name an export registers in dataset_info.json: its subset and version, so two exports never collide."""
    return f"omnithought_{subset}_{version[:12]}"


def preflight(
    store: CorpusStore, subset: str, *, cutoff_len: int | None = None, tokenizer: str | None = None, clean_markup: bool = False
) -> Preflight:
    """The subset's examples, and those set aside with their reasons. `tokenizer`: the student's model folder (its
    tokenizer, chat template and image processor), needed to count tokens for `cutoff_len` and adding its own
    added tokens to the markup looked for. `clean_markup`: delete markup from the reply first (curation.rules.markup)."""
    if cutoff_len is not None and tokenizer is None:
        raise ExportError(
            "a token cutoff needs the student's model folder (--tokenizer) to count what the client counts: its chat "
            "template and the image tokens; a character estimate undercounts"
        )
    vl = _vl_tokenizer(tokenizer) if tokenizer else None
    added = tuple(vl.added_tokens) if vl is not None else ()
    examples, version = _examples(store, subset, clean_markup, added)
    kept, set_aside, longest = [], [], 0
    for example in examples:
        problem, tokens = _problem(store, example, vl, added, cutoff_len)
        longest = max(longest, tokens)
        if problem is None:
            kept.append(example)
        else:
            set_aside.append(SetAside(example["id"], *problem))
    counter = f"the chat template and image tokens of {tokenizer}" if vl is not None else "none (no cutoff)"
    return Preflight(kept, version, set_aside, counter, longest)


def _problem(store: CorpusStore, example: dict, vl, added: tuple[str, ...], cutoff_len: int | None) -> tuple[tuple[str, str] | None, int]:
    """(reason, detail) for an example a client would misread (None when it is sound), and its length in tokens."""
    for image_id in example["image_ids"]:
        if not store.images.exists(image_id):
            return ("missing_image", f"image {image_id} is missing from the image store"), 0
    n_images = len(example["image_ids"])
    placeholders = example["user"].count(PLACEHOLDER) + example["assistant"].count(PLACEHOLDER)
    if placeholders != n_images:
        return ("image_placeholder_mismatch", f"{placeholders} {PLACEHOLDER} placeholders in its turns but {n_images} images"), 0
    # The question may hold control characters (text to any tokenizer: kept by the seed stage); the reply no markup at all.
    for name, text, kinds in (
        ("question", example["question"], TOKEN_KINDS),
        ("reasoning", example["reasoning"], KINDS),
        ("final answer", example["final_answer"], KINDS),
    ):
        found = find_markup(text, kinds, added)
        if found:
            return ("markup_in_text", f"its {name} holds {found[0].describe()}"), 0
    if vl is None or cutoff_len is None:
        return None, 0
    from omnithought_dagster.models.vl_chat import ImageTokensError, MarkupError

    try:
        tokens = _client_tokens(store, example, vl)
    except MarkupError as exc:
        return ("markup_in_text", str(exc)), 0
    except ImageTokensError as exc:
        return ("image_placeholder_mismatch", str(exc)), 0
    except (OSError, ValueError) as exc:  # a stored image that does not decode, a template that cannot render the turns
        return ("unreadable_image" if isinstance(exc, OSError) else "markup_in_text", f"{type(exc).__name__}: {exc}"), 0
    if tokens > cutoff_len:
        return ("over_cutoff", f"{tokens} tokens with the chat template and image tokens, over the cutoff of {cutoff_len}"), tokens
    return None, tokens


def _client_tokens(store: CorpusStore, example: dict, vl) -> int:
    """Prompt + reply tokens as the trainer (and LLaMA-Factory with the model's template) encodes the example: image
    sizes from the stored bytes' headers."""
    import io

    from PIL import Image

    sizes = []
    for image_id in example["image_ids"]:
        with Image.open(io.BytesIO(store.images.get(image_id))) as image:
            sizes.append(image.size)
    messages, _ = conversation(
        {
            "messages": [{"role": "user", "content": example["user"]}, {"role": "assistant", "content": example["assistant"]}],
            "images": example["image_ids"],
        }
    )
    return vl.example_length(messages, sizes)[1]


def _vl_tokenizer(model_dir: str):
    from omnithought_dagster.models.vl_chat import VLTokenizer

    try:
        return VLTokenizer.load(model_dir)
    except (OSError, ValueError) as exc:
        raise ExportError(f"cannot load the tokenizer and image processor of {model_dir}: {exc}") from None


def export_subset(
    store: CorpusStore,
    subset: str,
    fmt: str,
    out: str | Path,
    *,
    cutoff_len: int | None = None,
    tokenizer: str | None = None,
    clean_markup: bool = False,
) -> ExportReport:
    """Write the subset's sound examples in `fmt` to `out` (replaced as a whole, atomically); the report lists what was
    set aside. ExportError when there is nothing to write."""
    if fmt not in FORMATS:
        raise ExportError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    checked = preflight(store, subset, cutoff_len=cutoff_len, tokenizer=tokenizer, clean_markup=clean_markup)
    if not checked.examples:
        shown = "\n  ".join(f"{a.id}: {a.reason}: {a.detail}" for a in checked.set_aside[:20])
        raise ExportError(f"subset {subset!r}: all {checked.considered} examples were set aside by the pre-flight:\n  {shown}")
    examples, version = checked.examples, checked.subset_version
    name = dataset_name(subset, version)
    out = Path(out)
    staging = Path(tempfile.mkdtemp(prefix=".export-", dir=out.parent if out.parent.exists() else None))
    try:
        images = _copy_images(store, examples, staging / "images")
        _WRITERS[fmt](examples, staging, images, name)
        report = ExportReport(
            subset, version, fmt, len(examples), len(images), out, checked.token_counter, name, checked.max_tokens_seen, checked.set_aside
        )
        (staging / "manifest.json").write_text(
            json.dumps(
                {
                    "subset": subset,
                    "subset_version": version,
                    "format": fmt,
                    "dataset_name": name,
                    "examples": len(examples),
                    "images": len(images),
                    "cutoff_len": cutoff_len,
                    "token_counter": report.token_counter,
                    "max_tokens": checked.max_tokens_seen,
                    "markup": "cleaned from the replies" if clean_markup else "replies holding markup set aside",
                    "assistant_format": assistant_text("<reasoning>", "<answer>"),
                    "set_aside": [{"id": a.id, "reason": a.reason, "detail": a.detail} for a in checked.set_aside],
                },
                indent=2,
                ensure_ascii=False,
            ),
            encoding="utf-8",
        )
        if out.exists():
            shutil.rmtree(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return report


def _examples(store: CorpusStore, subset: str, clean_markup: bool = False, added: tuple[str, ...] = ()) -> tuple[list[dict], str]:
    con = store.catalog(["subset_members", "cot_traces", "seed_pool"])
    rows = (
        con.sql(
            """
        SELECT m.trace_id, m.subset_version, m.pick, s.question, s.choices, s.image_ids, s.answer, s.answer_type, t.reasoning,
               t.final_answer
        FROM subset_members m JOIN cot_traces t USING (trace_id) JOIN seed_pool s ON s.sample_id = m.sample_id
        WHERE m.subset = $subset ORDER BY m.pick
    """,
            params={"subset": subset},
        )
        .to_arrow_table()
        .to_pylist()
    )
    con.close()
    if not rows:
        raise ExportError(f"subset {subset!r} has no members (materialise sampled_subsets[{subset}] first)")
    examples = []
    for row in rows:
        reasoning, answer = (
            (clean(row["reasoning"], added), clean(row["final_answer"], added)) if clean_markup else (row["reasoning"], row["final_answer"])
        )
        examples.append(
            {
                "id": row["trace_id"],
                "image_ids": list(row["image_ids"]),
                "reasoning": reasoning or "",
                "final_answer": answer or "",
                "question": user_text(row["question"], list(row["choices"]), 0),  # the user turn as written, but our placeholders
                "user": user_text(row["question"], list(row["choices"]), len(row["image_ids"])),
                "assistant": assistant_text(reasoning, answer),
                "reference": {"answer": row["answer"], "answer_type": row["answer_type"], "choices": list(row["choices"])},
            }
        )
    return examples, rows[0]["subset_version"]


def _copy_images(store: CorpusStore, examples: list[dict], folder: Path) -> dict[str, str]:
    """image_id -> relative path of its copy (extension from the bytes)."""
    folder.mkdir(parents=True)
    paths = {}
    for example in examples:
        for image_id in example["image_ids"]:
            if image_id not in paths:
                data = store.images.get(image_id)
                ext = "png" if data[:8] == b"\x89PNG\r\n\x1a\n" else "jpg" if data[:3] == b"\xff\xd8\xff" else "bin"
                (folder / f"{image_id}.{ext}").write_bytes(data)
                paths[image_id] = f"images/{image_id}.{ext}"
    return paths


def _write_sharegpt(examples: list[dict], out: Path, images: dict[str, str], name: str) -> None:
    data = [
        {
            "id": e["id"],
            "conversations": [{"from": "human", "value": e["user"]}, {"from": "gpt", "value": e["assistant"]}],
            "images": [images[i] for i in e["image_ids"]],
        }
        for e in examples
    ]
    (out / "data.json").write_text(json.dumps(data, ensure_ascii=False, indent=1), encoding="utf-8")


def _write_llamafactory(examples: list[dict], out: Path, images: dict[str, str], name: str) -> None:
    data = [
        {
            "id": e["id"],
            "messages": [{"role": "user", "content": e["user"]}, {"role": "assistant", "content": e["assistant"]}],
            "images": [images[i] for i in e["image_ids"]],
            "reference": e["reference"],
        }
        for e in examples
    ]
    (out / "data.json").write_text(json.dumps(data, ensure_ascii=False, indent=1), encoding="utf-8")
    info = {
        name: {
            "file_name": "data.json",
            "formatting": "sharegpt",
            "columns": {"messages": "messages", "images": "images"},
            "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"},
        }
    }
    (out / "dataset_info.json").write_text(json.dumps(info, indent=2))


def _write_hf(examples: list[dict], out: Path, images: dict[str, str], name: str) -> None:
    import datasets

    features = datasets.Features(
        {
            "id": datasets.Value("string"),
            "messages": [{"role": datasets.Value("string"), "content": datasets.Value("string")}],
            "images": datasets.Sequence(datasets.Image()),
        }
    )
    records = {
        "id": [e["id"] for e in examples],
        "messages": [[{"role": "user", "content": e["user"]}, {"role": "assistant", "content": e["assistant"]}] for e in examples],
        "images": [[str(out / images[i]) for i in e["image_ids"]] for e in examples],
    }
    datasets.Dataset.from_dict(records, features=features).save_to_disk(str(out / "dataset"))


_WRITERS = {"sharegpt": _write_sharegpt, "llamafactory": _write_llamafactory, "hf": _write_hf}
