"""Tiny but real SD1.5-family and SDXL-family pipelines: the same diffusers/transformers classes as the
full models, with small widths. Images are 32x32; the VAE downsamples by 2, so latents are Cx16x16 (C: 4 in the
first toy world, 8 in world 2, whose images carry fine detail the round trip must keep)."""

from __future__ import annotations

from dataclasses import dataclass

from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from spo.tokenizer import VOCAB_SIZE, load_clip_tokenizer
from spo.toy.world import IMAGE_SIZE

TEXT_WIDTH = 32


@dataclass(frozen=True)
class Architecture:
    """What the toy worlds' models differ in."""

    latent_channels: int
    unet_widths: tuple[int, int]
    unet_groups: int  # GroupNorm groups of the UNet: 32 in every SD model, which ComfyUI's UNet loader assumes


ARCHITECTURES = {
    1: Architecture(latent_channels=4, unet_widths=(48, 96), unet_groups=16),
    # World 2: twice the latent channels keep the weave and the light through the round trip (measured in
    # docs/toy-world-v2.md); (64, 64) is the fastest of the 32-group widths timed
    # there (541 ms a batch-32 training step on one thread, against 633-1159 ms).
    2: Architecture(latent_channels=8, unet_widths=(64, 64), unet_groups=32),
}


def scheduler() -> DDIMScheduler:
    # The SD1.5/SDXL training schedule (scaled-linear betas 0.00085..0.012, 1000 steps).
    return DDIMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        clip_sample=False, set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading",
    )


def text_encoder(with_projection: bool = False, seed: int = 0):
    import torch

    config = CLIPTextConfig(
        vocab_size=VOCAB_SIZE, hidden_size=TEXT_WIDTH, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, projection_dim=TEXT_WIDTH,
        bos_token_id=49406, eos_token_id=49407, pad_token_id=49407 if not with_projection else 0,
        hidden_act="quick_gelu",
    )
    torch.manual_seed(seed)
    return CLIPTextModelWithProjection(config) if with_projection else CLIPTextModel(config)


def vae(seed: int = 0, world: int = 1) -> AutoencoderKL:
    import torch

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=ARCHITECTURES[world].latent_channels,
        block_out_channels=(32, 64),
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1, norm_num_groups=16, sample_size=IMAGE_SIZE,
    )


def unet(family: str, seed: int = 0, world: int = 1) -> UNet2DConditionModel:
    import torch

    torch.manual_seed(seed)
    arch = ARCHITECTURES[world]
    common = dict(
        sample_size=IMAGE_SIZE // 2, in_channels=arch.latent_channels, out_channels=arch.latent_channels,
        layers_per_block=1, block_out_channels=arch.unet_widths, norm_num_groups=arch.unet_groups,
        # Cross-attention only at the 8x8 level: 2.5x faster steps on CPU than attending at 16x16 too,
        # and an 8x8 grid is fine enough to place one shape in a 32x32 image.
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    )
    if family == "sd15":
        return UNet2DConditionModel(**common, cross_attention_dim=TEXT_WIDTH, attention_head_dim=8)
    if family == "sdxl":
        # SDXL: concatenated hidden states of both encoders, pooled projection + 6 micro-conditioning ids.
        return UNet2DConditionModel(
            **common, cross_attention_dim=2 * TEXT_WIDTH, attention_head_dim=8, use_linear_projection=True,
            addition_embed_type="text_time", addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=TEXT_WIDTH + 6 * 8,
        )
    raise ValueError(f"unknown family {family!r}")


def fresh_pipeline(family: str, seed: int = 0, world: int = 1):
    """An untrained pipeline of the family and toy world, built from the real diffusers classes."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    if family == "sd15":
        return StableDiffusionPipeline(
            vae=vae(seed, world), text_encoder=text_encoder(seed=seed), tokenizer=load_clip_tokenizer(),
            unet=unet(family, seed, world), scheduler=scheduler(), safety_checker=None, feature_extractor=None,
            requires_safety_checker=False,
        )
    return StableDiffusionXLPipeline(
        vae=vae(seed, world), text_encoder=text_encoder(seed=seed), text_encoder_2=text_encoder(True, seed + 1),
        tokenizer=load_clip_tokenizer(), tokenizer_2=load_clip_tokenizer("!"), unet=unet(family, seed, world),
        scheduler=scheduler(), force_zeros_for_empty_prompt=True,
    )
