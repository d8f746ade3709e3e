"""Training configuration for the three methods (SPO, Diffusion-DPO, the SPM trainer): one system.

Dataclasses with one shared validator, rather than pydantic: the settings are a flat table of scalars and
string lists, stdlib dataclasses carry the per-field help text in `metadata`, and the project gains no
dependency. Precedence: preset < TOML file (`--config`) < command-line flags. Presets are TOML files in
spo/assets/configs/presets/ (one per name, one [spo] / [dpo] / [spm] table). Every field is a flag named after
it (`lora_rank` -> `--lora-rank`; `output_dir` -> `--out`, as in every other command); every bad key or value is
a one-line error that names it. `to_toml` prints a resolved config that `--config` reads back unchanged.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from spo.ddim import NUM_TRAIN_TIMESTEPS
from spo.deprecation import DeprecatedFlag
from spo.errors import SpoInputError
from spo.models.prediction import PREDICTION_CHOICES
from spo.sources import DEFAULT_SOURCE

MIXED_PRECISION = ("no", "fp16", "bf16")
LR_SCHEDULES = ("constant", "cosine", "linear")
OPTIMIZERS = ("adamw", "adafactor")
GUIDANCE_RESCALE_HELP = ("rescaled CFG phi in [0, 1] (Lin et al. 2023; 0: plain CFG); -1: auto, 0.7 for a "
                         "zero-terminal-SNR checkpoint, else 0")
PRESET_DIR = Path(__file__).resolve().parent.parent / "assets" / "configs" / "presets"


def opt(default, help: str, **kwargs):  # noqa: A002 - the argparse word
    """A field with its help text (shown by --help with the default preset's value)."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **kwargs})
    return field(default=default, metadata={"help": help, **kwargs})


@dataclass
class RunConfig:
    """What every training method shares: where, seed, optimiser, precision, checkpoints, logging."""

    SECTION: ClassVar[str] = ""
    # Settings that may change between a run and its --resume (they do not change the trajectory).
    RESUMABLE: ClassVar[tuple[str, ...]] = (
        "output_dir", "resume", "report_to", "progress", "cpu", "keep_checkpoints", "log_every",
        "checkpoint_every_batches", "checkpoint_every_steps", "save_every_epochs", "validation_images", "epochs",
        "max_train_steps", "train_micro_batch", "gradient_checkpointing", "num_workers", "judge_batch")

    base: str = opt(DEFAULT_SOURCE, "base model: a built-in name (the embedded toy models), a diffusers folder or a "
                                    "single-file checkpoint (.safetensors)")
    output_dir: str = opt("outputs/run", "output folder (checkpoints, logs, results)")
    seed: int = opt(0, "seed of every random draw (same seed, same result on CPU)")
    learning_rate: float = opt(6e-5, "AdamW learning rate")
    weight_decay: float = opt(1e-4, "AdamW weight decay")
    adam_beta1: float = opt(0.9, "AdamW beta1")
    adam_beta2: float = opt(0.999, "AdamW beta2")
    adam_eps: float = opt(1e-8, "AdamW epsilon")
    max_grad_norm: float = opt(1.0, "clip the gradient norm to this (0: no clipping)")
    lr_warmup_steps: int = opt(0, "linear learning-rate warm-up, in optimizer steps")
    lr_schedule: str = opt("constant", "after warm-up: constant, or cosine or linear decay to 0 at the last step")
    gradient_accumulation_steps: int = opt(1, "train batches per optimizer step")
    mixed_precision: str = opt("no", "no, fp16 (GPU) or bf16")
    gradient_checkpointing: bool = opt(False, "recompute activations in the backward pass (saves memory)")
    use_8bit_adam: bool = opt(False, "bitsandbytes' 8-bit AdamW (saves optimizer memory; needs bitsandbytes)")
    keep_checkpoints: int = opt(2, "how many of the latest checkpoints to keep")
    resume: bool = opt(False, "continue from the latest checkpoint in the output folder")
    report_to: str = opt("tensorboard", "training curves: tensorboard, wandb or none")
    cpu: bool = opt(False, "train on the CPU even when a GPU is present")
    progress: bool = opt(True, "show a progress bar")
    vae: str = opt("", "a VAE in place of the base model's own: a diffusers folder or a .safetensors file (the sdxl "
                       "recipe: the fp16-safe madebyollin/sdxl-vae-fp16-fix)")
    optimizer: str = opt("adamw", "adamw, or adafactor (transformers' Adafactor at the given lr, no parameter scaling: "
                                  "Diffusion-DPO's SDXL optimizer; ignores the adam_* settings)")
    prediction_type: str = opt("auto", "what the base UNet predicts: auto (its scheduler config, or a single file's "
                                       "v_pred key), epsilon or v_prediction")


@dataclass
class FinetuneConfig(RunConfig):
    """The UNet being fine-tuned (SPO and Diffusion-DPO): LoRA or full, epochs, per-epoch outputs."""

    lora_rank: int = opt(4, "LoRA rank")
    lora_alpha: float = opt(4.0, "LoRA alpha (the update is scaled by alpha / rank)")
    lora_targets: list[str] = opt(["to_q", "to_k", "to_v", "to_out.0"], "UNet modules that get a LoRA (comma list)")
    init_lora: str = opt("", "continue from this LoRA (diffusers or webui format) instead of a fresh one")
    full_finetune: bool = opt(False, "train the whole UNet instead of a LoRA (keeps a frozen copy as reference)")
    train_micro_batch: int = opt(8, "pairs per forward pass (memory only: results do not depend on it)")
    epochs: int = opt(10, "passes over the prompts (SPO) or pairs (DPO)")
    validation_images: int = opt(16, "images in the validation grid written each saved epoch (same seeds)")
    save_every_epochs: int = opt(1, "write the LoRA and the validation grid every this many epochs")
    checkpoint_every_batches: int = opt(0, "also checkpoint inside an epoch every this many batches (0: epoch ends)")


@dataclass
class SPOConfig(FinetuneConfig):
    """SPO: the step-wise resampler's sampling, the preference model that judges it, the clipped-ratio loss."""

    SECTION: ClassVar[str] = "spo"

    output_dir: str = opt("outputs/spo", "output folder: LoRA, checkpoints, samples, logs, history")
    preference: str = opt("", "preference model: an SPM folder, a CLIP folder (clean-image scorer) or "
                              "module:function; default for a built-in base: its shipped SPM")
    prompts: str = opt("", "training prompts: JSON list, text, CSV or parquet; default for a built-in base: its own")
    prompt_column: str = opt("caption", "column of a CSV/parquet prompts file")
    max_prompts: int = opt(0, "use the first this many prompts (0: all)")
    num_steps: int = opt(20, "DDIM sampling steps (paper: 20)")
    cfg_scale: float = opt(5.0, "classifier-free guidance scale (paper: 5)")
    eta: float = opt(1.0, "DDIM eta of the sampling (paper: 1, stochastic)")
    k: int = opt(4, "candidates per branching step (paper: 4 SD1.5, 2 SDXL)")
    divert_start_step: int = opt(4, "the first this many steps are plain sampling, not trained on")
    threshold: float = opt(0.3, "keep a pair iff the softmax gap of best and worst exceeds this")
    num_inner_steps: int = opt(0, "SDXL recipe: steps each branch continues before judging (paper: 3)")
    sample_batch_size: int = opt(10, "prompts per sampling round, per process (paper: 10 SD1.5, 2 SDXL)")
    train_batch_size: int = opt(10, "kept transitions per train batch, per process: one backward on their mean loss "
                                    "(paper: 10 SD1.5, 2 SDXL)")
    inner_epochs: int = opt(1, "passes over each round's kept transitions, reshuffled each time (paper: 1)")
    judge_batch: int = opt(0, "candidates decoded and scored per VAE/SPM call while judging (0: all of a step's "
                              "k x sample_batch_size at once; fewer bound the judging memory, `spo plan` says)")
    beta: float = opt(10.0, "beta of the SPO loss")
    clip_eps: float = opt(0.1, "ratio clipping band of the SPO loss: p_theta / p_ref is clamped to "
                               "[1 - clip_eps, 1 + clip_eps] (paper: 0.1)")
    guidance_rescale: float = opt(-1.0, GUIDANCE_RESCALE_HELP)
    resolution: int = opt(0, "image side in pixels that SPO samples and trains at (0: the base model's native one; "
                             "a multiple of 8 x the VAE's factor, 64 for SD1.5/SDXL; lower saves memory and time; SDXL's micro-conditioning "
                             "follows it)")


@dataclass
class PairsConfig:
    """Offline Pick-a-Pic-schema pairs: what Diffusion-DPO and the SPM trainer read."""

    data: list[str] = opt([], "Pick-a-Pic-schema pairs: parquet files, folders of them, datasets save_to_disk folders "
                              "(spo dpo on a built-in base: default pairs made from its samples)")
    train_batch_size: int = opt(16, "pairs per batch per process")
    global_batch_size: int = opt(0, "pairs per optimizer step over all processes: sets gradient_accumulation_steps to "
                                    "it / (train_batch_size x processes) (0: off, the accumulation as given)")
    scale_lr: bool = opt(False, "learning_rate is per pair: the run's lr is it x the pairs per optimizer step "
                                "(train_batch_size x accumulation x processes), as Diffusion-DPO's --scale_lr")
    num_workers: int = opt(0, "spo spm train: DataLoader workers decoding and resizing images (0: in the training "
                              "process; the batches are the same either way)")
    shuffle_buffer_mb: float = opt(512.0, "image bytes held at once per process: the data order shuffles within windows "
                                      "of this size (a set that fits is shuffled whole)")
    drop_ties: bool = opt(False, "leave out pairs labelled 0.5/0.5 (counted)")
    drop_same: bool = opt(False, "leave out pairs whose are_different is false (counted)")
    drop_unlabelled: bool = opt(False, "leave out pairs whose has_label is false (Pick-a-Pic v2; counted)")
    data_in_memory: bool = opt(False, "read every pair into memory first (the former path; small sets only)")


@dataclass
class DPOConfig(FinetuneConfig, PairsConfig):
    """Diffusion-DPO (the baseline) on offline Pick-a-Pic-schema pairs."""

    SECTION: ClassVar[str] = "dpo"

    output_dir: str = opt("outputs/dpo", "output folder: LoRA, checkpoints, samples, logs, history")
    dpo_beta: float = opt(5000.0, "beta of the Diffusion-DPO loss")
    max_pairs: int = opt(0, "use the first this many non-tie pairs (0: all)")
    caption_dropout: float = opt(0.0, "probability of training a pair on the empty caption")
    hflip: bool = opt(False, "mirror each training image left-right with probability 1/2, each image its own seeded "
                             "draw (official Diffusion-DPO default: on)")


@dataclass
class SPMConfig(RunConfig, PairsConfig):
    """The step-aware preference model's trainer (`spo spm train`)."""

    SECTION: ClassVar[str] = "spm"

    output_dir: str = opt("outputs/spm", "output folder: spm/ (the model), checkpoints/, logs/")
    init: str = opt("", "start from: a transformers CLIP folder (e.g. PickScore_v1) or an SPM folder; default for "
                        "a built-in base: its tiny fresh CLIP")
    time_conditioning: bool = opt(True, "modulate the vision layers by the timestep (false: the untimed variant)")
    max_train_steps: int = opt(200, "optimizer steps")
    train_batch_size: int = opt(8, "pairs per batch per process")  # PairsConfig's, with the SPM's default
    learning_rate: float = opt(3e-6, "AdamW learning rate (paper: 3e-6 SD1.5, 1e-6 SDXL)")
    weight_decay: float = opt(0.3, "AdamW weight decay (paper: 0.3)")
    lr_warmup_steps: int = opt(500, "linear learning-rate warm-up, in optimizer steps (paper: 500)")
    max_t: int = opt(1000, "train on t ~ U[0, max_t)")
    cfg_scale: float = opt(5.0, "CFG scale of the base model's x0-hat prediction")
    checkpoint_every_steps: int = opt(500, "optimizer steps between checkpoints (0: none)")
    relabel_with: str = opt("", "relabel pairs by a clean-image scorer: a CLIP folder (PickScore_v1, as the SDXL "
                                "recipe), an SPM folder at t = 0, or module:function")
    relabel_threshold: float = opt(0.1, "tie unless the softmax gap of the clean scores exceeds this (SDXL: 0.1)")
    log_every: int = opt(10, "optimizer steps between logged training curves")
    relabel_required: bool = opt(False, "the recipe relabels its pairs (SDXL: PickScore at gap 0.1): refuse to start "
                                        "without --relabel-with")
    guidance_rescale: float = opt(-1.0, GUIDANCE_RESCALE_HELP)
    fused_backward_pass: bool = opt(False, "update each weight as soon as its gradient is ready and free that gradient "
                                           "(saves 4 bytes per SPM parameter: 5 GB for a PickScore-size SPM); "
                                           "clipping is then per tensor, and it cannot accumulate gradients")
    full_bf16: bool = opt(False, "keep the SPM's weights in bf16 (half the memory of fp32 master weights), each "
                                 "update computed in fp32 and rounded stochastically; needs --mixed-precision bf16 "
                                 "and --fused-backward-pass (kohya's --full_bf16)")


CONFIGS: dict[str, type] = {"spo": SPOConfig, "dpo": DPOConfig, "spm": SPMConfig}
DEFAULT_PRESETS: dict[type, str | None] = {SPOConfig: "toy-sd15", DPOConfig: "dpo-toy-sd15", SPMConfig: None}
# Old flag spellings -> field, accepted for one release with a deprecation line (spo spm train's former names).
DEPRECATED_FLAGS: dict[type, dict[str, str]] = {
    SPMConfig: {"--steps": "max_train_steps", "--batch-size": "train_batch_size", "--lr": "learning_rate",
                "--grad-accum": "gradient_accumulation_steps", "--warmup": "lr_warmup_steps", "--cfg": "cfg_scale",
                "--checkpoint-every": "checkpoint_every_steps"},
}


# ---------------------------------------------------------------------------------------------- presets
def preset_names(cls: type) -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.toml") if _section_of(p) == cls.SECTION)


def _section_of(path: Path) -> str:
    return next(iter(tomllib.loads(path.read_text(encoding="utf-8"))), "")


def load_preset(name: str, cls: type) -> dict:
    names = preset_names(cls)
    if name not in names:
        raise SpoInputError(f"unknown preset {name!r} (choose from {', '.join(names)})")
    return load_toml(PRESET_DIR / f"{name}.toml", cls, where=f"preset {name}")


# ---------------------------------------------------------------------------------------------- values
def fields_of(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def _coerce(name: str, value, where: str, cls: type):
    """Check and convert `value` to the field's type; the error names the key and where it came from."""
    hint = typing.get_type_hints(cls)[name]
    try:
        if hint is bool:
            if isinstance(value, str):
                lowered = value.strip().lower()
                if lowered not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError
                return lowered in ("true", "1", "yes")
            if not isinstance(value, bool):
                raise ValueError
            return value
        if hint is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if hint is float:
            if isinstance(value, bool):
                raise ValueError
            out = float(value)
            if not math.isfinite(out):
                raise ValueError
            return out
        if hint == list[str]:
            if isinstance(value, str):
                return [v.strip() for v in value.split(",") if v.strip()]
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ValueError
            return list(value)
        if not isinstance(value, str):
            raise ValueError
        return value
    except (TypeError, ValueError, OverflowError):
        type_name = getattr(hint, "__name__", str(hint))
        raise SpoInputError(f"{where}: {name} must be {type_name}, got {value!r}") from None


def _checks(cfg: RunConfig) -> list[tuple[bool, str, str]]:
    """(ok, key, what) for every range rule of `cfg`'s class."""
    rules = [
        (cfg.learning_rate > 0, "learning_rate", "must be positive"),
        (cfg.weight_decay >= 0, "weight_decay", "must be >= 0"),
        (cfg.max_grad_norm >= 0, "max_grad_norm", "must be >= 0 (0: no clipping)"),
        (cfg.lr_warmup_steps >= 0, "lr_warmup_steps", "must be >= 0"),
        (cfg.lr_schedule in LR_SCHEDULES, "lr_schedule", f"must be one of {', '.join(LR_SCHEDULES)}"),
        (cfg.optimizer in OPTIMIZERS, "optimizer", f"must be one of {', '.join(OPTIMIZERS)}"),
        (not (cfg.use_8bit_adam and cfg.optimizer != "adamw"), "optimizer", "must be adamw with use_8bit_adam"),
        (cfg.gradient_accumulation_steps > 0, "gradient_accumulation_steps", "must be positive"),
        (cfg.keep_checkpoints > 0, "keep_checkpoints", "must be positive"),
        (cfg.mixed_precision in MIXED_PRECISION, "mixed_precision", f"must be one of {', '.join(MIXED_PRECISION)}"),
        (cfg.report_to in ("tensorboard", "wandb", "none"), "report_to", "must be tensorboard, wandb or none"),
        (bool(cfg.output_dir.strip()), "output_dir", "must not be empty"),
        (0 <= cfg.seed < 2**32, "seed", "must be in [0, 2**32)"),
        (not cfg.vae or Path(cfg.vae).exists(), "vae", "names no such file or folder"),
        (cfg.prediction_type in PREDICTION_CHOICES, "prediction_type", f"must be one of {', '.join(PREDICTION_CHOICES)}"),
    ]
    if hasattr(cfg, "guidance_rescale"):
        rules.append((cfg.guidance_rescale == -1 or 0 <= cfg.guidance_rescale <= 1, "guidance_rescale",
                      "must be in [0, 1], or -1 (auto)"))
    if isinstance(cfg, FinetuneConfig):
        rules += [(getattr(cfg, k) > 0, k, "must be positive") for k in
                  ("lora_rank", "train_micro_batch", "epochs", "save_every_epochs")]
        rules += [(cfg.validation_images >= 0, "validation_images", "must be >= 0"),
                  (cfg.checkpoint_every_batches >= 0, "checkpoint_every_batches", "must be >= 0"),
                  (cfg.lora_alpha > 0, "lora_alpha", "must be positive"),
                  (bool(cfg.lora_targets), "lora_targets", "must name at least one module")]
    if isinstance(cfg, SPOConfig):
        rules += [(getattr(cfg, k) > 0, k, "must be positive") for k in ("num_steps", "sample_batch_size",
                                                                          "train_batch_size", "inner_epochs")]
        rules += [(cfg.k >= 2, "k", "must be at least 2 (best and worst of k candidates)"),
                  (cfg.num_steps <= NUM_TRAIN_TIMESTEPS, "num_steps", "must be at most 1000 (the schedulers' training timesteps)"),
                  (0 <= cfg.divert_start_step < cfg.num_steps, "divert_start_step",
                   f"must be in [0, num_steps={cfg.num_steps})"),
                  (0 <= cfg.num_inner_steps < cfg.num_steps, "num_inner_steps", "must be in [0, num_steps)"),
                  (0 <= cfg.threshold < 1, "threshold", "must be in [0, 1)"),
                  (cfg.resolution >= 0, "resolution", "must be >= 0 (0: the model's native one)"),
                  (0 < cfg.clip_eps < 1, "clip_eps", "must be in (0, 1)"),
                  (cfg.beta > 0, "beta", "must be positive"),
                  (0 < cfg.eta <= 1, "eta", "must be in (0, 1] (the resampler needs stochastic steps)"),
                  (cfg.max_prompts >= 0, "max_prompts", "must be >= 0")]
    if isinstance(cfg, DPOConfig):
        rules += [(cfg.dpo_beta > 0, "dpo_beta", "must be positive"), (cfg.max_pairs >= 0, "max_pairs", "must be >= 0"),
                  (0 <= cfg.caption_dropout < 1, "caption_dropout", "must be in [0, 1)")]
    if isinstance(cfg, PairsConfig):
        rules.append((cfg.train_batch_size > 0, "train_batch_size", "must be positive"))
        rules += [(cfg.global_batch_size >= 0, "global_batch_size", "must be >= 0 (0: off)"),
                  (cfg.global_batch_size % max(cfg.train_batch_size, 1) == 0, "global_batch_size",
                   f"must be a multiple of train_batch_size {cfg.train_batch_size}"),
                  (not cfg.global_batch_size or cfg.gradient_accumulation_steps == 1, "gradient_accumulation_steps",
                   "must be 1 when global_batch_size sets it")]
    if isinstance(cfg, PairsConfig):
        rules += [(cfg.num_workers >= 0, "num_workers", "must be >= 0"),
                  (cfg.shuffle_buffer_mb > 0, "shuffle_buffer_mb", "must be positive")]
    if isinstance(cfg, SPMConfig):
        rules += [(getattr(cfg, k) > 0, k, "must be positive") for k in ("max_train_steps", "log_every")]
        rules += [(1 <= cfg.max_t <= NUM_TRAIN_TIMESTEPS, "max_t", f"must be in [1, {NUM_TRAIN_TIMESTEPS}]"),
                  (cfg.cfg_scale >= 0, "cfg_scale", "must be >= 0"),
                  (cfg.checkpoint_every_steps >= 0, "checkpoint_every_steps", "must be >= 0"),
                  (0 <= cfg.relabel_threshold < 1, "relabel_threshold", "must be in [0, 1)")]
        rules.append((not (cfg.fused_backward_pass and cfg.mixed_precision == "fp16"), "fused_backward_pass",
                      "cannot run with fp16 mixed precision (its loss scaler unscales all gradients at once): use bf16"))
        rules.append((not cfg.full_bf16 or (cfg.mixed_precision == "bf16" and cfg.fused_backward_pass), "full_bf16",
                      "needs --mixed-precision bf16 and --fused-backward-pass (each bf16 weight is stepped in fp32 "
                      "alone, in its gradient hook)"))
    return rules


def validate(cfg: RunConfig) -> RunConfig:
    """Range checks, each naming the key."""
    for ok, key, what in _checks(cfg):
        if not ok:
            raise SpoInputError(f"config: {key} {what}, got {getattr(cfg, key)!r}")
    return cfg


def for_processes(cfg: RunConfig, processes: int) -> RunConfig:
    """The settings a run on `processes` processes trains with: global_batch_size -> gradient_accumulation_steps,
    a per-pair learning_rate (scale_lr) -> the lr of the optimizer step (per pair x pairs per step).

    Both switches come back off, so the result prints, fingerprints and reads back as the run it is; a config
    without them is returned unchanged.
    """
    if not isinstance(cfg, PairsConfig) or not (cfg.global_batch_size or cfg.scale_lr):
        return cfg
    accumulation = cfg.gradient_accumulation_steps
    if cfg.global_batch_size:
        per_batch = cfg.train_batch_size * processes
        if cfg.global_batch_size % per_batch:
            raise SpoInputError(f"config: global_batch_size {cfg.global_batch_size} is not a multiple of "
                                f"train_batch_size {cfg.train_batch_size} x {processes} processes")
        accumulation = cfg.global_batch_size // per_batch
    lr = cfg.learning_rate * cfg.train_batch_size * accumulation * processes if cfg.scale_lr else cfg.learning_rate
    return dataclasses.replace(cfg, gradient_accumulation_steps=accumulation, learning_rate=lr, global_batch_size=0,
                               scale_lr=False)


def describe_batch(cfg: RunConfig, processes: int) -> str:
    """One line: the pairs per optimizer step and the lr a resolved config trains with."""
    per_step = cfg.train_batch_size * cfg.gradient_accumulation_steps * processes
    return (f"optimizer steps of {per_step} pairs ({cfg.train_batch_size} per batch x "
            f"{cfg.gradient_accumulation_steps} accumulated x {processes} processes), "
            f"{cfg.optimizer} at lr {cfg.learning_rate:g}")


# ---------------------------------------------------------------------------------------------- TOML
def load_toml(path: str | Path, cls: type, where: str | None = None) -> dict:
    """{key: (value, where)} from a flat table or one [spo] / [dpo] / [spm] / [train] table. /dev/stdin works."""
    path = Path(path)
    if not path.exists() or path.is_dir():
        raise SpoInputError(f"{path}: no such config file")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError, OSError) as exc:
        raise SpoInputError(f"{path}: not valid TOML ({exc})") from None
    for section in ("spo", "dpo", "spm", "train"):
        if set(data) == {section} and isinstance(data[section], dict):
            if section in CONFIGS and section != cls.SECTION:
                raise SpoInputError(f"{path}: a [{section}] config, not a [{cls.SECTION}] one")
            data = data[section]
    return {k: (v, where or str(path)) for k, v in data.items()}


def _toml_value(value) -> str:
    # The stdlib reads TOML but cannot write it; a flat table of scalars and string lists needs only this.
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(json.dumps(v) for v in value) + "]"
    return json.dumps(value)


def to_toml(cfg: RunConfig) -> str:
    """The fully resolved config as TOML; `--config` reads it back to the same config."""
    lines = [f"[{cfg.SECTION}]"] + [f"{k} = {_toml_value(v)}" for k, v in to_dict(cfg).items()]
    return "\n".join(lines) + "\n"


def to_dict(cfg: RunConfig) -> dict:
    return dataclasses.asdict(cfg)


def fingerprint(cfg: RunConfig) -> dict:
    """The settings that decide the training trajectory: a resumed run must have the same."""
    return {k: v for k, v in to_dict(cfg).items() if k not in cfg.RESUMABLE}


# ---------------------------------------------------------------------------------------------- build
def build_config(preset: str | None = None, toml: str | Path | None = None, overrides: dict | None = None,
                 cls: type = SPOConfig) -> RunConfig:
    """A validated `cls` from its preset, a TOML file and overrides (in that order of precedence)."""
    fields = fields_of(cls)
    values: dict[str, tuple] = {}
    name = preset or DEFAULT_PRESETS[cls]
    if name is not None:
        values.update(load_preset(name, cls))
    if toml is not None:
        values.update(load_toml(toml, cls))
    values.update({k: (v, "command line") for k, v in (overrides or {}).items()})
    kwargs = {}
    for key, (value, where) in values.items():
        if key not in fields:
            close = [f for f in fields if f.startswith(key[:4])]
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise SpoInputError(f"{where}: unknown key {key!r}{hint}")
        kwargs[key] = _coerce(key, value, where, cls)
    return validate(cls(**kwargs))


def flag_of(name: str) -> str:
    return "--out" if name == "output_dir" else "--" + name.replace("_", "-")


SYNONYMS = {"output_dir": "--output-dir"}  # diffusers' training scripts' name for it, kept beside --out


def add_arguments(parser: argparse.ArgumentParser, cls: type = SPOConfig, skip: tuple[str, ...] = ()) -> None:
    """One flag per field, with its help and the default preset's value; all default to 'not given'.

    `skip`: fields whose flag the command defines itself (with the same dest), e.g. a positional data list.
    """
    preset = DEFAULT_PRESETS[cls]
    shown = {**to_dict(cls()), **({k: v for k, (v, _) in load_preset(preset, cls).items()} if preset else {})}
    parser.add_argument("--config", type=Path, default=None, help="a TOML file of settings (--print-config writes one)")
    parser.add_argument("--preset", default=None, help=f"one of {', '.join(preset_names(cls))} "
                                                       f"(default: {preset or 'none'})")
    parser.add_argument("--print-config", action="store_true", help="print the resolved settings as TOML and exit")
    hints = typing.get_type_hints(cls)
    for name, f in fields_of(cls).items():
        if name in skip:
            continue
        default = shown[name]
        text = f"{f.metadata.get('help', '')} (default: {','.join(default) if isinstance(default, list) else default})"
        if hints[name] is bool:
            parser.add_argument(flag_of(name), dest=name, default=None, nargs="?", const="true", metavar="BOOL",
                                help=text)
            parser.add_argument(f"--no-{flag_of(name)[2:]}", dest=name, action="store_const", const="false",
                                help=argparse.SUPPRESS)  # --no-progress for --progress false
        else:
            parser.add_argument(flag_of(name), *([SYNONYMS[name]] if name in SYNONYMS else []), dest=name, default=None,
                                metavar=name.upper(), help=text)
    for old, name in DEPRECATED_FLAGS.get(cls, {}).items():
        if name not in skip:
            parser.add_argument(old, dest=name, default=None, action=DeprecatedFlag, replacement=flag_of(name),
                                help=argparse.SUPPRESS)


def from_args(args: argparse.Namespace, cls: type = SPOConfig) -> RunConfig:
    overrides = {name: getattr(args, name) for name in fields_of(cls) if getattr(args, name, None) is not None}
    return build_config(args.preset, args.config, overrides, cls)
