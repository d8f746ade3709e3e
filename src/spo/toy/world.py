"""What the toy world contains: shapes, colors, backgrounds, sizes, positions, and the caption grammar.

A scene is the content a caption describes. Quality defects (see `render.py`) are never part of it:
two renders of one scene differ only in aesthetics, as two web images for one prompt do.

The held-out split keeps whole (shape, color, background) combinations out of training, chosen so that
every pair of attributes is still seen in training: evaluation on it measures composition, not recall.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

SHAPES = ("circle", "square", "triangle", "diamond")
COLORS: dict[str, tuple[int, int, int]] = {  # RGB
    "red": (220, 40, 40), "orange": (245, 140, 20), "yellow": (240, 220, 40), "green": (40, 170, 60),
    "cyan": (40, 205, 215), "blue": (40, 80, 230), "purple": (140, 50, 200), "pink": (250, 130, 190)}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (240, 240, 240), "black": (15, 15, 15), "gray": (128, 128, 128), "navy": (20, 30, 85),
    "brown": (105, 65, 30), "olive": (90, 100, 30)}
SIZES: dict[str, float] = {"small": 0.28, "large": 0.46}  # shape extent as a fraction of the image side
POSITIONS: dict[str, tuple[float, float]] = {  # (x, y) of the shape's centre as fractions of the side
    "in the center": (0.5, 0.5),
    "top left": (0.3, 0.3),
    "top right": (0.7, 0.3),
    "bottom left": (0.3, 0.7),
    "bottom right": (0.7, 0.7),
}
IMAGE_SIZE = 32


def shape_polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]] | None:
    """Outline of a shape centred at (cx, cy) with half-extent r, in pixels; None for the circle."""
    if shape == "square":
        r *= 0.86  # equal visual weight with the circle
        return [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "triangle":
        return [(cx, cy - r), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)]
    return None  # circle


@dataclass(frozen=True)
class Scene:
    shape: str
    color: str
    background: str
    size: str
    position: str

    @property
    def caption(self) -> str:
        return f"a {self.size} {self.color} {self.shape} on a {self.background} background, {self.position}"

    @property
    def triplet(self) -> tuple[str, str, str]:
        return (self.shape, self.color, self.background)


def is_held_out(shape: str, color: str, background: str) -> bool:
    """1 in 8 (shape, color, background) triplets; each (shape, color) pair keeps >= 5 of its 6 backgrounds."""
    s, c, b = SHAPES.index(shape), list(COLORS).index(color), list(BACKGROUNDS).index(background)
    return (s + 3 * c + 5 * b) % 8 == 0


def all_scenes(split: str = "all") -> list[Scene]:
    """Every scene of a split ("train", "heldout" or "all"), in a fixed order."""
    if split not in ("train", "heldout", "all"):
        raise ValueError(f"unknown split {split!r}")
    scenes = []
    for shape, color, bg, size, pos in itertools.product(SHAPES, COLORS, BACKGROUNDS, SIZES, POSITIONS):
        held = is_held_out(shape, color, bg)
        if split == "all" or (split == "heldout") == held:
            scenes.append(Scene(shape, color, bg, size, pos))
    return scenes


def sample_scenes(n: int, seed: int, split: str = "train") -> list[Scene]:
    """`n` scenes drawn uniformly (with replacement) from a split, deterministic for a seed."""
    pool = all_scenes(split)
    idx = np.random.default_rng(seed).integers(0, len(pool), size=n)
    return [pool[i] for i in idx]


def prompts(split: str = "train") -> list[str]:
    return [s.caption for s in all_scenes(split)]


_CAPTION_INDEX: dict[str, Scene] | None = None


def parse_caption(caption: str) -> Scene | None:
    """The scene a toy caption describes, or None for a caption outside the grammar."""
    global _CAPTION_INDEX
    if _CAPTION_INDEX is None:
        _CAPTION_INDEX = {s.caption: s for s in all_scenes("all")}
    return _CAPTION_INDEX.get(caption.strip().lower())
