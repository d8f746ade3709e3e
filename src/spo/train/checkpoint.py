"""Resumable training state without pickles: trainable weights, optimizer and RNG in safetensors, the rest JSON.

accelerate's save_state/load_state would do this, but it writes the optimizer and RNG states as pickles and
unpickles them on resume; a checkpoint folder from someone else would then run code. Here every tensor is
in safetensors and everything else is JSON, so loading a checkpoint can never execute anything.
A checkpoint is one folder written atomically (spo.io.atomic_dir) and complete iff `state.json` exists.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from spo.errors import SpoInputError

STATE_FILE = "state.json"


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def _optimizer_tensors(optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, state in sd["state"].items():
        for name, value in state.items():
            if torch.is_tensor(value):
                tensors[f"{idx}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{idx}.{name}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _optimizer_from(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    for key, value in meta["scalars"].items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


def _jsonable(d: dict) -> dict:
    return {k: v for k, v in d.items() if isinstance(v, (int, float, str, bool, list, type(None)))}


def save_state(folder: Path, model: torch.nn.Module, optimizer, scheduler, progress: dict) -> Path:
    """Write one complete checkpoint folder atomically; returns its path."""
    from safetensors.torch import save_file

    from spo.faults import maybe_fail
    from spo.io import atomic_dir, recover_stale, write_json

    recover_stale(folder.parent)  # folders of a writer killed mid-save (under any name) go now
    opt_tensors, opt_meta = _optimizer_tensors(optimizer)
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng.update({f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    with atomic_dir(folder) as tmp:
        save_file(trainable_state(model), str(tmp / "trainable.safetensors"))
        maybe_fail("checkpoint_mid")  # test seam: killed with one file written, before state.json and the rename
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        save_file(rng, str(tmp / "rng.safetensors"))
        write_json(tmp / STATE_FILE, {"progress": progress, "optimizer": opt_meta,
                                      "scheduler": _jsonable(scheduler.state_dict()) if scheduler is not None else None})
    maybe_fail("checkpoint_done")  # test seam: killed right after a complete checkpoint
    return folder


def _keep_saved_dtypes(optimizer, saved: dict) -> None:
    """torch's load_state_dict casts every floating state to its parameter's dtype; bf16 master weights keep fp32
    moments (engine.fuse_optimizer_step with rounding), which must come back as they were saved."""
    ids = [i for group in saved["param_groups"] for i in group["params"]]
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for i, p in zip(ids, params):
        for name, value in saved["state"].get(i, {}).items():
            if torch.is_tensor(value) and optimizer.state[p][name].dtype != value.dtype:
                optimizer.state[p][name] = value.to(p.device)


def load_state(folder: Path, model: torch.nn.Module, optimizer, scheduler) -> dict:
    """Restore what save_state wrote into live objects; returns the progress dict."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        meta = json.loads((folder / STATE_FILE).read_text())
        weights = load_file(str(folder / "trainable.safetensors"))
        opt_tensors = load_file(str(folder / "optimizer.safetensors"))
        rng = load_file(str(folder / "rng.safetensors"))
    except (OSError, ValueError, SafetensorError) as exc:
        raise SpoInputError(f"{folder}: unreadable checkpoint ({exc})") from None
    params = dict(model.named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and n not in weights]
    unknown = [n for n in weights if n not in params]
    if missing or unknown:
        raise SpoInputError(f"{folder}: checkpoint does not match this model "
                            f"(missing {missing[:3]}, unexpected {unknown[:3]})")
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value.to(params[name].dtype))
    saved = _optimizer_from(opt_tensors, meta["optimizer"])
    optimizer.load_state_dict(saved)
    _keep_saved_dtypes(optimizer, saved)
    if scheduler is not None and meta.get("scheduler"):
        state = scheduler.state_dict()
        state.update(meta["scheduler"])
        scheduler.load_state_dict(state)
    torch.set_rng_state(rng["torch"])
    if torch.cuda.is_available():
        torch.cuda.set_rng_state_all([rng[k] for k in sorted(rng) if k.startswith("cuda")])
    return meta["progress"]


def read_progress(folder: Path) -> dict:
    """The progress dict a checkpoint was saved with (position, config fingerprint, history)."""
    try:
        return json.loads((folder / STATE_FILE).read_text(encoding="utf-8"))["progress"]
    except (OSError, ValueError, KeyError) as exc:
        raise SpoInputError(f"{folder}: unreadable checkpoint ({exc})") from None


def complete_checkpoints(folder: Path) -> list[Path]:
    """Finished checkpoints, oldest first (a torn one has no state.json, as atomic_dir never leaves one)."""
    return sorted(p for p in Path(folder).glob("checkpoint-*") if (p / STATE_FILE).is_file())


def prune(folder: Path, keep: int) -> None:
    for old in complete_checkpoints(folder)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
