"""A procedural world of captioned images: coloured shapes on plain backgrounds.

The embedded `builtin:shapes-sd` model was pretrained on the base part of this world (three shapes,
solid, six colours, three backgrounds); what it has never seen — a new shape named by a new word
(`zorb`, a five-pointed star; `quib`, a plus sign) and a new style of a shape (`hollow`: the
outline only) — is what a dropped batch can teach it, and what the judge
(`models.judge`) tells apart. Tests, benches and the README's walkthrough make their batches here.

Every scene is a pure function of (seed, index): the same arguments give the same scene
everywhere, and the same pixels with the same Pillow (its polygon filling and resampling may
change between versions).
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

BASE_SHAPES = ("circle", "square", "triangle")
NEW_SHAPES = ("zorb", "quib")  # words the base model never saw
SHAPES = BASE_SHAPES + NEW_SHAPES
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 210, 40),
    "purple": (140, 50, 180),
    "orange": (240, 130, 30),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (245, 245, 245),
    "black": (15, 15, 15),
    "gray": (128, 128, 128),
}
SUPERSAMPLE = 4  # drawn at 4x and reduced: smooth edges, like a photo's


@dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    background: str
    hollow: bool = False
    size: float = 0.6  # the shape's extent as a share of the image side
    x: float = 0.5  # centre, as shares of the side
    y: float = 0.5
    angle: float = 0.0  # degrees

    @property
    def caption(self) -> str:
        style = "hollow " if self.hollow else ""
        return f"a {style}{self.colour} {self.shape} on a {self.background} background"

    def draw(self, px: int = 64) -> Image.Image:
        side = px * SUPERSAMPLE
        img = Image.new("RGB", (side, side), BACKGROUNDS[self.background])
        pen = ImageDraw.Draw(img)
        colour = COLOURS[self.colour]
        radius = self.size * side / 2
        cx, cy = self.x * side, self.y * side
        width = max(1, round(side * 0.07))  # a hollow shape's stroke
        if self.shape == "circle":
            box = (cx - radius, cy - radius, cx + radius, cy + radius)
            if self.hollow:
                pen.ellipse(box, outline=colour, width=width)
            else:
                pen.ellipse(box, fill=colour)
        else:
            points = _outline(self.shape, cx, cy, radius, self.angle)
            if self.hollow:
                pen.line([*points, points[0], points[1]], fill=colour, width=width, joint="curve")
            else:
                pen.polygon(points, fill=colour)
        return img.resize((px, px), Image.Resampling.LANCZOS)


def _outline(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    """The polygon of a shape: corners on a circle of radius r, turned by `angle`."""
    if shape == "square":
        corners = [(r * 0.8, 45 + 90 * k) for k in range(4)]
    elif shape == "triangle":
        corners = [(r, -90 + 120 * k) for k in range(3)]
    elif shape == "zorb":  # a five-pointed star
        corners = [(r if k % 2 == 0 else r * 0.42, -90 + 36 * k) for k in range(10)]
    elif shape == "quib":  # a plus sign
        a, b = r * 0.34, r
        corners = [(math.hypot(x, y), math.degrees(math.atan2(y, x))) for x, y in (
            (a, -b), (a, -a), (b, -a), (b, a), (a, a), (a, b),
            (-a, b), (-a, a), (-b, a), (-b, -a), (-a, -a), (-a, -b))]
    else:
        raise ValueError(f"shape {shape!r}: one of {', '.join(SHAPES)}")
    turn = math.radians(angle)
    return [(cx + d * math.cos(math.radians(t) + turn), cy + d * math.sin(math.radians(t) + turn))
            for d, t in corners]


def scenes(
    n: int,
    seed: int,
    *,
    shapes: Sequence[str] = BASE_SHAPES,
    colours: Sequence[str] = tuple(COLOURS),
    backgrounds: Sequence[str] = tuple(BACKGROUNDS),
    hollow: bool | None = False,
) -> list[Scene]:
    """n scenes drawn from the given choices (`hollow=None`: either style), a pure function of
    (seed, index): scene i is the same whatever n is."""
    for name, chosen, known in (("shape", shapes, SHAPES), ("colour", colours, COLOURS),
                                ("background", backgrounds, BACKGROUNDS)):
        unknown = [c for c in chosen if c not in known]
        if unknown or not chosen:
            raise ValueError(f"{name} {unknown[0] if unknown else '(none)'!r}: "
                             f"one or more of {', '.join(known)}")
    out = []
    for i in range(n):
        rng = random.Random(f"{seed}:{i}")
        shape = rng.choice(list(shapes))
        colour = rng.choice(list(colours))
        background = rng.choice([b for b in backgrounds if not _clash(colour, b)] or backgrounds)
        size = rng.uniform(0.45, 0.8)
        margin = size / 2 + 0.02
        out.append(Scene(
            shape=shape, colour=colour, background=background,
            hollow=rng.random() < 0.5 if hollow is None else hollow,
            size=round(size, 4), x=round(rng.uniform(margin, 1 - margin), 4),
            y=round(rng.uniform(margin, 1 - margin), 4), angle=round(rng.uniform(-20, 20), 2),
        ))
    return out


def _clash(colour: str, background: str) -> bool:
    """A yellow shape on white is barely visible: such pairs are not drawn."""
    return (colour, background) == ("yellow", "white")


def write_batch(folder: Path, chosen: Iterable[Scene], px: int = 64, *,
                ready: str | None = None) -> list[Path]:
    """Each scene as `NNNN.png` with its caption in `NNNN.txt`; then the ready marker, if
    named, so an inbox takes the folder only once it is whole."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for i, scene in enumerate(chosen):
        path = folder / f"{i:04d}.png"
        scene.draw(px).save(path)
        path.with_suffix(".txt").write_text(scene.caption + "\n")
        written.append(path)
    if ready:
        (folder / ready).touch()
    return written
