"""The models of a run, built on the meta device from their configs: every shape and dtype, no weights read.

`meta_models(base, cfg, spm)` gives the UNet (with the run's LoRA, as spo.train.finetune sets it up), the VAE,
the text encoders and the SPM; `base` is anything `spo train --base` takes (a built-in model, a diffusers
folder, a single-file checkpoint: only its header is read) or a family name for the real-size architecture.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from spo.errors import SpoInputError
from spo.models.family import BY_NAME, CONFIG_DIR

CLIP_H_CONFIG = CONFIG_DIR / "clip-vit-h-14"  # PickScore_v1's architecture: what a real-size SPM starts from


@dataclass
class MetaModels:
    family: str
    config_dir: Path
    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoders: list[torch.nn.Module]
    spm: torch.nn.Module
    spm_source: str
    full_finetune: bool = False

    @property
    def resolution(self) -> int:
        return int(self.unet.config.sample_size * 2 ** (len(self.vae.config.block_out_channels) - 1))


def config_folder(base: str) -> tuple[str, Path]:
    """(family, a diffusers folder with the configs) of a base model, reading no weights."""
    from spo import sources
    from spo.models.checkpoint import config_folder_for, detect_family, read_keys_and_shapes

    if base in BY_NAME:
        return base, BY_NAME[base].config_dir
    source = sources.get(base) if base else sources.default()
    if source is not None:
        return source.family, Path(source.config_dir)
    path = Path(base)
    if not path.exists():
        raise SpoInputError(f"--base {base}: no such file or folder (or give a family: sd15, sdxl)")
    if path.is_dir():
        if not (path / "unet" / "config.json").is_file():
            raise SpoInputError(f"{path}: not a diffusers model folder (no unet/config.json)")
        family = "sdxl" if (path / "text_encoder_2").is_dir() else "sd15"
        return family, path
    if path.suffix != ".safetensors":
        raise SpoInputError(f"{path}: spo plan reads .safetensors headers only (convert other formats first)")
    shapes = read_keys_and_shapes(path)
    family = detect_family(shapes)
    return family, config_folder_for(shapes, family)


def _spm_clip_config(spm: str, family: str, base: str) -> tuple[dict, bool, str]:
    """(CLIP config dict, time-conditioned, what it is) of the run's preference model."""
    from spo.spm.scoring import find_spm_dir

    if spm:
        path = Path(spm)
        spm_dir = find_spm_dir(path) if path.exists() else None
        if spm_dir is not None:
            cfg = json.loads((spm_dir / "spm_config.json").read_text(encoding="utf-8"))
            return cfg["clip_config"], cfg.get("time_conditioning", True), str(spm_dir)
        if (path / "config.json").is_file():
            return json.loads((path / "config.json").read_text(encoding="utf-8")), True, f"{path} (a CLIP folder)"
        raise SpoInputError(f"--spm {spm}: not an SPM folder or a transformers CLIP folder")
    from spo import sources

    source = sources.get(base) if base and base not in BY_NAME else (None if base in BY_NAME else sources.default())
    if source is not None and source.preference and find_spm_dir(Path(source.preference)) is not None:
        return _spm_clip_config(source.preference, family, base)
    return json.loads((CLIP_H_CONFIG / "config.json").read_text(encoding="utf-8")), True, \
        "CLIP-ViT-H-14 (PickScore_v1 size), time-conditioned"


def _vae_folder(vae: str) -> Path | None:
    """The config folder of `--vae` (whether it is fp16-safe decides the judging memory); a single file is read
    by the run itself, so the plan keeps the base's VAE config for it (its architecture is the family's)."""
    if not vae or not Path(vae).is_dir():
        return None
    path = Path(vae)
    return path / "vae" if not (path / "config.json").is_file() and (path / "vae" / "config.json").is_file() else path


def meta_models(base: str, cfg, spm: str = "") -> MetaModels:
    """The run's models on the meta device, in the dtypes the trainer uses (spo.train.finetune)."""
    from diffusers import AutoencoderKL
    from transformers import CLIPConfig

    from spo.models.loading import meta_components
    from spo.spm.model import StepAwarePreferenceModel
    from spo.train.finetune import add_lora, weight_dtype

    family, folder = config_folder(base)
    dtype = weight_dtype(cfg)
    unet, vae, encoders = meta_components(folder, family)
    vae_folder = _vae_folder(cfg.vae)
    with torch.device("meta"):
        if vae_folder:
            vae = AutoencoderKL.from_config(AutoencoderKL.load_config(vae_folder))
        clip_config, timed, what = _spm_clip_config(spm, family, base)
        spm_model = StepAwarePreferenceModel(CLIPConfig.from_dict(clip_config), time_conditioning=timed)
    if cfg.full_finetune:
        unet.requires_grad_(True)
    else:
        add_lora(unet, cfg)
        # The trainer keeps the LoRA in fp32 and runs under autocast, so its matmuls (and the activations saved
        # for backward) are in the run's precision; meta tensors have no autocast, so the trace holds the LoRA in
        # that precision and estimate.py counts its fp32 master weights, gradients and optimizer state apart.
        unet.to(dtype)
    for m in (vae, *encoders):
        m.requires_grad_(False).to(dtype)
    spm_model.requires_grad_(False).eval().to(dtype)
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    return MetaModels(family, folder, unet, vae, encoders, spm_model, what, cfg.full_finetune)


def parameter_bytes(module: torch.nn.Module, trainable: bool | None = None) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters()
               if trainable is None or p.requires_grad == trainable)
