"""Content-addressed ids.

Every id is a 128-bit BLAKE2b digest (32 hex characters) of what the thing is made of, so
ids survive moving the data, equal inputs give equal ids (free caching), and the same ids
serve as Dagster data versions. Each kind of id hashes a tag first, so a sample and an image
can never share an id by accident.
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from collections.abc import Iterable
from typing import Any

ID_HEX_LENGTH = 32
ID_PATTERN = re.compile(r"^[0-9a-f]{32}$")


def content_id(kind: str, payload: Any) -> str:
    """Hash a JSON-serialisable payload under a kind tag ("sample", "trace", ...)."""
    data = json.dumps([kind, payload], sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.blake2b(data.encode("utf-8"), digest_size=16).hexdigest()


def bytes_id(data: bytes) -> str:
    """Id of a blob (image bytes): the hash of the bytes themselves."""
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def normalise_text(text: str) -> str:
    """The form of a text that identity is computed on: NFKC, whitespace runs collapsed, stripped."""
    return " ".join(unicodedata.normalize("NFKC", text).split())


def sample_id(question: str, image_ids: Iterable[str], answer: str, choices: Iterable[str] | None = None) -> str:
    """Identity of a seed sample: normalised question (with its choices), image hashes in order, answer.

    Choices are part of the question as shown, so two multiple-choice items that differ only in
    their options are different samples.
    """
    return content_id(
        "sample",
        {
            "question": normalise_text(question),
            "choices": [normalise_text(c) for c in (choices or [])],
            "images": list(image_ids),
            "answer": normalise_text(answer),
        },
    )


def version_of(ids: Iterable[str]) -> str:
    """A data version for a set of rows: the hash of their sorted ids."""
    digest = hashlib.blake2b(digest_size=16)
    for item in sorted(ids):
        digest.update(item.encode("ascii", "replace"))
        digest.update(b"\n")
    return digest.hexdigest()


def shard_of(sample: str, n_shards: int) -> int:
    """The shard a sample falls in: stable under adding samples, so shards (and caches) stay put."""
    return int(sample[:8], 16) % n_shards


def shard_keys(n_shards: int) -> list[str]:
    width = max(3, len(str(n_shards - 1)))
    return [f"{i:0{width}d}" for i in range(n_shards)]


def code_version(tag: str, settings: Any) -> str:
    """An asset's code version: its code's tag and a short hash of the project file's settings that change its output, so
    Dagster shows its partitions unsynced ("new code version") when one of them is edited."""
    return f"{tag}+{content_id('output-settings', settings)[:12]}"
