"""Procedural scenes of coloured shapes with captions: data that is always available.

Each scene has 1-3 solid shapes on a lightly textured background, several paraphrased
captions (lowercase, words only) and a multi-sentence paragraph. Every word used is a whole
word of BERT's uncased WordPiece vocabulary (see `VOCABULARY`).
"""

from __future__ import annotations

import math
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ladic.data.captions import CaptionRecord

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (40, 80, 230),
    "yellow": (245, 225, 40),
    "purple": (150, 50, 190),
    "orange": (250, 140, 20),
    "white": (250, 250, 250),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star")
SIZES: tuple[str, ...] = ("small", "large")
POSITIONS: tuple[str, ...] = ("left", "right", "top", "bottom", "center")
BACKGROUNDS: dict[str, tuple[int, int, int]] = {"gray": (120, 120, 120), "black": (25, 25, 25)}
NUMBERS: tuple[str, ...] = ("zero", "one", "two", "three")
MIN_SIZE = 32

# Shape diameter as a fraction of the image side, (small, large), by number of objects.
_DIAMETER = {1: (0.22, 0.42), 2: (0.2, 0.4), 3: (0.15, 0.3)}
_PLACE = {"left": (0.25, 0.5), "right": (0.75, 0.5), "top": (0.5, 0.25), "bottom": (0.5, 0.75), "center": (0.5, 0.5)}
_WHERE = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "center": "in the center",
}
_PLURAL = {"circle": "circles", "square": "squares", "triangle": "triangles", "star": "stars"}

VOCABULARY: frozenset[str] = frozenset(
    [*COLOURS, *SHAPES, *_PLURAL.values(), *SIZES, *POSITIONS, *BACKGROUNDS, *NUMBERS[1:]]
    + "a an the of there is are picture image shape shapes on at in to and above below between "
    "row column side by other background".split()
)


@dataclass
class Scene:
    """A rendered scene; each object is {colour, shape, size, position, bbox=(x0, y0, x1, y1)}."""

    image: Image.Image
    captions: list[str]
    paragraph: str
    objects: list[dict]


def _draw(draw: ImageDraw.ImageDraw, shape: str, bbox: tuple[int, int, int, int], rgb: tuple[int, int, int]) -> None:
    x0, y0, x1, y1 = bbox[0], bbox[1], bbox[2] - 1, bbox[3] - 1
    if shape == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=rgb)
    elif shape == "square":
        draw.rectangle((x0, y0, x1, y1), fill=rgb)
    elif shape == "triangle":
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=rgb)
    elif shape == "star":
        cx, cy, r = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2
        points = []
        for k in range(10):
            radius = r if k % 2 == 0 else 0.45 * r
            angle = -math.pi / 2 + k * math.pi / 5
            points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
        draw.polygon(points, fill=rgb)
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def _background(rng: random.Random, size: int, rgb: tuple[int, int, int]) -> Image.Image:
    """A plain colour with a gentle gradient and pixel noise, so images are never constant."""
    nprng = np.random.default_rng(rng.getrandbits(63))
    ramp = np.linspace(-1.0, 1.0, size)
    angle = rng.uniform(0, 2 * math.pi)
    gradient = 10.0 * (math.cos(angle) * ramp[None, :] + math.sin(angle) * ramp[:, None])
    noise = nprng.normal(0.0, 4.0, (size, size, 3))
    pixels = np.asarray(rgb, dtype=np.float64) + gradient[..., None] + noise
    return Image.fromarray(np.clip(pixels, 0, 255).round().astype(np.uint8), "RGB")


def _bbox(
    rng: random.Random, size: int, centre: tuple[float, float], diameter: int, slack: tuple[float, float]
) -> tuple[int, int, int, int]:
    """Square bbox of side `diameter` near `centre`, moved by up to `slack` (fractions of the side)."""
    box = []
    for c, s in zip(centre, slack):
        lo = round(c * size + rng.uniform(-s, s) * size - diameter / 2)
        box.append(min(max(lo, 1), size - 1 - diameter))
    return box[0], box[1], box[0] + diameter, box[1] + diameter


