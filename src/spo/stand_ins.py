"""Random-weight stand-ins of the models users have, at full size, for runs where no weights can be downloaded.

`random_checkpoint` writes an SD1.5- or SDXL-family single file in the original layout (the key names real
SD1.5 / SDXL / Pony / Illustrious files use: UNet, text encoder(s), VAE), `random_clip` a transformers CLIP folder
(default: CLIP-ViT-H-14, PickScore_v1's architecture) that `spo spm train --init` takes. Both build the model on
the meta device and write it tensor by tensor (spo.merge.write_streaming), so a 6.9 GB SDXL file needs about one
tensor of memory. Weights are seeded per key: norms 1, biases 0, the rest N(0, 1/fan_in), so activations stay
of order one through the network and fp16 runs do not overflow.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import torch

from spo.dtypes import DTYPES
from spo.errors import SpoInputError
from spo.models.family import BY_NAME, CONFIG_DIR

CLIP_CONFIGS = {"clip-h": CONFIG_DIR / "clip-vit-h-14"}


def random_tensor(key: str, shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    """The stand-in value of one weight: a pure function of (seed, key, shape)."""
    if len(shape) <= 1:
        fill = 1.0 if key.endswith(("weight", "gamma")) else 0.0  # norm scales 1, biases and the rest 0
        return torch.full(shape, fill, dtype=dtype)
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    g = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") % 2**63)
    fan_in = math.prod(shape[1:])
    return (torch.randn(shape, generator=g) / math.sqrt(fan_in)).to(dtype)


class _Components:
    """What spo.formats.single_file.pipeline_to_original reads of a pipeline: its models, on meta."""

    def __init__(self, family: str):
        from spo.models.loading import meta_components

        self.unet, self.vae, encoders = meta_components(BY_NAME[family].config_dir, family)
        self.text_encoder = encoders[0]
        if family == "sdxl":
            self.text_encoder_2 = encoders[1]


def random_checkpoint(family: str, out: str | Path, dtype: str = "fp16", seed: int = 0) -> dict:
    """Write a random-weight single-file checkpoint of `family`'s real-size architecture; returns its summary."""
    from spo.formats.metadata import checkpoint_metadata
    from spo.formats.single_file import pipeline_to_original
    from spo.merge import write_streaming

    if family not in BY_NAME:
        raise SpoInputError(f"unknown family {family!r} (choose from {', '.join(BY_NAME)})")
    torch_dtype = DTYPES[dtype]
    layout = pipeline_to_original(_Components(family))  # meta tensors: every key and shape, no memory
    keys = list(layout)
    shapes = {k: tuple(v.shape) for k, v in layout.items()}
    dtypes = {k: torch_dtype for k in keys}
    tensors = ((k, random_tensor(k, shapes[k], torch_dtype, seed)) for k in _progress(keys, "random checkpoint"))
    meta = checkpoint_metadata(family, title=Path(out).stem, extra={"spo.stand_in": f"random weights, seed {seed}"})
    write_streaming(Path(out), keys, shapes, dtypes, tensors, meta)
    return {"path": str(out), "family": family, "tensors": len(keys), "dtype": dtype,
            "parameters": sum(math.prod(s) for s in shapes.values())}


def random_clip(out: str | Path, config: str = "clip-h", dtype: str = "fp16", seed: int = 0) -> dict:
    """Write a random-weight transformers CLIP folder (config.json, model.safetensors; no tokenizer files, so an
    SPM made from it uses the built-in CLIP tokenizer, the same vocabulary)."""
    import json

    from transformers import CLIPConfig, CLIPModel

    from spo.io import atomic_dir
    from spo.merge import write_streaming

    if config not in CLIP_CONFIGS:
        raise SpoInputError(f"unknown CLIP configuration {config!r} (choose from {', '.join(CLIP_CONFIGS)})")
    raw = json.loads((CLIP_CONFIGS[config] / "config.json").read_text(encoding="utf-8"))
    clip_config = CLIPConfig.from_dict({k: v for k, v in raw.items() if not k.startswith("_")})
    with torch.device("meta"):
        model = CLIPModel(clip_config)
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("position_ids")}
    keys = list(state)
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    dtypes = {k: DTYPES[dtype] for k in keys}
    tensors = ((k, random_tensor(k, shapes[k], DTYPES[dtype], seed) if k != "logit_scale"
                else torch.full((), clip_config.logit_scale_init_value, dtype=DTYPES[dtype]))
               for k in _progress(keys, "random CLIP"))
    with atomic_dir(Path(out)) as tmp:
        clip_config.save_pretrained(tmp)  # no dtype in the config: it loads as float32, as PickScore_v1's does
        write_streaming(tmp / "model.safetensors", keys, shapes, dtypes, tensors, {"format": "pt"})
    return {"path": str(out), "config": config, "tensors": len(keys), "dtype": dtype,
            "parameters": sum(math.prod(s) for s in shapes.values())}


def _progress(keys: list[str], what: str):
    from tqdm.auto import tqdm

    return tqdm(keys, desc=what, unit="tensor")
