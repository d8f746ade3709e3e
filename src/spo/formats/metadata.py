"""Safetensors metadata the UIs read: kohya `ss_*`, Stability's modelspec, and the data hash.

`sshs_model_hash` (and `modelspec.hash_sha256`) is the sha256 of the bytes after the safetensors header, so it
does not change when metadata is edited; A1111 shows it as the model's hash. `save_with_hashes` writes the file
once, hashes its data section, and rewrites only the header.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import struct
from pathlib import Path

import torch

ARCH = {"sd15": "stable-diffusion-v1", "sdxl": "stable-diffusion-xl-v1-base"}
BASE_VERSION = {"sd15": "sd_v1", "sdxl": "sdxl_base_v1-0"}
RESOLUTION = {"sd15": "512x512", "sdxl": "1024x1024"}
DEFAULT_DESCRIPTION = ("Step-aware Preference Optimization (SPO) post-training of a Stable Diffusion model: "
                       "improves aesthetics; use as a LoRA at strength ~1.0 (negative for the opposite effect).")


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


def modelspec(family: str, kind: str | None, title: str, description: str | None = None, license: str | None = None,
              resolution: str | None = None) -> dict[str, str]:
    """modelspec.* keys; kind 'lora' gives the '<arch>/lora' architecture, None a full checkpoint."""
    arch = ARCH[family] + (f"/{kind}" if kind else "")
    meta = {
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": arch,
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models" if family == "sdxl"
        else "https://github.com/CompVis/stable-diffusion",
        "modelspec.title": title,
        "modelspec.description": description or DEFAULT_DESCRIPTION,
        "modelspec.resolution": resolution or RESOLUTION[family],
        "modelspec.date": _now(),
        "modelspec.prediction_type": "epsilon",
    }
    if license:
        meta["modelspec.license"] = license
    return meta


def checkpoint_metadata(family: str, title: str, extra: dict | None = None) -> dict[str, str]:
    meta = modelspec(family, None, title)
    for k, v in (extra or {}).items():
        meta[str(k)] = v if isinstance(v, str) else json.dumps(v, sort_keys=True)
    return meta


def lora_metadata(family: str, rank: int, alpha: float, title: str, *, description: str | None = None,
                  license: str | None = None, training: dict | None = None, network_module: str = "networks.lora",
                  resolution: str | None = None, text_encoder: bool = False) -> dict[str, str]:
    """kohya ss_* + modelspec keys for a LoRA (A1111 hides an SDXL LoRA without ss_base_model_version)."""
    meta = {
        "ss_network_module": network_module,
        "ss_network_dim": str(int(rank)),
        "ss_network_alpha": _num(alpha),
        "ss_base_model_version": BASE_VERSION[family],
        "ss_v2": "False",
        "ss_network_args": json.dumps({}),
        "ss_output_name": title,
        "ss_training_comment": description or DEFAULT_DESCRIPTION,
        "ss_network_train_unet_only": "False" if text_encoder else "True",
    }
    if training:
        meta["ss_spo_training"] = json.dumps(training, sort_keys=True, default=str)
        for k in ("learning_rate", "max_train_steps", "seed", "num_epochs"):
            if k in training:
                meta[f"ss_{k}"] = str(training[k])
    meta.update(modelspec(family, "lora", title, description, license, resolution))
    return meta


def _num(x: float) -> str:
    x = float(x)
    return str(int(x)) if x.is_integer() else repr(x)


def header_length(f, path) -> int:
    """The header length of an open .safetensors file, checked against the file's size (a forged one could ask
    for exabytes)."""
    head = f.read(8)
    size = os.fstat(f.fileno()).st_size
    n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
    if not 0 <= n <= size - 8:
        from spo.errors import SpoInputError

        raise SpoInputError(f"{path}: not a readable .safetensors file (bad header length)")
    return n


def data_sha256(path: str | Path) -> str:
    """sha256 (hex) of the bytes after the safetensors header."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        n = header_length(f, path)
        f.seek(8 + n)
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_metadata(path: str | Path) -> dict[str, str]:
    with open(path, "rb") as f:
        header = json.loads(f.read(header_length(f, path)))
    return header.get("__metadata__", {}) or {}


def save_with_hashes(tensors: dict[str, torch.Tensor], target: str | Path, metadata: dict[str, str]) -> str:
    """Atomically write `tensors` with `metadata` plus sshs_model_hash/modelspec.hash_sha256; returns the hash."""
    import tempfile

    from safetensors.torch import save_file

    from spo.io import atomic_path

    target = Path(target)
    # Named like spo.io's temporaries, so a run killed while hashing has this folder cleaned on the next write.
    with tempfile.TemporaryDirectory(prefix=f".{target.name}.p{os.getpid()}.", suffix=".tmp",
                                     dir=target.parent if target.parent.exists() else None) as tmp:
        first = Path(tmp) / "data.safetensors"
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(first), metadata=dict(metadata))
        digest = data_sha256(first)
        with open(first, "rb") as src:
            (n,) = struct.unpack("<Q", src.read(8))
            header = json.loads(src.read(n))
            meta = dict(header.get("__metadata__", {}))
            meta["sshs_model_hash"] = digest
            meta["modelspec.hash_sha256"] = "0x" + digest
            header["__metadata__"] = meta
            raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
            raw += b" " * (-len(raw) % 8)  # safetensors pads the header with spaces to an 8-byte boundary
            with atomic_path(target, suffix=".safetensors") as out, open(out, "wb") as dst:
                dst.write(struct.pack("<Q", len(raw)))
                dst.write(raw)
                for chunk in iter(lambda: src.read(1 << 22), b""):
                    dst.write(chunk)
    return digest
