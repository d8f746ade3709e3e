"""LoRAs between diffusers/peft naming and webui/kohya naming, both directions.

Out (`export_lora`): diffusers' save_lora_weights writes peft keys
(`unet.<module>.lora_A.weight` / `.lora_B.weight`); A1111, ComfyUI and kohya's scripts read
`lora_unet_<path with _>.lora_down.weight` / `.lora_up.weight` / `.alpha`. SD1.5 UNet paths keep diffusers'
module names (kohya trains SD1 on the diffusers UNet); SDXL UNet paths use the original sgm names
(`input_blocks_4_1_...`, `middle_block_1_...`, `output_blocks_0_1_...`), the spelling kohya's own SDXL scripts
write and the only one its SDXL merge script reads, while A1111, ComfyUI and diffusers read it too. Text
encoders: `lora_te_` (SD1.5), `lora_te1_` / `lora_te2_` (SDXL), with transformers' CLIP module names.
diffusers has no exporter to this format, so it is written here (names from `spo.formats.single_file`).
The diffusers-format export keeps peft's keys but writes text-encoder modules under CLIP's `text_model.` level
(`text_encoder.text_model.encoder.layers...`), the names every diffusers version and ComfyUI read; it carries no
kohya `ss_*` keys, so A1111 does not take it for one of its LoRAs (the webui file is the one for A1111/ComfyUI).

In (`load_lora`): a webui/kohya file is converted with diffusers' own `lora_state_dict` (which maps sgm block
names and kohya keys) and `convert_unet_state_dict_to_peft`; a diffusers file is read as it is.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from functools import lru_cache
from pathlib import Path

import torch

from spo.dtypes import DTYPES
from spo.errors import SpoInputError
from spo.formats import single_file as sf
from spo.models.family import BY_NAME

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
WEBUI_TE_PREFIX = {(f.name, component): prefix for f in BY_NAME.values() for component, prefix in f.webui_te_prefix.items()}


# ----------------------------------------------------------------------------------------------- reading

def read_safetensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise SpoInputError(f"{path}: no such LoRA file")
    if path.suffix.lower() != ".safetensors":
        raise SpoInputError(f"{path}: LoRAs are read from .safetensors files only")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except Exception as exc:
        raise SpoInputError(f"{path}: not a readable .safetensors file ({str(exc).splitlines()[0][:120]})") from None


def lora_format(keys) -> str:
    keys = list(keys)
    if any(k.startswith(("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")) for k in keys):
        return "webui"
    if any(".lora_A." in k or ".lora_B." in k for k in keys):
        return "diffusers"
    if any(".lora.down." in k or "_lora.down." in k or ".lora_linear_layer." in k for k in keys):
        return "diffusers-old"
    raise SpoInputError("not a LoRA file (no lora_A/lora_B or lora_down/lora_up keys)")


def split_peft_key(key: str) -> tuple[str, str, str]:
    """'unet.a.b.lora_A.weight' -> ('unet', 'a.b', 'lora_A')."""
    for kind in ("lora_A", "lora_B"):
        marker = f".{kind}."
        if marker in key:
            module, _ = key.split(marker, 1)
            component, _, path = module.partition(".")
            if component not in COMPONENTS:
                raise SpoInputError(f"LoRA key {key!r}: unknown component {component!r}")
            return component, path, kind
    raise SpoInputError(f"LoRA key {key!r} is not a lora_A/lora_B weight")


def modules_of(state_dict: dict[str, torch.Tensor]) -> dict[tuple[str, str], dict[str, torch.Tensor]]:
    """(component, module path) -> {'down': lora_A, 'up': lora_B} for a peft-named state dict."""
    out: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for k, v in state_dict.items():
        if "lora_magnitude_vector" in k:
            raise SpoInputError("DoRA LoRAs are not supported")
        component, path, kind = split_peft_key(k)
        out.setdefault((component, path), {})["down" if kind == "lora_A" else "up"] = v
    for (c, p), pair in out.items():
        if set(pair) != {"down", "up"}:
            raise SpoInputError(f"LoRA module {c}.{p} lacks its {'lora_B' if 'up' not in pair else 'lora_A'} weight")
    return out


def adapter_alphas(metadata: dict[str, str], state_dict: dict[str, torch.Tensor]) -> dict[tuple[str, str], float]:
    """Per-module alpha of a diffusers LoRA: its lora_adapter_metadata (peft LoraConfig) or, without one, alpha = rank."""
    raw = metadata.get("lora_adapter_metadata")
    cfg = json.loads(raw) if raw else {}
    alphas = {}
    for (component, path), pair in modules_of(state_dict).items():
        rank = pair["down"].shape[0]
        alpha = cfg.get(f"{component}.lora_alpha", rank)
        for pattern, a in (cfg.get(f"{component}.alpha_pattern") or {}).items():
            if path == pattern or path.endswith("." + pattern):
                alpha = a
        alphas[(component, path)] = float(alpha)
    return alphas


# ----------------------------------------------------------------------------------------------- family

def _known_configs() -> list[tuple[str, dict]]:
    """(family, UNet config) of every layout we ship: the real SD1.5/SDXL bases, then the built-in (toy) models."""
    return [(family, sf.unet_config(folder)) for family, folder in sf.shipped_config_folders()
            if (folder / "unet" / "config.json").is_file()]


def _cross_dim(state_dict: dict[str, torch.Tensor]) -> int | None:
    for k, v in state_dict.items():
        if "attn2" in k and "to_k" in k and ("lora_A" in k or "lora_down" in k or "lora.down" in k):
            return int(v.shape[-1])
    return None


def _known_cross_dims() -> dict[int, str]:
    dims = {}
    for family, cfg in _known_configs():
        dims.setdefault(cfg["cross_attention_dim"], family)
    return dims


def unet_config_for(state_dict: dict[str, torch.Tensor], family: str) -> dict:
    """The shipped UNet layout a LoRA was made for: the one whose cross-attention width its attn2.to_k takes
    (this tells the toy models from the real bases), else the family's real base."""
    dim = _cross_dim(state_dict)
    for fam, cfg in _known_configs():
        if fam == family and cfg["cross_attention_dim"] == dim:
            return cfg
    return default_unet_config(family)


