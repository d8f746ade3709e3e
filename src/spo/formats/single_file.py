"""Single-file checkpoints in the original (ldm/sgm) layout: key maps and writing.

Detecting and reading (through diffusers' own single-file loader, offline) are spo.models.checkpoint's; their
names are importable from here too. The per-family key prefixes are the Family objects' (spo.models.family).

Writing (diffusers -> original keys) is hand-written: diffusers converts only in the loading direction
(`convert_ldm_unet_checkpoint`, `convert_ldm_vae_checkpoint`, `convert_open_clip_checkpoint`), and merged
checkpoints must ship in the layout A1111/ComfyUI/kohya read. The mapping below is the inverse of those
functions, built from the UNet/VAE config so that it also holds for the toy models (fewer blocks, one layer
per block); a round trip through diffusers' loader is tested to give identical outputs.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch

from spo.errors import SpoInputError
from spo.models.checkpoint import (  # noqa: F401 - reading lives with the models; these names are part of this API
    PICKLE_SUFFIXES, config_folder_for, detect_family, load_single_file, read_keys_and_shapes, shipped_config_folders,
    unet_config, vae_config)
from spo.models.family import BY_NAME, CONFIG_DIR, FAMILIES, UNET_PREFIX, VAE_PREFIX, family_of  # noqa: F401

TE_PREFIX = {(f.name, component): prefix for f in BY_NAME.values() for component, prefix in f.te_prefix.items()}

_RESNET_INNER = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
                 "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}
_OPENCLIP_LAYER = {"self_attn.out_proj": "attn.out_proj", "layer_norm1": "ln_1", "layer_norm2": "ln_2",
                   "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}


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
    from spo.models.prediction import scheduler_to_markers

    scheduler = getattr(pipe, "scheduler", None)  # bare component sets (meta-device layout checks) have none
    for key in scheduler_to_markers(scheduler.config if scheduler is not None else {}):
        out[key] = torch.zeros(0)  # v_pred / ztsnr: how A1111 and ComfyUI tell
    return out


def save_single_file(pipe, target: str | Path, dtype: torch.dtype | None = None, metadata: dict | None = None) -> Path:
    """Write `pipe` as one original-layout .safetensors file (atomically)."""
    from spo.formats.metadata import checkpoint_metadata
    from spo.io import save_safetensors

    target = Path(target)
    meta = checkpoint_metadata(family_of(pipe), title=target.stem, extra=metadata)
    if pipe.scheduler.config.get("prediction_type") == "v_prediction":
        meta["modelspec.prediction_type"] = "v"  # modelspec's spelling
    save_safetensors(pipeline_to_original(pipe, dtype), target, metadata=meta)
    return target
