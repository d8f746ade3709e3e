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


def ddim_sigma(alpha_bar_t: torch.Tensor, alpha_bar_prev: torch.Tensor, eta: float = 1.0) -> torch.Tensor:
    """sigma_t = eta * sqrt((1 - a_prev) / (1 - a_t)) * sqrt(1 - a_t / a_prev)."""
    return eta * ((1 - alpha_bar_prev) / (1 - alpha_bar_t) * (1 - alpha_bar_t / alpha_bar_prev)).sqrt()


def ddim_mean(x0: torch.Tensor, eps: torch.Tensor, alpha_bar_prev: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """mu = sqrt(a_prev) * x0 + sqrt(1 - a_prev - sigma^2) * eps."""
    return alpha_bar_prev.sqrt() * x0 + (1 - alpha_bar_prev - sigma**2).clamp(min=0).sqrt() * eps


def ddim_transition_mean(x_t: torch.Tensor, eps: torch.Tensor, alpha_bar_t: torch.Tensor, alpha_bar_prev: torch.Tensor,
                         sigma: torch.Tensor) -> torch.Tensor:
    """The mean of one DDIM step x_t -> x_{t-1} from an epsilon prediction: mu(x0-hat(x_t, eps), eps)."""
    return ddim_mean(predicted_x0(x_t, eps, alpha_bar_t), eps, alpha_bar_prev, sigma)


def ddim_step(x_t: torch.Tensor, eps: torch.Tensor, alpha_bar_t, alpha_bar_prev, eta: float,
              noise: torch.Tensor) -> torch.Tensor:
    """One stochastic DDIM step x_t -> x_{t-1} = mu + sigma_t z (what diffusers' DDIMScheduler.step samples)."""
    sigma = ddim_sigma(alpha_bar_t, alpha_bar_prev, eta)
    return ddim_transition_mean(x_t, eps, alpha_bar_t, alpha_bar_prev, sigma) + sigma * noise


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """log N(x; mean, std^2 I), averaged over all but the batch dimension.

    The average (not the sum) follows the official SPO/DDPO implementations, which set beta = 10 for it.
    """
    std = std.expand_as(x) if torch.is_tensor(std) else torch.full_like(x, std)
    lp = -((x.detach() - mean) ** 2) / (2 * std**2) - std.log() - 0.5 * math.log(2 * math.pi)
    return lp.mean(dim=tuple(range(1, x.ndim)))


def cfg(eps_uncond: torch.Tensor, eps_cond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance: eps_u + w * (eps_c - eps_u)."""
    return eps_uncond + scale * (eps_cond - eps_uncond)

