"""Diffusion-DPO (Wallace et al. 2023, arXiv 2311.12908): the main baseline, on offline Pick-a-Pic-schema pairs.

For each pair (winner w, loser l; ties dropped): both images -> VAE latents; one t ~ U[0, T) and one noise shared
by the two; the UNet's prediction from the trained model and the frozen reference (the UNet, adapters disabled);
err = per-sample MSE against the model's own target (noise; v = sqrt(a) eps - sqrt(1 - a) x0 for v-prediction);
loss = -log sigmoid(-beta/2 * [(err_theta(w) - err_ref(w)) - (err_theta(l) - err_ref(l))])
(spo.losses.diffusion_dpo_loss). One label is thus spread over every timestep of the pair, which is what SPO
replaces with step-wise judgements.

The loop, checkpoints and outputs are the engine's and spo.train.finetune's. Every random draw of a pair (VAE
posterior sample, t, noise, caption dropout) comes from a generator seeded by (seed, epoch, position of the
pair), and the data order is a pure function of (seed, epoch), so a resumed run, or N processes with batch B,
give the uninterrupted, one-process-with-N*B result.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import torch

from spo.ddim import add_noise, velocity
from spo.errors import SpoInputError
from spo.losses import diffusion_dpo_loss
from spo.models.family import Conditioning, encode, family_of
from spo.train.config import DPOConfig, describe_batch, for_processes
from spo.train.engine import Run, fit, open_run
from spo.train.dpo_data import data_options, load_pairs
from spo.train.finetune import FinetuneMethod, item_generators, load_dtype, setup_unet, validation_prompts

PAIRS_FROM_SOURCE = 512  # pairs made from a built-in base's samples when no --data is given
PAIRS_FILE = "toy_pairs.parquet"


# ---------------------------------------------------------------------------------------------- data
def make_source_pairs(pipe, cfg: DPOConfig, out: Path, log=print) -> list[str]:
    """--data for a built-in base: pairs sampled from the base model and labelled by its rater, made once."""
    from spo.sources import get

    target = out / PAIRS_FILE
    if not target.is_file():
        from spo.data.pickapic import write_pairs

        log(f"no --data given: making {PAIRS_FROM_SOURCE} preference pairs from {cfg.base} samples -> {target} "
            f"(once; later runs in this folder reuse them)")
        write_pairs(target, get(cfg.base).make_pairs(pipe, PAIRS_FROM_SOURCE, cfg.seed))
    return [str(target)]


@dataclass
class DPOBatch:
    """One batch of pairs ready for the UNet: clean latents, shared noise and t, conditioning."""

    latents_w: torch.Tensor
    latents_l: torch.Tensor
    noise: torch.Tensor
    timesteps: torch.Tensor
    cond: Conditioning

    def __len__(self) -> int:
        return self.latents_w.shape[0]

    def chunk(self, start: int, stop: int) -> "DPOBatch":
        s = slice(start, stop)
        return DPOBatch(self.latents_w[s], self.latents_l[s], self.noise[s], self.timesteps[s], self.cond.index(s))


@torch.no_grad()
def prepare_batch(pipe, items: list[tuple[str, bytes, bytes]], generators: list[torch.Generator], cfg: DPOConfig,
                  autocast=contextlib.nullcontext) -> DPOBatch:
    """VAE posterior samples of both images, then t, noise and caption dropout: all from each pair's generator."""
    import io

    from PIL import Image

    from spo.models.family import native_resolution
    from spo.models.vae import encode as vae_encode
    from spo.images import flip_draws, flip_images, images_to_tensor

    side = native_resolution(pipe)
    device = pipe.unet.device
    latents_w, latents_l = [], []
    micro = cfg.train_micro_batch
    for s in range(0, len(items), micro):  # VAE memory at full resolution; results do not depend on `micro`
        part, gens = items[s: s + micro], generators[s: s + micro]
        images = images_to_tensor([Image.open(io.BytesIO(b)).convert("RGB") for _, b, _ in part]
                                  + [Image.open(io.BytesIO(b)).convert("RGB") for _, _, b in part], side)
        if cfg.hflip:  # drawn first, and only when on: without it every other draw is as before
            images = flip_images(images, flip_draws(gens))
        with autocast():
            # a list of generators draws one sample per image in order: each pair's generator serves w, then l
            lat = vae_encode(pipe.vae, images, gens + gens).float()
        latents_w.append(lat[: len(part)])
        latents_l.append(lat[len(part):])
    x_w, x_l = torch.cat(latents_w), torch.cat(latents_l)
    num_train = pipe.scheduler.config.num_train_timesteps
    t = torch.cat([torch.randint(0, num_train, (1,), generator=g) for g in generators]).to(device)
    noise = torch.stack([torch.randn(x_w.shape[1:], generator=g) for g in generators]).to(device)
    drop = torch.cat([torch.rand(1, generator=g) for g in generators]) < cfg.caption_dropout
    captions = ["" if d else caption for d, (caption, _, _) in zip(drop.tolist(), items)]
    with autocast():
        cond = encode(pipe, captions)
    return DPOBatch(x_w, x_l, noise, t, cond)


