"""The step-aware preference model (SPM): a CLIP dual encoder whose vision tower knows the timestep.

Structure (paper section 3 / SPEC section 2): a sinusoidal timestep embedding goes through an MLP; each
vision transformer layer gets (shift, scale, gate) for its attention and its MLP branch from that embedding
(adaptive LayerNorm, as in DiT), and the pooled image embedding gets a final (shift, scale). The
modulation projections start at zero weight with gate bias 1, so a fresh SPM is *exactly* the CLIP it
was built from: shift 0, scale 0 and gate 1 are exact in floating point.

The CLIP itself stays a plain transformers `CLIPModel` (`self.clip`); the vision forward below reuses its
submodules (embeddings, layers' attention and MLP, layer norms) and only inserts the modulation.

Score(image, prompt, t) = logit_scale.exp() * cos(image_embedding(image, t), text_embedding(prompt)).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from spo.errors import SpoInputError

CONFIG_NAME = "spm_config.json"
WEIGHTS_NAME = "model.safetensors"
TOKENIZER_DIR = "tokenizer"
FORMAT = "spo-step-aware-preference-model"
FORMAT_VERSION = 1

# OpenAI CLIP preprocessing statistics (also PickScore's / CLIP-ViT-H-14's).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
FREQUENCY_DIM = 256
MAX_PERIOD = 10000.0


# ------------------------------------------------------------------------------------------- pure math


def timestep_frequencies(t: torch.Tensor, dim: int = FREQUENCY_DIM, max_period: float = MAX_PERIOD) -> torch.Tensor:
    """Sinusoidal features [cos(t w_i), sin(t w_i)] with w_i = max_period^(-i/half), float32, [B, dim]."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.to(torch.float32)[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x * (1 + scale) + shift, with per-sample [B, D] modulation broadcast over the token axis."""
    if x.ndim == 3:
        shift, scale = shift.unsqueeze(1), scale.unsqueeze(1)
    return x * (1 + scale) + shift


