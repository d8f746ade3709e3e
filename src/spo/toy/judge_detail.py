"""The judge's detail terms for toy world v2 (`spo.toy.detail`): how regular the fill's weave is, and whether the
shape is lit. Like the rest of the judge, nothing is learned and the scene is never seen: the shape is segmented
from the pixels (`judge.segment`), and the fill of one colour channel is fitted by least squares with an offset, the
light's ramp and the weave's two phases. The weave's coherent amplitude against what is left over tells a regular
weave from a broken one; the ramp's slope tells a lit shape from a flat one. Both are read relative to the world's
amplitudes, after undoing the blend toward gray that `low_contrast` applies and the grain's variance.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from spo.toy.detail import LIGHT, WEAVE, light_ramp, stripe_phase

MIN_FILL = 12  # fill pixels needed to fit the 4 coefficients at all

# Calibration: linear read-outs fitted by least squares once on the 482 of 1,500 training-split renders with sampled
# details and defects that have neither blur nor pixelation (tools/fit_detail_judge.py: correlation with the severity
# 0.74 texture, 0.76 light there; both defects erase the weave, which then reads as lost); clipped to [0, 1.2].
_TEXTURE = {"weave": -0.596, "residual": 0.23, "1": 0.68}
_FLAT = {"light": -0.554, "1": 0.669}


def _erode(mask: np.ndarray) -> np.ndarray:
    """4-neighbour erosion by one pixel: the fill without its anti-aliased edge."""
    m = np.pad(mask, 1, constant_values=False)
    return m[1:-1, 1:-1] & m[:-2, 1:-1] & m[2:, 1:-1] & m[1:-1, :-2] & m[1:-1, 2:]


def measure(x: np.ndarray) -> dict[str, float]:
    """Weave amplitude, leftover texture and light slope, each in units of the world's amplitude (1: as drawn)."""
    from spo.toy.judge import denoise, fade_and_noise, segment

    bg, fg, cov, _ = segment(x)
    fade, noise = fade_and_noise(x, bg, fg)
    inside = _erode(cov > 0.5)
    if inside.sum() < MIN_FILL:
        return {"weave": 0.0, "residual": 0.0, "light": 0.0, "fill_pixels": float(inside.sum())}
    # The channels with headroom for both layers (they are drawn into all three alike), else the one with the most.
    room = np.minimum(fg, 1 - fg)
    channels = np.flatnonzero(room >= LIGHT + WEAVE) if (room >= LIGHT + WEAVE).any() else [int(np.argmax(room))]
    phase = stripe_phase(x.shape[0])[inside]
    ramp = light_ramp(cov)[inside]
    one = np.ones_like(ramp)
    # The weave from the pixels as they are; the light from the median-filtered image when it is grainy (the
    # filter keeps a ramp and removes the grain). Both fits carry the weave's phases: over a small fill the ramp
    # and the stripes (both along the diagonal) are not orthogonal.
    design = np.stack([one, ramp, np.cos(phase), np.sin(phase)], axis=1)
    weave_fit = _fit(x[..., channels][inside], design)
    light_fit = _fit(denoise(x, noise)[..., channels][inside], design)
    coef, left = weave_fit
    keep = max(1.0 - fade, 0.2)  # the blend toward gray scales every layer by 1 - fade
    return {"weave": float(np.clip(np.hypot(coef[2], coef[3]) / keep / WEAVE, 0.0, 1.5)),
            "residual": float(np.clip(np.sqrt(max(left - noise**2 / len(channels), 0.0)) / keep / WEAVE, 0.0, 1.5)),
            "light": float(np.clip(light_fit[0][1] / keep / LIGHT, -0.5, 1.5)), "fill_pixels": float(inside.sum())}


def _fit(values: np.ndarray, design: np.ndarray) -> tuple[np.ndarray, float]:
    """Least squares of the channel mean of `values` (pixels, channels) on `design`: (coefficients, leftover variance)."""
    v = values.mean(axis=1)
    coef, *_ = np.linalg.lstsq(design, v, rcond=None)
    return coef, float(np.mean((v - design @ coef) ** 2))


def _readout(coefs: dict[str, float], m: dict[str, float]) -> float:
    return float(np.clip(sum(c * (1.0 if k == "1" else m[k]) for k, c in coefs.items()), 0.0, 1.2))


def detail_parts(image: Image.Image | np.ndarray) -> dict[str, float]:
    """Measurements and the estimated severity of each detail quality (`est_texture_break`, `est_flat_light`)."""
    from spo.toy.judge import as_array

    m = measure(as_array(image))
    if m["fill_pixels"] < MIN_FILL:  # no fill to judge (a tiny or missing shape): nothing to add or to take away
        return {**m, "est_texture_break": 0.0, "est_flat_light": 0.0}
    return {**m, "est_texture_break": _readout(_TEXTURE, m), "est_flat_light": _readout(_FLAT, m)}


def aesthetic(image: Image.Image | np.ndarray) -> float:
    """Toy world 2's aesthetic: the judge's (defects: grain, blur, low contrast, pixelation, a cramped shape) less
    the estimated severity of each detail quality."""
    from spo.toy import judge

    x = judge.as_array(image)
    d = detail_parts(x)
    return judge.aesthetic(x) - d["est_texture_break"] - d["est_flat_light"]


def aesthetic_preference(images, prompts, timesteps=None):
    """World 2's aesthetic as a preference scorer (`--reference spo.toy.judge_detail:aesthetic_preference`)."""
    from spo.toy import judge

    return judge.aesthetic_preference(images, prompts, timesteps, world=2)


def preference(images, prompts, timesteps=None, w_align: float = 2.0):
    """World 2's judge as SPO's preference (`--preference spo.toy.judge_detail:preference`): the simulated
    rater's utility, w_align * alignment + world 2's aesthetic, without its noise (`judge.preference` in world 2,
    whatever world the shipped models are)."""
    from spo.toy import judge

    return judge.preference(images, prompts, timesteps, w_align, world=2)
