"""Prediction types (epsilon, v_prediction), zero-terminal-SNR schedules and rescaled CFG: the project's DDIM math
against diffusers' DDIMScheduler, detection from scheduler configs and single-file marker keys, the override flag,
refusals, DPO's v target, a v-prediction toy that reproduces the epsilon toy's SPO, and the toy builder's
conversion of the epsilon toy to v-prediction (what benchmarks/run.py vpred-toy trains SPO on)."""

import pytest
import torch
from diffusers import DDIMScheduler

from spo.ddim import ddim_sigma, ddim_step, ddim_transition_mean, gaussian_log_prob, rescaled_cfg, velocity, cfg
from spo.errors import SpoInputError
from spo.models.loading import load_pipeline
from spo.models.prediction import parameterisation
from spo.sampling.resampler import schedule
from spo.toy.models import scheduler as toy_scheduler

ZTSNR = {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}


def _v_scheduler(**extra) -> DDIMScheduler:
    return DDIMScheduler.from_config(toy_scheduler().config, prediction_type="v_prediction", **extra)


@pytest.mark.parametrize("extra", [{}, ZTSNR], ids=["v", "v-ztsnr-trailing"])
def test_ddim_step_and_log_prob_mean_match_diffusers_v_prediction(extra):
    sched = _v_scheduler(**extra)
    timesteps, a_ts, a_prevs = schedule(sched, 20)
    if extra:
        assert int(timesteps[0]) == 999 and float(a_ts[0]) == 0.0  # zero terminal SNR: nothing of x0 left
    g = torch.Generator().manual_seed(0)
    x_t, v, z = (torch.randn(2, 4, 8, 8, generator=g) for _ in range(3))
    for i in (0, 7, 19):
        ref = sched.step(v, timesteps[i], x_t, eta=1.0, variance_noise=z).prev_sample
        if extra and i == 0:
            # At a_t = 0 with eta = 1, sigma^2 = 1 - a_prev exactly, so the direction term vanishes; diffusers takes
            # (1 - a_prev - sigma^2) ** 0.5 unclamped, which rounds to -6e-8 in float32 and gives NaN on this step.
            # The reference there is the closed form: x0-hat = -v, x_{t-1} = sqrt(a_prev) x0-hat + sigma z.
            assert torch.isnan(ref).all() or torch.isfinite(ref).all()
            ref = a_prevs[i].sqrt() * -v + (1 - a_prevs[i]).sqrt() * z
        ours = ddim_step(x_t, v, a_ts[i], a_prevs[i], 1.0, z, "v_prediction")
        assert torch.isfinite(ours).all()
        torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
        sigma = ddim_sigma(a_ts[i], a_prevs[i], 1.0)
        mean = ddim_transition_mean(x_t, v, a_ts[i], a_prevs[i], sigma, "v_prediction")
        torch.testing.assert_close(mean + sigma * z, ref, atol=1e-5, rtol=1e-5)  # the log-prob's mean is the step's
        lp = gaussian_log_prob(ref, mean, sigma)
        assert torch.isfinite(lp).all()
        torch.testing.assert_close(lp, torch.distributions.Normal(mean, sigma).log_prob(ref).mean(dim=(1, 2, 3)))


def test_set_alpha_to_one_last_step_has_a_finite_log_prob():
    """As the official code: the last step goes to alphas_cumprod[0], not to 1 (which gives sigma = 0, NaN)."""
    sched = DDIMScheduler.from_config(toy_scheduler().config, set_alpha_to_one=True)
    _, a_t, a_prev = schedule(sched, 20)
    assert float(sched.final_alpha_cumprod) == 1.0
    assert float(a_prev[-1]) == float(sched.alphas_cumprod[0])
    sigma = ddim_sigma(a_t[-1], a_prev[-1], 1.0)
    assert float(sigma) > 0 and float(ddim_sigma(a_t[-1], torch.tensor(1.0), 1.0)) == 0.0
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    mean = ddim_transition_mean(x, torch.zeros_like(x), a_t[-1], a_prev[-1], sigma)
    assert torch.isfinite(gaussian_log_prob(mean + sigma * x, mean, sigma)).all()


def test_velocity_is_diffusers_target():
    sched = _v_scheduler()
    g = torch.Generator().manual_seed(2)
    x0, noise = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([0, 500, 999])
    a = sched.alphas_cumprod[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(velocity(x0, noise, a), sched.get_velocity(x0, noise, t))


def test_rescaled_cfg():
    g = torch.Generator().manual_seed(3)
    u, c = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g) * 3
    assert torch.equal(rescaled_cfg(u, c, 5.0, 0.0), cfg(u, c, 5.0))
    full = rescaled_cfg(u, c, 5.0, 1.0)  # phi = 1: the guided output gets the conditional output's std
    torch.testing.assert_close(full.std(dim=(1, 2, 3)), c.std(dim=(1, 2, 3)))


