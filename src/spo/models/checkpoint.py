"""Original-layout (ldm/sgm) single-file checkpoints in: detect the family from the key names, find the shipped
component configs that fit, and load through diffusers' own single-file loader (`from_single_file` with a local
`config=` folder and `local_files_only=True`), so nothing is fetched from the hub. Writing that layout, and the key
maps, are spo.formats.single_file's.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Iterable

import torch

from spo.errors import SpoInputError
from spo.models.family import BY_NAME, SD15, SDXL, UNET_PREFIX
from spo.models.family import get as get_family
from spo.models.prediction import markers_to_scheduler

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


# ----------------------------------------------------------------------------------------------- detection

def detect_family(keys: Iterable[str]) -> str:
    """'sd15' or 'sdxl' from the key names of an original-layout checkpoint (no tensors needed)."""
    keys = set(keys)
    has_unet = any(k.startswith(UNET_PREFIX) for k in keys)
    if any(k.startswith(SDXL.te_prefix["text_encoder_2"]) for k in keys) and has_unet:
        return "sdxl"
    if any(k.startswith("conditioner.embedders.0.model.") for k in keys):
        raise SpoInputError("this is an SDXL refiner checkpoint; only SD1.5 and SDXL base-family models are supported")
    if any(k.startswith("cond_stage_model.model.") for k in keys):
        raise SpoInputError("this is an SD2.x checkpoint (OpenCLIP-H text encoder); only SD1.5 and SDXL families are supported")
    if any(k.startswith(SD15.te_prefix["text_encoder"]) for k in keys) and has_unet:
        return "sd15"
    if has_unet:
        raise SpoInputError("checkpoint has a UNet but no text encoder (UNet-only files are not supported)")
    if any(k.startswith(("unet.", "down_blocks.", "lora_unet_")) for k in keys):
        raise SpoInputError("not an original-layout checkpoint (diffusers or LoRA keys); give a full single-file model")
    raise SpoInputError("not a Stable Diffusion checkpoint (no model.diffusion_model.* keys)")


def read_keys_and_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    """Key -> shape of a .safetensors file, read from the header only."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as exc:  # safetensors raises its own error types for a torn or foreign file
        raise SpoInputError(f"{path}: not a readable .safetensors file ({str(exc).splitlines()[0][:120]})") from None


def shipped_config_folders() -> list[tuple[str, Path]]:
    """(family, config folder) of every layout we ship: the real-size bases, then the built-in models' (toy size)."""
    from spo import sources

    builtin = [(s.family, Path(s.config_dir)) for s in sources.all_sources() if s.config_dir is not None]
    return [(f.name, f.config_dir) for f in BY_NAME.values()] + builtin


def config_folder_for(shapes: dict[str, tuple[int, ...]], family: str) -> Path:
    """The shipped config folder whose UNet matches the checkpoint (real-size base, else a built-in model's)."""
    conv_in = shapes.get(UNET_PREFIX + "input_blocks.0.0.weight")
    if conv_in is None:
        raise SpoInputError("checkpoint has no UNet conv_in (model.diffusion_model.input_blocks.0.0.weight)")
    for folder in [folder for fam, folder in shipped_config_folders() if fam == family]:
        cfg = unet_config(folder)
        if cfg["block_out_channels"][0] == conv_in[0] and cfg["in_channels"] == conv_in[1]:
            return folder
    raise SpoInputError(f"unrecognised {family} UNet (conv_in {list(conv_in)}); inpainting and other variants "
                        "are not supported")


@lru_cache(maxsize=16)
def _read_json(path: str) -> dict:
    return json.loads(Path(path).read_text())


def unet_config(folder: str | Path) -> dict:
    return _read_json(str(Path(folder) / "unet" / "config.json"))


def vae_config(folder: str | Path) -> dict:
    return _read_json(str(Path(folder) / "vae" / "config.json"))


# ----------------------------------------------------------------------------------------------- reading

