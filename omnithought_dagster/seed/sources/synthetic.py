"""A procedural source of visual reasoning questions with verifiable answers (the embedded default).

Each sample is drawn with PIL from its own random generator seeded by (seed, index), so the
source is deterministic, any slice can be regenerated alone, and adding samples never changes
the earlier ones. Families cycle in order, so every family is equally represented. Each
sample carries its ground-truth task tag and a difficulty level (1 easy .. 3 hard) that
later stages use to measure annotator agreement.
"""

from __future__ import annotations

import io
import math
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from omnithought_dagster.ids import content_id
from omnithought_dagster.seed.sources.base import Candidate, ImageRef, SeedRecord

COLORS = {
    "red": (220, 40, 40),
    "blue": (40, 80, 220),
    "green": (30, 160, 60),
    "orange": (240, 140, 20),
    "purple": (140, 60, 180),
}
SHAPES = ("circle", "square", "triangle")
CATEGORIES = ("apples", "pears", "plums", "kiwis", "limes", "figs", "dates", "grapes")
NAMES = ("Alice", "Bob", "Chen", "Dana", "Emil", "Fatima", "Gus", "Hana", "Ivan", "Jun")
LETTERS = "ABCDEFGH"


@dataclass
class Drawn:
    """One generated question before it becomes a Candidate."""

    image: Image.Image
    question: str
    answer: str
    answer_type: str
    difficulty: int
    choices: list[str] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)
    solution: str = ""  # how the answer is reached, step by step (the sandbox teacher learns from it)
    content: str | None = None  # what the image shows, as text (`question_text: with_content`); None: only the image has it


Family = Callable[[random.Random, int], Drawn]


class SyntheticReader:
    """Reader for `kind: synthetic` sources."""

    image_root: Path | None = None

    def __init__(
        self,
        n_samples: int,
        seed: int = 0,
        image_size: int = 320,
        families: list[str] | None = None,
        start_index: int = 0,
        question_text: str = "image_only",
    ):
        self.n_samples = n_samples
        self.start_index = start_index
        self.seed = seed
        self.image_size = image_size
        self.families = list(families or FAMILIES)
        if question_text not in QUESTION_TEXT:
            raise ValueError(f"question_text: {question_text!r}; one of {QUESTION_TEXT}")
        self.question_text = question_text

    def records(self) -> Iterator[SeedRecord]:
        for position in range(self.n_samples):
            record = self.sample(self.start_index + position)
            record.record_index = position
            yield record

    def sample(self, index: int) -> Candidate:
        family = self.families[index % len(self.families)]
        rng = random.Random(f"omnithought-synthetic:{self.seed}:{index}")
        drawn = FAMILIES[family][1](rng, self.image_size)
        buffer = io.BytesIO()
        _vary_layout(drawn.image, rng).save(buffer, format="PNG", compress_level=1)
        question, extra = drawn.question, {}
        if self.question_text == "with_content":  # the sandbox's variant: the text carries what the image shows, where it can
            question = drawn.question if drawn.content is None else f"{drawn.question}\n{drawn.content}"
            extra = {"solution": drawn.solution, "content_in_text": drawn.content is not None}
        return Candidate(
            record_index=index,
            native_id=f"{family}-{self.seed}-{index:07d}",
            question=question,
            answer=drawn.answer,
            images=[ImageRef(data=buffer.getvalue())],
            choices=drawn.choices or None,
            answer_type=drawn.answer_type,
            tags=[FAMILIES[family][0]],
            difficulty=drawn.difficulty,
            metadata={"family": family, "generator_seed": self.seed, **drawn.metadata, **extra},
        )

    def count(self) -> int:
        return self.n_samples

    def fingerprint(self) -> str:
        return content_id(
            "synthetic-source",
            {
                "n": self.n_samples,
                "seed": self.seed,
                "size": self.image_size,
                "families": self.families,
                "v": GENERATOR_VERSION,
                **({"start": self.start_index} if self.start_index else {}),
                **({"question_text": self.question_text} if self.question_text != "image_only" else {}),
            },
        )


