"""Safetensors metadata the UIs read: kohya `ss_*`, Stability's modelspec, and the hashes.

Formats follow what kohya's sd-scripts write (train_network.py, library/sai_model_spec.py, library/train_util.py),
since A1111, ComfyUI and the model sites read those: every `ss_*` value is `str()` of the Python value
(`ss_network_alpha` "8.0", timestamps as unix seconds "1700000000.25"), modelspec 1.0.1.

`sshs_model_hash` (and `modelspec.hash_sha256`) is the sha256 of the bytes after the safetensors header, so it
does not change when metadata is edited; A1111 shows it as the model's hash. `sshs_legacy_hash` is kohya's older
additional-networks hash: sha256 of the 64 KiB at offset 1 MiB of the file as written with its `ss_*` keys only.
`save_with_hashes` writes the file once (tensors + ss_* keys), hashes it, and rewrites only the header.

`a1111_model_hash` is a checkpoint's "Model hash" as A1111 writes it into PNG parameters (modules/sd_models.py:
`CheckpointInfo.shorthash`, the first 10 hex digits of the sha256 of the whole file, read in 1 MiB blocks).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import struct
import threading
from pathlib import Path

import torch

ARCH = {"sd15": "stable-diffusion-v1", "sdxl": "stable-diffusion-xl-v1-base"}
BASE_VERSION = {"sd15": "sd_v1", "sdxl": "sdxl_base_v1-0"}
RESOLUTION = {"sd15": "512x512", "sdxl": "1024x1024"}
DEFAULT_DESCRIPTION = ("Step-aware Preference Optimization (SPO) post-training of a Stable Diffusion model: "
                       "improves aesthetics; use as a LoRA at strength ~1.0 (negative for the opposite effect).")


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


IMPL_SGM = "https://github.com/Stability-AI/generative-models"
IMPL_DIFFUSERS = "diffusers"


def implementation(family: str, kind: str | None, key_names: str = "webui") -> str:
    """modelspec.implementation as kohya writes it: an SDXL LoRA (sgm module names) and any full checkpoint
    (original layout) name Stability's code; an SD1 LoRA names diffusers, whose UNet module names it uses; so does
    a LoRA in diffusers' own key names."""
    if kind is None:
        return IMPL_SGM
    return IMPL_SGM if family == "sdxl" and key_names == "webui" else IMPL_DIFFUSERS