def lora_family(state_dict: dict[str, torch.Tensor], metadata: dict[str, str] | None = None,
                default: str | None = None) -> str:
    """'sd15' or 'sdxl' from metadata, key names, or the cross-attention width of attn2.to_k.

    `default` (the family the caller expects) answers when nothing tells: a self-attention-only LoRA of the
    diffusers format has neither metadata, original-layout names nor an attn2.to_k.
    """
    metadata = metadata or {}
    base = metadata.get("ss_base_model_version", "") + " " + metadata.get("modelspec.architecture", "")
    if "sdxl" in base or "stable-diffusion-xl" in base:
        return "sdxl"
    if "sd_v1" in base or "stable-diffusion-v1" in base:
        return "sd15"
    keys = list(state_dict)
    if any(k.startswith(("lora_te2_", "lora_te1_", "text_encoder_2.")) or
           (k.startswith("lora_unet_") and ("input_blocks" in k or "output_blocks" in k or "middle_block" in k))
           for k in keys):
        return "sdxl"
    dims = _known_cross_dims()
    if _cross_dim(state_dict) in dims:
        return dims[_cross_dim(state_dict)]
    if any(k.startswith(("lora_te_", "text_encoder.")) for k in keys):
        return "sd15"
    if default is not None:
        return default
    raise SpoInputError("cannot tell the LoRA's model family (SD1.5 or SDXL); pass it explicitly")


def default_unet_config(family: str) -> dict:
    return sf.unet_config(sf.CONFIG_DIR / family)