def cosine_scores(image_embeds: torch.Tensor, text_embeds: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Row-wise logit_scale.exp() * cos(image_i, text_i) -> [B]."""
    image_embeds = image_embeds / image_embeds.norm(dim=-1, keepdim=True)
    text_embeds = text_embeds / text_embeds.norm(dim=-1, keepdim=True)
    return logit_scale.exp() * (image_embeds * text_embeds).sum(dim=-1)


# ------------------------------------------------------------------------------------------- modules


class TimestepEmbedder(nn.Module):
    """Sinusoidal features -> Linear -> SiLU -> Linear (key names `mlp.0`, `mlp.2` as in the official SPM)."""

    def __init__(self, hidden: int, frequency_dim: int = FREQUENCY_DIM, max_period: float = MAX_PERIOD):
        super().__init__()
        self.frequency_dim = frequency_dim
        self.max_period = max_period
        self.mlp = nn.Sequential(nn.Linear(frequency_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        nn.init.normal_(self.mlp[0].weight, std=0.02)
        nn.init.normal_(self.mlp[2].weight, std=0.02)
        nn.init.zeros_(self.mlp[0].bias)
        nn.init.zeros_(self.mlp[2].bias)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        freq = timestep_frequencies(t, self.frequency_dim, self.max_period)
        return self.mlp(freq.to(self.mlp[0].weight.dtype))


def _ada_ln(hidden: int, chunks: int, gate_chunks: Sequence[int] = ()) -> nn.Sequential:
    """SiLU -> Linear(hidden, chunks*hidden), weight 0; bias 0 except 1 on the gate chunks (identity at init)."""
    lin = nn.Linear(hidden, chunks * hidden)
    nn.init.zeros_(lin.weight)
    with torch.no_grad():
        lin.bias.zero_()
        for c in gate_chunks:
            lin.bias[c * hidden:(c + 1) * hidden] = 1.0
    return nn.Sequential(nn.SiLU(), lin)


# Order of the six per-layer chunks, as in DiT and the official SPM.
LAYER_CHUNKS = ("shift_attn", "scale_attn", "gate_attn", "shift_mlp", "scale_mlp", "gate_mlp")
_GATES = (2, 5)


class StepAwarePreferenceModel(nn.Module):
    """CLIP + timestep-modulated vision tower. Call it as `spm(images, prompts, t)` -> scores [B].

    images: [B, 3, H, W] in [-1, 1] (any size; resized inside); prompts: B strings; t: LongTensor [B].
    With `time_conditioning=False` the same model ignores t (the time-unconditioned comparison arm).
    """

    def __init__(self, clip_config, *, time_conditioning: bool = True, frequency_dim: int = FREQUENCY_DIM,
                 max_period: float = MAX_PERIOD, image_mean: Sequence[float] = CLIP_MEAN,
                 image_std: Sequence[float] = CLIP_STD, tokenizer=None, family: str | None = None,
                 base_model: str | None = None, training: dict | None = None, clip=None):
        super().__init__()
        from transformers import CLIPModel

        self.clip = clip if clip is not None else CLIPModel(clip_config)  # `clip`: a loaded CLIPModel, kept as is
        self.time_conditioning = bool(time_conditioning)
        hidden = clip_config.vision_config.hidden_size
        n_layers = clip_config.vision_config.num_hidden_layers
        if self.time_conditioning:
            self.t_embedder = TimestepEmbedder(hidden, frequency_dim, max_period)
            self.layer_adaln = nn.ModuleList([_ada_ln(hidden, 6, _GATES) for _ in range(n_layers)])
            self.pooled_adaln = _ada_ln(hidden, 2)
        self.frequency_dim = frequency_dim
        self.max_period = max_period
        self.register_buffer("image_mean", torch.tensor(list(image_mean), dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("image_std", torch.tensor(list(image_std), dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self._tokenizer = tokenizer
        self.family = family
        self.base_model = base_model
        self.training_summary = dict(training or {})
        self.gradient_checkpointing = False

    # ----------------------------------------------------------------------------------- constructors

    @classmethod
    def from_clip(cls, clip_dir: str | Path, *, time_conditioning: bool = True, dtype: torch.dtype = torch.float32,
                  **kwargs) -> "StepAwarePreferenceModel":
        """From a local CLIP checkpoint folder in transformers format (config.json + weights), in `dtype`."""
        from transformers import CLIPModel

        clip_dir = Path(clip_dir)
        if not (clip_dir / "config.json").is_file():
            raise SpoInputError(f"{clip_dir}: not a transformers CLIP folder (no config.json)")
        try:
            # `dtype` whatever the folder's weights are: the SPM's own layers follow it below, and a half-precision
            # CLIP folder would otherwise leave CLIP and those layers in different dtypes (error at the first Linear).
            clip = _streamed_clip(clip_dir, dtype) or CLIPModel.from_pretrained(clip_dir, local_files_only=True,
                                                                                torch_dtype=dtype)
        except (OSError, ValueError, KeyError) as exc:
            raise SpoInputError(f"{clip_dir}: cannot load as a CLIP model ({str(exc).splitlines()[0]})") from None
        mean, std = _image_stats(clip_dir)
        kwargs.setdefault("image_mean", mean)
        kwargs.setdefault("image_std", std)
        kwargs.setdefault("tokenizer", _dir_tokenizer(clip_dir))
        # The loaded CLIP itself, not a fresh one filled from it: a CLIP-H-size copy would cost 4 GB and its init.
        return cls(clip.config, time_conditioning=time_conditioning, clip=clip, **kwargs).to(dtype)

    @classmethod
    def toy(cls, *, time_conditioning: bool = True, seed: int = 0, **kwargs) -> "StepAwarePreferenceModel":
        """A tiny randomly initialised SPM for the 32x32 toy world (about 7.5 MB saved)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return cls(toy_config(), time_conditioning=time_conditioning, **kwargs)

    # ----------------------------------------------------------------------------------- text / images

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from spo.tokenizer import load_clip_tokenizer

            self._tokenizer = load_clip_tokenizer()
        return self._tokenizer

    @property
    def image_size(self) -> int:
        return int(self.clip.config.vision_config.image_size)

    @property
    def device(self) -> torch.device:
        return self.clip.logit_scale.device

    def tokenize(self, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        if isinstance(prompts, str):
            raise SpoInputError("prompts must be a list of strings, not one string")
        enc = self.tokenizer(list(prompts), padding=True, truncation=True, max_length=77, return_tensors="pt")
        return {"input_ids": enc["input_ids"].to(self.device), "attention_mask": enc["attention_mask"].to(self.device)}

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """[-1, 1] images of any size -> CLIP pixel values: resize shortest side, centre crop, normalise."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise SpoInputError(f"images must be [B, 3, H, W], got {list(images.shape)}")
        x = images.float()
        size = self.image_size
        h, w = x.shape[-2:]
        if (h, w) != (size, size):
            s = size / min(h, w)
            nh, nw = max(size, int(h * s + 0.5)), max(size, int(w * s + 0.5))
            # antialias: as the CLIP image processor's PIL bicubic resize the SPM and PickScore were trained with.
            # The official SPO sampler scores without it; measured difference 1.4e-2 in scores at 64->32 (issue 19),
            # kept here so that training and judging see the same pixels. See docs/presets.md.
            x = F.interpolate(x, size=(nh, nw), mode="bicubic", align_corners=False, antialias=True)
            top, left = (nh - size) // 2, (nw - size) // 2
            x = x[..., top:top + size, left:left + size]
        x = ((x + 1) / 2).clamp(0, 1)
        return (x - self.image_mean) / self.image_std

    def text_embeds(self, prompts: Sequence[str]) -> torch.Tensor:
        out = self.clip.get_text_features(**self.tokenize(prompts))
        return out if torch.is_tensor(out) else out.pooler_output  # transformers 5 returns an output object

    def image_embeds(self, pixel_values: torch.Tensor, t: torch.Tensor | None) -> torch.Tensor:
        """Projected image embedding of CLIP pixel values at timesteps t (ignored without time conditioning)."""
        vm = self.clip.vision_model
        dtype = vm.embeddings.patch_embedding.weight.dtype
        h = vm.pre_layrnorm(vm.embeddings(pixel_values.to(dtype)))
        cond = None
        if self.time_conditioning:
            if t is None:
                raise SpoInputError("a time-conditioned SPM needs timesteps t")
            t = torch.as_tensor(t, device=h.device)
            if t.ndim == 0:
                t = t.expand(h.shape[0])
            cond = self.t_embedder(t)
        for i, layer in enumerate(vm.encoder.layers):
            mod = self.layer_adaln[i] if cond is not None else None
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                h = checkpoint(_modulated_layer, layer, mod, h, cond, use_reentrant=False)
            else:
                h = _modulated_layer(layer, mod, h, cond)
        pooled = vm.post_layernorm(h[:, 0, :])
        if cond is not None:
            shift, scale = self.pooled_adaln(cond).chunk(2, dim=1)
            pooled = modulate(pooled, shift, scale)
        return self.clip.visual_projection(pooled)

    def forward(self, images: torch.Tensor, prompts: Sequence[str], t: torch.Tensor | None = None) -> torch.Tensor:
        """Scores [B] = logit_scale.exp() * cos(image embedding at t, text embedding)."""
        if len(prompts) != images.shape[0]:
            raise SpoInputError(f"{images.shape[0]} images but {len(prompts)} prompts")
        img = self.image_embeds(self.preprocess(images.to(self.device)), t)
        txt = self.text_embeds(prompts)
        return cosine_scores(img.float(), txt.float(), self.clip.logit_scale.float())

    score = forward

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Recompute activations in the backward pass: our vision loop per layer, CLIP's text tower its own way."""
        was = self.gradient_checkpointing
        self.gradient_checkpointing = enabled
        # transformers 5 renamed the switch; 4.x only has the old name.
        if hasattr(self.clip, "activation_checkpointing_enable"):
            on = lambda: self.clip.activation_checkpointing_enable({"use_reentrant": False})  # noqa: E731
            off = self.clip.activation_checkpointing_disable
        else:
            on = lambda: self.clip.gradient_checkpointing_enable({"use_reentrant": False})  # noqa: E731
            off = self.clip.gradient_checkpointing_disable
        if enabled:
            on()
        elif was:
            off()

    # ----------------------------------------------------------------------------------- save / load

    def config_dict(self) -> dict:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "clip_config": self.clip.config.to_dict(),
            "time_conditioning": self.time_conditioning,
            "time_embedding": {"frequency_dim": self.frequency_dim, "max_period": self.max_period,
                               "kind": "sinusoidal+mlp", "adaln": "shift/scale/gate per vision layer, shift/scale pooled"},
            "image_mean": self.image_mean.flatten().tolist(),
            "image_std": self.image_std.flatten().tolist(),
            "tokenizer": "own" if self._tokenizer is not None and not _is_builtin(self._tokenizer) else "spo-builtin",
            "family": self.family,
            "base_model": self.base_model,
            "training": self.training_summary,
        }

    def save(self, out_dir: str | Path) -> Path:
        """Write model.safetensors + spm_config.json (+ tokenizer/ when not the built-in one), atomically."""
        from spo.io import atomic_dir, save_safetensors, write_json

        out_dir = Path(out_dir)
        if out_dir.exists() and not out_dir.is_dir():
            raise SpoInputError(f"{out_dir} exists and is not a directory")
        config = self.config_dict()
        # fp32 on disk, but bf16 weights (trained as bf16 masters, --full-bf16) stay bf16: an fp32 copy would cost
        # twice their memory at the save and add no information.
        state = {k: v.detach().to("cpu", torch.float32) if v.is_floating_point() and v.dtype != torch.bfloat16
                 else v.detach().cpu() for k, v in self.state_dict().items()}
        with atomic_dir(out_dir) as tmp:
            save_safetensors(state, tmp / WEIGHTS_NAME, metadata={"format": FORMAT, "family": str(self.family)})
            write_json(tmp / CONFIG_NAME, config)
            if config["tokenizer"] == "own":
                self._tokenizer.save_pretrained(str(tmp / TOKENIZER_DIR))
        return out_dir

    @classmethod
    def load(cls, spm_dir: str | Path, *, device: str | torch.device | None = None,
             dtype: torch.dtype = torch.float32) -> "StepAwarePreferenceModel":
        """A saved SPM in `dtype`. Built on the meta device and filled tensor by tensor from the file (accelerate's
        init_empty_weights): a CLIP-H SPM then costs its weights once, not a random init plus the file's copy."""
        from accelerate import init_empty_weights
        from transformers import CLIPConfig

        from spo.merge import TensorFile

        spm_dir = Path(spm_dir)
        cfg_path = spm_dir / CONFIG_NAME
        if not cfg_path.is_file():
            raise SpoInputError(f"{spm_dir}: not a step-aware preference model folder (no {CONFIG_NAME})")
        try:
            cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise SpoInputError(f"cannot read {cfg_path}: {exc}") from None
        if cfg.get("format") != FORMAT:
            raise SpoInputError(f"{cfg_path}: not an SPM config (format {cfg.get('format')!r})")
        if not (spm_dir / WEIGHTS_NAME).is_file():
            raise SpoInputError(f"{spm_dir}: {WEIGHTS_NAME} is missing")
        tokenizer = _dir_tokenizer(spm_dir / TOKENIZER_DIR) if cfg.get("tokenizer") == "own" else None
        te = cfg.get("time_embedding") or {}
        with init_empty_weights(include_buffers=False):
            model = cls(CLIPConfig.from_dict(cfg["clip_config"]), time_conditioning=cfg.get("time_conditioning", True),
                        frequency_dim=te.get("frequency_dim", FREQUENCY_DIM), max_period=te.get("max_period", MAX_PERIOD),
                        image_mean=cfg.get("image_mean", CLIP_MEAN), image_std=cfg.get("image_std", CLIP_STD),
                        tokenizer=tokenizer, family=cfg.get("family"), base_model=cfg.get("base_model"),
                        training=cfg.get("training"))
        # Positioned reads, not safe_open's memory map: every mapped page read stays resident until the file is
        # closed, which for a CLIP-H SPM in fp32 would add 5 GB to the peak of a bf16 load.
        try:
            f = TensorFile(spm_dir / WEIGHTS_NAME)
            state = {k: f.read(k).to(dtype) for k in f.keys()}
        except SpoInputError:
            raise
        except Exception as exc:  # a corrupt header
            raise SpoInputError(f"{spm_dir / WEIGHTS_NAME}: cannot read ({exc})") from None
        _load_exact(model, state, str(spm_dir / WEIGHTS_NAME), assign=True)
        model.eval()
        return model.to(device) if device is not None else model

    @classmethod
    def from_official(cls, ckpt: str | Path, clip_dir: str | Path | None = None, *, allow_pickle: bool = False,
                      clip_config=None, **kwargs) -> "StepAwarePreferenceModel":
        """Load an official SPM checkpoint (`final_ckpt.bin`, a torch pickle) onto this model.

        The .bin carries only weights; the architecture comes from `clip_dir` (the CLIP it was trained
        from, e.g. a local PickScore_v1 / CLIP-ViT-H-14 folder) or an explicit `clip_config`.
        """
        ckpt = Path(ckpt)
        if not allow_pickle:
            raise SpoInputError(f"{ckpt}: official SPM checkpoints are torch pickles; pass --allow-pickle to load them "
                                "(they are read with torch.load(weights_only=True))")
        if not ckpt.is_file():
            raise SpoInputError(f"{ckpt}: no such file")
        try:
            raw = torch.load(ckpt, map_location="cpu", weights_only=True)
        except Exception as exc:  # the unpickler refuses anything but tensors and containers
            raise SpoInputError(f"{ckpt}: cannot load with torch.load(weights_only=True): {str(exc).splitlines()[0]}") from None
        if clip_config is not None:
            model = cls(clip_config, **kwargs)
        elif clip_dir is not None:
            model = cls.from_clip(clip_dir, **kwargs)
        else:
            raise SpoInputError("loading an official SPM checkpoint needs the CLIP folder it was trained from")
        _load_exact(model, map_official_state_dict(_unwrap_state_dict(raw, ckpt)), str(ckpt))
        return model


# ------------------------------------------------------------------------------------------- helpers


def _modulated_layer(layer, mod, h: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
    """One CLIP encoder layer with adaLN; with mod=None exactly the layer's own pre-LN residual forward."""
    if mod is None:
        h = h + layer.self_attn(hidden_states=layer.layer_norm1(h))[0]
        return h + layer.mlp(layer.layer_norm2(h))
    sa, ca, ga, sm, cm, gm = mod(cond).chunk(6, dim=1)
    h = h + ga.unsqueeze(1) * layer.self_attn(hidden_states=modulate(layer.layer_norm1(h), sa, ca))[0]
    return h + gm.unsqueeze(1) * layer.mlp(modulate(layer.layer_norm2(h), sm, cm))


def toy_config():
    """CLIP config for the 32x32 toy world: ViT patch 4, hidden 64, 4 layers; text hidden 32, 2 layers.

    The text tower is narrower than the vision one because its token table (49,408 x hidden) dominates
    the file size; 32 keeps a saved SPM under 10 MB.
    """
    from transformers import CLIPConfig

    from spo.tokenizer import MAX_LENGTH, VOCAB_SIZE

    text = dict(vocab_size=VOCAB_SIZE, hidden_size=32, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=2, max_position_embeddings=MAX_LENGTH, bos_token_id=VOCAB_SIZE - 2,
                eos_token_id=VOCAB_SIZE - 1, pad_token_id=VOCAB_SIZE - 1)
    vision = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                  image_size=32, patch_size=4, num_channels=3)
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=64)


