"""Single-file checkpoints in the original (ldm/sgm) layout: detect, read, write.

Reading goes through diffusers' own single-file loader (`from_single_file` with a local `config=` folder and
`local_files_only=True`): the component configs of SD1.5 and SDXL base ship in `spo/assets/configs`, so nothing
is fetched from the hub. The toy models' folders serve as configs for toy-size files.

Writing (diffusers -> original keys) is hand-written: diffusers converts only in the loading direction
(`convert_ldm_unet_checkpoint`, `convert_ldm_vae_checkpoint`, `convert_open_clip_checkpoint`), and merged
checkpoints must ship in the layout A1111/ComfyUI/kohya read. The mapping below is the inverse of those
functions, built from the UNet/VAE config so that it also holds for the toy models (fewer blocks, one layer
per block); a round trip through diffusers' loader is tested to give identical outputs.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Iterable

import torch

from spo.errors import SpoInputError

CONFIG_DIR = Path(__file__).resolve().parent.parent / "assets" / "configs"
FAMILIES = ("sd15", "sdxl")

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TE_PREFIX = {  # (family, component) -> prefix of the text encoder's keys in the original layout
    ("sd15", "text_encoder"): "cond_stage_model.transformer.",
    ("sdxl", "text_encoder"): "conditioner.embedders.0.transformer.",
    ("sdxl", "text_encoder_2"): "conditioner.embedders.1.model.",
}
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")

_RESNET_INNER = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
                 "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}
_OPENCLIP_LAYER = {"self_attn.out_proj": "attn.out_proj", "layer_norm1": "ln_1", "layer_norm2": "ln_2",
                   "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}


# ----------------------------------------------------------------------------------------------- detection

def detect_family(keys: Iterable[str]) -> str:
    """'sd15' or 'sdxl' from the key names of an original-layout checkpoint (no tensors needed)."""
    keys = set(keys)
    has_unet = any(k.startswith(UNET_PREFIX) for k in keys)
    if any(k.startswith("conditioner.embedders.1.model.") for k in keys) and has_unet:
        return "sdxl"
    if any(k.startswith("conditioner.embedders.0.model.") for k in keys):
        raise SpoInputError("this is an SDXL refiner checkpoint; only SD1.5 and SDXL base-family models are supported")
    if any(k.startswith("cond_stage_model.model.") for k in keys):
        raise SpoInputError("this is an SD2.x checkpoint (OpenCLIP-H text encoder); only SD1.5 and SDXL families are supported")
    if any(k.startswith("cond_stage_model.transformer.") for k in keys) and has_unet:
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

    return [(f, CONFIG_DIR / f) for f in FAMILIES] + [(s.family, Path(s.config_dir)) for s in sources.all_sources()
                                                      if s.config_dir is not None]


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


# ----------------------------------------------------------------------------------------------- UNet keys

@lru_cache(maxsize=16)
def _unet_prefix_map(block_out: tuple, lpb: int, down_types: tuple, up_types: tuple, has_add: bool) -> dict:
    """diffusers module prefix -> (original prefix, is_resnet) for one UNet layout."""
    m = {"conv_in": ("input_blocks.0.0", False), "time_embedding.linear_1": ("time_embed.0", False),
         "time_embedding.linear_2": ("time_embed.2", False), "conv_norm_out": ("out.0", False),
         "conv_out": ("out.2", False)}
    if has_add:
        m["add_embedding.linear_1"] = ("label_emb.0.0", False)
        m["add_embedding.linear_2"] = ("label_emb.0.2", False)
    n_blocks = len(block_out)
    for b in range(n_blocks):
        for j in range(lpb):
            n = 1 + b * (lpb + 1) + j
            m[f"down_blocks.{b}.resnets.{j}"] = (f"input_blocks.{n}.0", True)
            m[f"down_blocks.{b}.attentions.{j}"] = (f"input_blocks.{n}.1", False)
        if b < n_blocks - 1:
            m[f"down_blocks.{b}.downsamplers.0.conv"] = (f"input_blocks.{1 + b * (lpb + 1) + lpb}.0.op", False)
    m["mid_block.resnets.0"] = ("middle_block.0", True)
    m["mid_block.attentions.0"] = ("middle_block.1", False)
    m["mid_block.resnets.1"] = ("middle_block.2", True)
    for b in range(n_blocks):
        has_attn = up_types[b].startswith("CrossAttn")
        for j in range(lpb + 1):
            n = b * (lpb + 1) + j
            m[f"up_blocks.{b}.resnets.{j}"] = (f"output_blocks.{n}.0", True)
            m[f"up_blocks.{b}.attentions.{j}"] = (f"output_blocks.{n}.1", False)
        if b < n_blocks - 1:
            m[f"up_blocks.{b}.upsamplers.0.conv"] = (f"output_blocks.{b * (lpb + 1) + lpb}.{2 if has_attn else 1}.conv", False)
    return m


def _prefix_map_for(config: dict) -> dict:
    lpb = config["layers_per_block"]
    if not isinstance(lpb, int):
        raise SpoInputError("UNets with per-block layer counts are not supported")
    return _unet_prefix_map(tuple(config["block_out_channels"]), lpb, tuple(config["down_block_types"]),
                            tuple(config["up_block_types"]), config.get("addition_embed_type") == "text_time")


def unet_key_to_original(key: str, config: dict) -> str:
    """A diffusers UNet parameter or module path -> its original-layout path (without model.diffusion_model.)."""
    prefixes = _prefix_map_for(config)
    parts = key.split(".")
    for cut in range(min(len(parts), 5), 0, -1):  # longest matching prefix (at most 5 components deep)
        head = ".".join(parts[:cut])
        if head in prefixes:
            new, is_resnet = prefixes[head]
            rest = parts[cut:]
            if is_resnet and rest and rest[0] in _RESNET_INNER:
                rest = _RESNET_INNER[rest[0]].split(".") + rest[1:]
            return ".".join([new] + rest)
    raise SpoInputError(f"UNet key {key!r} has no original-layout equivalent")


def unet_block_of(original_key: str) -> str | None:
    """'IN04', 'M00', 'OUT07' for a key inside model.diffusion_model (original naming), else None."""
    k = original_key[len(UNET_PREFIX):] if original_key.startswith(UNET_PREFIX) else original_key
    parts = k.split(".")
    if parts[0] == "input_blocks":
        return f"IN{int(parts[1]):02d}"
    if parts[0] == "middle_block":
        return "M00"
    if parts[0] == "output_blocks":
        return f"OUT{int(parts[1]):02d}"
    return None


def block_names(config: dict) -> list[str]:
    """The per-block weight names of a UNet layout (SDXL: IN00-IN08, M00, OUT00-OUT08; SD1: IN00-IN11, ...)."""
    n = 1 + len(config["block_out_channels"]) * (config["layers_per_block"] + 1) - 1
    n_out = len(config["block_out_channels"]) * (config["layers_per_block"] + 1)
    return [f"IN{i:02d}" for i in range(n)] + ["M00"] + [f"OUT{i:02d}" for i in range(n_out)]


# ----------------------------------------------------------------------------------------------- VAE keys

def vae_key_to_original(key: str, config: dict) -> str:
    n_up = len(config["up_block_types"])
    p = key.split(".")
    side = p[0]  # encoder / decoder / quant_conv / post_quant_conv
    if side not in ("encoder", "decoder"):
        return key
    rest = p[1:]
    if rest[0] == "conv_norm_out":
        return ".".join([side, "norm_out"] + rest[1:])
    if rest[0] in ("conv_in", "conv_out"):
        return key
    if rest[0] in ("down_blocks", "up_blocks"):
        i = int(rest[1])
        level, name = ("down", "downsample") if rest[0] == "down_blocks" else ("up", "upsample")
        if rest[0] == "up_blocks":
            i = n_up - 1 - i  # the original decoder counts its levels from the bottom
        if rest[2] in ("downsamplers", "upsamplers"):
            return ".".join([side, level, str(i), name] + rest[4:])
        tail = ["nin_shortcut" if x == "conv_shortcut" else x for x in rest[4:]]
        return ".".join([side, level, str(i), "block", rest[3]] + tail)
    if rest[0] == "mid_block":
        if rest[1] == "resnets":
            tail = ["nin_shortcut" if x == "conv_shortcut" else x for x in rest[3:]]
            return ".".join([side, "mid", f"block_{int(rest[2]) + 1}"] + tail)
        inner = ".".join(rest[3:])
        for a, b in (("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out")):
            if inner.startswith(a + "."):
                return ".".join([side, "mid", "attn_1", b + inner[len(a):]])
    raise SpoInputError(f"VAE key {key!r} has no original-layout equivalent")


# ----------------------------------------------------------------------------------------------- text encoders

def _clip_name(key: str) -> str:
    # transformers >= 5.6 flattened CLIPTextModel (no `text_model.` level); the original layout keeps it.
    return key if key.startswith(("text_model.", "text_projection")) else "text_model." + key


def text_encoder_key_to_original(key: str, family: str, component: str) -> tuple[str, tuple[int, int] | None]:
    """(original key, rows) of a text-encoder parameter or module; rows are set for OpenCLIP's fused q/k/v.

    rows = (i, 3) means: the i-th third (q=0, k=1, v=2) along dim 0 of the fused in_proj tensor.
    """
    prefix = TE_PREFIX.get((family, component))
    if prefix is None:
        raise SpoInputError(f"{family} has no text encoder {component!r}")
    key = _clip_name(key)
    if component != "text_encoder_2":
        return prefix + key, None
    fixed = {"text_model.embeddings.token_embedding": "token_embedding", "text_model.embeddings.position_embedding.weight":
             "positional_embedding", "text_model.final_layer_norm": "ln_final", "text_projection.weight": "text_projection",
             "text_projection": "text_projection"}
    for a, b in fixed.items():
        if key == a or key.startswith(a + "."):
            return prefix + b + key[len(a):], None
    p = key.split(".")
    if p[:3] != ["text_model", "encoder", "layers"]:
        raise SpoInputError(f"text encoder 2 key {key!r} has no original-layout equivalent")
    layer, inner = p[3], ".".join(p[4:])
    base = f"{prefix}transformer.resblocks.{layer}."
    for i, proj in enumerate(("q_proj", "k_proj", "v_proj")):
        stem = f"self_attn.{proj}"
        if inner == stem or inner.startswith(stem + "."):
            suffix = inner[len(stem) + 1:]
            return base + "attn.in_proj" + (f"_{suffix}" if suffix else ""), (i, 3)
    for a, b in _OPENCLIP_LAYER.items():
        if inner == a or inner.startswith(a + "."):
            return base + b + inner[len(a):], None
    raise SpoInputError(f"text encoder 2 key {key!r} has no original-layout equivalent")


# ----------------------------------------------------------------------------------------------- writing

def pipeline_to_original(pipe, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The pipeline's UNet, VAE and text encoder(s) as one original-layout state dict."""
    from spo.models.family import family_of

    family = family_of(pipe)

    def cast(t):  # meta tensors stay on meta: key sets of full-size models can be checked without memory
        t = t.detach() if t.is_meta else t.detach().cpu()
        return (t.to(dtype) if dtype else t).contiguous()

    out: dict[str, torch.Tensor] = {}
    ucfg = dict(pipe.unet.config)
    for k, v in pipe.unet.state_dict().items():
        out[UNET_PREFIX + unet_key_to_original(k, ucfg)] = cast(v)
    vcfg = dict(pipe.vae.config)
    for k, v in pipe.vae.state_dict().items():
        new = vae_key_to_original(k, vcfg)
        if ".mid.attn_1." in new and v.ndim == 2:
            v = v[:, :, None, None]  # the original VAE attention uses 1x1 convolutions
        out[VAE_PREFIX + new] = cast(v)
    components = [("text_encoder", pipe.text_encoder)]
    if family == "sdxl":
        components.append(("text_encoder_2", pipe.text_encoder_2))
    for name, model in components:
        fused: dict[str, list] = {}
        for k, v in model.state_dict().items():
            if k.endswith("position_ids"):
                continue
            new, rows = text_encoder_key_to_original(k, family, name)
            if rows is not None:
                fused.setdefault(new, [None, None, None])[rows[0]] = v
            elif new.endswith("text_projection"):
                out[new] = cast(v.T)  # OpenCLIP stores x @ P; transformers' Linear stores P^T
            else:
                out[new] = cast(v)
        for new, parts in fused.items():
            out[new] = cast(torch.cat(parts, 0))
    return out


