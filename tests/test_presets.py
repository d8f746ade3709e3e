"""The paper presets (issue 19): the official launchers' and the official SPM recipe's values, and the settings
they need: the linear decay, Adafactor, a global batch with per-pair lr scaling, the seeded horizontal flip."""

from __future__ import annotations

import io
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from spo.errors import SpoInputError
from spo.train.config import DPOConfig, SPMConfig, build_config, for_processes
from spo.train.engine import learning_rate_factor, make_optimizer
from spo.train.finetune import item_generators

torch.set_flush_denormal(True)


# ---------------------------------------------------------------------------------------------- schedule
def test_linear_decay_by_hand():
    # warm-up 3 of 10 steps: 1/3, 2/3, then full at the third step, down by 1/7 a step to 0 at the last (step 9)
    got = [learning_rate_factor(s, 3, 10, "linear") for s in range(10)]
    want = [1 / 3, 2 / 3, 1.0, 6 / 7, 5 / 7, 4 / 7, 3 / 7, 2 / 7, 1 / 7, 0.0]
    assert got == pytest.approx(want, abs=1e-12)
    assert learning_rate_factor(12, 3, 10, "linear") == 0.0  # past the end it stays at 0
    assert [learning_rate_factor(s, 0, 4, "linear") for s in range(4)] == pytest.approx([0.75, 0.5, 0.25, 0.0])
    assert learning_rate_factor(5, 10, 8, "linear") == 0.6  # warm-up longer than the run: only the warm-up
    # the other schedules are unchanged
    assert [learning_rate_factor(s, 2, 6, "constant") for s in range(6)] == [0.5, 1, 1, 1, 1, 1]
    assert learning_rate_factor(5, 2, 6, "cosine") == pytest.approx(0.0, abs=1e-12)


# ---------------------------------------------------------------------------------------------- Adafactor
def test_adafactor_steps_a_toy_unet_lora_and_resumes_exactly(tmp_path):
    from transformers.optimization import Adafactor

    from spo.models.loading import load_pipeline
    from spo.train.finetune import add_lora

    cfg = build_config("dpo-toy-sd15", overrides={"optimizer": "adafactor", "lr_warmup_steps": 4}, cls=DPOConfig)
    unet = load_pipeline("toy:sd15").unet
    add_lora(unet, cfg)
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = make_optimizer(cfg, params)
    assert isinstance(opt, Adafactor)
    group = opt.param_groups[0]
    assert (group["lr"], group["relative_step"], group["scale_parameter"], group["warmup_init"]) == \
           (cfg.learning_rate, False, False, False)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: learning_rate_factor(s, 4, 10, "constant"))
    assert opt.param_groups[0]["lr"] == pytest.approx(cfg.learning_rate / 4)  # our warm-up drives its lr
    before = [p.detach().clone() for p in params]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, unet.config.in_channels, 8, 8, generator=g)
    text = torch.randn(2, 4, unet.config.cross_attention_dim, generator=g)
    # LoRA B starts at 0, so the first step moves only B; two steps move every LoRA weight

    def step():
        unet(x, torch.tensor([10, 500]), encoder_hidden_states=text).sample.pow(2).mean().backward()
        opt.step()
        sched.step()
        opt.zero_grad()

    step()
    step()
    assert all(torch.isfinite(p).all() for p in params)
    assert all(not torch.equal(a, b) for a, b in zip(before, params))
    assert opt.param_groups[0]["lr"] == pytest.approx(cfg.learning_rate * 3 / 4)
    # its state (factored second moments, step counts) goes through the pickle-free checkpoint and back
    from spo.train.checkpoint import load_state, save_state

    save_state(tmp_path / "ckpt", unet, opt, sched, {})
    step()
    third = [p.detach().clone() for p in params]
    load_state(tmp_path / "ckpt", unet, opt, sched)
    step()
    assert all(torch.equal(a, b) for a, b in zip(third, params))


def test_bad_optimizer_and_schedule_are_named():
    with pytest.raises(SpoInputError, match="optimizer must be one of adamw, adafactor, got 'sgd'"):
        build_config(overrides={"optimizer": "sgd"}, cls=DPOConfig)
    with pytest.raises(SpoInputError, match="lr_schedule must be one of constant, cosine, linear"):
        build_config(overrides={"lr_schedule": "step"}, cls=SPMConfig)
    with pytest.raises(SpoInputError, match="optimizer must be adamw with use_8bit_adam"):
        build_config(overrides={"optimizer": "adafactor", "use_8bit_adam": True}, cls=DPOConfig)


