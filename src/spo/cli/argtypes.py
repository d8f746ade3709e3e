"""argparse value types shared by the subcommands: a bad value is one line naming it (exit 2)."""

from __future__ import annotations

import argparse
import math

from spo.sampling.images import MAX_SEED  # the sampler owns the seed range


def positive_int(text: str) -> int:
    value = integer(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


def nonneg_int(text: str) -> int:
    value = integer(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def probability(text: str) -> float:
    value = finite_float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {value}")
    return value


def integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None


def seed(text: str) -> int:
    """A seed in 0..2**32-1; -1 picks a random one, as in A1111 (the value returned is the one used, so outputs
    and metadata record the real seed)."""
    value = integer(text)
    if value == -1:
        return random_seed()
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"must be in 0..{MAX_SEED} (or -1 for a random seed), got {value}")
    return value


def random_seed() -> int:
    import secrets

    return secrets.randbelow(MAX_SEED + 1)

