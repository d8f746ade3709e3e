"""The Diffusion-DPO baseline on the real toy pipelines: loss and gradients against a re-implementation written
straight from the paper's formula, a tiny training run, resume mid-epoch, bad input on the command line."""

import copy
import io
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from spo.data.pickapic import write_pairs
from spo.errors import SpoInputError
from spo.losses import diffusion_dpo_loss
from spo.models.loading import load_pipeline
from spo.train import dpo_recipe
from spo.train.config import DPOConfig, build_config, to_dict
from spo.train.dpo_data import load_pairs
from spo.train.dpo_recipe import pair_losses, prepare_batch, train_dpo
from spo.train.finetune import add_lora, reference_model
from spo.train.finetune import item_generators as _generators

pytestmark = pytest.mark.slow  # integration: real training runs or subprocess chains

torch.set_flush_denormal(True)


def _jpeg(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def _write_pairs(path, n=12, ties_every=4, seed=0):
    """Bright images win over dark ones; label order alternates; every `ties_every`-th pair is a tie."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        bright = _jpeg(rng.integers(150, 256, (32, 32, 3), dtype=np.uint8))
        dark = _jpeg(rng.integers(0, 100, (32, 32, 3), dtype=np.uint8))
        if ties_every and i % ties_every == ties_every - 1:
            l0 = 0.5
        else:
            l0 = float(i % 2)
        first, second = (bright, dark) if l0 == 1.0 else (dark, bright)
        rows.append(dict(caption=f"a small red circle on a white background, number {i}", jpg_0=first, jpg_1=second,
                         label_0=l0, label_1=1.0 - l0))
    write_pairs(path, rows)
    return path



def _interrupt_after(monkeypatch, batches: int):
    """Make DPO raise KeyboardInterrupt at its (batches + 1)-th train batch; returns the real method."""
    calls = {"n": 0}
    real = dpo_recipe.DPOMethod.train_batch

    def interrupt(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == batches + 1:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(dpo_recipe.DPOMethod, "train_batch", interrupt)
    return real

def test_pure_loss():
    e = torch.tensor([0.3, 0.2])
    torch.testing.assert_close(diffusion_dpo_loss(e, e, e, e, 5000.0), torch.full((2,), math.log(2)))
    # the model denoises the winner better than the reference by 1e-3 (and the loser as well as it): margin 2.5
    loss = diffusion_dpo_loss(torch.tensor([0.299]), torch.tensor([0.2]), torch.tensor([0.3]), torch.tensor([0.2]), 5000.0)
    torch.testing.assert_close(loss, torch.tensor([math.log1p(math.exp(-2.5))]))


def _paper_losses(policy, reference, pipe, batch, beta):
    """Diffusion-DPO written directly from the paper, one pair and one image per forward (no batching tricks)."""
    ab = pipe.scheduler.alphas_cumprod
    losses = []
    for i in range(len(batch)):
        t = batch.timesteps[i: i + 1]
        a = ab[t].view(1, 1, 1, 1)
        eps = batch.noise[i: i + 1]
        err = {}
        for side, x0 in (("w", batch.latents_w[i: i + 1]), ("l", batch.latents_l[i: i + 1])):
            x_t = torch.sqrt(a) * x0 + torch.sqrt(1 - a) * eps
            for name, model in (("theta", policy), ("ref", reference)):
                pred = model(x_t, t, **batch.cond.index(slice(i, i + 1)).unet_kwargs()).sample
                err[name, side] = ((pred - eps) ** 2).mean()
        inside = -beta / 2 * ((err["theta", "w"] - err["ref", "w"]) - (err["theta", "l"] - err["ref", "l"]))
        losses.append(-torch.nn.functional.logsigmoid(inside))
    return torch.stack(losses)


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_loss_and_lora_gradients_match_the_paper(family, tmp_path):
    pipe = load_pipeline(f"toy:{family}")
    cfg = build_config(f"dpo-toy-{family}", overrides=dict(train_micro_batch=2, caption_dropout=0.5), cls=DPOConfig)
    items = load_pairs([str(_write_pairs(tmp_path / "p.parquet", n=4, ties_every=0))], 0, log=lambda *_: None)
    batch = prepare_batch(pipe, items, _generators(0, 0, list(range(len(items)))), cfg)
    # the pair's generators decide everything: the same batch again, and one pair alone, give the same draws
    again = prepare_batch(pipe, items[1:2], _generators(0, 0, [1]), cfg)
    torch.testing.assert_close(again.noise[0], batch.noise[1])
    torch.testing.assert_close(again.latents_l[0], batch.latents_l[1])
    assert torch.equal(again.timesteps[0], batch.timesteps[1])

    unet = pipe.unet
    add_lora(unet, cfg)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # move off the identity so the model and the reference differ
        for name, p in unet.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * (0.01 if "lora_B" in name else 0.5))
    params = {n: p for n, p in unet.named_parameters() if p.requires_grad}
    beta = 200.0  # keeps the sigmoid off its flat ends for these perturbations, so the gradients are not ~0
    out = pair_losses(unet, lambda: reference_model(unet, None), batch, pipe.scheduler.alphas_cumprod, beta)
    out["losses"].sum().backward()
    ours = {n: p.grad.clone() for n, p in params.items()}
    for p in params.values():
        p.grad = None

    reference = copy.deepcopy(unet)
    reference.disable_adapters()
    reference.requires_grad_(False)
    expected = _paper_losses(unet, reference, pipe, batch, beta)
    expected.sum().backward()
    torch.testing.assert_close(out["losses"], expected, atol=1e-5, rtol=1e-5)
    for n, p in params.items():
        torch.testing.assert_close(ours[n], p.grad, atol=1e-5, rtol=1e-4)
    assert any(ours[n].abs().sum() > 0 for n in params)
    assert not torch.allclose(out["losses"], torch.full_like(out["losses"], math.log(2)), atol=1e-3)


TINY = dict(train_batch_size=2, train_micro_batch=1, validation_images=0, report_to="none", keep_checkpoints=10)


def test_training_moves_the_lora_and_resumes_mid_epoch_exactly(tmp_path, monkeypatch):
    data = str(_write_pairs(tmp_path / "pairs.parquet"))  # 12 rows, 3 ties -> 9 pairs -> 4 batches of 2 per epoch
    full = train_dpo(build_config("dpo-toy-sd15", overrides=dict(TINY, data=[data], epochs=2, validation_images=1,
                                                                 output_dir=str(tmp_path / "a")), cls=DPOConfig),
                     log=lambda *_: None)
    out = tmp_path / "a"
    for artefact in ("lora/pytorch_lora_weights.safetensors", "lora-epoch-001/pytorch_lora_weights.safetensors",
                     "lora-epoch-002/training_summary.json", "dpo_sd15_webui.safetensors", "history.json",
                     "samples/epoch-000.png", "samples/epoch-002.png"):
        assert (out / artefact).is_file(), artefact
    assert full["pairs"] == 9 and full["steps"] == 8 and len(full["history"]) == 8
    first, last = full["history"][0], full["history"][-1]
    assert {"loss", "implicit_acc", "reward_margin", "reward_win", "reward_lose", "mse_model", "mse_ref"} <= set(first)
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)  # LoRA B starts at zero: the model is the reference
    assert last["reward_margin"] > 0 and math.isfinite(last["loss"])
    lora = load_file(full["lora"])
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in lora.items())  # the LoRA moved

    # Interrupt the second run in epoch 2 after its first batch, then resume: same LoRA, bit for bit.
    real = _interrupt_after(monkeypatch, 5)
    cfg_b = dict(TINY, data=[data], epochs=2, checkpoint_every_batches=1, output_dir=str(tmp_path / "b"))
    with pytest.raises(KeyboardInterrupt):
        train_dpo(build_config("dpo-toy-sd15", overrides=cfg_b, cls=DPOConfig), log=lambda *_: None)
    monkeypatch.setattr(dpo_recipe.DPOMethod, "train_batch", real)
    with pytest.raises(SpoInputError, match="--resume"):
        train_dpo(build_config("dpo-toy-sd15", overrides=cfg_b, cls=DPOConfig), log=lambda *_: None)
    messages = []
    resumed = train_dpo(build_config("dpo-toy-sd15", overrides=dict(cfg_b, resume=True), cls=DPOConfig),
                        log=messages.append)
    assert any("epoch 1, batch 1" in m for m in messages), messages
    a, b = load_file(full["lora"]), load_file(resumed["lora"])
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=0, rtol=0)


def test_dpo_config():
    cfg = build_config("dpo-sd15", cls=DPOConfig)
    # the official launchers: beta 5000, lr 1e-8 per pair scaled by the 2048 pairs of an optimizer step
    assert (cfg.dpo_beta, cfg.learning_rate, cfg.scale_lr, cfg.full_finetune) == (5000.0, 1e-8, True, True)
    assert (cfg.global_batch_size, cfg.hflip, cfg.optimizer, cfg.lr_warmup_steps) == (2048, True, "adamw", 500)
    xl = build_config("dpo-sdxl", cls=DPOConfig)
    assert (xl.dpo_beta, xl.optimizer, xl.lr_warmup_steps, xl.hflip) == (5000.0, "adafactor", 200, True)
    assert "k" not in to_dict(cfg) and "dpo_beta" in to_dict(cfg)
    with pytest.raises(SpoInputError, match="unknown key 'threshold'"):  # SPO-only settings do not apply
        build_config(overrides={"threshold": 0.3}, cls=DPOConfig)
    with pytest.raises(SpoInputError, match="caption_dropout"):
        build_config(overrides={"caption_dropout": "1.0"}, cls=DPOConfig)
    with pytest.raises(SpoInputError, match="unknown preset"):
        build_config("toy-sd15", cls=DPOConfig)
    assert build_config(overrides={"data": "a.parquet,b.parquet"}, cls=DPOConfig).data == ["a.parquet", "b.parquet"]


def _spo(*args, cwd):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "spo", "dpo", *args, "--report-to", "none"], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_bad_input_is_a_one_line_error(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"prompt": ["x"], "image": [b"y"]}), tmp_path / "wrong.parquet")
    _write_pairs(tmp_path / "ties.parquet", n=3, ties_every=1)
    cases = {("--data", "missing.parquet"): "does not exist",
             ("--data", "wrong.parquet"): "lacks required column",
             ("--data", "ties.parquet"): "are ties",
             ("--base", str(tmp_path / "my_model")): "no preference pairs given",
             ("--data", "ties.parquet", "--dpo-beta", "0"): "dpo_beta must be positive"}
    for args, message in cases.items():
        result = _spo(*args, "--output-dir", str(tmp_path / "out"), cwd=tmp_path)
        errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
        assert result.returncode == 2, (args, result.stderr[-1000:])
        assert len(errors) == 1 and errors[0].startswith("spo dpo: error:") and message in errors[0], (args, errors)
        assert "Traceback" not in result.stderr


def test_a_set_larger_than_the_buffer_is_streamed_in_block_order_and_resumes_exactly(tmp_path, monkeypatch):
    from spo.data.pickapic import read_pairs
    from spo.train.dpo_data import StreamedItems

    pairs, _ = read_pairs(_write_pairs(tmp_path / "one.parquet"))
    pairs[4].image_0 = b"not a jpeg"  # a decided pair whose image is found bad only when its window is read
    data = str(write_pairs(tmp_path / "groups.parquet", pairs, rows_per_group=2))
    in_memory = load_pairs([data], 0, log=lambda *_: None)
    streamed = load_pairs([data], 0, log=lambda *_: None, buffer_bytes=1500)
    assert isinstance(in_memory, list) and isinstance(streamed, StreamedItems)
    assert len(in_memory) == 8 and len(streamed) == 9  # the bad row is not known yet
    order = streamed.order(5, 0)
    assert sorted(order.tolist()) == list(range(9)) and not torch.equal(order, streamed.order(5, 1))
    seen = [streamed[int(i)] for i in streamed.order(5, 0)]
    assert set(seen) == set(in_memory) and len(seen) == 9  # the bad row stood in for by a readable one
    assert streamed.index.summary.skipped == {"undecodable image": 1}
    seen = [streamed[int(i)] for i in streamed.order(5, 1)]  # the next epoch meets the bad row again
    assert set(seen) == set(in_memory) and streamed.index.summary.skipped == {"undecodable image": 1}  # counted once
    from spo.data.stream import Filters

    flagged = write_pairs(tmp_path / "flagged.parquet", [dict(p.to_row(), are_different=i != 0)
                                                          for i, p in enumerate(pairs)])
    kept = load_pairs([str(flagged)], 0, log=lambda *_: None, filters=Filters(drop_same=True))
    assert len(kept) == 7 and in_memory[0] not in kept  # pair 0 (not a tie) is left out on request

    cfg = dict(TINY, data=[data], epochs=2, shuffle_buffer_mb=1500 / 2**20, checkpoint_every_batches=1)
    full = train_dpo(build_config("dpo-toy-sd15", overrides=dict(cfg, output_dir=str(tmp_path / "a")), cls=DPOConfig),
                     log=lambda *_: None)
    assert full["pairs"] == 9 and full["steps"] == 8
    real = _interrupt_after(monkeypatch, 5)
    with pytest.raises(KeyboardInterrupt):
        train_dpo(build_config("dpo-toy-sd15", overrides=dict(cfg, output_dir=str(tmp_path / "b")), cls=DPOConfig),
                  log=lambda *_: None)
    monkeypatch.setattr(dpo_recipe.DPOMethod, "train_batch", real)
    resumed = train_dpo(build_config("dpo-toy-sd15", overrides=dict(cfg, output_dir=str(tmp_path / "b"), resume=True),
                                     cls=DPOConfig), log=lambda *_: None)
    a, b = load_file(full["lora"]), load_file(resumed["lora"])
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=0, rtol=0)
