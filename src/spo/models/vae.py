"""The VAE: a user's own in place of the base model's (`--vae PATH`), and the one decode / encode every path uses.

Loading: a diffusers folder (config.json + weights; a whole pipeline folder's vae/ too) or one .safetensors file
in the original layout (encoder.*, decoder.*, quant_conv.*, post_quant_conv.*, optionally under
first_stage_model.) or in diffusers' key names. A single file carries no config, so it gets the base VAE's (as
A1111 and ComfyUI treat it): its scaling factor, and its force_upcast. A file's family cannot be read from its
weights (SD1.5 and SDXL VAEs share the architecture); a folder's can, from its config's scaling factor.

Decoding in fp16: the original SDXL VAE's activations pass fp16's 65504 and the image comes out NaN. Its config
says so (force_upcast = true; the fp16-fix VAE says false), and diffusers' SDXL pipeline then decodes in fp32;
`decode` and `encode` do the same, also under fp16 autocast (mixed-precision training), where the VAE's own
dtype is fp32 but its convolutions would run in fp16.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from spo.errors import SpoInputError
from spo.models.family import VAE_PREFIX

# scaling_factor -> the family whose latent space it is (the real bases' VAE configs)
KNOWN_SCALING = {0.18215: "SD1.5", 0.13025: "SDXL"}
WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors")


# ----------------------------------------------------------------------------------------------- fit

def _named(scaling: float) -> str:
    family = next((f for s, f in KNOWN_SCALING.items() if abs(s - scaling) < 1e-5), None)
    return f"scaling_factor {scaling:g}" + (f", an {family} VAE" if family else "")


def check_fits(vae_config: dict, base_config: dict, unet_in_channels: int, where: str) -> None:
    """Refuse a VAE whose latents are not the ones the base model's UNet works in (one line naming the problem).

    Same latent channels as the UNet's input, same downsampling (latent size), same scaling factor (the family:
    SD1.5 and SDXL VAEs share the architecture and differ in it), same latent normalisation where one is declared.
    """
    z = vae_config.get("latent_channels", 4)
    if z != unet_in_channels:
        raise SpoInputError(f"VAE {where}: {z}-channel latents, but this model's UNet takes {unet_in_channels} "
                            "(a VAE of another model type)")
    down, base_down = (2 ** (len(c["block_out_channels"]) - 1) for c in (vae_config, base_config))
    if down != base_down:
        raise SpoInputError(f"VAE {where}: latents 1/{down} of the image side, but this model's are 1/{base_down}")
    scaling, base_scaling = float(vae_config.get("scaling_factor", 0.18215)), float(base_config["scaling_factor"])
    if abs(scaling - base_scaling) > 1e-5:
        raise SpoInputError(f"VAE {where}: {_named(scaling)}, but this model's latents need {_named(base_scaling)} "
                            "(a VAE of another family)")
    for key in ("latents_mean", "latents_std"):
        if vae_config.get(key) != base_config.get(key):
            raise SpoInputError(f"VAE {where}: its {key} differs from this model's VAE (a VAE of another model type)")


# ----------------------------------------------------------------------------------------------- loading

def load_vae(path: str | Path, pipe, dtype: torch.dtype | None = None):
    """An AutoencoderKL from `path` that fits `pipe` (checked), in `dtype` (default: the pipeline VAE's)."""
    path = Path(path)
    dtype = dtype or pipe.vae.dtype
    if not path.exists():
        raise SpoInputError(f"VAE {path}: no such file or folder")
    if path.is_dir():
        return _from_folder(path, pipe, dtype)
    from spo.models.checkpoint import PICKLE_SUFFIXES

    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise SpoInputError(f"VAE {path}: {path.suffix} files are pickles and can run code when loaded; convert it "
                            "to .safetensors")
    if path.suffix.lower() != ".safetensors":
        raise SpoInputError(f"VAE {path}: unsupported file type {path.suffix or '(none)'} (a .safetensors file or "
                            "a diffusers folder)")
    return _from_file(path, pipe, dtype)


def _from_folder(path: Path, pipe, dtype: torch.dtype):
    import json

    from diffusers import AutoencoderKL

    if not (path / "config.json").is_file() and (path / "vae" / "config.json").is_file():
        path = path / "vae"  # a whole diffusers model folder: its VAE
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        raise SpoInputError(f"VAE {path}: not a diffusers VAE folder (no readable config.json)") from None
    kind = config.get("_class_name") if isinstance(config, dict) else None
    if kind != "AutoencoderKL":  # AutoencoderTiny, the 16-channel VAEs of newer models, ...
        raise SpoInputError(f"VAE {path}: {f'a {kind}' if kind else 'no model class in config.json'}, not an "
                            "AutoencoderKL (the VAE type SD1.5 and SDXL use)")
    check_fits(config, dict(pipe.vae.config), pipe.unet.config.in_channels, str(path))
    found = [name for name in WEIGHT_NAMES if (path / name).is_file()]
    if not found:
        raise SpoInputError(f"VAE {path}: no diffusion_pytorch_model.safetensors weights in it")
    variant = "fp16" if found == [WEIGHT_NAMES[1]] else None  # a folder holding only the fp16 variant
    try:
        return AutoencoderKL.from_pretrained(path, local_files_only=True, torch_dtype=dtype, use_safetensors=True,
                                             variant=variant)
    except (OSError, ValueError, RuntimeError) as exc:  # torn or mismatched weights
        raise SpoInputError(f"VAE {path}: cannot load it ({str(exc).strip().splitlines()[0][:160]})") from None


def _from_file(path: Path, pipe, dtype: torch.dtype):
    """A standalone VAE file, built on the base VAE's config; the original layout converted by diffusers."""
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
    from safetensors import safe_open

    from spo.models.checkpoint import read_keys_and_shapes

    shapes = read_keys_and_shapes(path)
    prefix = VAE_PREFIX if any(k.startswith(VAE_PREFIX) for k in shapes) else ""
    conv_in = shapes.get(prefix + "decoder.conv_in.weight")
    if conv_in is None or len(conv_in) != 4:
        raise SpoInputError(f"VAE {path}: not a VAE file (no decoder.conv_in.weight)")
    config = dict(pipe.vae.config)
    check_fits({**config, "latent_channels": conv_in[1]}, config, pipe.unet.config.in_channels, str(path))
    with safe_open(str(path), framework="pt") as f:  # only the VAE's tensors, also from a whole checkpoint
        state = {k[len(prefix):]: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}
    vae = AutoencoderKL.from_config(config)
    try:
        if not any(k.startswith(("encoder.down_blocks.", "decoder.up_blocks.")) for k in state):
            state = convert_ldm_vae_checkpoint(state, config)
        vae.load_state_dict(state, strict=True)
    except (RuntimeError, KeyError, IndexError, ValueError) as exc:  # missing keys, shapes: another architecture
        detail = [ln.strip() for ln in str(exc).strip().splitlines()][-1]
        raise SpoInputError(f"VAE {path}: does not fit this model's VAE ({detail[:160]})") from None
    return vae.to(dtype=dtype).eval()


def use_vae(pipe, path: str | Path) -> None:
    """Put the VAE at `path` into `pipe` in place of its own (checked to fit; same dtype and device)."""
    vae = load_vae(path, pipe).to(pipe.vae.device)
    vae.requires_grad_(False)
    pipe.vae = vae  # DiffusionPipeline.__setattr__ updates the pipeline's component registry too


# ----------------------------------------------------------------------------------------------- decode / encode

def needs_upcast(vae, device_type: str) -> bool:
    """Would this VAE run in fp16 (its weights, or fp16 autocast) while its config says it overflows there?"""
    if not getattr(vae.config, "force_upcast", False):
        return False
    autocast_fp16 = torch.is_autocast_enabled(device_type) and torch.get_autocast_dtype(device_type) == torch.float16
    return vae.dtype == torch.float16 or autocast_fp16


@contextlib.contextmanager
def _fp32(vae):
    """The VAE in fp32 with autocast off for the block; its weights' dtype restored after (as diffusers does)."""
    device_type = vae.device.type
    was = vae.dtype
    vae.to(dtype=torch.float32)
    try:
        with torch.autocast(device_type, enabled=False):
            yield
    finally:
        vae.to(dtype=was)


def _precision(vae):
    return _fp32(vae) if needs_upcast(vae, vae.device.type) else contextlib.nullcontext()


@torch.no_grad()
def decode(vae, latents: torch.Tensor) -> torch.Tensor:
    """Scaled latents (as the UNet sees them) -> images in [-1, 1], float32; in fp32 where fp16 would overflow."""
    with _precision(vae):
        out = vae.decode(latents.to(vae.device, vae.dtype) / vae.config.scaling_factor).sample
    return out.float().clamp(-1, 1)


@torch.no_grad()
def encode(vae, images: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Images in [-1, 1] -> scaled latents (a sample of the posterior); in fp32 where fp16 would overflow."""
    with _precision(vae):
        dist = vae.encode(images.to(vae.device, vae.dtype)).latent_dist
        return dist.sample(generator=generator) * vae.config.scaling_factor
