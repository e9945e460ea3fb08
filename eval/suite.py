"""The shapes suite: procedurally drawn scenes and single-word questions about them (no downloads).

Every scene is a 192x192 picture on a light background divided into a 4x4 grid of cells (columns
``a``-``d`` from left, rows ``1``-``4`` from top). Up to five coloured shapes sit in distinct cells, and a
small black letter may sit in another. A vision tower with 16-pixel patches sees 144 tokens per scene.

Each example asks one question of one of :data:`KINDS`:

* ``color`` - "what color is the circle ?" (the shape is unique in the scene)
* ``shape`` - "what shape is the red object ?" (colours are unique in a scene)
* ``count`` - "how many objects are there ?" (shapes only; the letter is not an object)
* ``position`` - "is the red object left or right of the blue object ?" (they sit in different columns)
* ``grounding`` - "which cell holds the red object ?" (``a1`` ... ``d4``)
* ``reading`` - "what letter is in the image ?" (a 26-point capital about 18 pixels tall and 12 wide, on
  two to six patches: the fine-detail kind)

Splits are deterministic streams: :func:`examples` draws example ``i`` of a split from a generator
seeded by the split's seed and ``i`` alone, so any prefix of a split is reproducible and the training,
validation and test streams never share a generator. ``tokenprune eval --seed S`` draws a fresh test
split from any other seed.
"""

from __future__ import annotations

import dataclasses
import functools
import random
from collections.abc import Iterator

from PIL import Image, ImageDraw, ImageFont

IMAGE_SIZE = 192
GRID = 4
CELL = IMAGE_SIZE // GRID
COLUMNS = "abcd"
KINDS = ("color", "shape", "count", "position", "grounding", "reading")
COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 30),
    "purple": (140, 60, 190),
    "orange": (245, 130, 30),
}
SHAPES = ("circle", "square", "triangle", "diamond")
LETTERS = ("e", "h", "k", "p", "r", "t", "x", "z")
MAX_OBJECTS = 5
#: Seeds of the named splits; any other seed draws a fresh split of its own.
SPLIT_SEEDS = {"train": 0, "validation": 1, "test": 2}
LETTER_SIZE = 26


@dataclasses.dataclass(frozen=True)
class Thing:
    """One drawn item in a grid cell: a shape, whose ``label`` is its colour, or (``shape == "letter"``) a
    black glyph, whose ``label`` is the letter."""

    shape: str
    label: str
    column: int
    row: int

    @property
    def cell(self) -> str:
        return f"{COLUMNS[self.column]}{self.row + 1}"


@dataclasses.dataclass(frozen=True)
class Example:
    """A scene, one question about it and its one-word answer."""

    image: Image.Image
    question: str
    answer: str
    kind: str
    things: tuple[Thing, ...]


def vocabulary() -> list[str]:
    """Every word that a question or an answer of the suite uses, in a fixed order."""
    words = "what color is the shape object how many objects are there or of which cell holds letter in image"
    words += " left right describe ."
    cells = [f"{column}{row}" for row in range(1, GRID + 1) for column in COLUMNS]
    counts = [str(n) for n in range(1, MAX_OBJECTS + 1)]
    return [*words.split(), "?", *COLORS, *SHAPES, *LETTERS, *cells, *counts]


#: The training-only prompt whose answer is :func:`description` (dense supervision: every item's colour,
#: shape and cell), so that the model learns to read the scene faster than from one-word answers alone.
DESCRIBE = "describe the image ."


def description(things: tuple[Thing, ...]) -> str:
    """Every item of a scene in row-major cell order: ``"red circle a1 letter e c2 ..."``."""
    ordered = sorted(things, key=lambda thing: (thing.row, thing.column))
    return " ".join(
        f"letter {t.label} {t.cell}" if t.shape == "letter" else f"{t.label} {t.shape} {t.cell}"
        for t in ordered
    )


def split_seed(split: str | int) -> int:
    """The seed of ``split``: a name of :data:`SPLIT_SEEDS` or any integer (a fresh split)."""
    if isinstance(split, bool) or not isinstance(split, (str, int)):
        raise TypeError(f"split must be a split name or an integer seed, got {split!r}")
    if isinstance(split, str):
        if split not in SPLIT_SEEDS:
            raise ValueError(
                f"unknown split {split!r}; use one of {', '.join(SPLIT_SEEDS)} or an integer seed"
            )
        return SPLIT_SEEDS[split]
    return split


def examples(split: str | int, count: int, start: int = 0) -> list[Example]:
    """Examples ``start`` .. ``start + count - 1`` of ``split`` (a name of :data:`SPLIT_SEEDS` or a seed).

    The question kinds cycle through :data:`KINDS`, so every kind gets an equal share of any ``count``
    that is a multiple of six.
    """
    if count < 0 or start < 0:
        raise ValueError(f"count and start must be >= 0, got {count} and {start}")
    seed = split_seed(split)
    return [example(seed, index) for index in range(start, start + count)]