def _np(obj: dict, with_size: bool = False) -> str:
    words = [obj["size"], obj["colour"], obj["shape"]] if with_size else [obj["colour"], obj["shape"]]
    return ("an " if words[0][0] in "aeiou" else "a ") + " ".join(words)


def _pair_captions(a: dict, b: dict, horizontal: bool, bg: str) -> list[str]:
    """Captions for two objects, `a` on the left (or top) and `b` on the right (or bottom)."""
    if a["colour"] == b["colour"] and a["shape"] == b["shape"]:
        group = f"two {a['colour']} {_PLURAL[a['shape']]}"
        layout = "side by side" if horizontal else "one above the other"
        captions = [group, f"there are {group} {layout}", f"a picture of {group} on a {bg} background"]
        if a["size"] != b["size"]:
            rel = "to the left of" if horizontal else "above"
            captions.append(f"{_np(a, True)} {rel} {_np(b, True)}")
        return captions
    if horizontal:
        return [
            f"{_np(a)} to the left of {_np(b)}",
            f"{_np(b)} to the right of {_np(a)}",
            f"there is {_np(a, True)} on the left and {_np(b, True)} on the right",
            f"a picture of {_np(a)} and {_np(b)}",
        ]
    return [
        f"{_np(a)} above {_np(b)}",
        f"{_np(b)} below {_np(a)}",
        f"there is {_np(a, True)} at the top and {_np(b, True)} at the bottom",
        f"a picture of {_np(a)} and {_np(b)}",
    ]


def _captions(objects: list[dict], horizontal: bool, bg: str) -> list[str]:
    if len(objects) == 1:
        o = objects[0]
        return [
            f"{_np(o)} {_WHERE[o['position']]}",
            f"there is {_np(o, True)}",
            f"a picture of {_np(o)}",
            f"{_np(o, True)} on a {bg} background",
        ]
    if len(objects) == 2:
        return _pair_captions(objects[0], objects[1], horizontal, bg)
    a, b, c = objects
    layout = "in a row" if horizontal else "in a column"
    if len({(o["colour"], o["shape"]) for o in objects}) == 1:
        group = f"three {a['colour']} {_PLURAL[a['shape']]}"
        return [group, f"there are {group} {layout}", f"a picture of {group} on a {bg} background"]
    return [
        " and ".join(f"{_np(o)} {_WHERE[o['position']]}" for o in objects),
        f"{_np(b)} between {_np(a)} and {_np(c)}",
        f"there are three shapes {layout}",
        f"a picture of three shapes on a {bg} background",
    ]


def _paragraph(objects: list[dict], horizontal: bool, bg: str) -> str:
    n = len(objects)
    kinds = {(o["colour"], o["shape"]) for o in objects}
    if n == 1:
        first = "there is one shape"
    elif len(kinds) == 1:
        first = f"there are {NUMBERS[n]} {objects[0]['colour']} {_PLURAL[objects[0]['shape']]}"
    else:
        first = f"there are {NUMBERS[n]} shapes"
    sentences = [first] + [f"{_np(o, True)} is {_WHERE[o['position']]}" for o in objects]
    if n == 2 and len(kinds) == 2:
        a, b = (f"the {o['colour']} {o['shape']}" for o in objects)
        sentences.append(f"{a} is to the left of {b}" if horizontal else f"{a} is above {b}")
    sentences.append(f"the background is {bg}")
    return " ".join(s + "." for s in sentences)


