"""Analytic judge for the toy world: an aesthetic score from pixel statistics and a caption check.

Nothing here is learned. The aesthetic score estimates the severity of each hidden defect from what it
does to the pixels (noise, soft edges, blocks, washed-out colours, a shape pushed into the border) and
returns minus their estimated sum. Alignment segments the shape from the background and checks its
colour (nearest palette colour) and its shape (a matched filter over outlines of every shape, size, blur
and position) against the caption. The judge knows the world's vocabulary (`world.COLORS`,
`world.BACKGROUNDS`, `world.shape_polygon`) but never sees the scene or defects.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw

from spo.toy.world import BACKGROUNDS, COLORS, IMAGE_SIZE, POSITIONS, SHAPES, parse_caption, shape_polygon

_COLOR_NAMES = tuple(COLORS)
_COLOR_ARR = np.array([COLORS[c] for c in _COLOR_NAMES], dtype=np.float64) / 255.0
_BG_ARR = np.array(list(BACKGROUNDS.values()), dtype=np.float64) / 255.0


def _array(image: Image.Image | np.ndarray) -> np.ndarray:
    if isinstance(image, Image.Image):
        x = np.asarray(image.convert("RGB"), dtype=np.float64) / 255.0
    else:
        x = np.asarray(image, dtype=np.float64)
        if x.max() > 1.5:
            x = x / 255.0
    return x


def _border(x: np.ndarray, width: int = 1) -> np.ndarray:
    h, w = x.shape[:2]
    mask = np.zeros((h, w), dtype=bool)
    mask[:width, :] = mask[-width:, :] = True
    mask[:, :width] = mask[:, -width:] = True
    return mask


def _conv2(a: np.ndarray, k: np.ndarray) -> np.ndarray:
    """'valid' 2-D correlation of a (H, W) array with a small kernel."""
    kh, kw = k.shape
    h, w = a.shape
    out = np.zeros((h - kh + 1, w - kw + 1))
    for i in range(kh):
        for j in range(kw):
            if k[i, j] != 0:
                out += k[i, j] * a[i : i + h - kh + 1, j : j + w - kw + 1]
    return out


def _noise_sigma(x: np.ndarray) -> float:
    """Immerkaer's fast noise estimate (Laplacian-difference mask), averaged over channels, [0, 1] units.

    Pixels where the mask answers strongly because of an edge (not noise) are left out: the largest
    responses are trimmed relative to the robust spread.
    """
    m = np.array([[1, -2, 1], [-2, 4, -2], [1, -2, 1]], dtype=np.float64)
    sig = []
    for c in range(x.shape[2]):
        r = np.abs(_conv2(x[:, :, c], m)).ravel()
        med = np.median(r)
        keep = r[r <= max(3.0 * med, 1e-6)] if med > 0 else r
        if keep.size < r.size * 0.5:
            keep = np.sort(r)[: r.size // 2]
        sig.append(np.sqrt(np.pi / 2) * keep.mean() / 6.0)
    return float(np.mean(sig))


def _denoise(x: np.ndarray, sigma: float) -> np.ndarray:
    """3x3 median filter when the image is noisy, otherwise the image itself."""
    if sigma < 0.02:
        return x
    p = np.pad(x, ((1, 1), (1, 1), (0, 0)), mode="edge")
    h, w = x.shape[:2]
    stack = np.stack([p[i : i + h, j : j + w] for i in range(3) for j in range(3)], axis=0)
    return np.median(stack, axis=0)


def _background(x: np.ndarray) -> np.ndarray:
    """Robust colour of the border ring: median of the border pixels nearest the border's mode."""
    b = x[_border(x, 1)]
    med = np.median(b, axis=0)
    # The border may be partly covered by the shape (cramped); keep the dominant cluster.
    d = np.linalg.norm(b[:, None, :] - b[None, :, :], axis=2)
    support = (d < 0.12).sum(axis=1)
    centre = b[np.argmax(support)]
    close = b[np.linalg.norm(b - centre, axis=1) < 0.15]
    if close.shape[0] >= 0.3 * b.shape[0]:
        return np.median(close, axis=0)
    return med


