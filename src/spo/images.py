"""PIL images <-> the tensors the models and scorers take: one home for the conversion."""

from __future__ import annotations

import numpy as np
import torch


def images_to_tensor(images, side: int | None = None) -> torch.Tensor:
    """PIL images -> float32 [B, 3, H, W] in [-1, 1] (v / 127.5 - 1 of the 8-bit RGB values).

    With `side`, an image of another size is centre-cropped to a square and resized (Lanczos) to side x side;
    without it the images must share one size.
    """
    from PIL import Image

    out = []
    for im in images:
        im = im.convert("RGB")
        w, h = im.size
        if side is not None and (w, h) != (side, side):
            s = min(w, h)
            im = im.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
            im = im.resize((side, side), Image.LANCZOS)
        out.append(torch.from_numpy(np.asarray(im, dtype=np.float32).copy()).permute(2, 0, 1))
    return torch.stack(out) / 127.5 - 1.0


def tensor_to_images(x: torch.Tensor) -> list:
    """[B, 3, H, W] in [-1, 1] -> 8-bit RGB PIL images; the exact inverse of images_to_tensor for its outputs."""
    from PIL import Image

    u8 = ((x.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return [Image.fromarray(a) for a in u8.permute(0, 2, 3, 1).numpy()]


def pair_tensors(pairs, indices, side: int) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Both images of the preference pairs at `indices` as [-1, 1] tensors at `side`, and their captions."""
    decoded = [pairs[i].decode() for i in indices]
    return (images_to_tensor([d[0] for d in decoded], side), images_to_tensor([d[1] for d in decoded], side),
            [pairs[i].caption for i in indices])


def flip_draws(generators: list[torch.Generator]) -> torch.Tensor:
    """[2n] bools, winners' then losers': mirror this image? Two coins per pair from its generator.

    Each image its own coin, as Diffusion-DPO's official script (torchvision's RandomHorizontalFlip on each
    image); drawn from the pair's generator, not the global RNG as torchvision does, so a run is the same for
    any micro-batch, resume or process count.
    """
    coins = torch.stack([torch.rand(2, generator=g) < 0.5 for g in generators])
    return torch.cat([coins[:, 0], coins[:, 1]])


def flip_images(images: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """Mirror left-right the images [B, C, H, W] where `flip` [B] is true."""
    return torch.where(flip.view(-1, 1, 1, 1), images.flip(-1), images)
