"""Field paths of a seed mapping: plain dotted paths, or JMESPath expressions for lists and filters.

Imports nothing of the project: the config validates paths with it and the readers resolve them.
"""

from __future__ import annotations

import functools
import re
from typing import Any

_PLAIN_PATH = re.compile(r"^[^.\[\]\"'|*@&(){}!<>=`,:?]+(?:\.[^.\[\]\"'|*@&(){}!<>=`,:?]+)*$")


def get_path(record: dict, path: str | None) -> Any:
    """The value at `path` in the record; None when nothing is there.

    A plain dotted path (`meta.id`, keys may hold hyphens or spaces) walks nested objects; anything
    else is a JMESPath expression (`texts[0].user`, `conversations[?from=='human'] | [0].value`).
    """
    if not path:
        return None
    if _PLAIN_PATH.match(path):
        node: Any = record
        for part in path.split("."):
            if not isinstance(node, dict) or part not in node:
                return None
            node = node[part]
        return node
    return compile_path(path).search(record)


@functools.lru_cache(maxsize=256)
def compile_path(path: str):
    """A JMESPath expression, compiled once; raises jmespath's ParseError for a bad one."""
    import jmespath

    return jmespath.compile(path)


def path_head(path: str) -> str:
    """The top-level key a field path starts from (what the record's metadata leaves out)."""
    return re.split(r"[.\[|]", path, maxsplit=1)[0].strip().strip('"')
