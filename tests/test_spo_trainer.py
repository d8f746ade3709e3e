"""The SPO trainer on the real toy pipelines: resampler structure, loss/gradients against a re-implementation
written straight from the paper's equations, resume, config validation."""

import copy
import math

import pytest
import torch
from safetensors.torch import load_file

from spo.errors import SpoInputError
from spo.models.family import encode, guided_output
from spo.models.loading import load_pipeline
from spo.sampling.resampler import sample_pairs, schedule
from spo.train.config import build_config
from spo.train.finetune import add_lora, reference_model
from spo.train.spo_recipe import pair_losses, train
from spo.train.spo_round import make_judge

pytestmark = pytest.mark.slow  # integration: real training runs or subprocess chains

torch.set_flush_denormal(True)


def brightness(images, prompts, t):
    """A stand-in preference: brighter is better (any pixel function will do for these tests)."""
    return images.mean(dim=(1, 2, 3)) * 10


def _setup(family, inner, k=3, batch=2, steps=6, divert=2, seed=0):
    pipe = load_pipeline(f"toy:{family}")
    cfg = build_config(f"toy-{family}", overrides=dict(k=k, num_inner_steps=inner, num_steps=steps,
                                                       divert_start_step=divert, threshold=0.0))
    prompts = ["a small red circle on a white background, top left", "a large blue square on a black background, center"][:batch]
    with torch.no_grad():
        cond, uncond = encode(pipe, prompts), encode(pipe, prompts, negative=True)
    timesteps, a_t, a_prev = schedule(pipe.scheduler, steps)
    gens = [torch.Generator().manual_seed(seed + i) for i in range(batch)]
    shape = (pipe.unet.config.in_channels, pipe.unet.config.sample_size, pipe.unet.config.sample_size)
    x_T = torch.stack([torch.randn(shape, generator=g) for g in gens])

    def eps_fn(x, t, rows):
        return guided_output(pipe.unet, x, t, cond.index(rows), uncond.index(rows), cfg.cfg_scale)

    x0, pairs = sample_pairs(eps_fn, make_judge(brightness, pipe, prompts), x_T, timesteps, a_t, a_prev, gens,
                             k=k, divert_start_step=divert, threshold=0.0, num_inner_steps=inner)
    return pipe, cfg, prompts, cond, uncond, (timesteps, a_t, a_prev), x0, pairs


@pytest.mark.parametrize("family,inner", [("sd15", 0), ("sdxl", 2)])
def test_resampler_pairs(family, inner):
    pipe, cfg, prompts, cond, uncond, (timesteps, a_t, a_prev), x0, pairs = _setup(family, inner)
    trained_steps = cfg.num_steps - cfg.divert_start_step
    assert len(pairs) == 2 * trained_steps  # every step after the divert point yields one pair per prompt
    assert (pairs.score_w >= pairs.score_l).all()
    first = pairs.step_index == cfg.divert_start_step
    # At a branching point win and lose share their parent and differ only by the step's noise.
    assert torch.equal(pairs.parent_w[first], pairs.parent_l[first])
    assert not torch.equal(pairs.sample_w[first], pairs.sample_l[first])
    if inner:
        later = pairs.step_index == cfg.divert_start_step + 1
        assert not torch.equal(pairs.parent_w[later], pairs.parent_l[later])  # inner steps: own branches
        # the transition after the first on the winning branch starts where the first ended
        torch.testing.assert_close(pairs.parent_w[later], pairs.sample_w[first])
    c = pipe.unet.config
    assert x0.shape == (2, c.in_channels, c.sample_size, c.sample_size) and torch.isfinite(x0).all()
    # Determinism: the same generators give the same pairs; a prompt's trajectory ignores its batch-mates.
    again = _setup(family, inner)[-1]
    torch.testing.assert_close(again.sample_w, pairs.sample_w)
    alone = _setup(family, inner, batch=1)[-1]
    # equal up to float summation order: multi-threaded kernels differ with batch size (measured 2e-5 after
    # 6 steps with 2 threads, on latents of magnitude ~1)
    torch.testing.assert_close(alone.sample_w, pairs.sample_w[pairs.row == 0], atol=1e-4, rtol=1e-3)


