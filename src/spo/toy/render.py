"""Renderer: a scene plus a mix of quality defects -> an RGB image.

Defects have a severity in [0, 1] each; captions never mention them. `defect_level` (their sum) is the
ground truth the judge's aesthetic score must rank.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from spo.toy.detail import Details, apply_details, sample_details
from spo.toy.world import BACKGROUNDS, COLORS, IMAGE_SIZE, POSITIONS, SIZES, Scene, shape_polygon

SUPERSAMPLE = 4  # clean renders are drawn 4x larger and box-filtered down (anti-aliased edges)


@dataclass(frozen=True)
class Defects:
    blur: float = 0.0  # gaussian blur, sigma up to 1.6 px
    grain: float = 0.0  # additive gaussian noise, std up to 0.22 of the value range
    pixelation: float = 0.0  # rendered at lower resolution, nearest-neighbour upscaled (jaggies, blocks)
    low_contrast: float = 0.0  # whole image blended toward mid-gray, up to 65 %
    cramped: float = 0.0  # shape enlarged and pushed toward a border until it is cut off

    @property
    def level(self) -> float:
        return float(sum(asdict(self).values()))

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))


CLEAN = Defects()


def sample_defects(rng: np.random.Generator, p_present: float = 0.45) -> Defects:
    """Each defect is present with probability `p_present`, at a uniform severity."""
    values = {}
    for name in Defects.names():
        values[name] = float(rng.uniform(0.15, 1.0)) if rng.random() < p_present else 0.0
    return Defects(**values)


def _geometry(scene: Scene, side: int, scale: float, shift: tuple[float, float]):
    """(centre x, centre y, half-extent, outline or None for the circle) in pixels of a side x side image."""
    px, py = POSITIONS[scene.position]
    cx, cy = (px + shift[0]) * side, (py + shift[1]) * side
    r = SIZES[scene.size] * scale * side / 2
    return cx, cy, r, shape_polygon(scene.shape, cx, cy, r)


def _fill(draw: ImageDraw.ImageDraw, geometry, color) -> None:
    cx, cy, r, poly = geometry
    if poly is None:
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=color)
    else:
        draw.polygon(poly, fill=color)


def _draw(scene: Scene, side: int, scale: float, shift: tuple[float, float], opacity: float = 1.0) -> Image.Image:
    bg = BACKGROUNDS[scene.background]
    img = Image.new("RGB", (side, side), bg)
    color = tuple(round(b + opacity * (c - b)) for b, c in zip(bg, COLORS[scene.color]))
    _fill(ImageDraw.Draw(img), _geometry(scene, side, scale, shift), color)
    return img


def _coverage(scene: Scene, side: int, scale: float, shift: tuple[float, float], supersample: int) -> np.ndarray:
    """The shape's share of each pixel, in [0, 1], drawn as `_draw` draws it (box-filtered when supersampled)."""
    mask = Image.new("L", (side * supersample, side * supersample), 0)
    _fill(ImageDraw.Draw(mask), _geometry(scene, side * supersample, scale, shift), 255)
    return np.asarray(mask.resize((side, side), Image.BOX), dtype=np.float32) / 255.0


def render(scene: Scene, defects: Defects = CLEAN, seed: int = 0, size: int = IMAGE_SIZE,
           opacity: float = 1.0, details: Details | None = None) -> Image.Image:
    """Render `scene` with `defects`; deterministic for (scene, defects, seed, size, details).

    `opacity` < 1 blends the shape's fill into the background: a faint or (at 0) missing subject, the
    failure a generator shows when it drops the prompt's object. It is not a defect: the image is wrong, not ugly.
    `details` (toy world v2, `spo.toy.detail`): the fill's weave and the light, drawn before the defects degrade
    the image; None draws the flat shapes of the first toy world.
    """
    rng = np.random.default_rng(seed)
    scale, shift = 1.0, (0.0, 0.0)
    if defects.cramped > 0:
        scale = 1.0 + 0.9 * defects.cramped
        angle = rng.uniform(0, 2 * np.pi)
        reach = 0.28 * defects.cramped
        shift = (reach * np.cos(angle), reach * np.sin(angle))
    # Pixelation: draw at a coarser resolution without anti-aliasing, then upscale with nearest.
    low = int(round(size / (1 + 2.5 * defects.pixelation)))
    side, supersample = (low, 1) if defects.pixelation > 0 and low < size else (size, SUPERSAMPLE)
    img = _draw(scene, side * supersample, scale, shift, opacity)
    if supersample > 1:
        img = img.resize((side, side), Image.BOX)
    if details is not None:
        cov = opacity * _coverage(scene, side, scale, shift, supersample)
        x = apply_details(np.asarray(img, dtype=np.float32) / 255.0, cov, details, np.random.default_rng([seed, 7]))
        img = Image.fromarray(np.clip(x * 255.0 + 0.5, 0, 255).astype(np.uint8))
    if side < size:
        img = img.resize((size, size), Image.NEAREST)
    if defects.blur > 0:
        img = img.filter(ImageFilter.GaussianBlur(radius=1.6 * defects.blur))
    x = np.asarray(img, dtype=np.float32) / 255.0
    if defects.low_contrast > 0:
        a = 0.65 * defects.low_contrast
        x = (1 - a) * x + a * 0.5
    if defects.grain > 0:
        x = x + rng.normal(0.0, 0.22 * defects.grain, size=x.shape).astype(np.float32)
    return Image.fromarray(np.clip(x * 255.0 + 0.5, 0, 255).astype(np.uint8))


def render_dataset(n: int, seed: int, split: str = "train", p_present: float = 0.45, details: bool | None = None):
    """`n` (scene, defects, image) triples; deterministic for the seed. `details`: toy world 2's images, each with
    sampled detail qualities (`detail.sample_details`, drawn from their own stream so the scenes, defects and
    noise are those of the first world's images); None: when the shipped models are world 2's."""
    from spo.toy.defaults import shipped_world
    from spo.toy.world import sample_scenes

    details = shipped_world() >= 2 if details is None else details
    scenes = sample_scenes(n, seed, split)
    rng = np.random.default_rng([seed, 1])
    detail_rng = np.random.default_rng([seed, 3])
    out = []
    for scene in scenes:
        d = sample_defects(rng, p_present)
        dt = sample_details(detail_rng) if details else None
        out.append((scene, d, render(scene, d, seed=int(rng.integers(2**31)), details=dt)))
    return out
