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