def _paper_losses(policy, reference, pairs, cond, uncond, cfg, a_t, a_prev):
    """SPO's loss written directly from the paper, one pair and one forward at a time (no batching tricks)."""
    losses = []
    for i in range(len(pairs)):
        row, step, t = int(pairs.row[i]), int(pairs.step_index[i]), pairs.timestep[i : i + 1]
        at, ap = a_t[step], a_prev[step]
        sigma = cfg.eta * torch.sqrt((1 - ap) / (1 - at)) * torch.sqrt(1 - at / ap)
        logps = {}
        for name, model in (("theta", policy), ("ref", reference)):
            for side, parent, child in (("w", pairs.parent_w[i : i + 1], pairs.sample_w[i : i + 1]),
                                        ("l", pairs.parent_l[i : i + 1], pairs.sample_l[i : i + 1])):
                e_u = model(parent, t, **uncond.index([row]).unet_kwargs()).sample
                e_c = model(parent, t, **cond.index([row]).unet_kwargs()).sample
                eps = e_u + cfg.cfg_scale * (e_c - e_u)
                x0 = (parent - torch.sqrt(1 - at) * eps) / torch.sqrt(at)
                mu = torch.sqrt(ap) * x0 + torch.sqrt(1 - ap - sigma**2) * eps
                logps[name, side] = torch.distributions.Normal(mu, sigma).log_prob(child).mean()
        r_w = torch.exp(logps["theta", "w"] - logps["ref", "w"]).clamp(1 - cfg.clip_eps, 1 + cfg.clip_eps)
        r_l = torch.exp(logps["theta", "l"] - logps["ref", "l"]).clamp(1 - cfg.clip_eps, 1 + cfg.clip_eps)
        losses.append(-torch.nn.functional.logsigmoid(cfg.beta * (torch.log(r_w) - torch.log(r_l))))
    return torch.stack(losses)


@pytest.mark.parametrize("family,inner", [("sd15", 0), ("sdxl", 1)])
def test_loss_and_lora_gradients_match_paper_equations(family, inner):
    pipe, cfg, prompts, cond, uncond, (timesteps, a_t, a_prev), _, pairs = _setup(family, inner, k=2, steps=5)
    unet = pipe.unet
    add_lora(unet, cfg)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # move off the identity so ratios differ from 1 and some get clipped
        for name, p in unet.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * (0.01 if "lora_B" in name else 0.5))
    params = {n: p for n, p in unet.named_parameters() if p.requires_grad}

    losses, logp_w, _, ref_w, _ = pair_losses(unet, lambda: reference_model(unet, None), pairs, cond, uncond, cfg,
                                              a_t, a_prev)
    ratio_w = torch.exp(logp_w - ref_w)
    inside = (ratio_w - 1).abs() < cfg.clip_eps
    assert inside.any() and not inside.all()  # the batch exercises both sides of the clamp
    losses.sum().backward()
    ours = {n: p.grad.clone() for n, p in params.items()}
    for p in params.values():
        p.grad = None

    reference = copy.deepcopy(unet)
    reference.disable_adapters()
    reference.requires_grad_(False)
    expected = _paper_losses(unet, reference, pairs, cond, uncond, cfg, a_t, a_prev)
    expected.sum().backward()
    torch.testing.assert_close(losses, expected, atol=1e-5, rtol=1e-5)
    for n, p in params.items():
        torch.testing.assert_close(ours[n], p.grad, atol=1e-5, rtol=1e-4)
    assert any(ours[n].abs().sum() > 0 for n in params)
    assert not torch.allclose(losses, torch.full_like(losses, math.log(2)))


TINY = dict(max_prompts=6, sample_batch_size=2, num_steps=6, divert_start_step=2, validation_images=0,
            threshold=0.0, report_to="none")


def test_resume_gives_the_uninterrupted_result(tmp_path):
    full = train(build_config("toy-sd15", overrides=dict(TINY, epochs=2, output_dir=str(tmp_path / "a"))), brightness, log=lambda *_: None)
    train(build_config("toy-sd15", overrides=dict(TINY, epochs=1, checkpoint_every_batches=1, output_dir=str(tmp_path / "b"))), brightness, log=lambda *_: None)
    resumed = train(build_config("toy-sd15", overrides=dict(TINY, epochs=2, resume=True, output_dir=str(tmp_path / "b"))), brightness, log=lambda *_: None)
    a, b = load_file(full["lora"]), load_file(resumed["lora"])
    assert a.keys() == b.keys() and len(a) > 0
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=0, rtol=0)
    # the LoRA moved, and the per-epoch artefacts are there
    assert (tmp_path / "b" / "lora-epoch-002" / "pytorch_lora_weights.safetensors").is_file()
    assert full["history"][-1]["pairs"] > 0


