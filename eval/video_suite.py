"""The video suite: short clips drawn with pillow from a seed, and one-word questions about them.

A clip is :data:`FRAMES` frames of :data:`FRAME_SIZE` x :data:`FRAME_SIZE` pixels on a light background.
Two to four actors (:class:`Actor`), each a shape of :data:`suite.SHAPES` in a colour of :data:`suite.COLORS`
(shapes and colours are unique in a clip, so that either names an actor), play one role each: one
``stays``, ``moves`` in a straight line (left, right, up or down), ``appears`` part-way through,
``disappears`` part-way through, or ``turns`` another colour part-way through. Their paths never cross.

Each example asks one question of one of :data:`KINDS`; the first five are :data:`TEMPORAL` (no single
frame answers them), the last two :data:`SINGLE_FRAME` (any frame does):

* ``direction`` - "which way does the red object move ?" (``left``, ``right``, ``up``, ``down``)
* ``turn`` - "what color does the circle turn ?" (the colour it ends with)
* ``appear`` - "which shape appears ?"
* ``vanish`` - "which shape disappears ?"
* ``more`` - "are there more or fewer objects at the end ?" (``more`` or ``fewer`` than at the start)
* ``color`` - "what color is the square ?" (an actor that stays)
* ``shape`` - "what shape is the red object ?" (an actor that stays)

Answers are read off the drawn frames' contents (:func:`answer`), so they hold for the pictures whatever
the roles. Splits are seeded streams, as in :mod:`tokenprune.eval.suite`: ``train`` 0, ``validation``
1, ``test`` 2, and any other seed draws a fresh split.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Iterator

from PIL import Image, ImageDraw

from .suite import COLORS, SHAPES, draw_shape, split_seed

FRAMES = 16
FRAME_SIZE = 96
KINDS = ("direction", "turn", "appear", "vanish", "more", "color", "shape")
TEMPORAL = KINDS[:5]
SINGLE_FRAME = KINDS[5:]
ROLES = ("stays", "moves", "appears", "disappears", "turns")
#: Unit steps of the four directions of motion (x right, y down).
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
#: The role a clip needs for a question of each kind (``more`` needs an actor that appears or disappears).
NEEDS = {"direction": "moves", "turn": "turns", "appear": "appears", "vanish": "disappears"}
#: The training-only prompt whose answer is :func:`description`: every actor's colour, shape and role.
DESCRIBE = "describe the video ."


@dataclasses.dataclass(frozen=True)
class Actor:
    """One shape of a clip: where its ``size``-pixel square starts (top-left ``x``, ``y``), its role,
    and the role's detail: the ``direction`` and ``distance`` of a move, the colour it ``turns`` to, and
    the frame ``at`` which it appears, disappears or turns."""

    shape: str
    color: str
    role: str
    x: int
    y: int
    size: int
    direction: str = ""
    distance: int = 0
    turns: str = ""
    at: int = 0

    def state(self, frame: int) -> Item | None:
        """What frame ``frame`` shows of the actor, or ``None`` when it is not in that frame."""
        if (self.role == "appears" and frame < self.at) or (self.role == "disappears" and frame >= self.at):
            return None
        step = self.distance * frame / (FRAMES - 1)
        dx, dy = DIRECTIONS[self.direction] if self.role == "moves" else (0, 0)
        color = self.turns if self.role == "turns" and frame >= self.at else self.color
        return Item(self.shape, color, round(self.x + dx * step), round(self.y + dy * step), self.size)

    def box(self) -> tuple[int, int, int, int]:
        """The box the actor covers over the whole clip (its path, for a mover)."""
        first, last = self.state(0) or self.state(FRAMES - 1), self.state(FRAMES - 1) or self.state(0)
        left, top = min(first.x, last.x), min(first.y, last.y)
        return left, top, max(first.x, last.x) + self.size, max(first.y, last.y) + self.size


@dataclasses.dataclass(frozen=True)
class Item:
    """A shape as one frame shows it."""

    shape: str
    color: str
    x: int
    y: int
    size: int


@dataclasses.dataclass(frozen=True)
class Example:
    """A clip, one question about it and its one-word answer; ``key`` names the question's actor (a
    colour or a shape; empty for questions about the whole clip)."""

    frames: tuple[Image.Image, ...]
    question: str
    answer: str
    kind: str
    key: str
    actors: tuple[Actor, ...]

    def states(self) -> list[list[Item]]:
        """What every frame shows: :func:`states` of the clip's actors."""
        return states(self.actors)


