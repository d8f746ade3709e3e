"""Toy world v2's fine detail: what a person judges in a finished image once the composition is right.

Two hidden qualities, severities in [0, 1] like the defects of `render.py`, never named by a caption:

- `texture_break`: the shape's fill carries a fine diagonal weave (period PERIOD px across the stripes); broken,
  the stripes lose their phase and become band-limited noise of the same strength (a smeared, irregular texture).
- `flat_light`: the shape is lit from the top left (its fill brightens toward that corner) and casts a soft
  shadow down and to the right; flat, neither.

Both are high- and mid-frequency content of the image: under the sampler's noise they are settled in the middle
and late steps, after the composition, which is what SPO's step-aware preference is for. The judge measures them
(`judge_detail`) from the pixels alone.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import numpy as np

PERIOD = 4.0  # px across the weave's stripes at 32 px
# Amplitudes in [0, 1] value units; together at most 0.16, the least headroom any palette colour keeps in its
# mid channel, so the judge can read them unclipped.
WEAVE = 0.06  # weave amplitude
LIGHT = 0.10  # brightness change from the fill's centre to its lit (or its shaded) extent
SHADOW = 0.45  # share of the background's brightness the shadow's core takes away
SHADOW_SHIFT = 2  # px, down and right


@dataclass(frozen=True)
class Details:
    texture_break: float = 0.0
    flat_light: float = 0.0

    @property
    def level(self) -> float:
        return float(sum(asdict(self).values()))

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))


FINE = Details()


def sample_details(rng: np.random.Generator, p_present: float = 0.45) -> Details:
    """Each quality is degraded with probability `p_present`, at a uniform severity (as `render.sample_defects`)."""
    return Details(**{name: float(rng.uniform(0.15, 1.0)) if rng.random() < p_present else 0.0
                      for name in Details.names()})


def stripe_phase(side: int) -> np.ndarray:
    """Phase of the ideal weave at each pixel centre: stripes run from the top right to the bottom left."""
    y, x = np.mgrid[0:side, 0:side] + 0.5
    return 2 * np.pi * (x + y) / (PERIOD * np.sqrt(2.0))


def band_noise(side: int, rng: np.random.Generator) -> np.ndarray:
    """Unit-variance noise with the weave's spatial frequency band (an annulus around 1/PERIOD), random phases."""
    fy, fx = np.meshgrid(np.fft.fftfreq(side), np.fft.fftfreq(side), indexing="ij")
    radius = np.hypot(fx, fy)
    band = np.exp(-0.5 * ((radius - 1.0 / PERIOD) / 0.04) ** 2)
    spectrum = band * np.exp(2j * np.pi * rng.random((side, side)))
    noise = np.real(np.fft.ifft2(spectrum))
    return noise / max(float(noise.std()), 1e-9)


def weave(side: int, texture_break: float, rng: np.random.Generator) -> np.ndarray:
    """The fill's texture in value units: the regular weave blended toward band noise of equal variance."""
    regular = np.sqrt(2.0) * np.cos(stripe_phase(side))  # unit variance
    s = float(texture_break)
    mixed = (1 - s) * regular + s * band_noise(side, rng) if s > 0 else regular
    return WEAVE / np.sqrt(2.0) * mixed / max(float(np.sqrt((1 - s) ** 2 + s**2)), 1e-9)


def light_ramp(coverage: np.ndarray) -> np.ndarray:
    """-1 at the shape's bottom-right extent .. +1 at its top-left one, along the light's direction."""
    side = coverage.shape[0]
    y, x = np.mgrid[0:side, 0:side] + 0.5
    w = coverage / max(float(coverage.sum()), 1e-9)
    u = -(x + y) / np.sqrt(2.0)  # grows toward the top left
    centre = float((w * u).sum())
    inside = coverage > 0.5
    reach = float(np.abs(u[inside] - centre).max()) if inside.any() else 1.0
    return np.clip((u - centre) / max(reach, 1.0), -1.0, 1.0)


def soft_shadow(coverage: np.ndarray) -> np.ndarray:
    """The shape's coverage moved down-right by SHADOW_SHIFT px and blurred: where its shadow falls, in [0, 1]."""
    k = int(SHADOW_SHIFT)
    moved = np.zeros_like(coverage)
    moved[k:, k:] = coverage[:-k, :-k]
    return np.clip(blur(moved, 1.2), 0.0, 1.0)


def blur(a: np.ndarray, sigma: float) -> np.ndarray:
    """Separable gaussian blur of a (H, W) array, zero outside it (numpy only: the toy needs no scipy)."""
    r = int(np.ceil(3 * sigma))
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    k /= k.sum()
    a = np.apply_along_axis(np.convolve, 0, a, k, mode="same")
    return np.apply_along_axis(np.convolve, 1, a, k, mode="same")


def apply_details(x: np.ndarray, coverage: np.ndarray, details: Details, rng: np.random.Generator) -> np.ndarray:
    """Detail layers on a clean render `x` (H, W, 3 in [0, 1]) whose shape covers `coverage` (H, W in [0, 1])."""
    side = x.shape[0]
    lit = 1.0 - float(details.flat_light)
    shadow = soft_shadow(coverage) * (1 - coverage)
    out = x * (1 - SHADOW * lit * shadow[..., None])
    fill = weave(side, details.texture_break, rng) + LIGHT * lit * light_ramp(coverage)
    return np.clip(out + (coverage * fill)[..., None], 0.0, 1.0)
