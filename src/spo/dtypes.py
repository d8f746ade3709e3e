"""Precision names as the command line spells them (fp32, fp16, bf16) and their torch dtypes: the one table."""

from __future__ import annotations

import torch

from spo.errors import SpoInputError

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def weights_dtype(name: str, device_type: str) -> torch.dtype:
    """The torch dtype of a `--dtype` name for weights on `device_type`; fp16 is refused on CPU (a small fraction of
    fp32's speed there, while bf16 is fast on CPUs with AVX-512 BF16 or AMX)."""
    if name not in DTYPES:
        raise SpoInputError(f"dtype {name!r}: choose one of {', '.join(DTYPES)}")
    if name == "fp16" and device_type == "cpu":
        raise SpoInputError("--dtype fp16 needs a GPU; use bf16 on CPU")
    return DTYPES[name]


def stochastic_round_bf16(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """fp32 `x` rounded to bf16 up or down at random, with the probability of rounding up equal to the fraction of
    the gap that `x` covers: unbiased, E[round(x)] = x. bf16 keeps the upper 16 bits of an fp32, so adding uniform
    16-bit noise to the bits and truncating does it (a carry into the exponent is the correct next value). Master
    weights in bf16 need it: a small update rounded to nearest is lost whenever it is under half a bf16 step.
    torch has no stochastic-rounding cast, hence by hand."""
    if x.dtype != torch.float32:
        raise ValueError(f"stochastic_round_bf16 takes fp32, got {x.dtype}")
    noise = torch.randint(0, 1 << 16, x.shape, dtype=torch.int32, device=x.device, generator=generator)
    bits = (x.contiguous().view(torch.int32) + noise) & -65536  # clear the 16 bits bf16 drops
    return bits.view(torch.float32).to(torch.bfloat16)  # exact: the low bits are zero