def states(actors: tuple[Actor, ...]) -> list[list[Item]]:
    """The items each of the :data:`FRAMES` frames shows, in drawing order."""
    return [[item for actor in actors if (item := actor.state(t)) is not None] for t in range(FRAMES)]


def vocabulary() -> list[str]:
    """Every word that a question, an answer or a description of the suite uses, in a fixed order."""
    words = "which way does the object move what color turn shape appears disappears are there more or"
    words += " fewer objects at end is describe video . stays moves turns"
    return [*words.split(), "?", *COLORS, *SHAPES, *DIRECTIONS]


def description(actors: tuple[Actor, ...]) -> str:
    """Every actor in :data:`suite.SHAPES` order: ``"red circle moves left blue square stays ..."``."""
    parts = []
    for actor in sorted(actors, key=lambda a: SHAPES.index(a.shape)):
        detail = {"moves": f" {actor.direction}", "turns": f" {actor.turns}"}.get(actor.role, "")
        parts.append(f"{actor.color} {actor.shape} {actor.role}{detail}")
    return " ".join(parts)


def examples(split: str | int, count: int, start: int = 0) -> list[Example]:
    """Examples ``start`` .. ``start + count - 1`` of ``split`` (a split name or a seed); the kinds cycle
    through :data:`KINDS`, so every kind gets an equal share of a multiple of seven."""
    if count < 0 or start < 0:
        raise ValueError(f"count and start must be >= 0, got {count} and {start}")
    seed = split_seed(split)
    return [example(seed, index) for index in range(start, start + count)]


def iter_examples(split: str | int, start: int = 0) -> Iterator[Example]:
    """An endless stream of ``split`` from example ``start`` on (training draws from this)."""
    seed, index = split_seed(split), start
    while True:
        yield example(seed, index)
        index += 1


def example(seed: int, index: int) -> Example:
    """Example ``index`` of the stream with ``seed``: the same arguments always give the same example."""
    rng = random.Random(f"video-suite/{seed}/{index}")
    kind = KINDS[index % len(KINDS)]
    actors = _clip(rng, kind)
    key, question, answer_ = _ask(rng, kind, actors)
    return Example(draw(rng, actors), question, answer_, kind, key, actors)


def questions(actors: tuple[Actor, ...]) -> list[tuple[str, str, str]]:
    """Every ``(kind, question, answer)`` the clip of ``actors`` answers: of each kind it can answer, one
    about every actor the kind can ask about (training asks them all about one clip)."""
    return [
        (kind, *_ask(random.Random(), kind, actors, key)[1:])
        for kind in KINDS
        if answerable(kind, actors)
        for key in _keys(kind, actors)
    ]


def answerable(kind: str, actors: tuple[Actor, ...]) -> bool:
    """Whether a clip of ``actors`` answers a ``kind`` question: it has an actor of the role the kind
    asks about (exactly one that appears or disappears, for those kinds), for ``more`` different counts
    of objects in its first and last frames, for ``color`` and ``shape`` an actor that stays."""
    roles = [actor.role for actor in actors]
    if kind in ("appear", "vanish"):
        return roles.count(NEEDS[kind]) == 1
    if kind == "more":
        return roles.count("appears") != roles.count("disappears")
    return (NEEDS.get(kind) or "stays") in roles


def _keys(kind: str, actors: tuple[Actor, ...]) -> list[str]:
    """The actors a ``kind`` question may ask about, by the colour or shape the question names them."""
    if kind in ("direction", "shape"):
        return [a.color for a in actors if a.role == ("moves" if kind == "direction" else "stays")]
    if kind in ("turn", "color"):
        return [a.shape for a in actors if a.role == ("turns" if kind == "turn" else "stays")]
    return [""]


def _ask(
    rng: random.Random, kind: str, actors: tuple[Actor, ...], key: str | None = None
) -> tuple[str, str, str]:
    """``(key, question, answer)`` of a ``kind`` question about the clip of ``actors``: about the actor
    ``key`` names, or one drawn with ``rng``."""
    key = rng.choice(_keys(kind, actors)) if key is None else key
    question = {
        "direction": f"which way does the {key} object move ?",
        "turn": f"what color does the {key} turn ?",
        "appear": "which shape appears ?",
        "vanish": "which shape disappears ?",
        "more": "are there more or fewer objects at the end ?",
        "color": f"what color is the {key} ?",
        "shape": f"what shape is the {key} object ?",
    }[kind]
    return key, question, answer(kind, key, states(actors))


