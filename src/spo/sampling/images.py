"""The seeded image sampler every command uses: one image per (prompt, seed), through the pipeline's own call.

Image i comes from a generator seeded with seeds[i] and used for that image alone, so it depends neither on its
batch nor on the other prompts: arms (before/after, LoRA strengths, schedulers) compare seed for seed. Callers
keep their own seed rules (`spo generate`: seed + i; the toy evaluation and the training validation grid:
`spread_seeds`).
"""

from __future__ import annotations

from typing import Sequence

MAX_SEED = 2**32 - 1  # numpy's limit, and A1111's seed range; torch would take 64 bits, numpy raises beyond 32


def spread_seeds(seed: int, n: int) -> list[int]:
    """Per-image seeds seed * 1_000_003 + i: runs with neighbouring seeds share no image seed."""
    return [seed * 1_000_003 + i for i in range(n)]


def sample_images(pipe, prompts: Sequence[str], seeds: Sequence[int], *, batch: int = 8, generator_device=None,
                  progress: bool = False, per_image: dict[str, Sequence] | None = None, **call_kwargs) -> list:
    """pipe(prompt=..., generator=[one per image], **call_kwargs) in batches; returns the images in order.

    per_image: further per-image arguments of the call (e.g. {"image": init images}), sliced like the prompts.
    generator_device: where the generators live (None: the CPU, as diffusers recommends for reproducibility).
    """
    import torch
    from tqdm.auto import tqdm

    if len(prompts) != len(seeds):
        raise ValueError("prompts and seeds differ in length")
    batch = max(1, batch)
    images = []
    for start in tqdm(range(0, len(prompts), batch), desc="sampling", unit="batch", disable=not progress):
        chunk = list(prompts[start:start + batch])
        gens = [torch.Generator(generator_device or "cpu").manual_seed(int(s)) for s in seeds[start:start + batch]]
        extra = {k: list(v[start:start + batch]) for k, v in (per_image or {}).items()}
        with torch.no_grad():
            out = pipe(prompt=chunk, generator=gens, **call_kwargs, **extra)
        images.extend(out.images)
    return images


def sample_native(pipe, prompts: Sequence[str], seeds: Sequence[int], *, steps: int = 20, cfg: float = 5.0,
                  eta: float = 0.0, batch: int = 32, progress: bool = True) -> list:
    """PIL images at the model's native resolution with its (DDIM) scheduler: SPO's evaluation setting by default."""
    from spo.models.family import native_resolution

    side = native_resolution(pipe)
    return sample_images(pipe, prompts, seeds, batch=batch, progress=progress, num_inference_steps=steps,
                         guidance_scale=cfg, eta=eta, height=side, width=side, output_type="pil")