# ----------------------------------------------------------------------------------------------- export

def webui_module_name(component: str, path: str, family: str, unet_config: dict) -> str:
    """The kohya name (without .lora_down/.lora_up/.alpha) of one LoRA'd module."""
    if component == "unet":
        name = sf.unet_key_to_original(path, unet_config) if family == "sdxl" else path
        return "lora_unet_" + name.replace(".", "_")
    prefix = WEBUI_TE_PREFIX.get((family, component))
    if prefix is None:
        raise SpoInputError(f"{family} has no {component}")
    return prefix + sf._clip_name(path).replace(".", "_")


def peft_to_webui(state_dict: dict[str, torch.Tensor], alphas: dict[tuple[str, str], float], family: str,
                  unet_config: dict | None = None, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    unet_config = unet_config or default_unet_config(family)
    out = {}
    cast = (lambda t: t.to(dtype).contiguous()) if dtype else (lambda t: t.contiguous())
    for (component, path), pair in modules_of(state_dict).items():
        name = webui_module_name(component, path, family, unet_config)
        out[f"{name}.lora_down.weight"] = cast(pair["down"])
        out[f"{name}.lora_up.weight"] = cast(pair["up"])
        out[f"{name}.alpha"] = cast(torch.tensor(float(alphas.get((component, path), pair["down"].shape[0]))))
    return out


def summarize(state_dict: dict[str, torch.Tensor], alphas: dict[tuple[str, str], float] | None = None) -> dict:
    """Module count, parameter count, the common rank and alpha, and which components are LoRA'd."""
    mods = modules_of(state_dict)
    ranks = Counter(p["down"].shape[0] for p in mods.values())
    alpha_counts = Counter((alphas or {}).get(m, mods[m]["down"].shape[0]) for m in mods)
    return {"modules": len(mods), "parameters": sum(p["down"].numel() + p["up"].numel() for p in mods.values()),
            "rank": ranks.most_common(1)[0][0] if ranks else 0,
            "alpha": float(alpha_counts.most_common(1)[0][0]) if alpha_counts else 0.0,
            "components": sorted({c for c, _ in mods})}


def safetensors_size(shapes_dtypes: dict[str, tuple[tuple[int, ...], torch.dtype]], metadata: dict[str, str] | None = None) -> int:
    """Bytes a .safetensors file would take, from shapes alone (the header is built the way safetensors does)."""
    names = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}
    header, offset = {}, 0
    for k in sorted(shapes_dtypes):
        shape, dt = shapes_dtypes[k]
        n = 1
        for s in shape:
            n *= s
        size = n * torch.tensor([], dtype=dt).element_size()
        header[k] = {"dtype": names[dt], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    if metadata:
        header["__metadata__"] = metadata
    raw = json.dumps(header, separators=(",", ":")).encode()
    return 8 + len(raw) + (-len(raw) % 8) + offset


RUN_SUMMARY = "training_summary.json"
# Characters a file name or A1111's <lora:NAME:weight> tag cannot carry
_BAD_NAME = re.compile(r'[\\/:<>"|?*\x00-\x1f]')


def check_finite(tensors: dict[str, torch.Tensor], source) -> None:
    """A LoRA with NaN/inf values gives black images in every client: refuse it, naming the first bad tensor."""
    for k in sorted(tensors):
        v = tensors[k]
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            n = int((~torch.isfinite(v)).sum())
            raise SpoInputError(f"{source}: tensor {k} has {n} non-finite value(s) (NaN or inf); not exported")


def read_run_summary(source: Path) -> tuple[dict | None, float | None]:
    """The training summary saved beside a LoRA by `spo train` (its folder's training_summary.json), and when it
    was written; (None, None) when there is none or it is unreadable (it only adds metadata)."""
    folder = source if source.is_dir() else source.parent
    path = folder / RUN_SUMMARY
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return (data if isinstance(data, dict) else None), path.stat().st_mtime
    except (OSError, UnicodeDecodeError, ValueError):
        return None, None


def default_export_name(source: Path, training: dict | None, family: str) -> str:
    """`<run>_<method>_<family>` for a LoRA saved by a training run (`<run>/lora/pytorch_lora_weights.safetensors`
    with its training_summary.json; `<run>/lora-epoch-003/...` adds `_epoch-003`); otherwise the file's stem or the
    LoRA folder's name."""
    folder = source.parent if source.name == "pytorch_lora_weights.safetensors" else None
    if folder is not None and (folder.name == "lora" or folder.name.startswith("lora-") or training):
        in_run = folder.name == "lora" or folder.name.startswith("lora-")
        run = folder.resolve().parent.name if in_run else folder.name
        method = str(training.get("method") or "") if training else ""
        fam = str(training.get("family") or family) if training else family
        parts = [run, method.lower(), fam, folder.name[len("lora-"):] if folder.name.startswith("lora-") else ""]
        name = "_".join(p for i, p in enumerate(parts) if p and p not in parts[:i])
    else:  # a webui file exported before keeps its name ("x_webui" -> "x", written again as x_webui)
        name = folder.name if folder is not None else source.stem.removesuffix("_webui")
    return re.sub(r"\s+", "_", _BAD_NAME.sub("_", name)).strip("._") or "lora"


def check_export_name(name: str) -> str:
    if not name or name in (".", "..") or _BAD_NAME.search(name):
        raise SpoInputError(f"export name {name!r}: use a plain file-name stem (no / \\ : < > \" | ? * or control characters)")
    return name


def export_lora(source: str | Path, out_dir: str | Path, *, formats=("webui", "diffusers"), dtype: str = "fp32",
                name: str | None = None, family: str | None = None, unet_config: dict | None = None,
                alpha: float | None = None, description: str | None = None, license: str | None = None,
                training: dict | None = None, base_model: str | None = None, clip_skip: int | None = None,
                started_at: float | None = None, finished_at: float | None = None) -> dict[str, Path]:
    """Write a diffusers-format LoRA (file or folder holding pytorch_lora_weights.safetensors) as webui and/or
    diffusers files with kohya + modelspec metadata. Returns {format: path}.

    `training` (the run's summary; read from the LoRA folder's training_summary.json when not given) fills the
    kohya keys A1111 shows: base model (`base_model` overrides its "base"), training start/end (`started_at`/
    `finished_at`, else its "started_at"/"finished_at", else the summary's save time minus its "seconds"), and the
    CLIP skip (`clip_skip`, else 1 for an SD1.5 run of ours: diffusers' encode_prompt uses the last layer).
    Without a name, files are named `<run>_<method>_<family>` (see default_export_name).
    """
    from spo.formats.metadata import lora_metadata, save_with_hashes, training_times
    from spo.io import check_output_dir

    if dtype not in DTYPES:
        raise SpoInputError(f"unknown dtype {dtype!r} (choose from {', '.join(DTYPES)})")
    bad = set(formats) - {"webui", "diffusers"}
    if bad or not formats:
        raise SpoInputError(f"unknown LoRA format(s) {sorted(bad) or formats} (choose from webui, diffusers)")
    if alpha is not None and not (math.isfinite(alpha) and alpha != 0):
        raise SpoInputError(f"--alpha must be a finite non-zero number, got {alpha}")
    if name is not None:
        check_export_name(name)
    out_dir = check_output_dir(out_dir)
    source = Path(source)
    if source.is_dir():
        source = source / "pytorch_lora_weights.safetensors"
    state_dict, meta = read_safetensors(source)
    kind = lora_format(state_dict)
    check_finite(state_dict, source)
    saved_at = None
    if training is None:
        training, saved_at = read_run_summary(source)
    elif source.is_file():
        saved_at = source.stat().st_mtime
    if kind == "webui":
        state_dict, rank, file_alpha, found = load_lora(source)
        alphas = {m: file_alpha for m in modules_of(state_dict)}
    elif kind == "diffusers":
        found = lora_family(state_dict, meta, default=family)
        alphas = adapter_alphas(meta, state_dict)
    else:
        raise SpoInputError(f"{source}: old-style diffusers LoRA keys; load and re-save it with current diffusers")
    if family is not None and family != found:
        raise SpoInputError(f"{source}: this LoRA is for {found}, not {family}")
    family = found
    if alpha is not None:
        alphas = {m: float(alpha) for m in alphas}
    if not all(math.isfinite(a) for a in alphas.values()):
        raise SpoInputError(f"{source}: non-finite alpha in its metadata or .alpha tensors; not exported")
    info = summarize(state_dict, alphas)
    title = name or default_export_name(source, training, family)
    started, finished = training_times(training, saved_at)
    if clip_skip is None and training:
        cfg = training.get("config") if isinstance(training.get("config"), dict) else {}
        clip_skip = cfg.get("clip_skip") or training.get("clip_skip") or (1 if family == "sd15" else None)
    metadata = lora_metadata(family, info["rank"], info["alpha"], title, description=description, license=license,
                             training=training, text_encoder=any(c != "unet" for c in info["components"]),
                             base_model=base_model, started_at=started_at if started_at is not None else started,
                             finished_at=finished_at if finished_at is not None else finished, clip_skip=clip_skip)
    torch_dtype = DTYPES[dtype]
    written = {}
    if "webui" in formats:
        tensors = peft_to_webui(state_dict, alphas, family, unet_config or unet_config_for(state_dict, family), torch_dtype)
        written["webui"] = out_dir / f"{title}_webui.safetensors"
        save_with_hashes(tensors, written["webui"], metadata)
    if "diffusers" in formats:
        tensors = {_diffusers_te_key(k): v.to(torch_dtype).contiguous() for k, v in state_dict.items()}
        written["diffusers"] = out_dir / f"{title}_diffusers" / "pytorch_lora_weights.safetensors"
        save_with_hashes(tensors, written["diffusers"], diffusers_metadata(metadata, state_dict, alphas, family),
                         kohya_hashes=False)
    return written


def _diffusers_te_key(key: str) -> str:
    """Text-encoder keys with CLIP's `text_model.` level: the names diffusers (any version, with transformers 4 or
    5), ComfyUI and kohya read; transformers >= 5.6 dropped that level from CLIPTextModel, so peft writes without it."""
    component, _, rest = key.partition(".")
    if component in ("text_encoder", "text_encoder_2") and rest.startswith(("encoder.", "embeddings.", "final_layer_norm.")):
        return f"{component}.text_model.{rest}"
    return key


def diffusers_metadata(metadata: dict[str, str], state_dict, alphas, family: str) -> dict[str, str]:
    """Metadata of the diffusers-format file: modelspec, diffusers' own keys, a note, and no kohya `ss_*` keys.

    A1111 lists every .safetensors in its LoRA folder and reads ss_* keys as a kohya network's; this file's peft key
    names match none of its modules, so with those keys it would show as a normal LoRA that silently does nothing.
    """
    from spo.formats.metadata import implementation

    meta = {k: v for k, v in metadata.items() if k.startswith("modelspec.")}
    meta["modelspec.implementation"] = implementation(family, "lora", key_names="diffusers")
    meta["format"] = "pt"  # what diffusers' save_lora_weights writes
    meta["lora_adapter_metadata"] = json.dumps(_adapter_metadata(state_dict, alphas), sort_keys=True)
    meta["spo.lora_format"] = "diffusers"
    meta["spo.note"] = ("diffusers/peft key names, for diffusers' load_lora_weights only; for A1111, ComfyUI and kohya "
                        f"use the webui export ({metadata.get('ss_output_name', 'NAME')}_webui.safetensors, "
                        "`spo export --format webui`)")
    return meta


def _adapter_metadata(state_dict, alphas) -> dict:
    """diffusers' lora_adapter_metadata (a peft LoraConfig per component) so load_lora_weights keeps the alphas."""
    mods = modules_of(state_dict)
    meta = {}
    for component in sorted({c for c, _ in mods}):
        ranks = Counter(p["down"].shape[0] for (c, _), p in mods.items() if c == component)
        r = ranks.most_common(1)[0][0]
        common_alpha = Counter(alphas[m] for m in mods if m[0] == component).most_common(1)[0][0]
        meta[f"{component}.r"] = r
        meta[f"{component}.lora_alpha"] = common_alpha
        meta[f"{component}.target_modules"] = sorted({p.split(".")[-1] if not p.endswith(".0") else ".".join(p.split(".")[-2:])
                                                      for (c, p) in mods if c == component})
        # peft matches these keys as module-name suffixes: without CLIP's `text_model.` they fit both layouts
        meta[f"{component}.rank_pattern"] = {_pattern(p): mods[(c, p)]["down"].shape[0] for (c, p) in mods
                                             if c == component and mods[(c, p)]["down"].shape[0] != r}
        meta[f"{component}.alpha_pattern"] = {_pattern(p): alphas[(c, p)] for (c, p) in mods
                                              if c == component and alphas[(c, p)] != common_alpha}
    return meta


def _pattern(path: str) -> str:
    return path[len("text_model."):] if path.startswith("text_model.") else path


# ----------------------------------------------------------------------------------------------- import

def load_lora(path: str | Path, family: str | None = None, unet_config: dict | None = None
              ) -> tuple[dict[str, torch.Tensor], int, float, str]:
    """Read a webui/kohya or diffusers LoRA -> (peft-named state dict, rank, alpha, family).

    Keys come back as diffusers writes them (`unet.<module>.lora_A.weight`, `text_encoder.<...>`), ready for
    `load_lora_weights`, `set_peft_model_state_dict`, merging, or continued training. Where modules differ in
    alpha/rank, each module's lora_B is rescaled so that the one returned (rank, alpha) gives the same
    W + (alpha/rank) * B @ A for every module.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "pytorch_lora_weights.safetensors"
    return lora_from_tensors(*read_safetensors(path), path, family, unet_config)


def lora_from_tensors(tensors: dict[str, torch.Tensor], meta: dict, path: Path, family: str | None = None,
                      unet_config: dict | None = None) -> tuple[dict[str, torch.Tensor], int, float, str]:
    """`load_lora` on a file already read (`path` only names it in errors): callers that inspected the
    tensors first need not read a LoRA of hundreds of MB twice."""
    kind = lora_format(tensors)
    found = lora_family(tensors, meta, default=family)
    if family is not None and family != found:
        raise SpoInputError(f"{path}: this LoRA is for {found}, not {family}")
    if kind == "diffusers-old":
        raise SpoInputError(f"{path}: old-style diffusers LoRA keys; load and re-save it with current diffusers")
    if kind == "diffusers":
        state_dict = {k: v for k, v in tensors.items() if ".lora_A." in k or ".lora_B." in k}
        alphas = adapter_alphas(meta, state_dict)
    else:
        state_dict, alphas = _webui_to_peft(tensors, found, unet_config or unet_config_for(tensors, found))
    return (*_common_scale(state_dict, alphas), found)


def _webui_to_peft(tensors, family, unet_config):
    from types import SimpleNamespace

    from diffusers.loaders import StableDiffusionLoraLoaderMixin
    from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_peft, convert_unet_state_dict_to_peft

    bad = [k for k in tensors if not k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha"))]
    if bad:
        raise SpoInputError(f"unsupported LoRA key {bad[0]!r} (only plain LoRA: lora_down/lora_up/alpha)")
    names = sorted({k.split(".", 1)[0] for k in tensors})
    for n in names:
        if f"{n}.lora_down.weight" not in tensors or f"{n}.lora_up.weight" not in tensors:
            raise SpoInputError(f"LoRA module {n} lacks its lora_down or lora_up weight")
    # Bake each module's alpha/rank into lora_up relative to the common (rank, alpha), so the converted dict needs
    # one scale; diffusers' network_alphas keep the pre-peft names, which would need a second renaming.
    ranks = {n: tensors[f"{n}.lora_down.weight"].shape[0] for n in names}
    alphas = {n: float(tensors[f"{n}.alpha"]) if f"{n}.alpha" in tensors else float(ranks[n]) for n in names}
    rank, alpha = _common_pair((ranks[n], alphas[n]) for n in names)
    plain = {}
    for n in names:
        plain[f"{n}.lora_down.weight"] = tensors[f"{n}.lora_down.weight"]
        factor = (alphas[n] / ranks[n]) / (alpha / rank)
        up = tensors[f"{n}.lora_up.weight"]
        plain[f"{n}.lora_up.weight"] = up * factor if factor != 1.0 else up
    try:
        converted, _ = StableDiffusionLoraLoaderMixin.lora_state_dict(plain, unet_config=SimpleNamespace(**unet_config))
    except ValueError as exc:
        raise SpoInputError(f"cannot convert this webui LoRA ({str(exc).splitlines()[0][:160]})") from None
    state_dict = {}
    for component in COMPONENTS:
        part = {k[len(component) + 1:]: v for k, v in converted.items() if k.startswith(component + ".")}
        if not part:
            continue
        # diffusers' kohya converter yields its older spellings (`to_q_lora.down`); these helpers of diffusers
        # map them to peft's lora_A/lora_B on the real module names, as its own loaders do.
        if component == "unet":
            part = convert_unet_state_dict_to_peft(part)
        else:
            part = {_te_module_name(k, component): v for k, v in convert_state_dict_to_peft(convert_state_dict_to_diffusers(part)).items()}
        state_dict.update({f"{component}.{k}": v for k, v in part.items()})
    # already baked: every module now scales by alpha/rank, so its own alpha is alpha * r_m / rank
    return state_dict, {m: alpha * pair["down"].shape[0] / rank for m, pair in modules_of(state_dict).items()}


@lru_cache(maxsize=1)
def _clip_text_model_flattened() -> bool:
    """transformers >= 5.6 dropped CLIPTextModel's `text_model.` level; peft keys follow the installed layout."""
    from transformers import CLIPTextConfig, CLIPTextModel

    tiny = CLIPTextConfig(hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=1,
                          vocab_size=8, max_position_embeddings=4)
    return not hasattr(CLIPTextModel(tiny), "text_model")


def _te_module_name(key: str, component: str) -> str:
    # CLIPTextModelWithProjection (text_encoder_2) keeps `text_model.`; only the plain CLIPTextModel lost it
    if component == "text_encoder" and key.startswith("text_model.") and _clip_text_model_flattened():
        return key[len("text_model."):]
    return key


def _common_scale(state_dict, alphas):
    mods = modules_of(state_dict)
    if not mods:
        raise SpoInputError("the LoRA has no modules")
    rank, alpha = _common_pair((p["down"].shape[0], alphas[m]) for m, p in mods.items())
    out = dict(state_dict)
    for (component, path), pair in mods.items():
        r = pair["down"].shape[0]
        factor = (alphas[(component, path)] / r) / (alpha / rank)
        if factor != 1.0:
            out[f"{component}.{path}.lora_B.weight"] = pair["up"] * factor
    return out, int(rank), float(alpha)


def _common_pair(pairs) -> tuple[int, float]:
    """The (rank, alpha) most modules share; ties go to the larger rank, then alpha (independent of key order)."""
    counts = Counter((int(r), float(a)) for r, a in pairs)
    return max(counts, key=lambda ra: (counts[ra], ra[0], ra[1]))