# Bump when any family draws differently: the fingerprint (and so demo caching) depends on it.
GENERATOR_VERSION = 1
# image_only: the question names what to do, the image holds what it is done on (the default); with_content: the question
# also carries, as text, what the image shows (the expression, the table's rows, the bars' values, the figure's lengths)
# for the families where text can say it - counting and spatial stay image-only. Worked solutions go into the metadata.
QUESTION_TEXT = ("image_only", "with_content")


# -- drawing helpers -----------------------------------------------------------------------------


def _vary_layout(image: Image.Image, rng: random.Random) -> Image.Image:
    """Shrink the drawing a little and place it anywhere on a lightly tinted page.

    Real seed images differ in framing; without this, same-family images (text on white)
    share most of their perceptual hash and would all be marked as near duplicates.
    """
    size = image.size[0]
    scale = rng.uniform(0.72, 1.0)
    inner = image.resize((int(size * scale), int(size * scale)), Image.Resampling.BILINEAR)
    tint = tuple(rng.randint(232, 255) for _ in range(3))
    page = Image.new("RGB", image.size, tint)
    mask = Image.eval(inner.convert("L"), lambda v: 255 if v < 250 else 0)
    offset = (rng.randint(0, size - inner.size[0]), rng.randint(0, size - inner.size[1]))
    page.paste(inner, offset, mask)
    return page


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def _canvas(size: int) -> tuple[Image.Image, ImageDraw.ImageDraw]:
    image = Image.new("RGB", (size, size), (255, 255, 255))
    return image, ImageDraw.Draw(image)


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, center: tuple[float, float], radius: float, color: tuple) -> None:
    x, y = center
    if shape == "circle":
        draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=color)
    elif shape == "square":
        draw.rectangle([x - radius, y - radius, x + radius, y + radius], fill=color)
    else:
        draw.polygon([(x, y - radius), (x - radius, y + radius), (x + radius, y + radius)], fill=color)