# ---------------------------------------------------------------------------------------------- global batch
def test_global_batch_and_lr_scaling_arithmetic():
    dpo = build_config("dpo-sd15", cls=DPOConfig)
    for processes, accumulation in ((1, 128), (4, 32), (16, 8)):  # the paper's run: 16 GPUs
        run = for_processes(dpo, processes)
        assert run.gradient_accumulation_steps == accumulation
        assert run.train_batch_size * accumulation * processes == 2048
        # the launcher's --learning_rate 1e-8 --scale_lr: 1e-8 x 1 x 128 x 16 GPUs, whatever the split here
        assert run.learning_rate == pytest.approx(2.048e-5, rel=1e-12)
        assert (run.global_batch_size, run.scale_lr) == (0, False)  # resolved: reads back as the run it is
    with pytest.raises(SpoInputError, match="global_batch_size 2048 is not a multiple of train_batch_size 16 x 3"):
        for_processes(dpo, 3)
    # scale_lr without a global batch: the per-pair lr times the pairs of a step as configured
    own = build_config("dpo-toy-sd15", overrides={"scale_lr": True, "learning_rate": 1e-5,
                                                  "gradient_accumulation_steps": 3}, cls=DPOConfig)
    assert for_processes(own, 2).learning_rate == pytest.approx(1e-5 * 16 * 3 * 2)
    spm = build_config("spm-sd15", cls=SPMConfig)
    assert [for_processes(spm, n).gradient_accumulation_steps for n in (1, 2, 4)] == [4, 2, 1]
    assert for_processes(spm, 4).learning_rate == 3e-6  # the SPM recipe's lr is not per pair
    toy = build_config("dpo-toy-sd15", cls=DPOConfig)
    assert for_processes(toy, 4) is toy  # the switches off: nothing changes
    with pytest.raises(SpoInputError, match="global_batch_size must be a multiple of train_batch_size 16"):
        build_config("spm-sd15", overrides={"global_batch_size": 60}, cls=SPMConfig)
    with pytest.raises(SpoInputError, match="gradient_accumulation_steps must be 1 when global_batch_size sets it"):
        build_config("spm-sd15", overrides={"gradient_accumulation_steps": 2}, cls=SPMConfig)


@pytest.mark.slow
def test_spm_preset_print_config_shows_the_official_recipe(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "spo", "spm", "train", "--preset", "spm-sd15", "--print-config"],
                       capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    for line in ("learning_rate = 3e-06", "weight_decay = 0.3", "lr_warmup_steps = 500", 'lr_schedule = "linear"',
                 "max_train_steps = 8000", "global_batch_size = 64", "train_batch_size = 16",
                 'mixed_precision = "bf16"', 'optimizer = "adamw"'):
        assert line in r.stdout.splitlines(), line
    xl = build_config("spm-sdxl", cls=SPMConfig)
    assert (xl.learning_rate, xl.max_train_steps, xl.relabel_threshold, xl.relabel_required) == (1e-6, 7000, 0.1, True)


# ---------------------------------------------------------------------------------------------- flip
def test_flip_draws_are_seeded_and_per_image():
    from spo.images import flip_draws, flip_images

    positions = list(range(64))
    a = flip_draws(item_generators(7, 2, positions))
    assert torch.equal(a, flip_draws(item_generators(7, 2, positions)))  # same seed, epoch, pairs: same flips
    assert not torch.equal(a, flip_draws(item_generators(8, 2, positions)))
    # one pair alone draws what it draws inside a batch (micro-batches, resume and processes do not matter)
    alone = flip_draws(item_generators(7, 2, [5]))
    assert torch.equal(alone, torch.stack([a[5], a[64 + 5]]))
    w, l = a[:64], a[64:]
    # each image its own coin, as the official per-image RandomHorizontalFlip: some pairs flip one image only
    assert 16 < int(w.sum()) < 48 and 16 < int(l.sum()) < 48 and bool((w != l).any()) and bool((w == l).any())
    images = torch.arange(2 * 3 * 2 * 4, dtype=torch.float32).view(2, 3, 2, 4)
    out = flip_images(images, torch.tensor([True, False]))
    assert torch.equal(out[0], images[0, :, :, [3, 2, 1, 0]]) and torch.equal(out[1], images[1])


def _jpeg(seed: int, side: int) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 255, (side, side, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def _mirror(jpeg: bytes) -> bytes:
    """The decoded image mirrored, stored losslessly (PNG): the same pixels prepare_batch's flip gives."""
    im = Image.open(io.BytesIO(jpeg)).convert("RGB").transpose(Image.FLIP_LEFT_RIGHT)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def test_prepare_batch_flips_the_drawn_images_deterministically():
    from spo.models.family import native_resolution
    from spo.models.loading import load_pipeline
    from spo.images import flip_draws
    from spo.train.dpo_recipe import prepare_batch

    pipe = load_pipeline("toy:sd15")
    side = native_resolution(pipe)  # no resize, so flipping before or after decoding gives the same pixels
    items = [(f"caption {i}", _jpeg(2 * i, side), _jpeg(2 * i + 1, side)) for i in range(4)]
    off = build_config("dpo-toy-sd15", overrides={"train_micro_batch": 2}, cls=DPOConfig)
    on = build_config("dpo-toy-sd15", overrides={"train_micro_batch": 3, "hflip": True}, cls=DPOConfig)
    gens = lambda: item_generators(0, 0, list(range(4)))  # noqa: E731
    a, b = prepare_batch(pipe, items, gens(), on), prepare_batch(pipe, items, gens(), on)
    assert torch.equal(a.latents_w, b.latents_w) and torch.equal(a.latents_l, b.latents_l)
    assert torch.equal(a.noise, b.noise) and torch.equal(a.timesteps, b.timesteps)
    # by hand: mirror the images the coins chose, then the flip-free path with the generators past the coins
    flips = flip_draws(gens())
    assert bool(flips.any()) and not bool(flips.all())
    mirrored = [(c, _mirror(w) if flips[i] else w, _mirror(l) if flips[4 + i] else l)
                for i, (c, w, l) in enumerate(items)]
    past = gens()
    for g in past:
        torch.rand(2, generator=g)
    by_hand = prepare_batch(pipe, mirrored, past, off)
    torch.testing.assert_close(by_hand.latents_w, a.latents_w, atol=1e-5, rtol=0)
    torch.testing.assert_close(by_hand.latents_l, a.latents_l, atol=1e-5, rtol=0)
    assert torch.equal(by_hand.timesteps, a.timesteps) and torch.equal(by_hand.noise, a.noise)
