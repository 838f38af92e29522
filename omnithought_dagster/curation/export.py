"""Export a subset as training data for VLM trainers, after a pre-flight validation that fails loudly.

Formats (each example: the images, a user turn with one `<image>` placeholder per image then
the question and options, and the assistant turn - the teacher's reasoning and final answer in
the structured form `<think>\\n...\\n</think>\\n\\nAnswer: ...`):
- sharegpt:     data.json - [{"id", "conversations": [{"from": "human"|"gpt", "value"}], "images": [...]}]
- llamafactory: data.json - [{"id", "messages": [{"role": "user"|"assistant", "content"}], "images": [...],
                "reference": {"answer", "answer_type", "choices"}} (the reference answer: the RL methods' reward)
                and dataset_info.json registering it (formatting sharegpt, the messages/images columns and tags)
- hf:           a datasets.save_to_disk folder with columns id, messages, images (a sequence of Image)
Images are copied to images/<image_id>.<ext> beside the data (paths in the data are relative).
The validation refuses to write anything when an example's placeholders do not match its
images, an image is missing from the store, or an example is over the token cutoff.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from omnithought_dagster.markup import FORGED_DELIMITER, find_markup
from omnithought_dagster.store import CorpusStore

FORMATS = ("sharegpt", "llamafactory", "hf")
PLACEHOLDER = "<image>"


class ExportError(RuntimeError):
    """The subset cannot be exported; the message lists the offending examples."""


@dataclass
class ExportReport:
    subset: str
    subset_version: str
    format: str
    examples: int
    images: int
    out: Path
    token_counter: str
    max_tokens_seen: int = 0
    problems: list[str] = field(default_factory=list)


THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
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
    return [{"type": "markup", "text": THINK_OPEN}, {"type": "text", "text": match.group(1)},
            {"type": "markup", "text": THINK_CLOSE}, {"type": "text", "text": match.group(2)}]


def user_text(question: str, choices: list[str], n_images: int) -> str:
    options = "\nOptions:\n" + "\n".join(f"{chr(65 + i)}. {c}" for i, c in enumerate(choices)) if choices else ""
    return PLACEHOLDER * n_images + "\n" + question + options


def export_subset(store: CorpusStore, subset: str, fmt: str, out: str | Path, *, cutoff_len: int | None = None,
                  tokenizer: str | None = None) -> ExportReport:
    if fmt not in FORMATS:
        raise ExportError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    examples, version = _examples(store, subset)
    count = _token_counter(tokenizer)
    problems, longest = [], 0
    for example in examples:
        user = example["user"]
        if user.count(PLACEHOLDER) != len(example["image_ids"]):
            problems.append(f"{example['id']}: {user.count(PLACEHOLDER)} {PLACEHOLDER} placeholders but {len(example['image_ids'])} images")
        for image_id in example["image_ids"]:
            if not store.images.exists(image_id):
                problems.append(f"{example['id']}: image {image_id} is missing from the image store")
        if cutoff_len is not None:
            tokens = count(user + example["assistant"])
            longest = max(longest, tokens)
            if tokens > cutoff_len:
                problems.append(f"{example['id']}: {tokens} tokens, over the cutoff of {cutoff_len}")
    if problems:
        shown = "\n  ".join(problems[:20])
        raise ExportError(f"subset {subset!r} failed pre-flight validation ({len(problems)} problems):\n  {shown}"
                          + (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""))
    out = Path(out)
    staging = Path(tempfile.mkdtemp(prefix=".export-", dir=out.parent if out.parent.exists() else None))
    try:
        images = _copy_images(store, examples, staging / "images")
        _WRITERS[fmt](examples, staging, images)
        report = ExportReport(subset, version, fmt, len(examples), len(images), out, "tokenizer" if tokenizer else "estimate (chars / 4)", longest)
        (staging / "manifest.json").write_text(json.dumps({
            "subset": subset, "subset_version": version, "format": fmt, "examples": len(examples), "images": len(images),
            "cutoff_len": cutoff_len, "token_counter": report.token_counter, "assistant_format": assistant_text("<reasoning>", "<answer>"),
        }, indent=2))
        if out.exists():
            shutil.rmtree(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return report


def _examples(store: CorpusStore, subset: str) -> tuple[list[dict], str]:
    con = store.catalog(["subset_members", "cot_traces", "seed_pool"])
    rows = con.sql("""
        SELECT m.trace_id, m.subset_version, m.pick, s.question, s.choices, s.image_ids, s.answer, s.answer_type, t.reasoning,
               t.final_answer
        FROM subset_members m JOIN cot_traces t USING (trace_id) JOIN seed_pool s ON s.sample_id = m.sample_id
        WHERE m.subset = $subset ORDER BY m.pick
    """, params={"subset": subset}).to_arrow_table().to_pylist()
    con.close()
    if not rows:
        raise ExportError(f"subset {subset!r} has no members (materialise sampled_subsets[{subset}] first)")
    examples = [{
        "id": row["trace_id"], "image_ids": list(row["image_ids"]),
        "user": user_text(row["question"], list(row["choices"]), len(row["image_ids"])),
        "assistant": assistant_text(row["reasoning"], row["final_answer"]),
        "reference": {"answer": row["answer"], "answer_type": row["answer_type"], "choices": list(row["choices"])},
    } for row in rows]
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


def _write_sharegpt(examples: list[dict], out: Path, images: dict[str, str]) -> None:
    data = [{"id": e["id"], "conversations": [{"from": "human", "value": e["user"]}, {"from": "gpt", "value": e["assistant"]}],
             "images": [images[i] for i in e["image_ids"]]} for e in examples]
    (out / "data.json").write_text(json.dumps(data, ensure_ascii=False, indent=1))


def _write_llamafactory(examples: list[dict], out: Path, images: dict[str, str]) -> None:
    data = [{"id": e["id"], "messages": [{"role": "user", "content": e["user"]}, {"role": "assistant", "content": e["assistant"]}],
             "images": [images[i] for i in e["image_ids"]], "reference": e["reference"]} for e in examples]
    (out / "data.json").write_text(json.dumps(data, ensure_ascii=False, indent=1))
    info = {"omnithought": {"file_name": "data.json", "formatting": "sharegpt",
                            "columns": {"messages": "messages", "images": "images"},
                            "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"}}}
    (out / "dataset_info.json").write_text(json.dumps(info, indent=2))


def _write_hf(examples: list[dict], out: Path, images: dict[str, str]) -> None:
    import datasets

    features = datasets.Features({
        "id": datasets.Value("string"),
        "messages": [{"role": datasets.Value("string"), "content": datasets.Value("string")}],
        "images": datasets.Sequence(datasets.Image()),
    })
    records = {
        "id": [e["id"] for e in examples],
        "messages": [[{"role": "user", "content": e["user"]}, {"role": "assistant", "content": e["assistant"]}] for e in examples],
        "images": [[str(out / images[i]) for i in e["image_ids"]] for e in examples],
    }
    datasets.Dataset.from_dict(records, features=features).save_to_disk(str(out / "dataset"))


_WRITERS = {"sharegpt": _write_sharegpt, "llamafactory": _write_llamafactory, "hf": _write_hf}


def _token_counter(tokenizer: str | None):
    if tokenizer is None:
        return lambda text: -(-len(text) // 4)  # a conservative estimate without a tokenizer
    from transformers import AutoTokenizer

    loaded = AutoTokenizer.from_pretrained(tokenizer)
    return lambda text: len(loaded(text, add_special_tokens=False)["input_ids"])