def _grid_positions(rng: random.Random, size: int, count: int, cells: int) -> list[tuple[float, float]]:
    """Distinct grid cells with a little jitter, so shapes never overlap."""
    step = size / cells
    chosen = rng.sample(range(cells * cells), count)
    return [
        (
            (c % cells + 0.5) * step + rng.uniform(-step * 0.12, step * 0.12),
            (c // cells + 0.5) * step + rng.uniform(-step * 0.12, step * 0.12),
        )
        for c in chosen
    ]


def _mc(rng: random.Random, correct: str, options: list[str]) -> tuple[list[str], str]:
    """Shuffle options (correct among them); return (choices, letter of the correct one)."""
    shuffled = list(dict.fromkeys(options))
    rng.shuffle(shuffled)
    return shuffled, LETTERS[shuffled.index(correct)]


# -- families ------------------------------------------------------------------------------------


def _counting(rng: random.Random, size: int) -> Drawn:
    image, draw = _canvas(size)
    difficulty = rng.choice((1, 2, 3))
    cells = 4 + difficulty
    total = rng.randint(3 + difficulty, 6 + 3 * difficulty)
    palette = list(COLORS)[: 1 + difficulty]
    shapes = SHAPES[: 1 + min(difficulty, 2)]
    items = [(rng.choice(shapes), rng.choice(palette)) for _ in range(total)]
    for (shape, color), center in zip(items, _grid_positions(rng, size, total, cells), strict=False):
        _draw_shape(draw, shape, center, size / cells * 0.3, COLORS[color])
    if difficulty == 1:
        answer, question = total, "How many shapes are in the image? Answer with a number."
        solution = f"I count every shape in the image: there are {total}."
    elif difficulty == 2:
        shape = rng.choice(shapes)
        answer = sum(1 for s, _ in items if s == shape)
        question = f"How many {shape}s are in the image? Answer with a number."
        solution = f"Of the {total} shapes, I count the {shape}s: there are {answer}."
    else:
        shape, color = rng.choice(items)
        answer = sum(1 for item in items if item == (shape, color))
        question = f"How many {color} {shape}s are in the image? Answer with a number."
        solution = f"Of the {total} shapes, I count those that are both {color} and {shape}s: there are {answer}."
    return Drawn(image, question, str(answer), "numeric", difficulty, metadata={"n_shapes": total}, solution=solution)


def _bar_chart(rng: random.Random, size: int) -> Drawn:
    image, draw = _canvas(size)
    difficulty = rng.choice((1, 2, 3))
    k = rng.randint(3, 3 + difficulty)
    labels = rng.sample(CATEGORIES, k)
    values = rng.sample(range(2, 21), k)
    font = _font(max(10, size // 26))
    left, bottom, top = size * 0.12, size * 0.85, size * 0.1
    draw.line([(left, top), (left, bottom), (size * 0.97, bottom)], fill=(0, 0, 0), width=2)
    width = (size * 0.85) / k
    for i, (label, value) in enumerate(zip(labels, values, strict=False)):
        x0 = left + i * width + width * 0.15
        height = (bottom - top) * value / 20
        draw.rectangle([x0, bottom - height, x0 + width * 0.7, bottom], fill=COLORS[list(COLORS)[i % len(COLORS)]])
        draw.text((x0 + width * 0.35, bottom - height - 3), str(value), fill=(0, 0, 0), font=font, anchor="md")
        draw.text((x0 + width * 0.35, bottom + 4), label, fill=(0, 0, 0), font=font, anchor="ma")
    draw.text((size / 2, 4), "Fruit sold", fill=(0, 0, 0), font=font, anchor="ma")
    bars = ", ".join(f"{label} {value}" for label, value in zip(labels, values, strict=True))
    content = f"The bars show: {bars}."
    if difficulty == 1:
        i = rng.randrange(k)
        return Drawn(
            image,
            f"According to the bar chart, how many {labels[i]} were sold? Answer with a number.",
            str(values[i]),
            "numeric",
            1,
            solution=f"The bar of {labels[i]} reaches {values[i]}.",
            content=content,
        )
    if difficulty == 2:
        best = labels[values.index(max(values))]
        choices, letter = _mc(rng, best, labels)
        solution = f"The bars are {bars}. The tallest is {best} with {max(values)}, option {letter}."
        return Drawn(
            image,
            "Which fruit sold the most according to the bar chart?",
            letter,
            "multiple_choice",
            2,
            choices=choices,
            solution=solution,
            content=content,
        )
    top, bottom_value = max(values), min(values)
    return Drawn(
        image,
        "What is the difference between the largest and the smallest value in the bar chart? Answer with a number.",
        str(top - bottom_value),
        "numeric",
        3,
        solution=f"The bars are {bars}. The largest is {top}, the smallest {bottom_value}; {top} - {bottom_value} = {top - bottom_value}.",
        content=content,
    )


def _arithmetic(rng: random.Random, size: int) -> Drawn:
    image, draw = _canvas(size)
    difficulty = rng.choice((1, 2, 3))
    a, b, c, d = (rng.randint(2, 30) for _ in range(4))
    if difficulty == 1:
        expression, value = f"{a} + {b}", a + b
        solution = f"{a} + {b} = {value}."
    elif difficulty == 2:
        expression, value = f"({a} + {b}) * {c % 9 + 2}", (a + b) * (c % 9 + 2)
        solution = f"First {a} + {b} = {a + b}. Then {a + b} * {c % 9 + 2} = {value}."
    else:
        divisor = d % 8 + 2
        expression, value = f"{divisor * a} / {divisor} + {b} * {c % 6 + 2} - {d}", a + b * (c % 6 + 2) - d
        product = b * (c % 6 + 2)
        solution = (
            f"First {divisor * a} / {divisor} = {a} and {b} * {c % 6 + 2} = {product}. "
            f"Then {a} + {product} = {a + product}, and {a + product} - {d} = {value}."
        )
    font = _font(max(14, size // 12 - 2 * difficulty))
    draw.text((size / 2, size / 2), f"{expression} = ?", fill=(0, 0, 0), font=font, anchor="mm")
    return Drawn(
        image,
        "Compute the value of the expression shown in the image. Answer with a number.",
        str(value),
        "numeric",
        difficulty,
        metadata={"expression": expression},
        solution=solution,
        content=f"The expression is {expression} = ?",
    )


def _geometry(rng: random.Random, size: int) -> Drawn:
    image, draw = _canvas(size)
    difficulty = rng.choice((1, 2, 3))
    font = _font(max(12, size // 20))
    ink = (0, 0, 0)
    if difficulty == 1:
        w, h = rng.randint(3, 24), rng.randint(3, 24)
        scale = size * 0.6 / max(w, h)
        x0, y0 = (size - w * scale) / 2, (size - h * scale) / 2
        draw.rectangle([x0, y0, x0 + w * scale, y0 + h * scale], outline=ink, width=3)
        draw.text((size / 2, y0 - 6), f"{w} cm", fill=ink, font=font, anchor="md")
        draw.text((x0 - 6, size / 2), f"{h} cm", fill=ink, font=font, anchor="rm")
        return Drawn(
            image,
            "What is the area of the rectangle in square centimetres? Answer with a number.",
            str(w * h),
            "numeric",
            1,
            solution=f"The rectangle is {w} cm by {h} cm, so its area is {w} * {h} = {w * h}.",
            content=f"The rectangle's sides are {w} cm and {h} cm.",
        )
    if difficulty == 2:
        m, n = rng.choice(((3, 4), (5, 12), (6, 8), (8, 15), (9, 12), (7, 24)))
        k = rng.randint(1, 4)
        a, b = m * k, n * k
        scale = size * 0.6 / max(a, b)
        x0, y0 = size * 0.2, size * 0.8
        points = [(x0, y0), (x0 + b * scale, y0), (x0, y0 - a * scale)]
        draw.polygon(points, outline=ink, width=3)
        draw.rectangle([x0, y0 - 12, x0 + 12, y0], outline=ink)
        draw.text((x0 + b * scale / 2, y0 + 6), str(b), fill=ink, font=font, anchor="ma")
        draw.text((x0 - 6, y0 - a * scale / 2), str(a), fill=ink, font=font, anchor="rm")
        hypotenuse = int(math.hypot(a, b))
        return Drawn(
            image,
            "The triangle has a right angle. What is the length of its longest side? Answer with a number.",
            str(hypotenuse),
            "numeric",
            2,
            solution=f"The legs are {a} and {b}. The longest side is sqrt({a}^2 + {b}^2) = sqrt({a * a + b * b}) = {hypotenuse}.",
            content=f"The legs are {a} and {b}.",
        )
    r = rng.randint(2, 30)
    draw.ellipse([size * 0.2, size * 0.2, size * 0.8, size * 0.8], outline=ink, width=3)
    draw.line([(size / 2, size / 2), (size * 0.8, size / 2)], fill=ink, width=2)
    draw.text((size * 0.65, size / 2 - 6), f"r = {r}", fill=ink, font=font, anchor="md")
    return Drawn(
        image,
        "What is the area of the circle? Use pi = 3.14 and round to one decimal place.",
        f"{3.14 * r * r:.1f}",
        "numeric",
        3,
        solution=f"The radius is {r}. The area is 3.14 * {r} * {r} = {3.14 * r * r:.1f}.",
        content=f"The radius is {r}.",
    )


def _table(rng: random.Random, size: int) -> Drawn:
    image, draw = _canvas(size)
    difficulty = rng.choice((1, 2, 3))
    rows = rng.randint(3, 3 + difficulty)
    names = rng.sample(NAMES, rows)
    scores = rng.sample(range(10, 100), rows)
    font = _font(max(11, size // 22))
    row_h = size * 0.8 / (rows + 1)
    x0, x1, x2, y0 = size * 0.15, size * 0.55, size * 0.85, size * 0.1
    for r in range(rows + 2):
        draw.line([(x0, y0 + r * row_h), (x2, y0 + r * row_h)], fill=(0, 0, 0), width=1)
    for x in (x0, x1, x2):
        draw.line([(x, y0), (x, y0 + (rows + 1) * row_h)], fill=(0, 0, 0), width=1)
    draw.text(((x0 + x1) / 2, y0 + row_h / 2), "Name", fill=(0, 0, 0), font=font, anchor="mm")
    draw.text(((x1 + x2) / 2, y0 + row_h / 2), "Score", fill=(0, 0, 0), font=font, anchor="mm")
    for r, (name, score) in enumerate(zip(names, scores, strict=False), start=1):
        draw.text(((x0 + x1) / 2, y0 + (r + 0.5) * row_h), name, fill=(0, 0, 0), font=font, anchor="mm")
        draw.text(((x1 + x2) / 2, y0 + (r + 0.5) * row_h), str(score), fill=(0, 0, 0), font=font, anchor="mm")
    listed = "; ".join(f"{name} {score}" for name, score in zip(names, scores, strict=True))
    content = f"The table's rows (name, score): {listed}."
    if difficulty == 1:
        i = rng.randrange(rows)
        return Drawn(
            image,
            f"What is {names[i]}'s score in the table? Answer with a number.",
            str(scores[i]),
            "numeric",
            1,
            solution=f"The row of {names[i]} says {scores[i]}.",
            content=content,
        )
    if difficulty == 2:
        best = names[scores.index(max(scores))]
        return Drawn(
            image,
            "Who has the highest score in the table? Answer with the name.",
            best,
            "free_form",
            2,
            solution=f"The rows are {listed}. The highest score, {max(scores)}, is {best}.",
            content=content,
        )
    i, j = rng.sample(range(rows), 2)
    return Drawn(
        image,
        f"What is the sum of the scores of {names[i]} and {names[j]}? Answer with a number.",
        str(scores[i] + scores[j]),
        "numeric",
        3,
        solution=f"{names[i]} has {scores[i]} and {names[j]} has {scores[j]}; {scores[i]} + {scores[j]} = {scores[i] + scores[j]}.",
        content=content,
    )


def _spatial(rng: random.Random, size: int) -> Drawn:
    image, draw = _canvas(size)
    difficulty = rng.choice((1, 2, 3))
    count = 2 + difficulty
    kinds = rng.sample([(s, c) for s in SHAPES for c in COLORS], count)
    centers = _grid_positions(rng, size, count, 4)
    for (shape, color), center in zip(kinds, centers, strict=False):
        _draw_shape(draw, shape, center, size * 0.07, COLORS[color])
    label = [f"{color} {shape}" for shape, color in kinds]
    if difficulty == 1:
        a, b = 0, 1
        truth = "Yes" if centers[a][0] < centers[b][0] else "No"
        choices, letter = _mc(rng, truth, ["Yes", "No"])
        solution = f"The {label[a]} is {'left' if truth == 'Yes' else 'right'} of the {label[b]}: {truth}, option {letter}."
        return Drawn(
            image, f"Is the {label[a]} to the left of the {label[b]}?", letter, "multiple_choice", 1, choices=choices, solution=solution
        )
    if difficulty == 2:
        anchor = rng.randrange(count)
        closest = min((i for i in range(count) if i != anchor), key=lambda i: math.dist(centers[i], centers[anchor]))
        choices, letter = _mc(rng, label[closest], [label[i] for i in range(count) if i != anchor])
        solution = f"Of the other shapes, the {label[closest]} is the nearest to the {label[anchor]}: option {letter}."
        return Drawn(
            image, f"Which shape is closest to the {label[anchor]}?", letter, "multiple_choice", 2, choices=choices, solution=solution
        )
    anchor = rng.randrange(count)
    answer = sum(1 for i in range(count) if centers[i][0] > centers[anchor][0])
    return Drawn(
        image,
        f"How many shapes are to the right of the {label[anchor]}? Answer with a number.",
        str(answer),
        "numeric",
        3,
        solution=f"I look right of the {label[anchor]} and count the shapes there: {answer}.",
    )


FAMILIES: dict[str, tuple[str, Family]] = {
    "counting": ("counting", _counting),
    "bar_chart": ("chart/bar", _bar_chart),
    "arithmetic": ("math/arithmetic", _arithmetic),
    "geometry": ("math/geometry", _geometry),
    "table": ("table", _table),
    "spatial": ("spatial-relations", _spatial),
}