def answer(kind: str, key: str, frames: list[list[Item]]) -> str | None:
    """The answer to a ``kind`` question about the actor named by ``key`` (a colour or a shape), read
    off what the frames show; ``None`` where they do not answer it (e.g. no motion, no change)."""
    first, last = frames[0], frames[-1]
    if kind == "direction":
        path = [item for frame in frames for item in frame if item.color == key]
        if not path or (path[0].x, path[0].y) == (path[-1].x, path[-1].y):
            return None
        dx, dy = path[-1].x - path[0].x, path[-1].y - path[0].y
        if abs(dx) > abs(dy):
            return "right" if dx > 0 else "left"
        return "down" if dy > 0 else "up"
    if kind == "turn":
        colors = [item.color for frame in frames for item in frame if item.shape == key]
        return colors[-1] if colors and colors[-1] != colors[0] else None
    if kind in ("appear", "vanish"):
        before, after = (first, last) if kind == "vanish" else (last, first)
        gone = {item.shape for item in before} - {item.shape for item in after}
        return gone.pop() if len(gone) == 1 else None
    if kind == "more":
        return None if len(first) == len(last) else "more" if len(last) > len(first) else "fewer"
    field, named = ("color", "shape") if kind == "color" else ("shape", "color")
    found = [getattr(item, field) for item in first if getattr(item, named) == key]
    return found[0] if found else None


def _clip(rng: random.Random, kind: str) -> tuple[Actor, ...]:
    """Actors that answer a ``kind`` question: the role it needs first, then random ones (at most one
    actor appears, one disappears and one turns), placed so that no two paths overlap."""
    while True:
        count = rng.randint(2, 4)
        needed = NEEDS.get(kind) or (
            "stays" if kind in SINGLE_FRAME else rng.choice(("appears", "disappears"))
        )
        roles = [needed]
        for _ in range(count - 1):
            roles.append(rng.choice([r for r in ROLES if r in ("stays", "moves") or r not in roles]))
        shapes, colors = rng.sample(SHAPES, count), rng.sample(list(COLORS), count + 1)
        actors = _place(rng, roles, shapes, colors)
        if actors is not None and answerable(kind, actors):
            return actors


def _place(rng: random.Random, roles, shapes, colors) -> tuple[Actor, ...] | None:
    """The actors of ``roles`` at random places whose boxes (paths) keep 3 pixels apart; ``None`` when
    a few tries find no room."""
    actors: list[Actor] = []
    for role, shape, color in zip(roles, shapes, colors, strict=False):
        size = rng.randint(14, 20)
        detail = dict(at=rng.randint(4, FRAMES - 4))
        if role == "moves":
            detail.update(direction=rng.choice(list(DIRECTIONS)), distance=rng.randint(28, 44))
        if role == "turns":
            detail.update(turns=colors[-1])
        for _ in range(30):
            dx, dy = DIRECTIONS[detail["direction"]] if role == "moves" else (0, 0)
            reach_x, reach_y = dx * detail.get("distance", 0), dy * detail.get("distance", 0)
            x = rng.randint(max(2, 2 - reach_x), min(FRAME_SIZE - 2 - size, FRAME_SIZE - 2 - size - reach_x))
            y = rng.randint(max(2, 2 - reach_y), min(FRAME_SIZE - 2 - size, FRAME_SIZE - 2 - size - reach_y))
            actor = Actor(shape, color, role, x, y, size, **detail)
            if all(_apart(actor.box(), other.box()) for other in actors):
                actors.append(actor)
                break
        else:
            return None
    return tuple(actors)


def _apart(a: tuple[int, int, int, int], b: tuple[int, int, int, int], gap: int = 3) -> bool:
    return a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1]


def draw(rng: random.Random, actors: tuple[Actor, ...]) -> tuple[Image.Image, ...]:
    """The clip's frames: a light random background, each frame's items drawn over it."""
    background = tuple(rng.randint(225, 255) for _ in range(3))
    frames = []
    for items in states(actors):
        frame = Image.new("RGB", (FRAME_SIZE, FRAME_SIZE), background)
        canvas = ImageDraw.Draw(frame)
        for item in items:
            draw_shape(canvas, item.shape, item.x, item.y, item.size, COLORS[item.color])
        frames.append(frame)
    return tuple(frames)