def test_detection_from_a_diffusers_folder_and_the_override(tmp_path):
    pipe = load_pipeline("toy:sd15")
    pipe.scheduler = _v_scheduler(**ZTSNR)
    pipe.save_pretrained(tmp_path / "vpred")
    loaded = load_pipeline(tmp_path / "vpred")
    assert parameterisation(loaded) == parameterisation(pipe)
    assert parameterisation(loaded).prediction_type == "v_prediction" and parameterisation(loaded).zero_terminal_snr
    assert parameterisation(loaded).guidance_rescale == 0.7  # auto: the paper's phi for a zero-SNR schedule
    assert parameterisation(loaded, 0.0).guidance_rescale == 0.0
    assert load_pipeline(tmp_path / "vpred", prediction_type="epsilon").scheduler.config.prediction_type == "epsilon"
    assert load_pipeline("toy:sd15", prediction_type="v_prediction").scheduler.config.prediction_type == "v_prediction"
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, prediction_type="sample")
    pipe.save_pretrained(tmp_path / "x0")
    with pytest.raises(SpoInputError, match="prediction type 'sample' is not supported"):
        load_pipeline(tmp_path / "x0")
    with pytest.raises(SpoInputError, match="unknown prediction type 'x0'"):
        load_pipeline("toy:sd15", prediction_type="x0")


def test_detection_from_single_file_marker_keys(tmp_path):
    from safetensors.torch import load_file, save_file

    from spo.formats.single_file import save_single_file

    pipe = load_pipeline("toy:sd15")
    eps_file = save_single_file(pipe, tmp_path / "eps.safetensors")
    assert not {"v_pred", "ztsnr"} & set(load_file(eps_file))
    assert parameterisation(load_pipeline(eps_file)).prediction_type == "epsilon"
    # The marker key A1111 and ComfyUI read, added to an ordinary file by hand.
    tensors = load_file(eps_file)
    save_file({**tensors, "v_pred": torch.zeros(0)}, str(tmp_path / "v.safetensors"))
    v = load_pipeline(tmp_path / "v.safetensors")
    assert parameterisation(v).prediction_type == "v_prediction" and not parameterisation(v).zero_terminal_snr
    assert load_pipeline(tmp_path / "v.safetensors", prediction_type="epsilon").scheduler.config.prediction_type == "epsilon"
    # The project's writer keeps both markers of a v-prediction zero-SNR model; reading it back gives them again.
    pipe.scheduler = _v_scheduler(**ZTSNR)
    both = save_single_file(pipe, tmp_path / "vz.safetensors")
    assert {"v_pred", "ztsnr"} <= set(load_file(both))
    loaded = load_pipeline(both).scheduler.config
    assert (loaded.prediction_type, loaded.rescale_betas_zero_snr, loaded.timestep_spacing) == (
        "v_prediction", True, "trailing")


def test_bad_prediction_type_in_config():
    from spo.train.config import DPOConfig, SPMConfig, build_config

    for cls in (None, DPOConfig, SPMConfig):
        kwargs = {"cls": cls} if cls else {}
        with pytest.raises(SpoInputError, match="prediction_type must be one of auto, epsilon, v_prediction"):
            build_config(overrides={"prediction_type": "x0"}, **kwargs)
    with pytest.raises(SpoInputError, match="guidance_rescale"):
        build_config(overrides={"guidance_rescale": 2.0})


def test_dpo_error_is_on_the_v_target():
    from spo.models.family import encode
    from spo.train.dpo_recipe import DPOBatch, noise_errors

    pipe = load_pipeline("toy:sd15", prediction_type="v_prediction")
    g = torch.Generator().manual_seed(4)
    shape = (2, pipe.unet.config.in_channels, pipe.unet.config.sample_size, pipe.unet.config.sample_size)
    batch = DPOBatch(torch.randn(shape, generator=g), torch.randn(shape, generator=g), torch.randn(shape, generator=g),
                     torch.tensor([10, 990]), encode(pipe, ["a red circle", "a blue square"]))
    with torch.no_grad():
        err_w, _ = noise_errors(pipe.unet, batch, pipe.scheduler.alphas_cumprod, prediction_type="v_prediction")
        noisy = pipe.scheduler.add_noise(batch.latents_w, batch.noise, batch.timesteps)
        pred = pipe.unet(noisy, batch.timesteps, **batch.cond.unet_kwargs()).sample
    target = pipe.scheduler.get_velocity(batch.latents_w, batch.noise, batch.timesteps)
    torch.testing.assert_close(err_w, (pred - target).pow(2).mean(dim=(1, 2, 3)), atol=1e-5, rtol=1e-5)


