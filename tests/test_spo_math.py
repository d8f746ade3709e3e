import torch
from diffusers import DDIMScheduler

from spo.ddim import cfg, ddim_mean, ddim_sigma, ddim_step, gaussian_log_prob, predicted_x0
from spo.losses import select_pairs, spo_loss
from spo.sampling.resampler import schedule
from spo.toy.models import scheduler as toy_scheduler


def test_ddim_step_matches_diffusers_with_eta_1():
    sched: DDIMScheduler = toy_scheduler()
    timesteps, a_ts, a_prevs = schedule(sched, 20)
    g = torch.Generator().manual_seed(0)
    x_t, eps, z = (torch.randn(2, 4, 8, 8, generator=g) for _ in range(3))
    for i in (0, 7, 19):
        ref = sched.step(eps, timesteps[i], x_t, eta=1.0, variance_noise=z).prev_sample
        a_t, a_prev = a_ts[i], a_prevs[i]
        sigma = ddim_sigma(a_t, a_prev, eta=1.0)
        ours = ddim_mean(predicted_x0(x_t, eps, a_t), eps, a_prev, sigma) + sigma * z
        torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ddim_step(x_t, eps, a_t, a_prev, 1.0, z), ref, atol=1e-5, rtol=1e-5)


def test_gaussian_log_prob_matches_torch_distributions():
    g = torch.Generator().manual_seed(1)
    x, mean = torch.randn(3, 4, 5, 5, generator=g), torch.randn(3, 4, 5, 5, generator=g)
    std = torch.tensor(0.3)
    ref = torch.distributions.Normal(mean, std).log_prob(x).mean(dim=(1, 2, 3))
    torch.testing.assert_close(gaussian_log_prob(x, mean, std), ref)


def test_spo_loss_clamps_and_prefers_winner():
    zero = torch.zeros(1)
    base = spo_loss(zero, zero, zero, zero)
    assert torch.isclose(base, torch.log(torch.tensor(2.0)))
    better = spo_loss(torch.tensor([0.05]), zero, zero, zero)
    assert better < base
    # Outside the band [1 - eps, 1 + eps] the ratio is clamped: no gradient flows.
    lw = torch.tensor([0.5], requires_grad=True)
    spo_loss(lw, zero, zero, zero, eps=0.1).sum().backward()
    assert lw.grad.abs().item() == 0.0
    lw2 = torch.tensor([0.01], requires_grad=True)
    spo_loss(lw2, zero, zero, zero, eps=0.1).sum().backward()
    assert lw2.grad.item() < 0


def test_select_pairs_threshold():
    scores = torch.tensor([[1.0, 3.0, 2.0, 0.0], [1.0, 1.1, 1.05, 1.0]])
    win, lose, keep = select_pairs(scores, threshold=0.3)
    assert win.tolist() == [1, 1] and lose.tolist() == [3, 0]
    assert keep.tolist() == [True, False]


def test_cfg():
    u, c = torch.zeros(2), torch.ones(2)
    assert cfg(u, c, 5.0).tolist() == [5.0, 5.0]


def test_output_conversions_match_diffusers_for_every_prediction_type():
    from spo.ddim import PREDICTION_TYPES, add_noise, eps_from_output, x0_from_output

    g = torch.Generator().manual_seed(2)
    x0, noise, out = (torch.randn(2, 4, 8, 8, generator=g) for _ in range(3))
    for kind in PREDICTION_TYPES:
        sched = DDIMScheduler.from_config(toy_scheduler().config, prediction_type=kind)
        timesteps, a_ts, a_prevs = schedule(sched, 20)
        for i in (0, 11, 19):
            t, a_t, a_prev = timesteps[i], a_ts[i], a_prevs[i]
            x_t = add_noise(x0, noise, a_t)
            torch.testing.assert_close(x_t, sched.add_noise(x0, noise, t.view(1)))
            step = sched.step(out, t, x_t, eta=0.0)
            x0_hat, eps_hat = x0_from_output(out, x_t, a_t, kind), eps_from_output(out, x_t, a_t, kind)
            torch.testing.assert_close(x0_hat, step.pred_original_sample, atol=1e-5, rtol=1e-5)
            # eta = 0: x_{t-1} = sqrt(a_prev) x0-hat + sqrt(1 - a_prev) eps-hat, eps-hat being diffusers' own
            torch.testing.assert_close(ddim_mean(x0_hat, eps_hat, a_prev, torch.zeros(())), step.prev_sample,
                                       atol=1e-5, rtol=1e-5)