def save_single_file(pipe, target: str | Path, dtype: torch.dtype | None = None, metadata: dict | None = None) -> Path:
    """Write `pipe` as one original-layout .safetensors file (atomically)."""
    from spo.formats.metadata import checkpoint_metadata
    from spo.io import save_safetensors
    from spo.models.family import family_of

    target = Path(target)
    meta = checkpoint_metadata(family_of(pipe), title=target.stem, extra=metadata)
    save_safetensors(pipeline_to_original(pipe, dtype), target, metadata=meta)
    return target


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
    `config` or, by default, the shipped SD1.5/SDXL base configs (or the toy's, for toy-size files).
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
    return _from_single_file(path, found, folder, dtype)


def _from_single_file(path: Path, family: str, folder: Path, dtype: torch.dtype):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    from spo.tokenizer import load_clip_tokenizer

    kwargs = {"tokenizer": load_clip_tokenizer()}
    if family == "sdxl":
        cls = StableDiffusionXLPipeline
        kwargs["tokenizer_2"] = load_clip_tokenizer("!")
        kwargs["text_encoder_2"] = _open_clip_encoder(path, folder, dtype)
    else:
        cls = StableDiffusionPipeline
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

    prefix = TE_PREFIX[("sdxl", "text_encoder_2")]
    with safe_open(str(path), framework="pt") as f:
        sub = {k: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}
    return create_diffusers_clip_model_from_ldm(CLIPTextModelWithProjection, sub, subfolder="text_encoder_2",
                                                config=str(folder), local_files_only=True, torch_dtype=dtype)