class _VFromEps(torch.nn.Module):
    """The epsilon toy UNet re-expressed as a v-prediction model: v = (eps - sqrt(1 - a) x_t) / sqrt(a).

    In exact arithmetic its DDIM trajectories equal the epsilon toy's, so SPO on it must give the epsilon toy's
    pairs, log-probabilities and loss: any place that still read its output as epsilon would differ grossly."""

    def __init__(self, unet, alphas_cumprod):
        super().__init__()
        self.inner = unet
        self.register_buffer("alphas_cumprod", alphas_cumprod.clone())

    config = property(lambda self: self.inner.config)
    device = property(lambda self: self.inner.device)
    dtype = property(lambda self: self.inner.dtype)

    def forward(self, sample, timestep, **kwargs):
        from types import SimpleNamespace

        eps = self.inner(sample, timestep, **kwargs).sample
        a = self.alphas_cumprod[timestep].view(-1, 1, 1, 1)
        return SimpleNamespace(sample=(eps - (1 - a).sqrt() * sample) / a.sqrt())


@pytest.mark.slow
def test_spo_on_a_v_prediction_toy_matches_the_epsilon_toy():
    import contextlib

    from spo.sources import get
    from spo.train.config import build_config
    from spo.train.spo_recipe import load_preference, pair_losses
    from spo.train.spo_round import collect_pairs

    cfg = build_config("toy-sd15", overrides=dict(k=3, num_steps=6, divert_start_step=2, threshold=0.0))
    prompts = get("toy:sd15").training_prompts(0)[:2]
    scorer = load_preference("", "toy:sd15", "sd15")  # the toy's own SPM
    pipe_e = load_pipeline("toy:sd15")
    pipe_v = load_pipeline("toy:sd15", prediction_type="v_prediction")
    v_model = _VFromEps(pipe_v.unet, pipe_v.scheduler.alphas_cumprod)

    def run(pipe, model):
        sched = schedule(pipe.scheduler, cfg.num_steps)
        gens = [torch.Generator().manual_seed(i) for i in range(len(prompts))]
        pairs, cond, uncond = collect_pairs(pipe, model, scorer, prompts, gens, cfg, sched)
        with torch.no_grad():
            _, lw, ll, _, _ = pair_losses(model, lambda: contextlib.nullcontext(model), pairs, cond, uncond, cfg,
                                          sched[1], sched[2], param=parameterisation(pipe))
        return pairs, lw, ll

    pe, lw_e, ll_e = run(pipe_e, pipe_e.unet)
    pv, lw_v, ll_v = run(pipe_v, v_model)
    torch.testing.assert_close(pv.sample_w, pe.sample_w, atol=2e-3, rtol=1e-3)
    torch.testing.assert_close(pv.score_w, pe.score_w, atol=2e-3, rtol=1e-3)  # the resampler's x0-hat, judged
    torch.testing.assert_close(lw_v, lw_e, atol=2e-3, rtol=1e-3)
    torch.testing.assert_close(ll_v, ll_e, atol=2e-3, rtol=1e-3)
    # Control: reading the v model's output as epsilon (what happened before) gives other samples altogether.
    pipe_v.scheduler = DDIMScheduler.from_config(pipe_v.scheduler.config, prediction_type="epsilon")
    wrong, _, _ = run(pipe_v, v_model)
    assert (wrong.sample_w - pe.sample_w).abs().mean() > 0.1


def _velocity_error(pipe, seed: int = 3, n: int = 32) -> float:
    """Mean squared error of the UNet's output against the true velocity on noised held-out renders."""
    from spo.images import images_to_tensor
    from spo.models.family import encode
    from spo.toy.render import render_dataset

    g = torch.Generator().manual_seed(seed)
    data = render_dataset(n, seed=seed, split="heldout")
    with torch.no_grad():
        z0 = pipe.vae.encode(images_to_tensor([im for _, _, im in data])).latent_dist.mean * pipe.vae.config.scaling_factor
        t = torch.randint(50, 950, (n,), generator=g)
        noise = torch.randn(z0.shape, generator=g)
        a = pipe.scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
        cond = encode(pipe, [scene.caption for scene, _, _ in data])
        out = pipe.unet(a.sqrt() * z0 + (1 - a).sqrt() * noise, t, **cond.unet_kwargs()).sample
    return float((out - velocity(z0, noise, a)).pow(2).mean())


@pytest.mark.slow
def test_toy_build_converts_the_epsilon_toy_to_v_prediction(tmp_path):
    """`spo toy build --continue-from ... --prediction-type v_prediction` trains the v target and says so in its
    scheduler config: the result is detected as v-prediction and predicts velocity far better than before."""
    import subprocess
    import sys

    from spo.toy.defaults import TOY_MODEL_DIR

    cmd = [sys.executable, "-m", "spo", "toy", "build", "--family", "sd15", "--continue-from", str(TOY_MODEL_DIR),
           "--prediction-type", "v_prediction", "--unet-steps", "30", "--decoder-steps", "0", "--images", "64",
           "--batch", "16", "--out", str(tmp_path)]
    assert subprocess.run(cmd, capture_output=True, text=True).returncode == 0
    converted = load_pipeline(str(tmp_path / "sd15"))
    assert parameterisation(converted).prediction_type == "v_prediction"
    before = _velocity_error(load_pipeline("toy:sd15"))  # the epsilon toy's output read as velocity
    after = _velocity_error(converted)
    assert after < 0.5 * before, (before, after)