def test_config_errors_name_the_key(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('lora_rnak = 4\n')
    with pytest.raises(SpoInputError, match="lora_rnak"):
        build_config(toml=bad)
    bad.write_text('k = "four"\n')
    with pytest.raises(SpoInputError, match="k must be int"):
        build_config(toml=bad)
    with pytest.raises(SpoInputError, match="threshold"):
        build_config(overrides={"threshold": "1.5"})
    with pytest.raises(SpoInputError, match="unknown preset"):
        build_config("sd3")
    good = tmp_path / "good.toml"
    good.write_text('[spo]\nk = 3\nlora_targets = ["to_q", "to_v"]\n')
    cfg = build_config("sdxl", good, {"learning_rate": "2e-5"})
    assert (cfg.k, cfg.lora_targets, cfg.learning_rate, cfg.num_inner_steps) == (3, ["to_q", "to_v"], 2e-5, 3)


def test_every_preset_builds_a_valid_config():
    from spo.train.config import SPOConfig, preset_names

    assert {"sd15", "sdxl", "toy-sd15", "toy-sdxl", "toy-sd15-long", "toy-sdxl-long"} <= set(preset_names(SPOConfig))
    for name in preset_names(SPOConfig):
        cfg = build_config(name)
        assert cfg.epochs > 0 and 0 <= cfg.divert_start_step < cfg.num_steps, name
    long = build_config("toy-sdxl-long")
    assert (long.k, long.num_inner_steps, long.base) == (2, 3, "toy:sdxl")  # the family's recipe, a longer budget


DIST_SCRIPT = """
import os, sys, torch
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save_file
from spo.train.config import build_config
from spo.train.spo_recipe import train

def brightness(images, prompts, t):
    return images.mean(dim=(1, 2, 3)) * 10

out, per_process = sys.argv[1], int(sys.argv[2])
# Rounds of 2 prompts x 3 transitions; global train batches of 4 (2 per process): 6 kept -> train batches of 4 and 2
cfg = build_config("toy-sd15", overrides=dict(max_prompts=4, sample_batch_size=per_process, num_steps=5,
                   train_batch_size=2 * per_process,
                   divert_start_step=2, validation_images=0, threshold=0.0, report_to="none", epochs=1,
                   adam_eps=1e-2, output_dir=out))
result = train(cfg, brightness, log=lambda *_: None)
rank = int(os.environ.get("RANK", 0))
save_file({k: v.contiguous() for k, v in get_peft_model_state_dict(result["model"]).items()}, f"{out}/rank{rank}.safetensors",
          metadata={"steps": str(result["steps"])})
"""


def test_two_cpu_processes_match_one_process_with_the_same_global_batch(tmp_path):
    """accelerate over torch.distributed (gloo): 2 processes x (1 prompt, train batch 2) == 1 process x (2, 4)."""
    import os
    import subprocess
    import sys

    script = tmp_path / "dist.py"
    script.write_text(DIST_SCRIPT)
    env = dict(os.environ, ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1")
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          "29533", str(script), str(tmp_path / "two"), "1"], env=env, capture_output=True, text=True,
                         timeout=600)
    assert two.returncode == 0, two.stderr[-2000:]
    one = subprocess.run([sys.executable, str(script), str(tmp_path / "one"), "2"], env=env, capture_output=True,
                         text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-2000:]
    r0, r1 = load_file(tmp_path / "two" / "rank0.safetensors"), load_file(tmp_path / "two" / "rank1.safetensors")
    single = load_file(tmp_path / "one" / "rank0.safetensors")
    from safetensors import safe_open

    steps = [safe_open(tmp_path / d / "rank0.safetensors", "pt").metadata()["steps"] for d in ("two", "one")]
    assert steps == ["4", "4"]  # 2 rounds x 2 train batches (4 + 2 of the 6 kept transitions)
    moved = False
    for key in single:
        torch.testing.assert_close(r0[key], r1[key], atol=0, rtol=0)  # ranks identical
        # == one process with global batch 2, up to float summation order. A large adam_eps keeps the update
        # linear in the gradient: with the default, Adam's first step is lr * sign(g), and a gradient that is
        # zero up to rounding would flip sign between the runs.
        torch.testing.assert_close(r0[key], single[key], atol=1e-6, rtol=1e-5)
        moved |= "lora_B" in key and bool(single[key].abs().sum() > 0)
    assert moved, "training changed nothing"