# ---------------------------------------------------------------------------------------------- math
def noise_errors(unet, batch: DPOBatch, alphas_cumprod: torch.Tensor, weight_dtype=torch.float32,
                 prediction_type: str = "epsilon") -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample MSE of the model's prediction against its target (noise, or v for v-prediction) for the winners
    and the losers (one UNet batch for both)."""
    a = alphas_cumprod[batch.timesteps].float().view(-1, 1, 1, 1)
    x0, noise = torch.cat([batch.latents_w, batch.latents_l]), torch.cat([batch.noise, batch.noise])
    noisy = add_noise(x0, noise, torch.cat([a, a]))
    pred = unet(noisy.to(weight_dtype), torch.cat([batch.timesteps, batch.timesteps]),
                **batch.cond.cat(batch.cond).unet_kwargs()).sample.float()
    target = noise if prediction_type == "epsilon" else velocity(x0, noise, torch.cat([a, a]))
    err = (pred - target).pow(2).mean(dim=(1, 2, 3))
    return err.chunk(2)


def pair_losses(unet, reference, batch: DPOBatch, alphas_cumprod: torch.Tensor, beta: float, weight_dtype=torch.float32,
                autocast=contextlib.nullcontext, prediction_type: str = "epsilon") -> dict[str, torch.Tensor]:
    """Diffusion-DPO loss per pair with gradients through `unet`; `reference()` is a context giving the frozen model."""
    with torch.no_grad(), autocast(), reference() as ref:
        ref_w, ref_l = noise_errors(ref, batch, alphas_cumprod, weight_dtype, prediction_type)
    with autocast():
        err_w, err_l = noise_errors(unet, batch, alphas_cumprod, weight_dtype, prediction_type)
    losses = diffusion_dpo_loss(err_w, err_l, ref_w, ref_l, beta)
    return {"losses": losses, "err_w": err_w, "err_l": err_l, "ref_w": ref_w, "ref_l": ref_l}


def batch_stats(v: dict[str, torch.Tensor], beta: float) -> dict:
    """Implicit rewards r(x) = -beta/2 (err_theta(x) - err_ref(x)); the loss is -log sigmoid(r(w) - r(l))."""
    reward_w = -0.5 * beta * (v["err_w"] - v["ref_w"])
    reward_l = -0.5 * beta * (v["err_l"] - v["ref_l"])
    margin = reward_w - reward_l
    return {"loss": float(v["losses"].mean()), "pairs": len(v["losses"]),
            "implicit_acc": float((margin > 0).float().mean()), "reward_margin": float(margin.mean()),
            "reward_win": float(reward_w.mean()), "reward_lose": float(reward_l.mean()),
            "mse_model": float(torch.cat([v["err_w"], v["err_l"]]).mean()),
            "mse_ref": float(torch.cat([v["ref_w"], v["ref_l"]]).mean())}


# -------------------------------------------------------------------------------------------- the method
class DPOMethod(FinetuneMethod):
    name, title = "dpo", "Diffusion-DPO"

    def __init__(self, cfg: DPOConfig, pipe, family, frozen_copy, items, world: int, rank: int):
        captions = [c for c, _, _ in items] if isinstance(items, list) else items.captions()
        super().__init__(cfg, pipe, family, frozen_copy, validation_prompts(cfg, captions))
        self.items, self.world, self.rank = items, world, rank
        self.alphas_cumprod = pipe.scheduler.alphas_cumprod.to(pipe.unet.device)
        self.prediction_type = pipe.scheduler.config.prediction_type  # resolved (and checked) by load_pipeline

    def batches_per_epoch(self) -> int:
        # Full batches only (the official trainer drops the last one too): every process always has a full share.
        return len(self.items) // (self.cfg.train_batch_size * self.world)

    def order(self, n: int, epoch: int) -> torch.Tensor:
        """In memory: the trainer's shuffle; streamed (spo.train.dpo_data): the stream's block shuffle."""
        return super().order(n, epoch) if isinstance(self.items, list) else self.items.order(self.cfg.seed, epoch)

    def train_batch(self, run: Run, sync_now: bool) -> dict:
        """Backward of sum(pair losses) / (train_batch_size * accumulation) in micro-batches, all-reduced once.

        Every process has a full batch, and DDP averages over processes, so the update is the mean over the
        effective batch (train_batch_size x processes x accumulation), whatever the micro-batch size.
        """
        cfg, p = self.cfg, run.progress
        lo = p.batch * cfg.train_batch_size * self.world + self.rank * cfg.train_batch_size
        positions = self.order(len(self.items), p.epoch)[lo: lo + cfg.train_batch_size].tolist()
        batch = prepare_batch(self.pipe, [self.items[i] for i in positions],
                              item_generators(cfg.seed, p.epoch, positions), cfg, run.accelerator.autocast)
        run.fire("batch_ready")
        run.module.train()
        scale = 1.0 / (cfg.train_batch_size * cfg.gradient_accumulation_steps)
        parts: dict[str, list[torch.Tensor]] = {}
        starts = list(range(0, len(batch), cfg.train_micro_batch))
        for s in starts:
            with run.no_sync(s == starts[-1], sync_now):
                out = pair_losses(run.module, self.reference(run), batch.chunk(s, s + cfg.train_micro_batch),
                                  self.alphas_cumprod, cfg.dpo_beta, self.dtype, run.accelerator.autocast,
                                  self.prediction_type)
                run.accelerator.backward(out["losses"].sum() * scale)
            for k, v in out.items():
                parts.setdefault(k, []).append(v.detach())
        return batch_stats({k: torch.cat(x) for k, x in parts.items()}, cfg.dpo_beta)

    def postfix(self, stats: dict) -> dict:
        return {"loss": f"{stats['loss']:.4f}", "acc": f"{stats['implicit_acc']:.2f}"}

    def summary(self, run: Run) -> dict:
        return {**super().summary(run), "pairs": len(self.items)}

    def finish(self, run: Run) -> dict:
        return {**super().finish(run), "pairs": len(self.items)}


# --------------------------------------------------------------------------------------------- train
def train_dpo(cfg: DPOConfig, log=print) -> dict:
    """Run Diffusion-DPO with `cfg`; the artefacts are those of SPO's (spo.train.finetune)."""
    from accelerate.utils import set_seed

    from spo.models.loading import load_pipeline
    from spo.sources import get

    if not cfg.data and get(cfg.base) is None:
        raise SpoInputError("no preference pairs given: pass --data PARQUET... (Pick-a-Pic schema: caption, jpg_0, "
                            "jpg_1, label_0, label_1)")
    run = open_run(cfg, "dpo", log)
    with run:
        cfg = run.cfg = for_processes(cfg, run.accelerator.num_processes)  # before anything reads the batch or lr
        items = load_pairs(cfg.data, cfg.max_pairs, log, *data_options(cfg)) if cfg.data else None  # before the model: fails in a second
        set_seed(cfg.seed)
        pipe = load_pipeline(cfg.base, dtype=load_dtype(cfg), vae=cfg.vae, prediction_type=cfg.prediction_type)
        family = family_of(pipe)
        run.create_output_dir()
        if items is None:
            pipe.to(run.device)
            if run.is_main:
                make_source_pairs(pipe, cfg, run.out, log)
            run.accelerator.wait_for_everyone()
            items = load_pairs([str(run.out / PAIRS_FILE)], cfg.max_pairs, log, *data_options(cfg))
        unet, frozen_copy, params = setup_unet(pipe, cfg, family, run.device)
        method = DPOMethod(cfg, pipe, family, frozen_copy, items, run.accelerator.num_processes,
                           run.accelerator.process_index)
        if method.batches_per_epoch() == 0:
            raise SpoInputError(f"{len(items)} non-tie pairs are fewer than one batch of "
                                f"{cfg.train_batch_size * method.world} (train_batch_size {cfg.train_batch_size} x "
                                f"{method.world} processes)")
        run.attach(unet, params, total_steps=cfg.epochs * method.batches_per_epoch() // cfg.gradient_accumulation_steps)
        log(f"Diffusion-DPO on {len(items)} pairs: {method.batches_per_epoch()} batches of "
            f"{cfg.train_batch_size * method.world} per epoch, {cfg.epochs} epochs, beta {cfg.dpo_beta:g}, "
            f"lr {cfg.learning_rate:g}, {'full fine-tuning' if cfg.full_finetune else 'LoRA'}")
        log(describe_batch(cfg, method.world))
        fit(run, method)
        return method.finish(run)
