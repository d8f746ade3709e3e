"""The project's one scorer protocol (`Scorer`) and its loader: an SPM folder, a CLIP folder or any
`package.module:function`, behind one callable.

Every scorer, wherever it is used (SPO's preference, `spo spm eval` / `siblings`, `spo sweep`, `spo score`), is
`scorer(images, prompts, timesteps=None) -> scores [B]` with images in [-1, 1] as [B, 3, H, W]. Step-aware
preference models read the timesteps; clean-image scorers (a CLIP folder such as PickScore_v1, a model source's
reference scorer, most user functions) ignore them. `spo score` and `spo sweep` use the same protocol (scorers
of PIL images, such as PickScore through its processor, join it through spo.show.scoring.pil_scorer).
`score_latents` is the hot path of SPO sampling: decode k candidates' x0-hat latents and score them.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Protocol, Sequence

import torch

from spo import sources
from spo.errors import SpoInputError
from spo.spm.model import CONFIG_NAME, StepAwarePreferenceModel, check_family


class Scorer(Protocol):
    """images [B, 3, H, W] in [-1, 1], prompts [B], timesteps [B] (long; None or zeros: clean images) -> scores [B]
    (a tensor, or anything torch.as_tensor takes). Callers here always pass timesteps; a scorer may ignore them.
    Implemented by StepAwarePreferenceModel (SPM and CLIP folders), model sources' reference scorers, user functions."""

    def __call__(self, images: torch.Tensor, prompts: Sequence[str], timesteps: torch.Tensor | None = None, /):
        ...


def find_spm_dir(path: str | Path) -> Path | None:
    """The SPM folder at `path`, or inside a `spo spm train` output folder (its `spm/`), else None."""
    path = Path(path)
    if (path / CONFIG_NAME).is_file():
        return path
    if (path / "spm" / CONFIG_NAME).is_file():
        return path / "spm"
    return None


def is_clip_dir(path: str | Path) -> bool:
    """A transformers CLIPModel folder (config.json with model_type "clip")."""
    import json

    config = Path(path) / "config.json"
    try:
        return config.is_file() and json.loads(config.read_text()).get("model_type") == "clip"
    except (OSError, ValueError, AttributeError):
        return False


def load_spm(path: str | Path, *, family: str | None = None, device=None,
             dtype: torch.dtype = torch.float32) -> StepAwarePreferenceModel:
    """Load a saved SPM for inference (eval mode, no gradients); refuse one trained for another family.
    A built-in model's name stands for its default preference SPM."""
    path = sources.preference_spec(path)
    spm_dir = find_spm_dir(path)
    if spm_dir is None:
        raise SpoInputError(f"{path}: not a step-aware preference model folder (no {CONFIG_NAME})")
    spm = StepAwarePreferenceModel.load(spm_dir, device=device, dtype=dtype)
    if family is not None:
        check_family(spm, family)
    spm.requires_grad_(False)
    return spm


def load_scorer(spec: str | Path, *, family: str | None = None, device=None, dtype: torch.dtype = torch.float32) -> Scorer:
    """An SPM folder, a transformers CLIP folder (a clean-image scorer such as PickScore_v1: t is ignored),
    "package.module:function" naming a scorer callable, or a built-in model's name (its default preference model).
    Models load in `dtype` (a frozen scorer in bf16/fp16 takes half the memory); a callable is left as it is."""
    text = str(sources.preference_spec(spec))
    if find_spm_dir(text) is not None:
        return load_spm(text, family=family, device=device, dtype=dtype)
    if is_clip_dir(text):
        clip = StepAwarePreferenceModel.from_clip(text, time_conditioning=False, dtype=dtype).eval().requires_grad_(False)
        return clip.to(device) if device is not None else clip
    if ":" in text and not Path(text).exists():
        module_name, _, func_name = text.partition(":")
        if not module_name or not func_name:
            raise SpoInputError(f"scorer {text!r}: expected 'package.module:function'")
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise SpoInputError(f"scorer {text!r}: cannot import module {module_name!r} ({exc})") from None
        func = getattr(module, func_name, None)
        if func is None:
            raise SpoInputError(f"scorer {text!r}: module {module_name!r} has no function {func_name!r}")
        if not callable(func):
            raise SpoInputError(f"scorer {text!r}: {func_name!r} is not callable")
        return func
    if Path(text).exists():
        raise SpoInputError(f"scorer {text}: not a step-aware preference model folder (no {CONFIG_NAME})")
    raise SpoInputError(f"scorer {text!r}: no such folder, and not of the form 'package.module:function'")


@torch.no_grad()
def score_images(scorer: Scorer, images: torch.Tensor, prompts: Sequence[str], timesteps: torch.Tensor,
                 chunk: int = 16) -> torch.Tensor:
    """Scores of images in chunks (bounded memory), float32 on CPU."""
    if len(prompts) != images.shape[0]:
        raise SpoInputError(f"{images.shape[0]} images but {len(prompts)} prompts")
    timesteps = _timesteps(timesteps, images.shape[0])
    out = []
    for s in range(0, images.shape[0], max(1, chunk)):
        e = s + max(1, chunk)
        out.append(torch.as_tensor(scorer(images[s:e], list(prompts[s:e]), timesteps[s:e])).float().cpu())
    return torch.cat(out) if out else torch.zeros(0)


@torch.no_grad()
def score_latents(spm: Scorer, vae, latents: torch.Tensor, prompts: Sequence[str], timesteps: torch.Tensor,
                  chunk: int = 8) -> torch.Tensor:
    """Decode predicted-x0 latents [B*k, 4, h, w] (scaled, as the UNet sees them) and score them at `timesteps`.

    prompts and timesteps are per latent (B*k each; a single timestep is broadcast). Decoding and
    scoring go chunk by chunk so k candidates of a large batch fit in memory. Returns float32 [B*k] on CPU.
    """
    from spo.models.vae import decode as vae_decode

    n = latents.shape[0]
    if len(prompts) != n:
        raise SpoInputError(f"{n} latents but {len(prompts)} prompts")
    timesteps = _timesteps(timesteps, n)
    out = []
    step = max(1, chunk)
    for s in range(0, n, step):
        images = vae_decode(vae, latents[s:s + step])
        out.append(torch.as_tensor(spm(images, list(prompts[s:s + step]), timesteps[s:s + step].to(images.device))).float().cpu())
    return torch.cat(out) if out else torch.zeros(0)


def _timesteps(timesteps, n: int) -> torch.Tensor:
    t = torch.as_tensor(timesteps, dtype=torch.long)
    if t.ndim == 0:
        t = t.expand(n)
    if t.shape[0] != n:
        raise SpoInputError(f"{n} items but {t.shape[0]} timesteps")
    return t
