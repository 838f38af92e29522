"""Small matplotlib charts as PNG bytes, shared by the asset metadata and `omnithought report`. No Dagster here.

Every chart is drawn on the Agg backend (no display) at a fixed size, so the same data gives
the same picture; callers embed the PNG as a base64 data URI (markdown metadata, HTML report).
"""

from __future__ import annotations

import base64
import io
from collections.abc import Callable, Iterable, Mapping, Sequence

BAR = "#4c72b0"
BAR_H = "#dd8452"
NEGATIVE = "#c44e52"


def png(draw: Callable, size: tuple[float, float] = (7, 3.2)) -> bytes:
    """Draw on a fresh axes with `draw(ax)` and return the PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=size, dpi=100)
    try:
        draw(ax)
        fig.tight_layout()
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png")
    finally:
        plt.close(fig)
    return buffer.getvalue()


def png_base64(draw: Callable, size: tuple[float, float] = (7, 3.2)) -> str:
    return base64.b64encode(png(draw, size)).decode()


def pairs(mapping: Mapping | Iterable[tuple]) -> list[tuple]:
    return list(mapping.items()) if isinstance(mapping, Mapping) else list(mapping)


def bar(ax, data: Mapping | Sequence[tuple], ylabel: str) -> None:
    """Vertical bars in the order given (labels along x)."""
    items = pairs(data)
    ax.bar([str(k) for k, _ in items], [v for _, v in items], color=BAR)
    ax.set_ylabel(ylabel)


def barh(ax, data: Mapping | Sequence[tuple], xlabel: str) -> None:
    """Horizontal bars, first item on top; negative values in red (score deltas)."""
    items = list(reversed(pairs(data)))
    values = [v for _, v in items]
    ax.barh([str(k) for k, _ in items], values, color=[NEGATIVE if v < 0 else BAR_H for v in values])
    if any(v < 0 for v in values):
        ax.axvline(0, color="#444", linewidth=0.8)
    ax.set_xlabel(xlabel)


def histogram(
    ax, values: Sequence[float], xlabel: str, ylabel: str, bins: int = 10, value_range: tuple[float, float] | None = None
) -> None:
    ax.hist(values, bins=bins, range=value_range, color=BAR)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)


def curves(ax, series: Mapping[str, Sequence[float]], xlabel: str = "step", ylabel: str = "loss") -> None:
    for name, values in series.items():
        ax.plot(range(1, len(values) + 1), values, label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if len(series) > 1:
        ax.legend()


def top(counter: Mapping[str, int], n: int) -> list[tuple[str, int]]:
    """The n largest counts, largest first (ties by name), the rest summed as `other`."""
    ranked = sorted(counter.items(), key=lambda kv: (-kv[1], str(kv[0])))
    head, rest = ranked[:n], ranked[n:]
    return head + ([("other", sum(v for _, v in rest))] if rest else [])
