"""What a checkpoint's UNet predicts, and the noise schedule it was trained with: one answer, read once at load time.

The answer lives in the pipeline's DDIM scheduler config (`prediction_type`, `rescale_betas_zero_snr`,
`timestep_spacing`), where diffusers' own pipelines read it too, so `spo generate` needs nothing else. It comes from
a diffusers folder's scheduler config, or from a single file's marker keys (A1111 and ComfyUI read a `v_pred` key
for v-prediction; ComfyUI a `ztsnr` key for a zero-terminal-SNR schedule), and a `--prediction-type` flag
overrides it. Everything that turns a UNet output into x0 / eps asks `parameterisation(pipe)`.
"""

from __future__ import annotations

from dataclasses import dataclass

from spo.errors import SpoInputError

# What training and sampling here support (of diffusers' spo.ddim.PREDICTION_TYPES): "sample" (x0-prediction)
# checkpoints are refused when loaded. Kept free of torch imports: the CLI's flag vocabulary comes from here.
TRAINABLE_PREDICTION_TYPES = ("epsilon", "v_prediction")
PREDICTION_CHOICES = ("auto",) + TRAINABLE_PREDICTION_TYPES  # the --prediction-type vocabulary
AUTO_RESCALE = -1.0  # guidance_rescale setting: "the checkpoint decides" (see `parameterisation`)
ZTSNR_GUIDANCE_RESCALE = 0.7  # Lin et al. 2023's phi for zero-terminal-SNR models
V_PRED_KEY, ZTSNR_KEY = "v_pred", "ztsnr"  # single-file marker keys (A1111 / ComfyUI)
# A zero-terminal-SNR schedule as diffusers spells it (Lin et al. 2023: rescaled betas, trailing timesteps).
ZTSNR_SCHEDULER = {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}


@dataclass(frozen=True)
class Parameterisation:
    """How to read the UNet: its prediction type, whether its schedule reaches zero SNR, the CFG rescale to use."""

    prediction_type: str = "epsilon"
    zero_terminal_snr: bool = False
    guidance_rescale: float = 0.0


EPSILON = Parameterisation()  # SD1.5 / SDXL base: what every code path assumed before


def check_prediction_choice(value: str) -> str:
    if value not in PREDICTION_CHOICES:
        raise SpoInputError(f"unknown prediction type {value!r} (choose from {', '.join(PREDICTION_CHOICES)})")
    return value


def markers_to_scheduler(keys) -> dict:
    """Scheduler config overrides that a single file's marker keys ask for (empty for an ordinary checkpoint)."""
    keys = set(keys)
    out = {"prediction_type": "v_prediction"} if V_PRED_KEY in keys else {}
    if ZTSNR_KEY in keys:
        out.update(ZTSNR_SCHEDULER)
    return out


def scheduler_to_markers(config) -> list[str]:
    """The marker keys a single file written from a pipeline with this scheduler config must carry."""
    keys = [V_PRED_KEY] if config.get("prediction_type") == "v_prediction" else []
    return keys + ([ZTSNR_KEY] if config.get("rescale_betas_zero_snr") else [])


def resolve_scheduler(scheduler, prediction_type: str = "auto", where: str = "model"):
    """A DDIMScheduler from `scheduler`'s config with the --prediction-type override applied; unsupported types
    (e.g. "sample", x0-prediction) are refused with one line naming them, never trained silently."""
    from diffusers import DDIMScheduler

    check_prediction_choice(prediction_type)
    overrides = {} if prediction_type == "auto" else {"prediction_type": prediction_type}
    out = DDIMScheduler.from_config(scheduler.config, **overrides)
    found = out.config.prediction_type
    if found not in TRAINABLE_PREDICTION_TYPES:
        raise SpoInputError(f"{where}: prediction type {found!r} is not supported (supported: "
                            f"{', '.join(TRAINABLE_PREDICTION_TYPES)}; override with --prediction-type)")
    return out


def parameterisation(pipe_or_scheduler, guidance_rescale: float = AUTO_RESCALE) -> Parameterisation:
    """The loaded model's parameterisation. guidance_rescale AUTO: 0.7 for a zero-terminal-SNR schedule (the
    paper's remedy for the over-exposure plain CFG gives there), else 0; any value >= 0 is used as given."""
    scheduler = getattr(pipe_or_scheduler, "scheduler", pipe_or_scheduler)
    config = scheduler.config
    ztsnr = bool(config.get("rescale_betas_zero_snr", False))
    if guidance_rescale < 0:
        guidance_rescale = ZTSNR_GUIDANCE_RESCALE if ztsnr else 0.0
    return Parameterisation(config.get("prediction_type", "epsilon"), ztsnr, float(guidance_rescale))
