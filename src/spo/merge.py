"""`spo merge`: checkpoints and LoRAs -> one model, from a TOML recipe, streamed one tensor at a time.

Written by hand rather than on sd-mecha (checked: v1.1.8 on PyPI, a capable streaming merger) because what is
needed here is small (weighted sum, add difference, LoRA baking, per-block weights) while sd-mecha brings its own
recipe language, key-space configs and dependencies (scipy, click, fuzzywuzzy, python-Levenshtein), and reads
neither peft-named LoRAs nor our toy layouts; the recipe validation and one-line errors are ours either way.

Recipe (paths relative to the recipe's folder, never outside it)::

    base = "a.safetensors"                 # original-layout single file, a diffusers folder, or a built-in model (`spo generate --help` lists them)
    output = "merged.safetensors"          # and/or: output_diffusers = "merged_diffusers"
    dtype = "fp16"                         # fp32 | fp16 | bf16 (default: the base's)
    title = "my merge"                     # optional, for the metadata

    [[checkpoint]]                         # applied in order
    method = "weighted_sum"                # (1 - m) A + m B
    model = "b.safetensors"
    multiplier = 0.3
    blocks = { IN04 = 0.5, OUT00 = 0.0 }   # optional: m per block (IN.., M00, OUT.., TE, OTHER)

    [[checkpoint]]
    method = "add_difference"              # A + m (B - C)
    model = "b.safetensors"
    minus = "c.safetensors"
    multiplier = 1.0

    [[lora]]                               # applied after the checkpoints: W + s * (alpha/rank) * up @ down
    path = "spo_webui.safetensors"         # webui/kohya or diffusers LoRA
    strength = 1.0                         # negative and > 1 allowed
    blocks = { IN04 = 0.0 }                # optional: factor on the strength per block

Memory: inputs are read one tensor at a time with plain positioned reads (`TensorFile`; safetensors'
safe_open memory-maps the whole file, and every mapped page it touches stays in the process's resident set
until the file is closed: 14 GB for two SDXL inputs), the next tensor is read while the current one is
computed, and the output is written tensor by tensor (header first, sizes known from shapes) while a thread
hashes it. A diffusers-folder input is converted in memory (not streamed).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import torch

from spo.dtypes import DTYPES
from spo.errors import SpoInputError
from spo.formats import single_file as sf
from spo.io import check_output_dir, check_output_file
from spo.formats.metadata import checkpoint_metadata, header_length

ST_DTYPE = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
            torch.int64: "I64", torch.int32: "I32", torch.uint8: "U8", torch.bool: "BOOL"}
EXTRA_BLOCKS = ("TE", "OTHER")
TOP_KEYS = {"base", "output", "output_diffusers", "dtype", "title", "description", "checkpoint", "lora"}
CKPT_KEYS = {"method", "model", "minus", "multiplier", "blocks"}
LORA_KEYS = {"path", "strength", "blocks"}
METHODS = ("weighted_sum", "add_difference")


@dataclass
class CheckpointStep:
    method: str
    model: Path | str  # a path, or a built-in model's name
    multiplier: float
    minus: Path | str | None = None
    blocks: dict[str, float] = field(default_factory=dict)


@dataclass
class LoraStep:
    path: Path
    strength: float
    blocks: dict[str, float] = field(default_factory=dict)


@dataclass
class Recipe:
    folder: Path
    base: Path | str  # a path, or a built-in model's name
    output: Path | None
    output_diffusers: Path | None
    dtype: str | None
    title: str
    description: str | None
    checkpoints: list[CheckpointStep]
    loras: list[LoraStep]
    text: str


# ----------------------------------------------------------------------------------------------- recipe

def _inside(folder: Path, value, what: str, must_exist: bool) -> Path:
    if not isinstance(value, str) or not value:
        raise SpoInputError(f"recipe: {what} must be a path string")
    path = (folder / value).resolve()
    if path != folder and folder not in path.parents:
        raise SpoInputError(f"recipe: {what} {value!r} points outside the recipe's folder")
    if must_exist and not path.exists():
        raise SpoInputError(f"recipe: {what} {value!r} not found")
    return path


def _model(folder: Path, value, what: str) -> Path | str:
    """A model input: a built-in model's name (spo.sources) as it is, else a path inside the recipe's folder."""
    from spo import sources

    if isinstance(value, str) and value in sources.names():
        return value
    return _inside(folder, value, what, True)


def _number(value, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise SpoInputError(f"recipe: {what} must be a number, got {value!r}")
    return float(value)


MAX_FACTOR = 100.0  # multipliers and strengths beyond this only overflow fp16 (1e308 gives inf/NaN weights)


def _bounded(value, what: str) -> float:
    value = _number(value, what)
    if abs(value) > MAX_FACTOR:
        raise SpoInputError(f"recipe: {what} {value:g} is outside -{MAX_FACTOR:g}..{MAX_FACTOR:g}")
    return value


def _blocks(value, what: str) -> dict[str, float]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise SpoInputError(f"recipe: {what}.blocks must be a table like {{ IN04 = 0.5 }}")
    return {str(k).upper(): _bounded(v, f"{what}.blocks.{k}") for k, v in value.items()}


def _unknown(table: dict, allowed: set, what: str) -> None:
    extra = sorted(set(table) - allowed)
    if extra:
        raise SpoInputError(f"recipe: unknown key {extra[0]!r} in {what} (allowed: {', '.join(sorted(allowed))})")


def load_recipe(path: str | Path) -> Recipe:
    path = Path(path)
    if not path.is_file():
        raise SpoInputError(f"{path}: no such recipe file")
    text = path.read_text(encoding="utf-8")
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise SpoInputError(f"{path}: not valid TOML ({exc})") from None
    folder = path.parent.resolve()
    _unknown(data, TOP_KEYS, "the recipe")
    if "base" not in data:
        raise SpoInputError("recipe: 'base' (the model to start from) is required")
    base = _model(folder, data["base"], "base")
    output = _inside(folder, data["output"], "output", False) if "output" in data else None
    output_dir = _inside(folder, data["output_diffusers"], "output_diffusers", False) if "output_diffusers" in data else None
    dtype = data.get("dtype")
    if dtype is not None and dtype not in DTYPES:
        raise SpoInputError(f"recipe: dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    checkpoints = []
    for i, t in enumerate(_tables(data.get("checkpoint", []), "checkpoint")):
        what = f"checkpoint #{i + 1}"
        _unknown(t, CKPT_KEYS, what)
        method = t.get("method", "weighted_sum")
        if method not in METHODS:
            raise SpoInputError(f"recipe: {what}: method {method!r} is not one of {', '.join(METHODS)}")
        if "model" not in t or "multiplier" not in t:
            raise SpoInputError(f"recipe: {what} needs 'model' and 'multiplier'")
        if (method == "add_difference") != ("minus" in t):
            raise SpoInputError(f"recipe: {what}: 'minus' goes with method add_difference (and only with it)")
        checkpoints.append(CheckpointStep(method, _model(folder, t["model"], f"{what} model"),
                                          _bounded(t["multiplier"], f"{what} multiplier"),
                                          _model(folder, t["minus"], f"{what} minus") if "minus" in t else None,
                                          _blocks(t.get("blocks"), what)))
    loras = []
    for i, t in enumerate(_tables(data.get("lora", []), "lora")):
        what = f"lora #{i + 1}"
        _unknown(t, LORA_KEYS, what)
        if "path" not in t:
            raise SpoInputError(f"recipe: {what} needs 'path'")
        loras.append(LoraStep(_inside(folder, t["path"], f"{what} path", True),
                              _bounded(t.get("strength", 1.0), f"{what} strength"), _blocks(t.get("blocks"), what)))
    title = data.get("title", output.stem if output else (output_dir.name if output_dir else "merge"))
    return Recipe(folder, base, output, output_dir, dtype, str(title), data.get("description"), checkpoints, loras, text)


def _tables(value, name: str) -> list[dict]:
    if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
        raise SpoInputError(f"recipe: use [[{name}]] tables for {name} steps")
    return value


# ----------------------------------------------------------------------------------------------- sources

class Source:
    """An original-layout model to read tensor by tensor: a .safetensors file (streamed) or a diffusers folder."""

    def __init__(self, path: Path | str):
        from spo import sources

        builtin = isinstance(path, str) and sources.get(path) is not None
        self.path = path = Path(path)
        self._file = None
        self._dict = None
        if builtin or path.is_dir():
            from spo.models.loading import load_pipeline

            self._dict = sf.pipeline_to_original(load_pipeline(str(path) if builtin else path))
            self.shapes = {k: tuple(v.shape) for k, v in self._dict.items()}
            self.dtypes = {k: v.dtype for k, v in self._dict.items()}
        elif path.suffix.lower() == ".safetensors":
            self.shapes = sf.read_keys_and_shapes(path)  # validated by safetensors itself
            self._file = TensorFile(path)
            self.dtypes = self._file.dtypes
        else:
            raise SpoInputError(f"{path}: merge inputs must be .safetensors single files or diffusers folders")
        self.family = sf.detect_family(self.shapes)

    def get(self, key: str) -> torch.Tensor | None:
        if key not in self.shapes:
            return None
        return self._dict[key] if self._dict is not None else self._file.read(key)


class TensorFile:
    """One .safetensors file read tensor by tensor with os.pread into fresh memory (no memory map)."""

    def __init__(self, path: Path):
        self.path = path
        size = path.stat().st_size
        with open(path, "rb") as f:
            n = header_length(f, path)
            header = json.loads(f.read(n))
        header.pop("__metadata__", None)
        self._start = 8 + n
        self._entries = {}
        self.dtypes = {}
        for key, e in header.items():
            dtype = _st_dtype(e["dtype"], path, key)
            lo, hi = e["data_offsets"]
            if hi - lo != math.prod(e["shape"]) * torch.tensor([], dtype=dtype).element_size() or self._start + hi > size:
                raise SpoInputError(f"{path}: tensor {key} does not fit its declared shape or the file")
            self._entries[key] = (dtype, tuple(e["shape"]), lo, hi)
            self.dtypes[key] = dtype
        self._fd = os.open(path, os.O_RDONLY)

    def keys(self) -> list[str]:
        return list(self._entries)

    def read(self, key: str) -> torch.Tensor:
        dtype, shape, lo, hi = self._entries[key]
        buf = torch.empty(hi - lo, dtype=torch.uint8)
        view, done = memoryview(buf.numpy()), 0
        while done < hi - lo:  # pread may return less than asked for
            got = os.preadv(self._fd, [view[done:]], self._start + lo + done)
            if got <= 0:
                raise SpoInputError(f"{self.path}: file ended inside tensor {key} (truncated?)")
            done += got
        return buf.view(dtype).reshape(shape)

    def __del__(self):
        fd = getattr(self, "_fd", None)
        if fd is not None:
            os.close(fd)


def _st_dtype(name: str, path: Path, key: str) -> torch.dtype:
    for dt, n in ST_DTYPE.items():
        if n == name:
            return dt
    raise SpoInputError(f"{path}: tensor {key} has the unknown dtype {name!r}")


# ----------------------------------------------------------------------------------------------- merge

def block_of(key: str) -> str:
    if key.startswith(sf.UNET_PREFIX):
        return sf.unet_block_of(key) or "OTHER"
    if key.startswith(("cond_stage_model.", "conditioner.")):
        return "TE"
    return "OTHER"


def _check_blocks(blocks: dict, allowed: list[str], what: str) -> None:
    for name in blocks:
        if name not in allowed:
            raise SpoInputError(f"recipe: {what}: unknown block {name!r} for this model "
                                f"(use {allowed[0]}-{allowed[-1]} names, M00, TE, OTHER)")


@dataclass
class _Delta:
    down: torch.Tensor
    up: torch.Tensor
    scale: float
    rows: tuple[int, int] | None


def _same_path(a: Path, b: Path) -> bool:
    a, b = Path(a), Path(b)
    if a.exists() and b.exists():
        return a.samefile(b)
    return a.resolve() == b.resolve()


def lora_deltas(step: LoraStep, family: str, unet_cfg: dict, shapes: dict) -> dict[str, list[_Delta]]:
    """original key -> the LoRA terms to add to it (W' = W + s * block * (alpha/rank) * up @ down).

    Every LoRA module must land on a base weight of the right shape; otherwise the error lists the modules
    that did not (a LoRA for another model changes nothing, and saying so beats a silent no-op merge).
    """
    from spo.formats.webui_lora import lora_family, lora_from_tensors, modules_of, read_safetensors

    tensors, meta = read_safetensors(step.path)
    bad = next((k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all()), None)
    if bad is not None:
        raise SpoInputError(f"{step.path.name}: tensor {bad} holds NaN or infinite values; nothing was merged")
    found = lora_family(tensors, meta, default=family)
    if found == family and (direct := webui_deltas_by_name(tensors, shapes, step, family)) is not None:
        return direct
    # Converted with its own family's layout; only a same-family LoRA can use the base's exact UNet config.
    state_dict, rank, alpha, _ = lora_from_tensors(tensors, meta, step.path, unet_config=unet_cfg if found == family else None)
    modules = modules_of(state_dict)
    out: dict[str, list[_Delta]] = {}
    unmatched = []
    for (component, path), pair in modules.items():
        try:
            if component == "unet":
                key, rows = sf.UNET_PREFIX + sf.unet_key_to_original(path + ".weight", unet_cfg), None
            else:
                key, rows = sf.text_encoder_key_to_original(path + ".weight", family, component)
        except (KeyError, ValueError, IndexError, SpoInputError):
            key, rows = None, None
        expect = (pair["up"].shape[0] * (rows[1] if rows else 1), pair["down"].shape[1])
        if key not in shapes or tuple(shapes[key][:2]) != expect:
            unmatched.append(f"{component}.{path}" + (f" ({key}: base {list(shapes[key])}, LoRA {list(expect)})"
                                                       if key in shapes else ""))
            continue
        out.setdefault(key, []).append(_Delta(pair["down"].float(), pair["up"].float(), _scale(step, key, alpha, rank), rows))
    if unmatched:
        what = f"a {found} LoRA on a {family} base" if found != family else f"a {found} LoRA"
        raise SpoInputError(f"{step.path.name}: {what}: {len(unmatched)} of {len(modules)} modules match no base weight, "
                            f"e.g. {'; '.join(unmatched[:3])}")
    return out


def webui_deltas_by_name(tensors: dict, shapes: dict, step: LoraStep, family: str) -> dict[str, list[_Delta]] | None:
    """The LoRA terms of a webui LoRA whose module names are original checkpoint keys with `_` for `.`, or None.

    SDXL webui LoRAs (the published SPO one, kohya's, ours) name UNet modules after the original layout
    (`lora_unet_input_blocks_4_1_...`), so a key map from the base checkpoint's own keys resolves them, as
    A1111 and ComfyUI do. That skips diffusers' kohya converter, whose import alone costs seconds per merge.
    Anything the map cannot resolve exactly (SD1.5's diffusers-named UNet modules, OpenCLIP's fused q/k/v)
    returns None, and the caller takes the general conversion path.
    """
    from spo.formats.webui_lora import WEBUI_TE_PREFIX

    # original-layout key prefix -> webui module-name prefix; the first text encoder only (SDXL's second is
    # OpenCLIP with fused q/k/v in the original layout, so its names never map one to one)
    prefixes = {sf.UNET_PREFIX: "lora_unet_",
                sf.TE_PREFIX[(family, "text_encoder")]: WEBUI_TE_PREFIX[(family, "text_encoder")]}
    by_name = {}
    for key in shapes:
        for prefix, lora_prefix in prefixes.items():
            if key.startswith(prefix) and key.endswith(".weight"):
                by_name[lora_prefix + key[len(prefix):-len(".weight")].replace(".", "_")] = key
    parts: dict[str, set[str]] = {}
    for k in tensors:
        n, _, rest = k.partition(".")
        parts.setdefault(n, set()).add(rest)
    out: dict[str, list[_Delta]] = {}
    for n, have in parts.items():
        key = by_name.get(n)
        if key is None or not {"lora_down.weight", "lora_up.weight"} <= have <= {"lora_down.weight", "lora_up.weight", "alpha"}:
            return None
        down, up = tensors[f"{n}.lora_down.weight"], tensors[f"{n}.lora_up.weight"]
        if tuple(shapes[key][:2]) != (up.shape[0], down.shape[1]):
            return None
        rank = down.shape[0]
        alpha = float(tensors[f"{n}.alpha"]) if f"{n}.alpha" in tensors else float(rank)
        out.setdefault(key, []).append(_Delta(down.float(), up.float(), _scale(step, key, alpha, rank), None))
    return out


def _scale(step: LoraStep, key: str, alpha: float, rank: int) -> float:
    """W' = W + scale * up @ down: the step's strength, its weight for the key's block, and alpha / rank."""
    return step.strength * step.blocks.get(block_of(key), 1.0) * alpha / rank


def _apply_delta(t: torch.Tensor, d: _Delta) -> torch.Tensor:
    delta = d.up.flatten(1) @ d.down.flatten(1)
    if d.rows is None:
        return t + d.scale * delta.reshape(t.shape)
    i, n = d.rows
    size = t.shape[0] // n
    t = t.clone()
    t[i * size:(i + 1) * size] += d.scale * delta.reshape(t[i * size:(i + 1) * size].shape)
    return t


def _outputs(recipe: Recipe, output: Path | None, output_diffusers: Path | None) -> tuple[Path | None, Path | None]:
    """The outputs (the command line's over the recipe's), checked before minutes of merging."""
    output = output or recipe.output
    output_diffusers = output_diffusers or recipe.output_diffusers
    if output is None and output_diffusers is None:
        raise SpoInputError("recipe: give 'output' and/or 'output_diffusers' (or --out/--out-diffusers)")
    input_paths = [recipe.base, *(c.model for c in recipe.checkpoints), *(c.minus for c in recipe.checkpoints if c.minus),
                   *(step.path for step in recipe.loras)]
    for out in (output, output_diffusers):
        if out is not None and any(_same_path(out, i) for i in input_paths):
            raise SpoInputError(f"{out}: the output is one of the recipe's inputs; inputs are never overwritten")
    if output is not None:
        check_output_file(output)  # a device, FIFO or folder there is never replaced
    if output_diffusers is not None:
        check_output_dir(output_diffusers)
    return output, output_diffusers


def _inputs(recipe: Recipe, base: "Source") -> tuple[list, dict[str, list]]:
    """The checkpoint steps (checkpoint, its source, its minus source) and the LoRA deltas by base key."""
    family = base.family
    unet_cfg = sf.unet_config(sf.config_folder_for(base.shapes, family))
    allowed = sf.block_names(unet_cfg) + list(EXTRA_BLOCKS)
    steps = []
    for i, c in enumerate(recipe.checkpoints):
        _check_blocks(c.blocks, allowed, f"checkpoint #{i + 1}")
        b = Source(c.model)
        m = Source(c.minus) if c.minus else None
        for s in (b, m):
            if s is not None and s.family != family:
                raise SpoInputError(f"{s.path.name}: a {s.family} checkpoint cannot merge with a {family} base")
        steps.append((c, b, m))
    deltas: dict[str, list[_Delta]] = {}
    for i, step in enumerate(recipe.loras):
        _check_blocks(step.blocks, allowed, f"lora #{i + 1}")
        for k, v in lora_deltas(step, family, unet_cfg, base.shapes).items():
            deltas.setdefault(k, []).extend(v)
    return steps, deltas


def run_recipe(recipe: Recipe, output: Path | None = None, output_diffusers: Path | None = None) -> dict:
    """Merge per the recipe; returns a summary. CLI-given outputs override the recipe's."""
    output, output_diffusers = _outputs(recipe, output, output_diffusers)
    base = Source(recipe.base)
    family = base.family
    steps, deltas = _inputs(recipe, base)

    out_dtype = DTYPES[recipe.dtype] if recipe.dtype else None
    keys = sorted(base.shapes)
    out_dtypes = {k: (out_dtype if out_dtype is not None and base.dtypes[k].is_floating_point else base.dtypes[k]) for k in keys}
    missing = {}

    def inputs(k):
        return base.get(k), [(b.get(k), m.get(k) if m is not None else None) for _, b, m in steps]

    def tensors():
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(1) as reader:  # reads the next key's tensors while this one is computed
            ahead = reader.submit(inputs, keys[0]) if keys else None
            for i, k in enumerate(keys):
                t, others = ahead.result()
                if i + 1 < len(keys):
                    ahead = reader.submit(inputs, keys[i + 1])
                yield k, merged(k, t, others)

    def merged(k, t, others):
        t0 = t
        tb = others[0][0] if len(steps) == 1 and steps[0][0].method == "weighted_sum" and k not in deltas else None
        if tb is not None and t.is_floating_point() and t.dtype == tb.dtype == out_dtypes[k] and tb.shape == t.shape:
            # The common case, ten times faster: CPU lerp on fp16/bf16 computes in fp32 and rounds once, so
            # this is bit-identical to the fp32 path below (checked) without its conversions.
            return _finite(k, torch.lerp(t, tb, steps[0][0].blocks.get(block_of(k), steps[0][0].multiplier)), t, others)
        if t.is_floating_point() and (steps or k in deltas):
            t = t.float()
            for (c, b, m), (tb, tc) in zip(steps, others):
                mult = c.blocks.get(block_of(k), c.multiplier)
                if tb is None or tuple(tb.shape) != tuple(t.shape) or (m is not None and (tc is None or tc.shape != t.shape)):
                    missing[c.model.name] = missing.get(c.model.name, 0) + 1
                    continue
                if c.method == "weighted_sum":
                    t = torch.lerp(t, tb.float(), mult)  # (1 - m) A + m B without the temporaries
                else:
                    t = t + mult * (tb.float() - tc.float())
            for d in deltas.get(k, []):
                t = _apply_delta(t, d)
        return _finite(k, t.to(out_dtypes[k]).contiguous(), t0, others)

    def _finite(k, t, t0, others):
        # Checked on what is written (after the cast: fp16 overflows to inf where fp32 did not), so a NaN input
        # or an overflowing multiplier never reaches a file; the atomic writer then leaves nothing behind.
        if not t.is_floating_point() or torch.isfinite(t).all():
            return t
        inputs = [(recipe.base, t0)] + [(p, x) for (c, _, _), (tb, tc) in zip(steps, others)
                                        for p, x in ((c.model, tb), (c.minus, tc))]
        bad = [p.name for p, x in inputs if x is not None and x.is_floating_point() and not torch.isfinite(x).all()]
        why = (f"{', '.join(dict.fromkeys(bad))} holds NaN/inf there" if bad else
               f"it overflowed {str(out_dtypes[k]).replace('torch.', '')}: a multiplier, strength or weight too large")
        raise SpoInputError(f"merged tensor {k} would hold NaN or infinite values ({why}); nothing was written")

    meta = checkpoint_metadata(family, recipe.title, {"spo.merge_recipe": recipe.text})
    if recipe.description:
        meta["modelspec.description"] = recipe.description
    summary = {"family": family, "tensors": len(keys), "checkpoints": len(steps), "loras": len(recipe.loras),
               "lora_weights_changed": len(deltas), "skipped_keys": missing}
    if output is not None:
        summary["hash"] = write_streaming(output, keys, {k: base.shapes[k] for k in keys}, out_dtypes, tensors(), meta)
        summary["output"] = str(output)
    if output_diffusers is not None:
        _write_diffusers(output, output_diffusers, keys, base, out_dtypes, tensors if output is None else None, meta)
        summary["output_diffusers"] = str(output_diffusers)
    return summary


def _write_diffusers(single: Path | None, target: Path, keys, base, out_dtypes, tensors, meta) -> None:
    import tempfile

    from spo.io import atomic_dir
    from spo.models.loading import load_pipeline

    with tempfile.TemporaryDirectory(prefix=".spo-merge-", dir=target.parent if target.parent.exists() else None) as tmp:
        if single is None:
            single = Path(tmp) / "merged.safetensors"
            write_streaming(single, keys, {k: base.shapes[k] for k in keys}, out_dtypes, tensors(), meta)
        pipe = load_pipeline(single)
        with atomic_dir(target) as out:
            pipe.save_pretrained(out, safe_serialization=True)


# ----------------------------------------------------------------------------------------------- streaming writer

def write_streaming(target: Path, keys: list[str], shapes: dict, dtypes: dict, tensors, metadata: dict[str, str]) -> str:
    """Write a .safetensors file tensor by tensor; the header is sized up front and its hash fields filled at the end.

    Returns sshs_model_hash (sha256 of the bytes after the header), also stored as modelspec.hash_sha256.
    """
    from spo.io import atomic_path

    header, offset = {}, 0
    for k in keys:
        n = math.prod(shapes[k]) * torch.tensor([], dtype=dtypes[k]).element_size()
        header[k] = {"dtype": ST_DTYPE[dtypes[k]], "shape": list(shapes[k]), "data_offsets": [offset, offset + n]}
        offset += n
    placeholder = "0" * 64

    def encode(digest: str) -> bytes:
        meta = dict(metadata, sshs_model_hash=digest, **{"modelspec.hash_sha256": "0x" + digest})
        raw = json.dumps({"__metadata__": meta, **header}, separators=(",", ":")).encode()
        return raw + b" " * (-len(raw) % 8)

    first = encode(placeholder)
    h = hashlib.sha256()
    from concurrent.futures import ThreadPoolExecutor, wait

    with atomic_path(target, suffix=".safetensors") as tmp, ThreadPoolExecutor(1) as hasher, ThreadPoolExecutor(1) as writer:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(first)))
            f.write(first)
            pending = []
            try:
                for (k, t), expected in zip(tensors, keys):
                    assert k == expected and t.dtype == dtypes[k], (k, expected)
                    # A uint8 view, not a bytes copy: hashing and writing read the tensor's own memory. Both run
                    # beside the next tensor's read and computation (hashlib and file writes drop the GIL); one
                    # thread each keeps their order, and waiting for the previous tensor bounds what is in flight.
                    data = t.reshape(-1).view(torch.uint8).numpy() if t.numel() else b""
                    for job in pending:
                        job.result()
                    pending = [hasher.submit(h.update, data), writer.submit(f.write, data)]
            finally:  # never close the file under a running write, even when a tensor failed
                wait(pending)
            for job in pending:
                job.result()
            digest = h.hexdigest()
            final = encode(digest)
            assert len(final) == len(first)  # same-length hex digest, so the header fits its slot
            f.seek(8)
            f.write(final)
    return digest
