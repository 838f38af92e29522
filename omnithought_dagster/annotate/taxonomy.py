"""The versioned task taxonomy and the mapping of a judge's free tags onto it.

A tag the judge writes is mapped, in order: exact label; alias; the leaf of a label
("geometry" -> math/geometry); the nearest label or alias by string similarity (rapidfuzz,
at least `min_similarity`); otherwise it is rejected with a reason. Mapping to the nearest
label keeps most of what a judge meant; the threshold keeps it from inventing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import yaml

BUILTIN_PREFIX = "builtin:"
BUILTIN_DIR = Path(__file__).resolve().parents[1] / "taxonomy"


class TaxonomyError(ValueError):
    """A taxonomy file that cannot be used."""


@dataclass(frozen=True)
class TagMapping:
    raw: str
    label: str | None
    how: str  # exact | alias | leaf | nearest | rejected


@dataclass(frozen=True)
class Taxonomy:
    version: str
    labels: dict[str, dict]

    @classmethod
    def load(cls, reference: str) -> Taxonomy:
        """`builtin:tags-v1` (shipped in the package) or a path to a taxonomy YAML."""
        path = BUILTIN_DIR / f"{reference[len(BUILTIN_PREFIX) :]}.yaml" if reference.startswith(BUILTIN_PREFIX) else Path(reference)
        try:
            document = yaml.safe_load(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise TaxonomyError(f"{reference}: cannot read the taxonomy: {exc}") from None
        if not isinstance(document, dict) or not isinstance(document.get("labels"), dict) or not document.get("version"):
            raise TaxonomyError(f"{reference}: a taxonomy needs `version` and a `labels` mapping")
        labels = {str(k): dict(v or {}) for k, v in document["labels"].items()}
        for label in labels:
            if _slug(label) != label:
                raise TaxonomyError(f"{reference}: label {label!r} must be lowercase words joined by '-' and '/'")
        return cls(str(document["version"]), labels)

    @property
    def names(self) -> list[str]:
        return list(self.labels)

    @cached_property
    def _aliases(self) -> dict[str, str]:
        aliases = {}
        for label, info in self.labels.items():
            for alias in info.get("aliases") or []:
                aliases.setdefault(_slug(str(alias)), label)
        return aliases

    @cached_property
    def _leaves(self) -> dict[str, str]:
        leaves: dict[str, list[str]] = {}
        for label in self.labels:
            leaves.setdefault(label.rsplit("/", 1)[-1], []).append(label)
        return {leaf: found[0] for leaf, found in leaves.items() if len(found) == 1}

    def map_tag(self, raw: str, min_similarity: float = 85.0) -> TagMapping:
        tag = _slug(raw)
        if tag in self.labels:
            return TagMapping(raw, tag, "exact")
        if tag in self._aliases:
            return TagMapping(raw, self._aliases[tag], "alias")
        if tag in self._leaves:
            return TagMapping(raw, self._leaves[tag], "leaf")
        from rapidfuzz import fuzz, process

        # Compared as words ("counting objects" ~ "counting"; typos like "geometery" ~ "geometry").
        candidates = {_words(name): label for name, label in {**{label: label for label in self.labels}, **self._aliases}.items()}
        best = process.extractOne(_words(tag), list(candidates), scorer=fuzz.WRatio) if tag else None
        if best and best[1] >= min_similarity:
            return TagMapping(raw, candidates[best[0]], "nearest")
        return TagMapping(raw, None, "rejected")

    def map_tags(self, raw_tags: list[str], min_similarity: float = 85.0, max_tags: int = 3) -> tuple[list[str], list[TagMapping]]:
        """Mapped labels (deduplicated, in order, at most max_tags) and how each raw tag fared."""
        mappings = [self.map_tag(raw, min_similarity) for raw in raw_tags]
        labels = list(dict.fromkeys(m.label for m in mappings if m.label))
        return labels[:max_tags], mappings


def _words(slug: str) -> str:
    return slug.replace("/", " ").replace("-", " ")


def _slug(text: str) -> str:
    text = re.sub(r"[\s_]+", "-", text.strip().lower())
    text = re.sub(r"-*/-*", "/", text)
    return re.sub(r"[^a-z0-9/-]", "", text).strip("-/")
