"""Precision names as the command line spells them (fp32, fp16, bf16) and their torch dtypes: the one table."""

from __future__ import annotations

import torch

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
