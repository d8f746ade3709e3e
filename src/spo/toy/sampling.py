"""Sampling the toy base models and judging what they make (DDIM 20 steps, CFG 5: SPO's evaluation setting)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from spo.models.family import FAMILIES
from spo.models.family import get as get_family
from spo.sampling.images import sample_native, spread_seeds
from spo import stats
from spo.toy.defaults import TOY_MODEL_DIR


def load_toy_pipeline(family: str | None = "sd15", path: str | Path | None = None):
    """A toy pipeline from `path` (default: the shipped `family` model); `family` None: the one the folder holds."""
    from diffusers import DDIMScheduler

    from spo.errors import SpoInputError

    if family is not None and family not in FAMILIES:
        raise SpoInputError(f"unknown toy family {family!r} (choose from {', '.join(FAMILIES)})")
    folder = Path(path) if path else TOY_MODEL_DIR / (family or "sd15")
    if not (folder / "model_index.json").is_file():
        raise SpoInputError(f"{folder}: no toy model here (run `spo toy build` first)")
    held = _folder_family(folder)
    if family is not None and held != family:
        raise SpoInputError(f"{folder} holds a {held}-family toy model, not {family} (pass --family {held})")
    pipe = get_family(held).pipeline_cls().from_pretrained(folder, local_files_only=True)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _folder_family(folder: Path) -> str:
    """The family whose pipeline class a diffusers folder's model_index.json names (read before any weights)."""
    import json

    from spo.errors import SpoInputError
    from spo.models.family import BY_NAME

    index = folder / "model_index.json"
    try:
        name = json.loads(index.read_text()).get("_class_name", "")
    except (ValueError, AttributeError) as e:  # not JSON, or JSON that is not an object
        raise SpoInputError(f"{index}: not a diffusers model index ({e})") from None
    return next((f.name for f in BY_NAME.values() if f.pipeline_class == name), "sd15")


def sample(pipe, prompts: list[str], seed: int, steps: int = 20, cfg: float = 5.0, batch: int = 32, eta: float = 0.0):
    """One image per prompt; image i depends only on (seed, i), so arms compare seed for seed."""
    return sample_native(pipe, prompts, spread_seeds(seed, len(prompts)), steps=steps, cfg=cfg, eta=eta, batch=batch)


def judge_images(images, prompts, aesthetic=None) -> dict:
    """The judge's figures of `images`; `aesthetic`: a per-image function in place of the judge's own (e.g. toy
    world 2's, `judge_detail.aesthetic`)."""
    from spo.toy import judge

    aes = np.asarray(judge.aesthetic_batch(images) if aesthetic is None else [aesthetic(im) for im in images],
                     dtype=np.float64)
    ali = np.asarray(judge.alignment_batch(images, prompts), dtype=np.float64)
    n = len(images)
    return {
        "n": n,
        "aesthetic_mean": float(aes.mean()), "aesthetic_std": float(aes.std(ddof=1)) if n > 1 else 0.0,
        "aesthetic_ci95": stats.mean_half_width(aes) if n > 1 else 0.0,
        "aesthetic_p10": float(np.percentile(aes, 10)), "aesthetic_p90": float(np.percentile(aes, 90)),
        "alignment": float(ali.mean()), "alignment_ci95": stats.proportion_half_width(float(ali.mean()), n),
        "per_image": {"aesthetic": aes.tolist(), "alignment": ali.tolist()},
    }