def _is_builtin(tokenizer) -> bool:
    from spo.tokenizer import ASSET_DIR

    return Path(getattr(tokenizer, "name_or_path", "") or "").resolve() == ASSET_DIR.resolve()


def _dir_tokenizer(folder: Path):
    """The folder's own CLIP tokenizer, or None (the built-in one is used then)."""
    folder = Path(folder)
    if not ((folder / "tokenizer.json").is_file() or (folder / "vocab.json").is_file()):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise SpoInputError(f"{folder}: cannot load its tokenizer ({str(exc).splitlines()[0]})") from None


def _image_stats(folder: Path) -> tuple[list[float], list[float]]:
    path = folder / "preprocessor_config.json"
    if path.is_file():
        try:
            cfg = json.loads(path.read_text(encoding="utf-8"))
            return list(cfg.get("image_mean", CLIP_MEAN)), list(cfg.get("image_std", CLIP_STD))
        except (OSError, ValueError):
            raise SpoInputError(f"cannot read {path}") from None
    return list(CLIP_MEAN), list(CLIP_STD)


def _streamed_clip(clip_dir: Path, dtype: torch.dtype):
    """The CLIPModel of a folder with one model.safetensors, built on the meta device and filled tensor by tensor in
    `dtype` (as StepAwarePreferenceModel.load does); None for any other layout or a file whose keys do not fit,
    which from_pretrained then reads. Why not from_pretrained for all: it memory-maps the file, and the mapped pages
    it reads (2 GB for CLIP-H in fp16) stay in the process's RSS beside the converted weights until it closes."""
    from accelerate import init_empty_weights
    from transformers import CLIPConfig, CLIPModel

    from spo.merge import TensorFile

    weights = clip_dir / "model.safetensors"
    if not weights.is_file():
        return None
    with init_empty_weights(include_buffers=False):
        clip = CLIPModel(CLIPConfig.from_pretrained(clip_dir))
    f = TensorFile(weights)
    own = clip.state_dict()
    if set(f.keys()) - set(own) - {k for k in f.keys() if k.endswith("position_ids")} or set(own) - set(f.keys()):
        return None  # an older or renamed layout: transformers' loader knows its conversions
    state = {k: f.read(k).to(dtype) for k in f.keys() if k in own}
    _load_exact(clip, state, str(weights), assign=True)
    return clip.eval()


