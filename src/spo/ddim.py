"""Diffusion math in one place: forward noising, model output <-> x0/epsilon for each prediction type, and the
DDIM transition (Song et al., 2021) that both sampling and the SPO log-probability use, as small pure functions.

SPO samples with eta = 1, so each DDIM step x_t -> x_{t-1} is a Gaussian with mean `mu` and std `sigma_t`;
its log-probability is what the SPO loss compares between the trained and the reference model.
diffusers' `DDIMScheduler.step` computes the same sample but not the log-probability, hence these.
`alpha_bar` arguments are broadcastable tensors (per-sample for batched timesteps).
"""

from __future__ import annotations

import math

import torch

from spo.errors import SpoInputError

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")  # diffusers' scheduler `prediction_type` values
NUM_TRAIN_TIMESTEPS = 1000  # the training timesteps of the SD1.5 and SDXL schedulers


def add_noise(x0: torch.Tensor, noise: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """Forward diffusion q(x_t | x_0): sqrt(a_t) x0 + sqrt(1 - a_t) noise."""
    return alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * noise


def predicted_x0(x_t: torch.Tensor, eps: torch.Tensor, alpha_bar_t: torch.Tensor) -> torch.Tensor:
    """x0-hat = (x_t - sqrt(1 - a_t) * eps) / sqrt(a_t)."""
    return (x_t - (1 - alpha_bar_t).sqrt() * eps) / alpha_bar_t.sqrt()


def x0_from_output(output: torch.Tensor, x_t: torch.Tensor, alpha_bar: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """x0-hat from the UNet output for the scheduler's parameterisation (as DDIMScheduler.step computes it)."""
    if prediction_type == "epsilon":
        return predicted_x0(x_t, output, alpha_bar)
    if prediction_type == "v_prediction":
        return alpha_bar.sqrt() * x_t - (1 - alpha_bar).sqrt() * output
    if prediction_type == "sample":
        return output
    raise SpoInputError(f"unsupported scheduler prediction_type {prediction_type!r}")


def eps_from_output(output: torch.Tensor, x_t: torch.Tensor, alpha_bar: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """epsilon-hat from the UNet output for the scheduler's parameterisation (as DDIMScheduler.step computes it)."""
    if prediction_type == "epsilon":
        return output
    if prediction_type == "v_prediction":
        return alpha_bar.sqrt() * output + (1 - alpha_bar).sqrt() * x_t
    if prediction_type == "sample":
        return (x_t - alpha_bar.sqrt() * output) / (1 - alpha_bar).sqrt()
    raise SpoInputError(f"unsupported scheduler prediction_type {prediction_type!r}")


def x0_eps_from_output(output: torch.Tensor, x_t: torch.Tensor, alpha_bar: torch.Tensor,
                       prediction_type: str = "epsilon") -> tuple[torch.Tensor, torch.Tensor]:
    """(x0-hat, eps-hat) straight from the model output, never dividing by sqrt(a_t) for v-prediction: a
    zero-terminal-SNR schedule has a_t = 0 at t = 999 (DDIMScheduler.step converts the same way)."""
    return x0_from_output(output, x_t, alpha_bar, prediction_type), eps_from_output(output, x_t, alpha_bar, prediction_type)


def velocity(x0: torch.Tensor, noise: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """The v-prediction target v = sqrt(a_t) eps - sqrt(1 - a_t) x0 (Salimans & Ho 2022; DDIMScheduler.get_velocity)."""
    return alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * x0


def ddim_sigma(alpha_bar_t: torch.Tensor, alpha_bar_prev: torch.Tensor, eta: float = 1.0) -> torch.Tensor:
    """sigma_t = eta * sqrt((1 - a_prev) / (1 - a_t)) * sqrt(1 - a_t / a_prev)."""
    return eta * ((1 - alpha_bar_prev) / (1 - alpha_bar_t) * (1 - alpha_bar_t / alpha_bar_prev)).sqrt()


def ddim_mean(x0: torch.Tensor, eps: torch.Tensor, alpha_bar_prev: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """mu = sqrt(a_prev) * x0 + sqrt(1 - a_prev - sigma^2) * eps."""
    return alpha_bar_prev.sqrt() * x0 + (1 - alpha_bar_prev - sigma**2).clamp(min=0).sqrt() * eps


def ddim_transition_mean(x_t: torch.Tensor, output: torch.Tensor, alpha_bar_t: torch.Tensor,
                         alpha_bar_prev: torch.Tensor, sigma: torch.Tensor, prediction_type: str = "epsilon") -> torch.Tensor:
    """The mean of one DDIM step x_t -> x_{t-1} from the model output: mu(x0-hat, eps-hat)."""
    x0, eps = x0_eps_from_output(output, x_t, alpha_bar_t, prediction_type)
    return ddim_mean(x0, eps, alpha_bar_prev, sigma)


def ddim_step(x_t: torch.Tensor, output: torch.Tensor, alpha_bar_t, alpha_bar_prev, eta: float,
              noise: torch.Tensor, prediction_type: str = "epsilon") -> torch.Tensor:
    """One stochastic DDIM step x_t -> x_{t-1} = mu + sigma_t z (what diffusers' DDIMScheduler.step samples)."""
    sigma = ddim_sigma(alpha_bar_t, alpha_bar_prev, eta)
    return ddim_transition_mean(x_t, output, alpha_bar_t, alpha_bar_prev, sigma, prediction_type) + sigma * noise


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """log N(x; mean, std^2 I), averaged over all but the batch dimension.

    The average (not the sum) follows the official SPO/DDPO implementations, which set beta = 10 for it.
    """
    std = std.expand_as(x) if torch.is_tensor(std) else torch.full_like(x, std)
    lp = -((x.detach() - mean) ** 2) / (2 * std**2) - std.log() - 0.5 * math.log(2 * math.pi)
    return lp.mean(dim=tuple(range(1, x.ndim)))


def cfg(eps_uncond: torch.Tensor, eps_cond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance: eps_u + w * (eps_c - eps_u) (of the model output, whatever it predicts)."""
    return eps_uncond + scale * (eps_cond - eps_uncond)


def rescaled_cfg(out_uncond: torch.Tensor, out_cond: torch.Tensor, scale: float, guidance_rescale: float) -> torch.Tensor:
    """CFG, then rescaled towards the conditional output's std (Lin et al. 2023, sec. 3.4; phi = 0.7 there), which
    keeps zero-terminal-SNR models from over-exposing. phi = 0 is plain CFG. The rescale is diffusers'
    `rescale_noise_cfg`, the one its pipelines apply for `guidance_rescale`."""
    guided = cfg(out_uncond, out_cond, scale)
    if guidance_rescale <= 0:
        return guided
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

    return rescale_noise_cfg(guided, out_cond, guidance_rescale)

