"""The project's statistics: one home for every 95 % interval that is printed, plotted or saved.

Which interval each function gives:

- `mean_interval(values)`: the mean with a 95 % interval mean +- q * sd / sqrt(n) (sd with ddof = 1), where q is
  Student's t quantile t(0.975, n - 1) for n < LARGE_N and the normal 1.96 from LARGE_N on (there the two
  differ by under 1.2 %, and the figures the project saved before this module, all normal with 1.96, stay the
  same). One value: a zero-width interval; none: NaN. With `bounds=(lo, hi)` (the range of the score, where it
  is known) the interval is clipped to it; `half_width` stays the unclipped q * sd / sqrt(n).
- `paired_difference(a, b)`: `mean_interval` of a - b over matched items (same seeds and prompts). Pairing
  removes what both arms share, so this is the interval that answers "is a better than b". Score bounds
  (lo, hi) bound the difference by lo - hi .. hi - lo.
- `wilson_interval(successes, n)`: the Wilson score interval for a proportion (win rates, accuracies, alignment
  rates; a tie counted as half a success is allowed). It never leaves [0, 1] and is not degenerate at 0 or n
  successes, unlike the normal approximation; its `half_width` is half its length.
- `proportion_half_width(p, n)`: the normal-approximation (Wald) half-width 1.96 * sqrt(p (1 - p) / n). Only for
  the saved fields that have always been a symmetric "+-" half-width (`spo spm eval` accuracies, sibling
  agreement, the toy sampler's alignment) so that their meaning does not change; print ranges with Wilson.
- `win_fractions(a, b)`: the one win rate's per-pair terms (1 / 0.5 for a tie / 0); its interval is Wilson's.
- `mean_summary(values)`: the dict `spo score` saves ({n, mean, std, ci95: [low, high], ci95_half_width,
  interval}); `proportion=True` gives the Wilson interval of 0/1 (or 0 / 0.5 / 1) values.

Z95 is the conventional 1.96 (scipy's norm.ppf(0.975) = 1.959964 differs by 2e-5 relative); the t quantiles are
exact (the closed-form Student t distribution function for whole degrees of freedom, inverted by bisection), so
no runtime dependency on scipy is needed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

Z95 = 1.96
LARGE_N = 100  # from this many values on, the normal quantile replaces Student's t


@dataclass(frozen=True)
class Interval:
    estimate: float  # the mean, difference or proportion
    low: float
    high: float
    half_width: float  # q * sd / sqrt(n) before clipping (mean), half the length (Wilson)
    n: int
    method: str  # "t", "normal", "wilson", or "none" (n < 2: no spread to measure)

    def contains(self, value: float) -> bool:
        return self.low <= value <= self.high

    def as_pair(self) -> list[float]:
        return [self.low, self.high]


def _t_two_sided_cdf(t: float, df: int) -> float:
    """P(|T| <= t) for Student's t with whole `df` (Abramowitz & Stegun 26.7.3 / 26.7.4)."""
    theta = math.atan(t / math.sqrt(df))
    s, c2 = math.sin(theta), math.cos(theta) ** 2
    if df % 2 == 0:
        term = total = 1.0
        for k in range(1, df // 2):
            term *= c2 * (2 * k - 1) / (2 * k)
            total += term
        return s * total
    if df == 1:
        return 2 * theta / math.pi
    term = total = 1.0
    for k in range(1, (df - 1) // 2):
        term *= c2 * (2 * k) / (2 * k + 1)
        total += term
    return 2 / math.pi * (theta + s * math.cos(theta) * total)


@lru_cache(maxsize=None)
def t_quantile(df: int, level: float = 0.95) -> float:
    """The two-sided `level` quantile of Student's t: t((1 + level) / 2, df), for whole df >= 1."""
    if df < 1 or int(df) != df:
        raise ValueError(f"degrees of freedom must be a whole number >= 1, got {df}")
    lo, hi = 0.0, 1.0
    while _t_two_sided_cdf(hi, int(df)) < level:
        hi *= 2
    for _ in range(200):  # bisection to the last bit: the distribution function is monotone in t
        mid = (lo + hi) / 2
        if mid in (lo, hi):
            break
        if _t_two_sided_cdf(mid, int(df)) < level:
            lo = mid
        else:
            hi = mid
    return hi


def critical_value(n: int) -> float:
    """The multiplier of the standard error for a 95 % interval of a mean of n values."""
    return t_quantile(n - 1) if 2 <= n < LARGE_N else Z95


def _clip(low: float, high: float, bounds) -> tuple[float, float]:
    if bounds is None:
        return low, high
    lo, hi = bounds
    return min(max(low, lo), hi), max(min(high, hi), lo)


def mean_interval(values, bounds: tuple[float, float] | None = None) -> Interval:
    """Mean and its 95 % interval (t below LARGE_N values, normal from there), clipped to `bounds` if given."""
    v = np.asarray(values, dtype=np.float64).ravel()
    n = int(v.size)
    if n == 0:
        nan = float("nan")
        return Interval(nan, nan, nan, nan, 0, "none")
    mean = float(v.mean())
    if n < 2:
        return Interval(mean, *_clip(mean, mean, bounds), 0.0, 1, "none")
    half = critical_value(n) * float(v.std(ddof=1)) / math.sqrt(n)
    return Interval(mean, *_clip(mean - half, mean + half, bounds), half, n, "t" if n < LARGE_N else "normal")


def mean_half_width(values) -> float:
    """The (unclipped) half-width of `mean_interval`: 0 for one value, NaN for none."""
    return mean_interval(values).half_width


def paired_difference(a, b, bounds: tuple[float, float] | None = None) -> Interval:
    """Mean of a - b over matched items with its 95 % interval; `bounds` are the range of the scores themselves."""
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    if a.shape != b.shape:
        raise ValueError(f"paired values differ in number: {a.size} and {b.size}")
    diff_bounds = None if bounds is None else (bounds[0] - bounds[1], bounds[1] - bounds[0])
    return mean_interval(a - b, diff_bounds)


def wilson_interval(successes: float, n: int) -> Interval:
    """Wilson score 95 % interval of a proportion successes / n (successes may count ties as halves)."""
    if n <= 0:
        nan = float("nan")
        return Interval(nan, nan, nan, nan, 0, "none")
    p = float(successes) / n
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"successes must lie in [0, n], got {successes} of {n}")
    z2 = Z95 * Z95
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = Z95 / (1 + z2 / n) * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    low, high = max(0.0, centre - half), min(1.0, centre + half)
    return Interval(p, low, high, (high - low) / 2, int(n), "wilson")


def proportion_interval(values) -> Interval:
    """Wilson interval of the mean of 0/1 values (a 0.5 counts as half a success, e.g. a tie)."""
    v = np.asarray(values, dtype=np.float64).ravel()
    return wilson_interval(float(v.sum()), int(v.size))


def proportion_half_width(p: float, n: int) -> float:
    """Normal-approximation (Wald) half-width of a proportion, for the fields saved as "+-" half-widths."""
    if n <= 0 or not math.isfinite(p):
        return float("nan")
    return float(Z95 * math.sqrt(max(p * (1 - p), 0.0) / n))


def win_fractions(a, b) -> np.ndarray:
    """Per matched pair: 1 where a scores higher than b, 0.5 for a tie, 0 where lower. Their mean is the
    project's one win rate (`proportion_interval` gives its Wilson interval)."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return np.where(a > b, 1.0, np.where(a < b, 0.0, 0.5))


def mean_summary(values, bounds: tuple[float, float] | None = None, proportion: bool = False) -> dict:
    """{n, mean, std, ci95: [low, high], ci95_half_width, interval} as `spo score` saves it."""
    v = np.asarray(values, dtype=np.float64).ravel()
    ci = proportion_interval(v) if proportion else mean_interval(v, bounds)
    return {"n": ci.n, "mean": ci.estimate, "std": float(v.std(ddof=1)) if v.size > 1 else 0.0,
            "ci95": ci.as_pair(), "ci95_half_width": ci.half_width, "interval": ci.method}