def _load_exact(model: nn.Module, state: dict, source: str, assign: bool = False) -> None:
    """Load `state` into `model`, refusing any key or shape mismatch with one line; `assign` for a meta model."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        parts = []
        if unexpected:
            parts.append(f"{len(unexpected)} key(s) that do not map, e.g. {', '.join(unexpected[:4])}")
        if missing:
            parts.append(f"{len(missing)} missing, e.g. {', '.join(missing[:4])}")
        raise SpoInputError(f"{source}: does not fit this model: {'; '.join(parts)}")
    bad = [k for k, v in state.items() if tuple(v.shape) != tuple(own[k].shape)]
    if bad:
        k = bad[0]
        raise SpoInputError(f"{source}: {len(bad)} tensor(s) have the wrong shape, e.g. {k} "
                            f"{list(state[k].shape)} vs {list(own[k].shape)}")
    model.load_state_dict(state, strict=True, assign=assign)


def _unwrap_state_dict(raw, source) -> dict[str, torch.Tensor]:
    # Trainers wrap weights differently (plain dict, {"state_dict": ...}, DeepSpeed {"module": ...}).
    for key in ("state_dict", "module", "model_state_dict"):
        if isinstance(raw, dict) and key in raw and isinstance(raw[key], dict):
            raw = raw[key]
    if not isinstance(raw, dict) or not all(isinstance(v, torch.Tensor) for v in raw.values()):
        raise SpoInputError(f"{source}: not a state dict of tensors")
    return raw


_OFFICIAL_RULES: tuple[tuple[re.Pattern, str], ...] = (
    (re.compile(r"^t_embedder\.mlp\.(\d+)\.(weight|bias)$"), r"t_embedder.mlp.\1.\2"),
    (re.compile(r"^vision_model\.encoder\.layers\.(\d+)\.adaLN_modulation\.1\.(weight|bias)$"), r"layer_adaln.\1.1.\2"),
    (re.compile(r"^vision_model\.adaLN_modulation\.1\.(weight|bias)$"), r"pooled_adaln.1.\1"),
)
# Buffers older transformers saved with CLIP; they are constants (0..n-1) and not state any more.
_DROPPED = re.compile(r"^(text_model|vision_model)\.embeddings\.position_ids$")


def map_official_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official SPM keys (`model.` + HFTimeConditionedCLIPModel names) -> this model's keys.

    Anything not time-related is a plain CLIP key and goes under `clip.`. Keys are returned unchanged
    when they do not match, so `_load_exact` can name them.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        k = key[len("model."):] if key.startswith("model.") else key
        if _DROPPED.match(k):
            continue
        for pattern, repl in _OFFICIAL_RULES:
            if pattern.match(k):
                out[pattern.sub(repl, k)] = value
                break
        else:
            is_clip = k.split(".")[0] in ("text_model", "vision_model", "visual_projection", "text_projection", "logit_scale")
            out["clip." + k if is_clip and "adaLN" not in k else key] = value
    return out


def official_state_dict(model: StepAwarePreferenceModel) -> dict[str, torch.Tensor]:
    """The inverse of `map_official_state_dict`: this model's weights in the official layout (`model.` prefix)."""
    inverse = (
        (re.compile(r"^t_embedder\.mlp\.(\d+)\.(weight|bias)$"), r"model.t_embedder.mlp.\1.\2"),
        (re.compile(r"^layer_adaln\.(\d+)\.1\.(weight|bias)$"), r"model.vision_model.encoder.layers.\1.adaLN_modulation.1.\2"),
        (re.compile(r"^pooled_adaln\.1\.(weight|bias)$"), r"model.vision_model.adaLN_modulation.1.\1"),
        (re.compile(r"^clip\.(.*)$"), r"model.\1"),
    )
    out = {}
    for key, value in model.state_dict().items():
        for pattern, repl in inverse:
            if pattern.match(key):
                out[pattern.sub(repl, key)] = value.detach().clone()
                break
    return out


def check_family(spm: StepAwarePreferenceModel, family: str) -> None:
    """Refuse an SPM trained for another base-model family: its notion of x0-hat comes from another denoiser."""
    if spm.family is not None and family is not None and spm.family != family:
        base = f" ({spm.base_model})" if spm.base_model else ""
        raise SpoInputError(f"this step-aware preference model was trained for {spm.family}{base}, "
                            f"but the base model is {family}; train an SPM for this base model with `spo spm train`")
