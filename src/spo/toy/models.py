"""Tiny but real SD1.5-family and SDXL-family pipelines: the same diffusers/transformers classes as the
full models, with small widths. Images are 32x32; the VAE downsamples by 2, so latents are 4x16x16."""

from __future__ import annotations

from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from spo.tokenizer import VOCAB_SIZE, load_clip_tokenizer
from spo.toy.world import IMAGE_SIZE

TEXT_WIDTH = 32


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


def vae(seed: int = 0) -> AutoencoderKL:
    import torch

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64),
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1, norm_num_groups=16, sample_size=IMAGE_SIZE,
    )


def unet(family: str, seed: int = 0) -> UNet2DConditionModel:
    import torch

    torch.manual_seed(seed)
    common = dict(
        sample_size=IMAGE_SIZE // 2, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(48, 96), norm_num_groups=16,
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


def fresh_pipeline(family: str, seed: int = 0):
    """An untrained pipeline of the family, built from the real diffusers classes."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    if family == "sd15":
        return StableDiffusionPipeline(
            vae=vae(seed), text_encoder=text_encoder(seed=seed), tokenizer=load_clip_tokenizer(),
            unet=unet(family, seed), scheduler=scheduler(), safety_checker=None, feature_extractor=None,
            requires_safety_checker=False,
        )
    return StableDiffusionXLPipeline(
        vae=vae(seed), text_encoder=text_encoder(seed=seed), text_encoder_2=text_encoder(True, seed + 1),
        tokenizer=load_clip_tokenizer(), tokenizer_2=load_clip_tokenizer("!"), unet=unet(family, seed),
        scheduler=scheduler(), force_zeros_for_empty_prompt=True,
    )
