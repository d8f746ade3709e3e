"""Base models in: built-in model sources (spo.sources), diffusers folders, single-file checkpoints (original layout).

`load_pipeline` is the one entry point every command uses, so a user's model goes wherever a built-in one does.
"""

from __future__ import annotations

from pathlib import Path

import torch

from spo import sources
from spo.errors import SpoInputError


def check_model(source: str | Path) -> Path | None:
    """A built-in model's name (None), or a path that exists; anything else is one line naming it."""
    if sources.get(source) is not None:
        return None
    path = Path(source)
    if not path.exists():
        raise SpoInputError(f"{path}: no such model file or folder")
    return path


def load_pipeline(source: str | Path | None = None, family: str | None = None, *, dtype: torch.dtype = torch.float32,
                  allow_pickle: bool = False, config: str | Path | None = None, vae: str | Path | None = None,
                  prediction_type: str = "auto"):
    """A diffusers StableDiffusion(XL)Pipeline with a DDIM scheduler, on CPU, progress bars off.

    source: None (the default built-in model of `family`, default sd15), a built-in model's name (spo.sources),
    a diffusers folder, or a single-file checkpoint in the original layout (.safetensors; .ckpt/.pt/.bin only
    with allow_pickle, read with torch.load(weights_only=True)). A single file's family is detected from its
    keys (and checked against `family` when given); `config` overrides the shipped component configs.
    vae: a VAE (diffusers folder or .safetensors file, spo.models.vae) in place of the model's own; checked to fit.
    prediction_type: "auto" (the scheduler config's, or a single file's `v_pred` marker), or "epsilon" /
    "v_prediction" to override it (spo.models.prediction); an unsupported type is refused.
    """
    from diffusers import DiffusionPipeline

    from spo.models.prediction import check_prediction_choice, resolve_scheduler

    check_prediction_choice(prediction_type)
    builtin = sources.default(family) if source is None else sources.get(source)
    if builtin is not None:
        pipe = builtin.load_pipeline().to(dtype=dtype)
        if prediction_type != "auto":
            pipe.scheduler = resolve_scheduler(pipe.scheduler, prediction_type, str(source))
        return _with_vae(pipe, vae)
    path = check_model(source)
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise SpoInputError(f"{path}: not a diffusers model folder (no model_index.json)")
        pipe = DiffusionPipeline.from_pretrained(path, local_files_only=True, torch_dtype=dtype)
    else:
        from spo.models.checkpoint import load_single_file

        pipe = load_single_file(path, family, dtype=dtype, allow_pickle=allow_pickle, config=config)
    pipe.scheduler = resolve_scheduler(pipe.scheduler, prediction_type, str(source))
    pipe.set_progress_bar_config(disable=True)
    return _with_vae(pipe, vae)


def _with_vae(pipe, vae: str | Path | None):
    if vae:
        from spo.models.vae import use_vae

        use_vae(pipe, vae)
    return pipe


def meta_components(folder: str | Path, family: str) -> tuple:
    """(unet, vae, text encoders) of a diffusers config folder on the meta device: every shape, no memory."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    folder = Path(folder)
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae"))
        encoders = [CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder"))]
        if family == "sdxl":
            encoders.append(CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(folder / "text_encoder_2")))
    return unet, vae, encoders
