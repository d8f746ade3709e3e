"""Fit the judge's detail read-outs (spo.toy.judge_detail._TEXTURE, _FLAT) by least squares on training-split
renders with sampled details and defects; prints the coefficients and how well each estimate tracks its severity.
Run once when the world's detail layers change: python tools/fit_detail_judge.py [-n 1500]"""

import argparse

import numpy as np

from spo.toy import judge_detail
from spo.toy.detail import sample_details
from spo.toy.render import render, sample_defects
from spo.toy.world import sample_scenes


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("-n", type=int, default=1500)
    ap.add_argument("--seed", type=int, default=99)
    args = ap.parse_args()
    rng = np.random.default_rng([args.seed, 2])
    rows = []
    for i, scene in enumerate(sample_scenes(args.n, args.seed, "train")):
        defects, details = sample_defects(rng), sample_details(rng)
        m = judge_detail.measure(np.asarray(render(scene, defects, seed=i, details=details), dtype=np.float64) / 255)
        if m["fill_pixels"] >= judge_detail.MIN_FILL:
            rows.append((m, details, defects.blur == 0 and defects.pixelation == 0))
    # Fitted where the detail survives the defects (no blur, no pixelation: both erase the weave, so there a
    # broken and a regular weave look alike and the estimate reads "texture lost", which is what a person sees).
    sharp = np.array([s for _, _, s in rows])
    for target, keys in (("texture_break", ("weave", "residual")), ("flat_light", ("light",))):
        a = np.array([[m[k] for k in keys] + [1.0] for m, _, _ in rows])
        y = np.array([getattr(d, target) for _, d, _ in rows])
        coef, *_ = np.linalg.lstsq(a[sharp], y[sharp], rcond=None)
        est = np.clip(a @ coef, 0, 1.2)
        print(target, {k: round(float(c), 3) for k, c in zip((*keys, "1"), coef)},
              f"corr {np.corrcoef(est[sharp], y[sharp])[0, 1]:.3f} on {sharp.sum()} sharp renders, "
              f"{np.corrcoef(est, y)[0, 1]:.3f} on all {len(rows)} with a fill")


if __name__ == "__main__":
    main()
