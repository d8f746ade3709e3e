"""Sampling the toy base models and judging what they make (DDIM 20 steps, CFG 5: SPO's evaluation setting)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from spo.toy.defaults import TOY_MODEL_DIR
from spo.toy.models import FAMILIES


def load_toy_pipeline(family: str = "sd15", path: str | Path | None = None):
    from diffusers import DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    from spo.errors import SpoInputError

    if family not in FAMILIES:
        raise SpoInputError(f"unknown toy family {family!r} (choose from {', '.join(FAMILIES)})")
    folder = Path(path) if path else TOY_MODEL_DIR / family
    if not (folder / "model_index.json").is_file():
        raise SpoInputError(f"{folder}: no toy model here (run `spo toy build` first)")
    cls = StableDiffusionPipeline if family == "sd15" else StableDiffusionXLPipeline
    pipe = cls.from_pretrained(folder, local_files_only=True)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sample(pipe, prompts: list[str], seed: int, steps: int = 20, cfg: float = 5.0, batch: int = 32, eta: float = 0.0):
    """One image per prompt; image i depends only on (seed, i), so arms compare seed for seed."""
    from tqdm.auto import tqdm

    side = pipe.unet.config.sample_size * pipe.vae_scale_factor
    images = []
    for start in tqdm(range(0, len(prompts), batch), desc="sampling", unit="batch"):
        chunk = prompts[start : start + batch]
        gens = [torch.Generator().manual_seed(seed * 1_000_003 + start + i) for i in range(len(chunk))]
        out = pipe(chunk, num_inference_steps=steps, guidance_scale=cfg, generator=gens, eta=eta,
                   height=side, width=side, output_type="pil")
        images.extend(out.images)
    return images


def judge_images(images, prompts) -> dict:
    from spo.toy import judge

    aes = np.asarray(judge.aesthetic_batch(images), dtype=np.float64)
    ali = np.asarray(judge.alignment_batch(images, prompts), dtype=np.float64)
    n = len(images)
    return {
        "n": n,
        "aesthetic_mean": float(aes.mean()), "aesthetic_std": float(aes.std(ddof=1)) if n > 1 else 0.0,
        "aesthetic_ci95": float(1.96 * aes.std(ddof=1) / np.sqrt(n)) if n > 1 else 0.0,
        "aesthetic_p10": float(np.percentile(aes, 10)), "aesthetic_p90": float(np.percentile(aes, 90)),
        "alignment": float(ali.mean()), "alignment_ci95": float(1.96 * np.sqrt(ali.mean() * (1 - ali.mean()) / n)),
        "per_image": {"aesthetic": aes.tolist(), "alignment": ali.tolist()},
    }


def grid(images, cols: int = 8, scale: int = 4) -> Image.Image:
    w, h = images[0].size
    rows = (len(images) + cols - 1) // cols
    g = Image.new("RGB", (cols * w, rows * h), (255, 255, 255))
    for i, im in enumerate(images):
        g.paste(im, ((i % cols) * w, (i // cols) * h))
    return g.resize((cols * w * scale, rows * h * scale), Image.NEAREST)
