"""The synthetic scenes: coloured shapes on soft backgrounds, and the true captions of each.

The vocabulary (shapes, colours, sizes, positions), which colour-shape pairs are held out,
scene sampling, rendering and captioning; ``data_prep.synth`` turns them into the corpus.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "star", "cross")
COLORS: tuple[str, ...] = ("red", "orange", "yellow", "green", "cyan", "blue", "purple", "pink")
COLOR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 35),
    "orange": (245, 135, 20),
    "yellow": (240, 220, 40),
    "green": (40, 165, 55),
    "cyan": (40, 205, 225),
    "blue": (35, 65, 215),
    "purple": (130, 45, 185),
    "pink": (245, 125, 195),
}
SIZES: tuple[str, ...] = ("small", "large")
POSITIONS: tuple[str, ...] = ("top left", "top right", "bottom left", "bottom right", "center")
# (colour, shape): shape i is held out in colour (3 * i + 1) % 8.
HELD_OUT_PAIRS: tuple[tuple[str, str], ...] = tuple(
    (COLORS[(3 * i + 1) % len(COLORS)], shape) for i, shape in enumerate(SHAPES)
)
ALL_PAIRS: tuple[tuple[str, str], ...] = tuple((c, s) for s in SHAPES for c in COLORS)
SEEN_PAIRS: tuple[tuple[str, str], ...] = tuple(p for p in ALL_PAIRS if p not in HELD_OUT_PAIRS)

SPLIT_IDS: dict[str, int] = {
    "train": 0, "bad": 1, "shape_seen": 2, "shape_unseen": 3, "color_seen": 4, "color_unseen": 5, "retrieval": 6,
}
SHAPE_TEMPLATES: tuple[str, ...] = ("a {c}.", "a photo of a {c}.", "a {c} shape.", "a drawing of a {c}.")
# No leading "a": "a {c}" would read "a orange" while training captions say "an orange".
COLOR_TEMPLATES: tuple[str, ...] = ("the {c} shape.", "something {c}.", "the {c} object.", "a photo of something {c}.")

# Geometry in units of the image side. Corner anchors sit at 0.25/0.75 so that even two
# large shapes (centre and corner) never touch: 0.354 > 1.06 * (0.15 + 0.15) + 0.02.
_ANCHORS = {
    "top left": (0.25, 0.25), "top right": (0.75, 0.25), "bottom left": (0.25, 0.75),
    "bottom right": (0.75, 0.75), "center": (0.5, 0.5),
}
_ROW_COL = {"top left": (0, 0), "top right": (0, 2), "bottom left": (2, 0), "bottom right": (2, 2), "center": (1, 1)}
_RADIUS = {"small": 0.09, "large": 0.15}
_JITTER = 0.03
_SINGLE_SHAPE_P = 0.7


@dataclass(frozen=True)
class ShapeSpec:
    """One shape in a scene; ``x``/``y`` is its centre in units of the image side."""

    shape: str
    color: str
    size: str
    position: str
    x: float
    y: float


Scene = tuple[ShapeSpec, ...]


def _place(rng: np.random.Generator, position: str, jitter: float) -> tuple[float, float]:
    ax, ay = _ANCHORS[position]
    dx, dy = rng.uniform(-jitter, jitter, size=2)
    return ax + float(dx), ay + float(dy)


def _overlap(a: ShapeSpec, b: ShapeSpec) -> bool:
    reach = 1.06 * (_RADIUS[a.size] + _RADIUS[b.size]) + 0.02
    return (a.x - b.x) ** 2 + (a.y - b.y) ** 2 < reach**2


def sample_scene(
    rng: np.random.Generator, pairs: Sequence[tuple[str, str]], n_shapes: int | None = None
) -> Scene:
    """Draw a scene of one or two shapes whose (colour, shape) pairs come from ``pairs``.

    Args:
        rng: Source of randomness.
        pairs: Allowed ``(colour, shape)`` pairs; a two-shape scene uses two different ones.
        n_shapes: 1 or 2; ``None`` draws 1 with probability 0.7.
    """
    if n_shapes is None:
        n_shapes = 1 if rng.random() < _SINGLE_SHAPE_P else 2
    if n_shapes == 2 and len(pairs) < 2:
        n_shapes = 1
    chosen = rng.choice(len(pairs), size=n_shapes, replace=False)
    positions = rng.choice(len(POSITIONS), size=n_shapes, replace=False)
    sizes = rng.integers(len(SIZES), size=n_shapes)
    specs = []
    for k in range(n_shapes):
        color, shape = pairs[int(chosen[k])]
        position = POSITIONS[int(positions[k])]
        x, y = _place(rng, position, _JITTER)
        specs.append(ShapeSpec(shape, color, SIZES[int(sizes[k])], position, x, y))
    if n_shapes == 2 and _overlap(*specs):  # fall back to the anchors, which never overlap
        specs = [ShapeSpec(s.shape, s.color, s.size, s.position, *_ANCHORS[s.position]) for s in specs]
    return tuple(specs)


def _outline(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]] | None:
    """Polygon vertices for ``shape`` inside a circle of radius ``r`` (``None`` for a circle)."""
    if shape == "square":
        h = 0.75 * r
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":
        cy += 0.15 * r  # centre the triangle's bounding box rather than its centroid
        return [(cx + r * np.sin(a), cy - r * np.cos(a)) for a in (0.0, 2 * np.pi / 3, 4 * np.pi / 3)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + 0.72 * r, cy), (cx, cy + r), (cx - 0.72 * r, cy)]
    if shape == "star":
        angles = np.arange(10) * np.pi / 5
        radii = np.where(np.arange(10) % 2 == 0, r, 0.45 * r)
        return [(cx + q * np.sin(a), cy - q * np.cos(a)) for q, a in zip(radii, angles)]
    if shape == "cross":
        a, t = 0.95 * r, 0.32 * r
        return [
            (cx - t, cy - a), (cx + t, cy - a), (cx + t, cy - t), (cx + a, cy - t), (cx + a, cy + t), (cx + t, cy + t),
            (cx + t, cy + a), (cx - t, cy + a), (cx - t, cy + t), (cx - a, cy + t), (cx - a, cy - t), (cx - t, cy - t),
        ]
    if shape == "circle":
        return None
    raise ValueError(f"unknown shape {shape!r}")


def _background(rng: np.random.Generator, n: int) -> np.ndarray:
    """A grey or softly tinted background, sometimes a gradient: float array (n, n, 3)."""
    base = rng.uniform(95, 215) + (rng.uniform(-18, 18, size=3) if rng.random() < 0.5 else np.zeros(3))
    img = np.broadcast_to(base, (n, n, 3)).astype(np.float64)
    if rng.random() < 0.4:
        angle = rng.uniform(0, 2 * np.pi)
        yy, xx = np.mgrid[0:n, 0:n] / max(n - 1, 1) - 0.5
        ramp = (np.cos(angle) * xx + np.sin(angle) * yy) * rng.uniform(20, 50)
        img = img + ramp[..., None]
    return img


def render_scene(scene: Scene, rng: np.random.Generator, image_size: int = 64, supersample: int = 4) -> Image.Image:
    """Draw a scene as an RGB image of ``image_size`` pixels square.

    Each shape is drawn as a mask at ``supersample`` times the resolution and box-filtered
    down (antialiasing), then filled with its colour (plus a little jitter); pixel noise last.
    """
    n, big = image_size, image_size * supersample
    canvas = Image.fromarray(np.clip(_background(rng, n), 0, 255).round().astype(np.uint8), "RGB")
    for spec in scene:
        mask = Image.new("L", (big, big), 0)
        draw = ImageDraw.Draw(mask)
        cx, cy, r = spec.x * big, spec.y * big, _RADIUS[spec.size] * big
        outline = _outline(spec.shape, cx, cy, r)
        if outline is None:
            q = 0.9 * r
            draw.ellipse((cx - q, cy - q, cx + q, cy + q), fill=255)
        else:
            draw.polygon(outline, fill=255)
        rgb = np.clip(np.array(COLOR_RGB[spec.color]) + rng.integers(-12, 13, size=3), 0, 255)
        canvas.paste(tuple(int(v) for v in rgb), mask=mask.resize((n, n), Image.Resampling.BOX))
    noisy = np.asarray(canvas, dtype=np.float64) + rng.normal(0.0, rng.uniform(1.5, 5.0), size=(n, n, 3))
    return Image.fromarray(np.clip(noisy, 0, 255).round().astype(np.uint8), "RGB")


def _a(word: str) -> str:
    return f"an {word}" if word[0] in "aeiou" else f"a {word}"


def _where(position: str) -> str:
    return "in the center" if position == "center" else f"at the {position}"


def caption_options(scene: Scene) -> list[str]:
    """Every caption template that is true of ``scene``; each names all colours and shapes."""
    if len(scene) == 1:
        (s,) = scene
        thing, where = f"{s.color} {s.shape}", _where(s.position)
        return [
            f"{_a(s.size)} {s.color} {s.shape} {where}",
            f"{_a(thing)} {where}",
            f"a picture of {_a(thing)}",
            f"{_a(s.size)} {thing}",
            f"a photo of {_a(s.size)} {thing} {where}",
            f"there is {_a(thing)} {where}",
            f"the {thing} is {where}",
            f"{_a(thing)} on a plain background",
            f"a drawing of {_a(thing)}",
            _a(thing),
        ]
    a, b = scene
    ta, tb = _a(f"{a.color} {a.shape}"), _a(f"{b.color} {b.shape}")
    options = [
        f"{ta} and {tb}",
        f"two shapes: {ta} and {tb}",
        f"{ta} {_where(a.position)} and {tb} {_where(b.position)}",
        f"a picture of {ta} and {tb}",
        f"{_a(a.size)} {a.color} {a.shape} and {_a(b.size)} {b.color} {b.shape}",
    ]
    (ra, ca), (rb, cb) = _ROW_COL[a.position], _ROW_COL[b.position]
    if ra < rb:
        options += [f"{ta} above {tb}", f"{tb} below {ta}"]
    elif ra > rb:
        options += [f"{ta} below {tb}", f"{tb} above {ta}"]
    else:
        options += [f"{ta} next to {tb}", f"{tb} next to {ta}"]
    if ca < cb:
        options += [f"{ta} to the left of {tb}", f"{tb} to the right of {ta}"]
    elif ca > cb:
        options += [f"{ta} to the right of {tb}", f"{tb} to the left of {ta}"]
    return options


def caption_scene(scene: Scene, rng: np.random.Generator, k: int = 1) -> list[str]:
    """``k`` different true captions for ``scene``, chosen with ``rng``."""
    options = caption_options(scene)
    return [options[int(i)] for i in rng.choice(len(options), size=k, replace=False)]