def example(seed: int, index: int) -> Example:
    """Example ``index`` of the stream with ``seed``: the same arguments always give the same example."""
    rng = random.Random(f"shapes-suite/{seed}/{index}")
    kind = KINDS[index % len(KINDS)]
    things = _scene(rng, kind)
    question, answer = _ask(rng, kind, things)
    return Example(_draw(rng, things), question, answer, kind, things)


def iter_examples(split: str | int, start: int = 0) -> Iterator[Example]:
    """An endless stream of ``split`` from example ``start`` on (training draws from this)."""
    seed = split_seed(split)
    index = start
    while True:
        yield example(seed, index)
        index += 1


def _scene(rng: random.Random, kind: str) -> tuple[Thing, ...]:
    """The items of a scene that can answer a ``kind`` question: at least two shapes for ``position``, a
    uniquely shaped one for ``color``, and a letter for ``reading`` (elsewhere a letter half the time)."""
    while True:
        count = rng.randint(2 if kind == "position" else 1, MAX_OBJECTS)
        with_letter = kind == "reading" or rng.random() < 0.5
        cells = rng.sample(range(GRID * GRID), count + with_letter)
        colors = rng.sample(list(COLORS), count)
        things = [
            Thing(rng.choice(SHAPES), color, cell % GRID, cell // GRID)
            for color, cell in zip(colors, cells, strict=False)
        ]
        if with_letter:
            things.append(Thing("letter", rng.choice(LETTERS), cells[-1] % GRID, cells[-1] // GRID))
        if answerable(kind, things):
            return tuple(things)


def answerable(kind: str, things) -> bool:
    """Whether a scene of ``things`` can answer a ``kind`` question: ``color`` needs a shape that occurs
    once, ``position`` two shapes in different columns, ``reading`` a letter."""
    objects = _objects(things)
    shapes = [thing.shape for thing in objects]
    if kind == "color":
        return any(shapes.count(shape) == 1 for shape in SHAPES)
    if kind == "position":
        return len({thing.column for thing in objects}) >= 2
    if kind == "reading":
        return len(objects) < len(things)
    return True


def questions(things: tuple[Thing, ...], rng: random.Random) -> list[tuple[str, str, str]]:
    """One ``(kind, question, answer)`` of every kind the scene of ``things`` can answer, drawn with
    ``rng`` (training asks them all about one image)."""
    return [(kind, *_ask(rng, kind, things)) for kind in KINDS if answerable(kind, things)]


def _objects(things) -> list[Thing]:
    return [thing for thing in things if thing.shape != "letter"]


def _ask(rng: random.Random, kind: str, things: tuple[Thing, ...]) -> tuple[str, str]:
    objects = _objects(things)
    if kind == "color":
        shapes = [thing.shape for thing in objects]
        target = rng.choice([thing for thing in objects if shapes.count(thing.shape) == 1])
        return f"what color is the {target.shape} ?", target.label
    if kind == "shape":
        target = rng.choice(objects)
        return f"what shape is the {target.label} object ?", target.shape
    if kind == "count":
        return "how many objects are there ?", str(len(objects))
    if kind == "position":
        first, second = rng.sample(objects, 2)
        while first.column == second.column:
            first, second = rng.sample(objects, 2)
        side = "left" if first.column < second.column else "right"
        return f"is the {first.label} object left or right of the {second.label} object ?", side
    if kind == "grounding":
        target = rng.choice(objects)
        return f"which cell holds the {target.label} object ?", target.cell
    letter = next(thing for thing in things if thing.shape == "letter")
    return "what letter is in the image ?", letter.label


def _draw(rng: random.Random, things: tuple[Thing, ...]) -> Image.Image:
    """The scene: a light random background, each shape 26-40 px with jitter inside its cell, letters
    as ``LETTER_SIZE``-pixel capitals."""
    background = tuple(rng.randint(225, 255) for _ in range(3))
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), background)
    draw = ImageDraw.Draw(image)
    for thing in things:
        if thing.shape == "letter":
            x = thing.column * CELL + rng.randint(8, CELL - 8 - LETTER_SIZE)
            y = thing.row * CELL + rng.randint(8, CELL - 8 - LETTER_SIZE)
            draw.text((x, y), thing.label.upper(), fill=(0, 0, 0), font=_font())
            continue
        size = rng.randint(26, 40)
        x = thing.column * CELL + rng.randint(2, CELL - 2 - size)
        y = thing.row * CELL + rng.randint(2, CELL - 2 - size)
        draw_shape(draw, thing.shape, x, y, size, COLORS[thing.label])
    return image


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, x: float, y: float, size: float, fill) -> None:
    """One of :data:`SHAPES` filled with ``fill`` in the ``size``-pixel square whose top-left corner is
    ``(x, y)`` (the video suite draws its frames with it too)."""
    box = (x, y, x + size, y + size)
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "triangle":
        draw.polygon([(x + size / 2, y), (x + size, y + size), (x, y + size)], fill=fill)
    else:
        half = size / 2
        draw.polygon([(x + half, y), (x + size, y + half), (x + half, y + size), (x, y + half)], fill=fill)


@functools.cache
def _font() -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=LETTER_SIZE)