def make_scene(
    rng: random.Random | int,
    size: int = 64,
    max_objects: int = 2,
    min_objects: int = 1,
    colours: Sequence[str] | None = None,
    shapes: Sequence[str] | None = None,
    same_prob: float = 0.3,
) -> Scene:
    """Render one scene, deterministic given the seed (or the state of `rng`).

    Draws between `min_objects` and `max_objects` (1-3) shapes. Several objects lie in a
    row (left/right, or left/center/right) or a column (top/bottom, or top/center/bottom);
    with probability `same_prob` they all share colour and shape ("two green triangles").
    `max_objects=1` gives a single object whose colour and shape are in every caption.
    """
    rng = random.Random(rng) if isinstance(rng, int) else rng
    colours = list(colours or COLOURS)
    shapes = list(shapes or SHAPES)
    if size < MIN_SIZE:
        raise ValueError(f"size must be at least {MIN_SIZE}, got {size}")
    if not 1 <= min_objects <= max_objects <= 3:
        raise ValueError(f"need 1 <= min_objects <= max_objects <= 3, got {min_objects}, {max_objects}")
    unknown = sorted(set(colours) - set(COLOURS)) + sorted(set(shapes) - set(SHAPES))
    if unknown:
        raise ValueError(f"unknown colours or shapes {unknown}; known: {list(COLOURS)}, {list(SHAPES)}")

    n = rng.randint(min_objects, max_objects)
    bg = rng.choice(list(BACKGROUNDS))
    horizontal = rng.random() < 0.5
    if n == 1:
        positions = [rng.choice(POSITIONS)]
    elif n == 2:
        positions = ["left", "right"] if horizontal else ["top", "bottom"]
    else:
        positions = ["left", "center", "right"] if horizontal else ["top", "center", "bottom"]
    if n > 1 and rng.random() < same_prob:
        kinds = [(rng.choice(colours), rng.choice(shapes))] * n
    else:
        pool = [(c, s) for c in colours for s in shapes]
        kinds = rng.sample(pool, n) if len(pool) >= n else [rng.choice(pool) for _ in range(n)]

    image = _background(rng, size, BACKGROUNDS[bg])
    draw = ImageDraw.Draw(image)
    objects = []
    for i, (position, (colour, shape)) in enumerate(zip(positions, kinds)):
        size_name = rng.choice(SIZES)
        diameter = max(4, round(_DIAMETER[n][SIZES.index(size_name)] * size))
        if n == 1:
            centre, slack = _PLACE[position], (0.05, 0.05)
        else:
            along = max(0.0, (1 / n - diameter / size) / 2 - 0.01)
            centre, slack = ((i + 0.5) / n, 0.5), (along, 0.15 if n == 2 else 0.08)
            if not horizontal:
                centre, slack = centre[::-1], slack[::-1]
        bbox = _bbox(rng, size, centre, diameter, slack)
        _draw(draw, shape, bbox, COLOURS[colour])
        objects.append({"colour": colour, "shape": shape, "size": size_name, "position": position, "bbox": bbox})
    return Scene(image, _captions(objects, horizontal, bg), _paragraph(objects, horizontal, bg), objects)


def make_scenes(n: int, seed: int = 0, **kw) -> list[Scene]:
    """`n` scenes; scene i depends only on (seed, i), so a longer list extends a shorter one."""
    return [make_scene(random.Random(f"{seed}:{i}"), **kw) for i in range(n)]


def scene_records(
    n: int,
    seed: int,
    out_dir: str | os.PathLike[str],
    split: str = "train",
    paragraphs: bool = False,
    **kw,
) -> list[CaptionRecord]:
    """Write `n` scenes as PNGs into `out_dir` and return their records.

    Captions are the scene's captions, or its paragraph alone when `paragraphs` is true.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    records = []
    for i, scene in enumerate(make_scenes(n, seed, **kw)):
        image_id = f"scene_{seed}_{i:05d}"
        path = out / f"{image_id}.png"
        scene.image.save(path)
        captions = [scene.paragraph] if paragraphs else list(scene.captions)
        records.append(CaptionRecord(image_id, str(path), captions, split))
    return records
