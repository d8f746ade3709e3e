"""Images for the models: PIL images -> [-1, 1] tensors at the model's square resolution."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch


def images_to_tensor(images, side: int) -> torch.Tensor:
    """PIL images -> [B, 3, side, side] in [-1, 1]: centre-crop to square, resize (Lanczos) when needed."""
    from PIL import Image

    out = []
    for im in images:
        w, h = im.size
        if (w, h) != (side, side):
            s = min(w, h)
            im = im.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
            im = im.resize((side, side), Image.LANCZOS)
        out.append(torch.from_numpy(np.asarray(im, dtype=np.float32).copy()).permute(2, 0, 1))
    return torch.stack(out) / 127.5 - 1.0


def pair_tensors(pairs, indices: Sequence[int], side: int) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Both images of the pairs at `indices` as tensors, and their captions."""
    decoded = [pairs[i].decode() for i in indices]
    return (images_to_tensor([d[0] for d in decoded], side), images_to_tensor([d[1] for d in decoded], side),
            [pairs[i].caption for i in indices])
