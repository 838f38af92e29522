"""Training examples read lazily from an exported subset: memory does not grow with the subset.

An export is LLaMA-Factory's layout (`data.json`, a JSON array of {"messages", "images"}, plus
`images/`). `build_index` streams it once (`sources/jsonstream.py`, a record at a time), measures
each example's length in tokens without decoding a pixel (image headers give the sizes, the image
processor the visual token counts), applies the over-length policy, and writes the kept records
one per line to `examples.jsonl` with their byte offsets. `LazyExamples` then reads, decodes and
encodes an example only when a batch asks for it; what stays in memory is 16 bytes per example.

Over-length policy (`training.overlong`): `skip` sets aside every example longer than
`max_length`; `truncate_reply` cuts the reply at `max_length` and sets aside only examples whose
prompt (question and images) does not fit. Images are never cut. An example whose text cannot be
encoded as plain text, whose reply forges the format's delimiters (`markup_in_text`) or whose image
tokens do not match its images (`image_token_mismatch`) is set aside too: one bad example never
fails a training run. Set-aside examples are counted by reason. No Dagster, no torch at module level.
"""

from __future__ import annotations

import json
from array import array
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omnithought_dagster.curation.export import conversation
from omnithought_dagster.models.vl_chat import ImageTokensError, MarkupError
from omnithought_dagster.seed.sources import jsonstream

EXAMPLES_FILE = "examples.jsonl"
INDEX_FILE = "examples.index.json"


@dataclass
class ExampleIndex:
    """Where each kept example starts in examples.jsonl, its length in tokens, and what was set aside."""

    path: Path
    offsets: array = field(default_factory=lambda: array("q"))
    lengths: array = field(default_factory=lambda: array("l"))
    skipped: Counter = field(default_factory=Counter)

    @property
    def records(self) -> int:
        return len(self.offsets) + sum(self.skipped.values())

    def save(self) -> None:
        (self.path / INDEX_FILE).write_text(
            json.dumps({"offsets": self.offsets.tolist(), "lengths": self.lengths.tolist(), "skipped": dict(self.skipped)})
        )

    @classmethod
    def load(cls, folder: Path) -> ExampleIndex:
        raw = json.loads((folder / INDEX_FILE).read_text())
        return cls(folder, array("q", raw["offsets"]), array("l", raw["lengths"]), Counter(raw["skipped"]))


def build_index(data_dir: Path, out_dir: Path, vl, max_length: int, overlong: str) -> ExampleIndex:
    """Stream data_dir/data.json into out_dir/examples.jsonl, keeping the examples the policy allows."""
    from PIL import Image

    out_dir.mkdir(parents=True, exist_ok=True)
    index = ExampleIndex(out_dir)
    with (out_dir / EXAMPLES_FILE).open("wb") as out:
        for record, problem in jsonstream.records(data_dir / "data.json"):
            if problem is not None:
                index.skipped["unreadable_record"] += 1
                continue
            try:
                messages, images = conversation(record)
                sizes = []
                for path in images:
                    with Image.open(data_dir / path) as image:  # reads the header only
                        sizes.append(image.size)
                prompt, total = vl.example_length(messages, sizes)
            except MarkupError:  # text the student would read as markup: never trained on
                index.skipped["markup_in_text"] += 1
                continue
            except ImageTokensError:
                index.skipped["image_token_mismatch"] += 1
                continue
            except (OSError, ValueError, KeyError, TypeError, IndexError):
                index.skipped["unreadable_record"] += 1
                continue
            if prompt >= max_length:
                index.skipped["prompt_over_max_length"] += 1
                continue
            if total > max_length and overlong == "skip":
                index.skipped["over_max_length"] += 1
                continue
            index.offsets.append(out.tell())
            index.lengths.append(min(total, max_length))
            kept = {"messages": messages, "images": [str(data_dir / p) for p in images]}
            if isinstance(record.get("reference"), dict):
                kept["reference"] = record["reference"]  # the reference answer (method grpo's reward)
            out.write(json.dumps(kept).encode() + b"\n")
    index.save()
    return index


class IndexRecords:
    """A map-style dataset (torch's protocol) of an example index's records - the export's conversations, images as
    paths - each read from disk when asked for."""

    def __init__(self, index: ExampleIndex, positions: list[int] | None = None):
        self.index = index
        self.positions = positions  # a slice of the index (the training or the held-out part), None = all
        self._handle = None

    def __len__(self) -> int:
        return len(self.positions) if self.positions is not None else len(self.index.offsets)

    def __getitem__(self, item: int) -> dict:
        return self.record(item)

    def record(self, item: int) -> dict:
        position = self.positions[item] if self.positions is not None else item
        if self._handle is None:  # opened in the process that reads (a DataLoader worker has its own)
            self._handle = (self.index.path / EXAMPLES_FILE).open("rb")
        self._handle.seek(self.index.offsets[position])
        return json.loads(self._handle.readline())

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_handle": None}


def open_images(paths: list[str]) -> list:
    """A record's images, decoded as RGB."""
    from PIL import Image

    images = []
    for path in paths:
        with Image.open(path) as image:
            images.append(image.convert("RGB"))
    return images


class LazyExamples(IndexRecords):
    """The index's records encoded for training (tokens, labels, pixels), each when asked for."""

    def __init__(self, index: ExampleIndex, vl, max_length: int, positions: list[int] | None = None, threads: int = 1):
        super().__init__(index, positions)
        self.vl, self.max_length = vl, max_length
        self.threads = threads
        self._pool = None

    def __getitem__(self, item: int) -> dict[str, Any]:
        return self._encode(self.record(item))

    def __getitems__(self, items: list[int]) -> list[dict[str, Any]]:
        """A batch (what torch's DataLoader asks for when this exists): its examples decoded and encoded in parallel threads
        (PIL and the image processor release the GIL), the records read in order first."""
        records = [self.record(item) for item in items]
        if len(records) < 2 or self.threads < 2:
            return [self._encode(record) for record in records]
        if self._pool is None:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="examples")
        return list(self._pool.map(self._encode, records))

    def _encode(self, record: dict) -> dict[str, Any]:
        return self.vl.encode_example(record["messages"], open_images(record["images"]), self.max_length)

    def __getstate__(self) -> dict:
        return {**super().__getstate__(), "_pool": None}


def split(index: ExampleIndex, eval_share: float, seed: int) -> tuple[list[int] | None, list[int] | None]:
    """Positions of the training part and of a held-out part of `eval_share` (None, None without one)."""
    import random

    if eval_share <= 0 or len(index.offsets) < 2:
        return None, None
    order = list(range(len(index.offsets)))
    random.Random(seed).shuffle(order)
    held = max(1, round(len(order) * eval_share))
    return sorted(order[held:]), sorted(order[:held])
