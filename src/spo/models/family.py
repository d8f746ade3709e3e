"""Model families: everything that differs between SD1.5 and SDXL, behind one small interface.

A trainer or sampler asks the family for the UNet's conditioning of a batch of prompts and never looks
at text encoders, pooled embeddings or add_time_ids itself. Prompt encoding goes through the pipeline's
own `encode_prompt` (diffusers), so the conditioning is exactly what diffusers' sampling uses.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from spo.errors import SpoInputError

CONFIG_DIR = Path(__file__).resolve().parent.parent / "assets" / "configs"  # the real bases' component configs
# Original (ldm/sgm) single-file layout: the prefixes every family shares.
UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."


@dataclass(frozen=True)
class Family:
    """What differs between SD1.5 and SDXL, in one place: pipeline classes, native resolution, text encoders and
    the prefixes of their keys in the original single-file layout and in webui/kohya LoRAs."""

    name: str  # "sd15" | "sdxl"
    pipeline_class: str  # diffusers class name (txt2img)
    default_resolution: int  # the real base model's native side in pixels
    te_prefix: dict[str, str] = field(default_factory=dict)  # text encoder component -> original-layout key prefix
    webui_te_prefix: dict[str, str] = field(default_factory=dict)  # component -> webui/kohya LoRA key prefix

    @property
    def text_encoders(self) -> tuple[str, ...]:
        return tuple(self.te_prefix)

    @property
    def config_dir(self) -> Path:
        return CONFIG_DIR / self.name

    def pipeline_cls(self):
        import diffusers

        return getattr(diffusers, self.pipeline_class)


SD15 = Family("sd15", "StableDiffusionPipeline", 512, {"text_encoder": "cond_stage_model.transformer."},
              {"text_encoder": "lora_te_"})
SDXL = Family("sdxl", "StableDiffusionXLPipeline", 1024,
              {"text_encoder": "conditioner.embedders.0.transformer.", "text_encoder_2": "conditioner.embedders.1.model."},
              {"text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"})
BY_NAME: dict[str, Family] = {f.name: f for f in (SD15, SDXL)}
FAMILIES: tuple[str, ...] = tuple(BY_NAME)  # ("sd15", "sdxl")


def get(name: str) -> Family:
    if name not in BY_NAME:
        raise SpoInputError(f"unknown model family {name!r} (choose from {', '.join(FAMILIES)})")
    return BY_NAME[name]


@dataclass
class Conditioning:
    """Keyword arguments for `unet(latents, t, **cond.unet_kwargs())`, batched along dim 0."""

    encoder_hidden_states: torch.Tensor
    added_cond_kwargs: dict[str, torch.Tensor] | None = None

    def unet_kwargs(self) -> dict:
        kw = {"encoder_hidden_states": self.encoder_hidden_states}
        if self.added_cond_kwargs is not None:
            kw["added_cond_kwargs"] = self.added_cond_kwargs
        return kw

    def cat(self, other: "Conditioning") -> "Conditioning":
        added = None
        if self.added_cond_kwargs is not None:
            added = {k: torch.cat([v, other.added_cond_kwargs[k]]) for k, v in self.added_cond_kwargs.items()}
        return Conditioning(torch.cat([self.encoder_hidden_states, other.encoder_hidden_states]), added)

    def index(self, idx) -> "Conditioning":
        added = None if self.added_cond_kwargs is None else {k: v[idx] for k, v in self.added_cond_kwargs.items()}
        return Conditioning(self.encoder_hidden_states[idx], added)


def family_of(pipe) -> str:
    """The family of a loaded pipeline (the one detector; checkpoint files are read by their key names instead)."""
    return "sdxl" if getattr(pipe, "text_encoder_2", None) is not None else "sd15"


def native_resolution(pipe) -> int:
    """The side, in pixels, the pipeline's UNet was trained at (sample size x VAE scale)."""
    return int(pipe.unet.config.sample_size * pipe.vae_scale_factor)


def latent_side(side: int, vae_factor: int, where: str = "resolution") -> int:
    """The latent side of a `side`-pixel image; the UNet's three downsamplings need a multiple of 8 latents."""
    if side <= 0 or side % (vae_factor * 8):
        raise SpoInputError(f"{where} {side}: must be a multiple of {vae_factor * 8} for this model")
    return side // vae_factor


def encode(pipe, prompts: list[str], negative: bool = False, side: int | None = None) -> Conditioning:
    """Conditioning for `prompts` (or, with negative=True, the unconditional branch for as many rows).

    SDXL's unconditional branch is all zeros (force_zeros_for_empty_prompt, as its pipeline does); its
    micro-conditioning names `side` (default: the native resolution) as original and target size.
    """
    device = pipe.unet.device
    if family_of(pipe) == "sd15":
        if negative:
            embeds, _ = pipe.encode_prompt([""] * len(prompts), device, 1, False)
        else:
            embeds, _ = pipe.encode_prompt(prompts, device, 1, False)
        return Conditioning(embeds)
    embeds, _, pooled, _ = pipe.encode_prompt(prompts, device=device, num_images_per_prompt=1,
                                              do_classifier_free_guidance=False)
    if negative:
        embeds, pooled = torch.zeros_like(embeds), torch.zeros_like(pooled)
    return Conditioning(embeds, {"text_embeds": pooled, "time_ids": add_time_ids(pipe, len(prompts), embeds.dtype, side)})


def add_time_ids(pipe, batch: int, dtype=torch.float32, side: int | None = None) -> torch.Tensor:
    """SDXL micro-conditioning: original size, crop top-left, target size (no crop; default native resolution)."""
    side = side or native_resolution(pipe)
    ids = torch.tensor([side, side, 0, 0, side, side], dtype=dtype, device=pipe.unet.device)
    return ids.expand(batch, 6)


def trainable_text_encoders(pipe) -> list[torch.nn.Module]:
    return [m for m in (pipe.text_encoder, getattr(pipe, "text_encoder_2", None)) if m is not None]


def guided_output(unet, x: torch.Tensor, t: torch.Tensor, cond: Conditioning, uncond: Conditioning,
                  scale: float, guidance_rescale: float = 0.0) -> torch.Tensor:
    """The CFG model output (eps for an epsilon model, v for a v-prediction one), with the unconditional and
    conditional halves in one UNet batch; rescaled CFG when guidance_rescale > 0 (spo.ddim.rescaled_cfg).
    spo.ddim.x0_eps_from_output turns it into x0 / eps for the checkpoint's prediction type."""
    from spo.ddim import cfg, rescaled_cfg

    both = uncond.cat(cond)
    out = unet(torch.cat([x, x]), torch.cat([t, t]), **both.unet_kwargs()).sample
    out_uncond, out_cond = out.chunk(2)
    if guidance_rescale > 0:
        return rescaled_cfg(out_uncond, out_cond, scale, guidance_rescale)
    return cfg(out_uncond, out_cond, scale)
