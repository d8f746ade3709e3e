"""What the SPM sees: the base model's one-step predicted clean image x0-hat at timestep t.

For a pair (as in SPM training and evaluation): encode both images with the base model's VAE, add the
SAME noise at the same t to both, make one CFG prediction, take DDIM's predicted x0 and decode it.
The base model is frozen; everything here runs under no_grad.
"""

from __future__ import annotations

from typing import Sequence

import torch

from spo.ddim import add_noise, rescaled_cfg, x0_from_output
from spo.models.family import encode
from spo.models.vae import decode as vae_decode
from spo.models.vae import encode as vae_encode
from spo.models.prediction import AUTO_RESCALE, parameterisation




def freeze(pipe) -> None:
    """The base model is a fixed function here: eval mode, no gradients."""
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        module = getattr(pipe, name, None)
        if module is not None:
            module.eval()
            module.requires_grad_(False)


@torch.no_grad()
def predict_x0_latents(pipe, x_t: torch.Tensor, t: torch.Tensor, prompts: Sequence[str], cfg_scale: float,
                       guidance_rescale: float = AUTO_RESCALE) -> torch.Tensor:
    """One CFG prediction (uncond + cond in one UNet batch) -> predicted clean latents, for the pipeline's
    prediction type (spo.models.prediction; rescaled CFG where it asks for it or `guidance_rescale` says)."""
    param = parameterisation(pipe, guidance_rescale)
    unet = pipe.unet
    cond = encode(pipe, list(prompts))
    uncond = encode(pipe, list(prompts), negative=True)
    x_in = torch.cat([x_t, x_t]).to(unet.dtype)
    out = unet(x_in, torch.cat([t, t]), **uncond.cat(cond).unet_kwargs()).sample.float()
    eps_u, eps_c = out.chunk(2)
    guided = rescaled_cfg(eps_u, eps_c, cfg_scale, param.guidance_rescale)
    a = pipe.scheduler.alphas_cumprod.to(x_t.device)[t].float().view(-1, 1, 1, 1)
    return x0_from_output(guided, x_t.float(), a, param.prediction_type)


@torch.no_grad()
def predicted_pair_images(pipe, images_0: torch.Tensor, images_1: torch.Tensor, prompts: Sequence[str],
                          t: torch.Tensor, generator: torch.Generator | None, cfg_scale: float = 5.0,
                          guidance_rescale: float = AUTO_RESCALE) -> tuple[torch.Tensor, torch.Tensor]:
    """x0-hat images of both images of each pair at t (same noise for the two), in [-1, 1]."""
    device = pipe.unet.device
    t = t.to(device)
    both = torch.cat([images_0, images_1]).to(device)
    latents = vae_encode(pipe.vae, both, generator).float()
    n = images_0.shape[0]
    noise = torch.randn(latents[:n].shape, generator=generator, device=device, dtype=latents.dtype)
    a = pipe.scheduler.alphas_cumprod.to(device)[t].float().view(-1, 1, 1, 1)
    noisy = add_noise(latents, torch.cat([noise, noise]), torch.cat([a, a]))
    x0 = predict_x0_latents(pipe, noisy, torch.cat([t, t]), list(prompts) * 2, cfg_scale, guidance_rescale)
    images = vae_decode(pipe.vae, x0)
    return images[:n], images[n:]