def _pickle_to_safetensors(path: Path, tmpdir: Path) -> Path:
    """torch.load(weights_only=True) -> a temporary .safetensors file that diffusers' loader then reads."""
    from safetensors.torch import save_file

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise SpoInputError(f"{path}: cannot read as a weights-only torch checkpoint ({str(exc).splitlines()[0][:120]})") from None
    while isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise SpoInputError(f"{path}: no state dict inside")
    tensors = {k: v.contiguous() for k, v in obj.items() if isinstance(v, torch.Tensor)}
    out = tmpdir / (path.stem + ".safetensors")
    save_file(tensors, str(out))
    return out


def load_single_file(path: str | Path, family: str | None = None, *, dtype: torch.dtype = torch.float32,
                     allow_pickle: bool = False, config: str | Path | None = None):
    """A StableDiffusion(XL)Pipeline from an original-layout single file, offline.

    The family comes from the keys (checked against `family` when given); the component configs from
    `config` or, by default, the shipped SD1.5/SDXL base configs (or a built-in model's, for files of its size).
    """
    import tempfile

    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise SpoInputError(f"{path}: {suffix} files are pickles and can run code when loaded; convert it to "
                                ".safetensors or pass --allow-pickle (loads weights only)")
        with tempfile.TemporaryDirectory(prefix="spo-ckpt-") as tmp:
            return load_single_file(_pickle_to_safetensors(path, Path(tmp)), family, dtype=dtype, config=config)
    if suffix != ".safetensors":
        raise SpoInputError(f"{path}: unsupported model file type {suffix or '(none)'} (use .safetensors)")
    shapes = read_keys_and_shapes(path)
    found = detect_family(shapes)
    if family is not None and family != found:
        raise SpoInputError(f"{path}: this is an {found} checkpoint, not {family}")
    folder = Path(config) if config is not None else config_folder_for(shapes, found)
    pipe = _from_single_file(path, found, folder, dtype)
    markers = markers_to_scheduler(shapes)  # the v_pred / ztsnr keys A1111 and ComfyUI read
    if markers:
        pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, **markers)
    return pipe


def _from_single_file(path: Path, family: str, folder: Path, dtype: torch.dtype):
    from spo.tokenizer import load_clip_tokenizer

    kwargs = {"tokenizer": load_clip_tokenizer()}
    cls = get_family(family).pipeline_cls()
    if family == "sdxl":
        kwargs["tokenizer_2"] = load_clip_tokenizer("!")
        kwargs["text_encoder_2"] = _open_clip_encoder(path, folder, dtype)
    else:
        kwargs.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    try:
        return cls.from_single_file(str(path), config=str(folder), local_files_only=True, torch_dtype=dtype, **kwargs)
    except (ValueError, KeyError, RuntimeError) as exc:
        # shape mismatches and missing keys surface as these; the user's fix is a different file or config
        raise SpoInputError(f"{path}: cannot load as {family} ({str(exc).splitlines()[0][:160]})") from None


def _open_clip_encoder(path: Path, folder: Path, dtype: torch.dtype):
    """SDXL's second text encoder, built from the conditioner.embedders.1.* keys alone.

    diffusers picks the converter for a CLIP class by probing the whole checkpoint, and takes the CLIP-L branch
    whenever both encoders have the same width (the toy models do), leaving text_projection unloaded. Handing
    it only the OpenCLIP keys removes the ambiguity; the conversion itself is still diffusers'.
    """
    from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm
    from safetensors import safe_open
    from transformers import CLIPTextModelWithProjection

    prefix = SDXL.te_prefix["text_encoder_2"]
    with safe_open(str(path), framework="pt") as f:
        sub = {k: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}
    return create_diffusers_clip_model_from_ldm(CLIPTextModelWithProjection, sub, subfolder="text_encoder_2",
                                                config=str(folder), local_files_only=True, torch_dtype=dtype)