def modelspec(family: str, kind: str | None, title: str, description: str | None = None, license: str | None = None,
              resolution: str | None = None, key_names: str = "webui") -> dict[str, str]:
    """modelspec.* keys; kind 'lora' gives the '<arch>/lora' architecture, None a full checkpoint."""
    arch = ARCH[family] + (f"/{kind}" if kind else "")
    meta = {
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": arch,
        "modelspec.implementation": implementation(family, kind, key_names),
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
                  resolution: str | None = None, text_encoder: bool = False, base_model: str | None = None,
                  started_at: float | None = None, finished_at: float | None = None,
                  clip_skip: int | None = None) -> dict[str, str]:
    """kohya ss_* + modelspec keys for a LoRA (A1111 hides an SDXL LoRA without ss_base_model_version).

    A1111's LoRA info table shows ss_output_name, ss_sd_model_name, ss_clip_skip, ss_network_module and
    ss_training_started_at ("Date trained"). `base_model`: the checkpoint trained on (a file's name is written
    with its hashes, as kohya does; a folder or a built-in name as given). Times are unix seconds.
    """
    training = training or {}
    meta = {
        "ss_network_module": network_module,
        "ss_network_dim": str(int(rank)),
        "ss_network_alpha": str(float(alpha)),  # kohya's --network_alpha is a float: str(8.0) == "8.0"
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
        # kohya writes the step and epoch a file was saved at as ss_steps / ss_epoch
        if "steps" in training:
            meta["ss_steps"] = str(training["steps"])
            meta.setdefault("ss_max_train_steps", str(training["steps"]))
        if "epochs" in training:
            meta["ss_epoch"] = str(training["epochs"])
            meta.setdefault("ss_num_epochs", str(training["epochs"]))
        cfg = training.get("config") if isinstance(training.get("config"), dict) else {}
        for ours, theirs in (("learning_rate", "ss_learning_rate"), ("seed", "ss_seed")):
            if theirs not in meta and ours in cfg:
                meta[theirs] = str(cfg[ours])
    base_model = base_model or training.get("base")
    if base_model:
        meta.update(base_model_keys(str(base_model)))
    if started_at is not None:
        meta["ss_training_started_at"] = str(float(started_at))
    if finished_at is not None:
        meta["ss_training_finished_at"] = str(float(finished_at))
    if clip_skip is not None:
        meta["ss_clip_skip"] = str(int(clip_skip))
    meta.update(modelspec(family, "lora", title, description, license, resolution))
    return meta


def base_model_keys(base: str) -> dict[str, str]:
    """ss_sd_model_name (+ kohya's two hashes of the file when it is one): what A1111 shows as "Model:"."""
    path = Path(base)
    if not path.exists():  # a built-in model name, or a path not on this machine
        return {"ss_sd_model_name": base}
    if path.is_dir():
        return {"ss_sd_model_name": path.name}
    return {"ss_sd_model_name": path.name, "ss_sd_model_hash": legacy_hash(path),
            "ss_new_sd_model_hash": file_sha256(path)}


def training_times(training: dict | None, saved_at: float | None = None) -> tuple[float | None, float | None]:
    """(started, finished) unix seconds of a run: its summary's started_at/finished_at when it has them, else
    finished = when the LoRA was saved (`saved_at`) and started = finished - the summary's `seconds`."""
    training = training or {}

    def number(key):
        v = training.get(key)
        return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None

    finished = number("finished_at") or saved_at
    started = number("started_at")
    if started is None and finished is not None and number("seconds") is not None:
        started = finished - number("seconds")
    return started, finished


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


def legacy_hash_of_open(f) -> str:
    """kohya/A1111's old 8-digit hash: sha256 of the 64 KiB at offset 1 MiB (of nothing, for a smaller file)."""
    f.seek(0x100000)
    return hashlib.sha256(f.read(0x10000)).hexdigest()[:8]


def legacy_hash(path: str | Path) -> str:
    with open(path, "rb") as f:
        return legacy_hash_of_open(f)


_SHA_CACHE: dict[tuple, str] = {}
_SHA_LOCK = threading.Lock()
# Files this big get their sha256 remembered across runs too (A1111 keeps such a cache.json): rehashing a 6 GB
# checkpoint on every `spo generate` costs as much as loading it.
PERSISTENT_MIN_BYTES = 64 << 20


def hash_cache_path() -> Path:
    """$SPO_HASH_CACHE, else $XDG_CACHE_HOME/spo/sha256.json (~/.cache/spo/sha256.json)."""
    if os.environ.get("SPO_HASH_CACHE"):
        return Path(os.environ["SPO_HASH_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "spo" / "sha256.json"


def _read_hash_cache(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _remember(key: tuple, digest: str) -> None:
    """Add one entry to the persistent cache; a cache that cannot be written is simply not kept."""
    from spo.io import write_json

    path = hash_cache_path()
    data = _read_hash_cache(path)
    data[key[0]] = {"size": key[1], "mtime_ns": key[2], "sha256": digest}
    try:
        write_json(path, data)
    except Exception:  # noqa: BLE001 - a read-only home or full disk must not fail a generation
        pass


def file_sha256(path: str | Path) -> str:
    """sha256 (hex) of a whole file, read in 1 MiB blocks (a 6 GB checkpoint never sits in memory), remembered
    while the file's size and mtime stay the same: in this process, and for big files in hash_cache_path()."""
    path = Path(path)
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    with _SHA_LOCK:
        if key in _SHA_CACHE:
            return _SHA_CACHE[key]
    persistent = st.st_size >= PERSISTENT_MIN_BYTES
    if persistent:
        entry = _read_hash_cache(hash_cache_path()).get(key[0])
        if (isinstance(entry, dict) and entry.get("size") == key[1] and entry.get("mtime_ns") == key[2]
                and isinstance(entry.get("sha256"), str) and len(entry["sha256"]) == 64):
            with _SHA_LOCK:
                _SHA_CACHE[key] = entry["sha256"]
            return entry["sha256"]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    digest = h.hexdigest()
    with _SHA_LOCK:
        _SHA_CACHE[key] = digest
    if persistent:
        _remember(key, digest)
    return digest


def a1111_model_hash(path: str | Path) -> str:
    """A1111's short checkpoint hash ("Model hash" in PNG parameters, "[abcdef0123]" in its model list)."""
    return file_sha256(path)[:10]


def read_metadata(path: str | Path) -> dict[str, str]:
    with open(path, "rb") as f:
        header = json.loads(f.read(header_length(f, path)))
    return header.get("__metadata__", {}) or {}


def save_with_hashes(tensors: dict[str, torch.Tensor], target: str | Path, metadata: dict[str, str],
                     kohya_hashes: bool = True) -> str:
    """Atomically write `tensors` with `metadata` plus modelspec.hash_sha256 and (kohya_hashes) kohya's
    sshs_model_hash/sshs_legacy_hash; returns the data hash."""
    import tempfile

    from safetensors.torch import save_file

    from spo.io import atomic_path

    target = Path(target)
    # Named like spo.io's temporaries, so a run killed while hashing has this folder cleaned on the next write.
    with tempfile.TemporaryDirectory(prefix=f".{target.name}.p{os.getpid()}.", suffix=".tmp",
                                     dir=target.parent if target.parent.exists() else None) as tmp:
        first = Path(tmp) / "data.safetensors"
        # kohya hashes the file as written with its ss_* keys only (its legacy hash reads header bytes too)
        ss_only = {k: v for k, v in metadata.items() if k.startswith("ss_")}
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(first), metadata=ss_only or None)
        digest = data_sha256(first)
        with open(first, "rb") as src:
            legacy = legacy_hash_of_open(src)
            src.seek(0)
            (n,) = struct.unpack("<Q", src.read(8))
            header = json.loads(src.read(n))
            meta = dict(metadata)
            if kohya_hashes:
                meta["sshs_model_hash"] = digest
                meta["sshs_legacy_hash"] = legacy
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