def _otsu(values: np.ndarray) -> float:
    v = np.sort(values)
    n = v.size
    if n < 2 or v[-1] - v[0] < 1e-6:
        return float(v[-1]) if n else 0.0
    csum = np.cumsum(v)
    k = np.arange(1, n)
    w0, w1 = k / n, (n - k) / n
    m0 = csum[:-1] / k
    m1 = (csum[-1] - csum[:-1]) / (n - k)
    between = w0 * w1 * (m0 - m1) ** 2
    i = int(np.argmax(between))
    return float((v[i] + v[i + 1]) / 2)


def _segment(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(background colour, foreground colour, coverage map in [0, 1], hard foreground mask)."""
    sigma = _noise_sigma(x)
    xs = _denoise(x, sigma)
    bg = _background(xs)
    dist = np.linalg.norm(xs - bg, axis=2)
    thr = max(_otsu(dist.ravel()), 0.06)
    mask = dist > thr
    if mask.sum() == 0:
        return bg, bg, np.zeros(dist.shape), mask
    core = dist >= np.quantile(dist[mask], 0.5)
    fg = np.median(xs[core & mask], axis=0)
    # Coverage: projection of each pixel onto the bg -> fg segment.
    axis = fg - bg
    denom = float(axis @ axis)
    cov = np.clip(((xs - bg) @ axis) / max(denom, 1e-9), 0.0, 1.0) if denom > 1e-9 else mask.astype(float)
    return bg, fg, cov, mask


def _fade(bg: np.ndarray, fg: np.ndarray) -> tuple[float, int, int]:
    """Estimated blend toward mid-gray, with the palette background and colour indices that fit best."""
    best = (np.inf, 0.0, 0, 0)
    for bi, b0 in enumerate(_BG_ARR):
        for ci, c0 in enumerate(_COLOR_ARR):
            src = np.concatenate([b0, c0])
            obs = np.concatenate([bg, fg])
            d = 0.5 - src  # obs = src + a * (0.5 - src)
            a = float(np.clip((obs - src) @ d / max(d @ d, 1e-9), 0.0, 1.0))
            res = float(np.sum((obs - src - a * d) ** 2))
            if res < best[0]:
                best = (res, a, bi, ci)
    return best[1], best[2], best[3]


def _block_boundaries(size: int, low: int) -> np.ndarray:
    """Which adjacent pixel pairs (i-1, i), i = 1..size-1, straddle a block edge after nearest upscaling."""
    src = np.floor((np.arange(size) + 0.5) * low / size).astype(int)
    return src[1:] != src[:-1]


def _blockiness(x: np.ndarray, sigma: float) -> tuple[float, float]:
    """(block evidence weighted by block size, 1 - the smallest in-block energy share) over block grids.

    Nearest upscaling from `low` pixels makes neighbours inside one block identical, so all the energy
    of neighbour differences sits on the grid's block edges. The expected noise energy is removed first.
    """
    h = x.shape[0]
    ec = ((np.diff(x, axis=1)) ** 2).sum(axis=(0, 2)) - 2 * sigma**2 * 3 * h
    er = ((np.diff(x, axis=0)) ** 2).sum(axis=(1, 2)) - 2 * sigma**2 * 3 * h
    e = np.maximum(ec, 0) + np.maximum(er, 0)
    tot = e.mean()
    if tot <= 1e-9:
        return 0.0, 0.0
    best, best2 = 1.0, 0.0
    for low in range(8, h - 6):
        b = _block_boundaries(h, low)
        if (~b).sum() == 0:
            continue
        r = float(e[~b].mean() / tot)
        best = min(best, r)
        best2 = max(best2, (1 - min(r, 1.0)) * (~b).mean())
    return best2, float(1.0 - min(best, 1.0))


# Calibration: each defect's estimate is a linear read-out of the measurements that respond to it, with
# coefficients fitted by least squares once on 1,500 training-split renders (render_dataset(1500, 99)).
_GRAIN = 5.55  # noise sigma -> grain severity (the renderer adds noise of std 0.22 * severity, then clips)
_FADE = 1.49  # blend toward gray -> low_contrast severity (the renderer blends up to 0.65)
_BLUR = {"sharp": -0.334, "tvr": 0.173, "noise": -1.89, "1": -0.016}
_CRAMPED = {"off": 4.44, "area": 0.666, "1": -0.15}
_PIXEL = {"blocks": 1.93, "block_fit": -0.60, "sharp": -0.653, "noise": 1.15, "1": 0.297}


def _readout(coefs: dict[str, float], m: dict[str, float]) -> float:
    v = sum(c * (1.0 if k == "1" else m[k]) for k, c in coefs.items())
    return float(np.clip(v, 0.0, 1.2))


def _measure(x: np.ndarray) -> dict[str, float]:
    h, w = x.shape[:2]
    sigma = _noise_sigma(x)
    bg, fg, cov, _ = _segment(x)
    fade, _, _ = _fade(bg, fg)

    # Edge sharpness on the contrast-normalised coverage map: strongest gradients, and the
    # total-variation / energy ratio of the edge gradients (grows with the width of blurred edges).
    py, px = np.gradient(cov)
    sharp = float(np.quantile(np.hypot(px, py), 0.97))
    g = np.concatenate([np.abs(np.diff(cov, axis=1)).ravel(), np.abs(np.diff(cov, axis=0)).ravel()])
    g = g[g > 0.08]
    tvr = float(g.sum() / max((g**2).sum(), 1e-9))

    # Composition: the shape's centroid far from every allowed position, and a large share of the frame.
    hard = cov > 0.5
    if hard.any():
        ys, xs = np.nonzero(hard)
        cy, cx = (ys.mean() + 0.5) / h, (xs.mean() + 0.5) / w
    else:
        cy, cx = 0.5, 0.5
    off = min(np.hypot(cx - px_, cy - py_) for px_, py_ in POSITIONS.values())
    area = float(hard.mean())
    touch = float(hard[_border(x, 1)].mean())

    blocks, block_fit = _blockiness(x, sigma)
    return {
        "noise": sigma,
        "fade": fade,
        "contrast": float(np.linalg.norm(fg - bg)),
        "sharp": sharp,
        "tvr": tvr,
        "off": float(off),
        "area": area,
        "touch": touch,
        "blocks": blocks,
        "block_fit": block_fit,
    }


# What the detail terms (spo.toy.judge_detail) measure with: the segmentation, the gray blend and the grain.
as_array, segment, denoise = _array, _segment, _denoise


def fade_and_noise(x: np.ndarray, bg: np.ndarray, fg: np.ndarray) -> tuple[float, float]:
    """(estimated blend toward mid-gray, noise sigma) of an image and its segmented colours."""
    return _fade(bg, fg)[0], _noise_sigma(x)


def aesthetic_parts(image: Image.Image | np.ndarray) -> dict[str, float]:
    """Measurements of one image and the estimated severity of each defect (`est_*`)."""
    m = _measure(_array(image))
    est = {
        "est_grain": float(np.clip(_GRAIN * m["noise"], 0.0, 1.2)),
        "est_low_contrast": float(np.clip(_FADE * m["fade"], 0.0, 1.2)),
        "est_blur": _readout(_BLUR, m),
        "est_cramped": _readout(_CRAMPED, m),
        "est_pixelation": _readout(_PIXEL, m),
    }
    return {**m, **est}


def aesthetic(image: Image.Image | np.ndarray) -> float:
    """Higher is better: minus the estimated total severity of the defects."""
    p = aesthetic_parts(image)
    return -float(sum(v for k, v in p.items() if k.startswith("est_")))


def world_aesthetic(image: Image.Image | np.ndarray, world: int | None = None) -> float:
    """The aesthetic of a toy world (None: the shipped models' world): the defect terms above in world 1; in
    world 2 less its detail terms as well (`judge_detail.aesthetic`). Everything that judges toy images for
    training or evaluation (the rater, the scorers, `spo score --judge`, the toy evaluation) goes through here."""
    from spo.toy.defaults import shipped_world

    if (world or shipped_world()) >= 2:
        from spo.toy import judge_detail

        return judge_detail.aesthetic(image)
    return aesthetic(image)


def aesthetic_batch(images: Sequence[Image.Image | np.ndarray], world: int | None = None) -> np.ndarray:
    return np.array([world_aesthetic(im, world) for im in images], dtype=np.float64)


# ----------------------------------------------------------------------------------------- alignment


# Shape templates: every outline the renderer can draw (sizes 4..14.5 px covers small/large and the enlarged
# "cramped" shapes), each sharp and blurred, matched at every position including partly outside the frame.
_T_RADII = np.arange(4.0, 14.6, 0.5)
_T_BLURS = (0.0, 0.9, 1.8)
_T_SIDE = 40  # template canvas (pixels), large enough for the biggest blurred outline
_T_MARGIN = 4  # centres up to this far outside the image (shapes pushed into the border)
_FFT = IMAGE_SIZE + _T_SIDE  # linear (not circular) correlation


def _gaussian_blur(a: np.ndarray, sigma: float) -> np.ndarray:
    if sigma <= 0:
        return a
    k = np.exp(-0.5 * (np.arange(-6, 7) / sigma) ** 2)
    k /= k.sum()
    a = np.apply_along_axis(np.convolve, 0, a, k, mode="same")
    return np.apply_along_axis(np.convolve, 1, a, k, mode="same")


def _outline(shape: str, r: float, supersample: int = 4) -> np.ndarray:
    side = _T_SIDE * supersample
    img = Image.new("L", (side, side), 0)
    c, rr = side / 2, r * supersample
    poly = shape_polygon(shape, c, c, rr)
    if poly is None:
        ImageDraw.Draw(img).ellipse([c - rr, c - rr, c + rr, c + rr], fill=255)
    else:
        ImageDraw.Draw(img).polygon(poly, fill=255)
    return np.asarray(img.resize((_T_SIDE, _T_SIDE), Image.BOX), dtype=np.float64) / 255.0


def _window(a: np.ndarray) -> np.ndarray:
    lo = _T_SIDE // 2 - _T_MARGIN
    return a[..., lo : lo + IMAGE_SIZE + 2 * _T_MARGIN, lo : lo + IMAGE_SIZE + 2 * _T_MARGIN]


@functools.cache
def _template_bank() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(shape name per template, spectra of the flipped templates, template energy inside the frame per centre)."""
    names, templates = [], []
    for shape in SHAPES:
        for r in _T_RADII:
            base = _outline(shape, float(r))
            for b in _T_BLURS:
                names.append(shape)
                templates.append(_gaussian_blur(base, b))
    t = np.stack(templates)[:, ::-1, ::-1]
    spectra = np.fft.rfft2(t, s=(_FFT, _FFT))
    frame = np.fft.rfft2(np.ones((IMAGE_SIZE, IMAGE_SIZE)), s=(_FFT, _FFT))
    energy = _window(np.fft.irfft2(frame[None] * np.fft.rfft2(t**2, s=(_FFT, _FFT)), s=(_FFT, _FFT)))
    return np.array(names), spectra.astype(np.complex64), energy


def _matched_shape(cov: np.ndarray) -> str:
    """The shape whose best-placed template explains the coverage map best (least squares, free amplitude).

    Residual of cov ~ a * T at a centre = sum(cov^2) - <cov, T>^2 / <T, T>, so the best fit maximises
    <cov, T>^2 / <T, T>; both terms for all centres come from one FFT correlation per template.
    """
    names, spectra, energy = _template_bank()
    if cov.shape != (IMAGE_SIZE, IMAGE_SIZE):
        cov = np.asarray(Image.fromarray(cov.astype(np.float32)).resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR))
    corr = _window(np.fft.irfft2(np.fft.rfft2(cov.astype(np.float32), s=(_FFT, _FFT))[None] * spectra, s=(_FFT, _FFT)))
    gain = np.where(energy > 1e-3, np.maximum(corr, 0.0) ** 2 / np.maximum(energy, 1e-3), 0.0)
    return str(names[int(np.argmax(gain.reshape(len(names), -1).max(axis=1)))])


def classify(image: Image.Image | np.ndarray) -> tuple[str, str] | None:
    """(shape, colour) the image shows, or None when no foreground shape can be found.

    Colour: the palette colour (with a palette background) that best explains the foreground and
    background medians, allowing for a blend toward gray; on undimmed images this is the nearest
    palette colour. Shape: the best matched filter over all outlines (see `_matched_shape`), which stays
    right under blur, grain and cropping where simple silhouette statistics (fill, mass position) do not.
    """
    x = _array(image)
    bg, fg, cov, _ = _segment(x)
    if float(np.linalg.norm(fg - bg)) < 0.05 or (cov > 0.5).sum() < 4:
        return None
    _, _, ci = _fade(bg, fg)
    return _matched_shape(cov), _COLOR_NAMES[ci]


def alignment(image: Image.Image | np.ndarray, caption: str) -> int:
    """1 iff the caption is a toy caption whose shape and colour both match what the image shows."""
    scene = parse_caption(caption)
    if scene is None:
        return 0
    got = classify(image)
    if got is None:
        return 0
    return int(got == (scene.shape, scene.color))


def alignment_batch(images: Sequence[Image.Image | np.ndarray], captions: Sequence[str]) -> np.ndarray:
    if len(images) != len(captions):
        raise ValueError("images and captions differ in length")
    return np.array([alignment(im, c) for im, c in zip(images, captions)], dtype=np.int64)


# ------------------------------------------------------------------------------------- as a scorer


def columns(images, prompts: Sequence[str]) -> dict[str, list[float]]:
    """The judge as a model source's `judge`: aesthetic and alignment (0/1) of each PIL image."""
    return {"aesthetic": [world_aesthetic(i) for i in images],
            "alignment": [float(alignment(i, p)) for i, p in zip(images, prompts)]}


def preference(images, prompts: Sequence[str], timesteps=None, w_align: float = 2.0, world: int | None = None):
    """The judge as an SPO scorer (`--preference spo.toy.judge:preference`): the simulated rater's utility,
    w_align * alignment + aesthetic, without its noise. Images in [-1, 1] as [B, 3, H, W]; t is ignored.

    An oracle for diagnosis: SPO with it shows what the trainer does given a perfect clean-image preference,
    separating the trainer's limits from the preference model's. `world`: the toy world's aesthetic (None: the
    shipped models').
    """
    return as_scorer(lambda im, cap: w_align * alignment(im, cap) + world_aesthetic(im, world), images, prompts)


def aesthetic_preference(images, prompts: Sequence[str], timesteps=None, world: int | None = None):
    """The judge's aesthetic alone as a scorer (`spo.toy.judge:aesthetic_preference`); prompt and t are ignored."""
    return as_scorer(lambda im, cap: world_aesthetic(im, world), images, prompts)


def alignment_preference(images, prompts: Sequence[str], timesteps=None):
    """The judge's alignment (0/1) as a scorer (`spo.toy.judge:alignment_preference`); t is ignored."""
    return as_scorer(lambda im, cap: float(alignment(im, cap)), images, prompts)


def as_scorer(score, images, prompts: Sequence[str]):
    """Apply a per-image judge function to a [B, 3, H, W] batch in [-1, 1], as the scorer protocol wants."""
    import torch

    x = ((images.detach().float().clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).cpu().numpy()
    return torch.tensor([score(im, cap) for im, cap in zip(x, prompts)], dtype=torch.float32)