def test_one_round_follows_the_official_update_structure(tmp_path):
    """From the official recipe's description: a round's K kept transitions are shuffled and split into train batches
    of B; each train batch is one AdamW step on its mean loss (no clipping). So one round takes ceil(K/B) optimizer
    steps, and the LoRA ends where a plain loop written from that description ends."""
    from spo.train.finetune import continue_lora, epoch_order, item_generators, save_lora
    from spo.train.spo_recipe import load_training_prompts
    from spo.train.spo_round import collect_pairs

    pipe = load_pipeline("toy:sd15")
    cfg = build_config("toy-sd15", overrides=dict(k=3, max_prompts=2, sample_batch_size=2, num_steps=6,
                                                  divert_start_step=2, threshold=0.0, train_batch_size=3, epochs=1,
                                                  validation_images=0, report_to="none", max_grad_norm=0.0,
                                                  learning_rate=1e-3, adam_eps=1e-2, seed=11))
    add_lora(pipe.unet, cfg)  # a fixed start off the identity, so ratios move from the first step
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in pipe.unet.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * (0.01 if "lora_B" in name else 0.5))
    save_lora(pipe, pipe.unet, tmp_path / "start", {})
    cfg.init_lora, cfg.output_dir = str(tmp_path / "start"), str(tmp_path / "run")
    result = train(cfg, brightness, log=lambda *_: None)

    # The plain loop: the same round (same prompts, same generators), then the description's update.
    plain = load_pipeline("toy:sd15")
    continue_lora(plain.unet, str(tmp_path / "start"), "sd15")
    unet = plain.unet
    params = [p for p in unet.parameters() if p.requires_grad]
    prompts = load_training_prompts(cfg)
    positions = epoch_order(len(prompts), cfg.seed, 0)[:2].tolist()
    sched = schedule(plain.scheduler, cfg.num_steps)
    pairs, cond, uncond = collect_pairs(plain, unet, brightness, [prompts[i] for i in positions],
                                        item_generators(cfg.seed, 0, positions), cfg, sched)
    kept = pairs.select(pairs.keep)
    n_kept = len(kept)
    assert n_kept == 2 * (cfg.num_steps - cfg.divert_start_step)  # threshold 0: every pair kept
    # the documented shuffle: a permutation seeded by (seed, epoch, round, inner epoch)
    perm = torch.randperm(n_kept, generator=torch.Generator().manual_seed(hash((cfg.seed, 0, 0, 0)) % (2**63)))
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                  eps=cfg.adam_eps, weight_decay=cfg.weight_decay)
    reference = copy.deepcopy(unet)
    reference.disable_adapters()
    reference.requires_grad_(False)
    steps = 0
    for start in range(0, n_kept, cfg.train_batch_size):
        batch = kept.select(perm[start: start + cfg.train_batch_size])
        _paper_losses(unet, reference, batch, cond, uncond, cfg, sched[1], sched[2]).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        steps += 1

    assert result["steps"] == steps == math.ceil(n_kept / cfg.train_batch_size) == 3
    from peft.utils import get_peft_model_state_dict

    ours, theirs = get_peft_model_state_dict(result["model"]), get_peft_model_state_dict(unet)
    start = load_file(tmp_path / "start" / "pytorch_lora_weights.safetensors")
    moved = 0.0
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], atol=2e-6, rtol=1e-4)
        moved = max(moved, float((theirs[key] - start["unet." + key]).abs().max()))
    assert moved > 1e-4, "the plain loop's weights did not move"


def test_training_at_another_resolution_in_bf16(tmp_path):
    """`resolution` sets the side SPO samples and judges at (SDXL's micro-conditioning follows it); under bf16 mixed
    precision the frozen base loads in bf16 while the LoRA trains and saves in fp32."""
    sides = []

    def scorer(images, prompts, t):
        sides.append(tuple(images.shape[-2:]))
        return brightness(images.float(), prompts, t)

    from accelerate.state import AcceleratorState

    cfg = build_config("toy-sdxl", overrides=dict(TINY, max_prompts=2, epochs=1, resolution=64, mixed_precision="bf16",
                                                  output_dir=str(tmp_path / "run")))
    # accelerate keeps one precision per process: earlier in-process runs of this suite were fp32
    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        result = train(cfg, scorer, log=lambda *_: None)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    native = load_pipeline("toy:sdxl").unet.config.sample_size * 2
    assert native != 64 and set(sides) == {(64, 64)}
    lora = load_file(result["lora"])
    assert lora and all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in lora.values())
    assert result["history"][-1]["pairs"] > 0


def test_sdxl_micro_conditioning_names_the_training_side():
    pipe = load_pipeline("toy:sdxl")
    cond = encode(pipe, ["a small red circle on a white background, top left"], side=64)
    assert cond.added_cond_kwargs["time_ids"].tolist() == [[64, 64, 0, 0, 64, 64]]
    native = encode(pipe, ["a small red circle on a white background, top left"])
    side = pipe.unet.config.sample_size * pipe.vae_scale_factor
    assert native.added_cond_kwargs["time_ids"].tolist() == [[side, side, 0, 0, side, side]]


def test_frozen_weights_load_in_the_mixed_precision():
    from spo.train.finetune import load_dtype

    assert load_dtype(build_config("toy-sd15", overrides=dict(mixed_precision="bf16"))) == torch.bfloat16
    assert load_dtype(build_config("toy-sd15", overrides=dict(mixed_precision="no"))) == torch.float32
    # the whole UNet trains: it must be loaded (and kept) in fp32 whatever the mixed precision
    assert load_dtype(build_config("toy-sd15", overrides=dict(mixed_precision="bf16", full_finetune=True))) == torch.float32
