"""`spo toy build`: train the tiny base models from scratch on toy-world renders.

One VAE (shared architecture, trained once; then its decoder alone is fine-tuned, as SD's ft-MSE VAE was,
which keeps the latent space), then per family a UNet trained jointly with its text encoder(s) on epsilon
prediction (or velocity prediction, as SD 2.x-v and several SDXL-family models are) with min-SNR weighting
and an EMA of the weights, with 10 % caption dropout so classifier-free guidance works. `continue_from`
resumes all of this from an earlier build (same latent space: the encoder is frozen), so a longer budget need
not start over; continuing an epsilon build with v_prediction converts it, as SD 2.0-v was made from SD 2.0.
Weights are stored in fp16 to keep the repository small; configs say float32, so they load as fp32.
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from spo.ddim import add_noise, velocity
from spo.errors import SpoInputError
from spo.images import images_to_tensor
from spo.models.family import encode, trainable_text_encoders
from spo.toy.defaults import MODELS as DEFAULT_BUDGET, TOY_MODEL_DIR
from spo.toy.models import fresh_pipeline
from spo.toy.render import render_dataset

SNR_GAMMA = 5.0  # min-SNR-gamma loss weighting (Hang et al. 2023): converges ~3x faster than plain epsilon MSE
EMA_DECAY = 0.999


def one_cycle(opt: torch.optim.Optimizer, max_lr: float, steps: int):
    """OneCycleLR with a 5 % warm-up, at least 3 steps of it (at most 40 %): torch's schedule divides by zero
    when the warm-up phase is exactly one step long (e.g. 20 steps at 5 %)."""
    return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=max_lr, total_steps=steps,
                                               pct_start=min(0.4, max(0.05, 3.0 / steps)))


def train_vae(vae, pixels: torch.Tensor, steps: int, batch: int, seed: int) -> torch.Tensor:
    """Reconstruction + a small KL term; returns the (unscaled) posterior-mean latents of `pixels`."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    vae.train()
    for _ in tqdm(range(steps), desc="vae", unit="step"):
        idx = torch.randint(0, len(pixels), (batch,), generator=g)
        x = pixels[idx]
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=g)
        recon = vae.decode(z).sample
        loss = F.mse_loss(recon, x) + 1e-6 * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    vae.eval()
    with torch.no_grad():
        return _encode(vae, pixels)


def image_gradients(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return x[..., 1:, :] - x[..., :-1, :], x[..., :, 1:] - x[..., :, :-1]


def sharp_loss(recon: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """MSE + L1 + L1 of the image gradients. World 2's detail is a 4-pixel weave and a soft shadow: a plain-MSE
    autoencoder this small averages the weave away (measured: 8 latent channels kept it only with this loss)."""
    (ry, rx), (gy, gx) = image_gradients(recon), image_gradients(x)
    return F.mse_loss(recon, x) + 0.5 * F.l1_loss(recon, x) + 0.5 * (F.l1_loss(ry, gy) + F.l1_loss(rx, gx))


def train_sharp_vae(vae, pixels: torch.Tensor, steps: int, batch: int, seed: int, lr: float = 1e-3) -> torch.Tensor:
    """World 2's VAE: the posterior mean decoded (no sampling, as SD's VAE is used at inference), `sharp_loss`, a
    small pull of the latents toward 0 in place of the KL term, a one-cycle schedule; returns the latents of `pixels`."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    sched = one_cycle(opt, lr, steps)
    vae.train()
    for _ in tqdm(range(steps), desc="vae", unit="step"):
        x = pixels[torch.randint(0, len(pixels), (batch,), generator=g)]
        z = vae.encode(x).latent_dist.mean
        loss = sharp_loss(vae.decode(z).sample, x) + 1e-7 * z.pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    vae.eval()
    pin_posterior(vae)
    with torch.no_grad():
        return _encode(vae, pixels)


PINNED_LOGVAR = -14.0  # posterior std e^-7 ~ 1e-3 of unit-scale latents, about as narrow as SD's VAE's


@torch.no_grad()
def pin_posterior(vae) -> None:
    """Make the posterior as narrow as SD's: its variance head is never trained when the mean alone is decoded
    (it stays at its initial log-variance ~0, a std as large as the latents themselves), yet diffusers' img2img,
    Diffusion-DPO and SPM training draw posterior samples, which would then be noisy copies of the means the UNet
    learned (measured: round trip 22.4 dB PSNR from the mean, 17.7 dB from a sample)."""
    half = vae.quant_conv.out_channels // 2  # moments = (mean, logvar) along the channels
    vae.quant_conv.weight[half:] = 0.0
    vae.quant_conv.bias[half:] = PINNED_LOGVAR


def flat_loss(recon: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    # L1 next to MSE: flat colour areas and hard edges matter more in the first world than the (unlearnable) grain.
    return F.mse_loss(recon, x) + 0.5 * F.l1_loss(recon, x)


def finetune_decoder(vae, latents: torch.Tensor, pixels: torch.Tensor, steps: int, batch: int, seed: int,
                     loss_fn=flat_loss) -> None:
    """Decoder-only fine-tuning on fixed (unscaled) latents: sharper, truer colours, same latent space."""
    g = torch.Generator().manual_seed(seed + 1)
    params = list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters())
    opt = torch.optim.AdamW(params, lr=2e-3, weight_decay=0.0)
    sched = one_cycle(opt, 2e-3, steps)
    vae.train()
    for _ in tqdm(range(steps), desc="vae decoder", unit="step"):
        idx = torch.randint(0, len(pixels), (batch,), generator=g)
        loss = loss_fn(vae.decode(latents[idx]).sample, pixels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    vae.eval()


def train_denoiser(pipe, latents: torch.Tensor, captions: list[str], steps: int, batch: int, seed: int, lr: float = 1e-3,
                   prediction_type: str = "epsilon"):
    from diffusers.training_utils import EMAModel, compute_snr

    g = torch.Generator().manual_seed(seed)
    params = list(pipe.unet.parameters()) + [p for m in trainable_text_encoders(pipe) for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    ema = EMAModel(params, decay=EMA_DECAY)
    sched = one_cycle(opt, lr, steps)
    noise_sched = pipe.scheduler
    alphas = noise_sched.alphas_cumprod
    for m in [pipe.unet, *trainable_text_encoders(pipe)]:
        m.train()
    bar = tqdm(range(steps), desc="unet", unit="step")
    for _ in bar:
        idx = torch.randint(0, len(latents), (batch,), generator=g)
        z0 = latents[idx]
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (batch,), generator=g)
        noise = torch.randn(z0.shape, generator=g)
        a = alphas[t].view(-1, 1, 1, 1)
        zt = add_noise(z0, noise, a)
        prompts = [captions[i] for i in idx.tolist()]
        drop = torch.rand(batch, generator=g) < 0.1
        cond = encode(pipe, prompts)
        if drop.any():
            uncond = encode(pipe, prompts, negative=True)
            m = drop.view(-1, 1, 1)
            cond.encoder_hidden_states = torch.where(m, uncond.encoder_hidden_states, cond.encoder_hidden_states)
            if cond.added_cond_kwargs is not None:
                cond.added_cond_kwargs["text_embeds"] = torch.where(
                    drop.view(-1, 1), uncond.added_cond_kwargs["text_embeds"], cond.added_cond_kwargs["text_embeds"])
        pred = pipe.unet(zt, t, **cond.unet_kwargs()).sample
        snr = compute_snr(noise_sched, t)
        if prediction_type == "v_prediction":  # min-SNR weights for a velocity target: min(snr, gamma) / (snr + 1)
            target, weight = velocity(z0, noise, a), torch.clamp(snr, max=SNR_GAMMA) / (snr + 1)
        else:
            target, weight = noise, torch.clamp(snr, max=SNR_GAMMA) / snr
        loss = (weight * F.mse_loss(pred, target, reduction="none").mean(dim=(1, 2, 3))).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        ema.step(params)
        bar.set_postfix(loss=f"{loss.item():.4f}")
    ema.copy_to(params)
    for m in [pipe.unet, *trainable_text_encoders(pipe)]:
        m.eval()


def build(out_dir: Path = TOY_MODEL_DIR, families=("sd15", "sdxl"), n_images: int = DEFAULT_BUDGET["n_images"],
          vae_steps: int = DEFAULT_BUDGET["vae_steps"], unet_steps: int = DEFAULT_BUDGET["unet_steps"],
          batch: int = DEFAULT_BUDGET["batch"], seed: int = 0, decoder_steps: int = DEFAULT_BUDGET["decoder_steps"],
          continue_from: Path | None = None, prediction_type: str | None = None, world: int | None = None) -> dict:
    """Train (or, with `continue_from`, keep training) the toy pipelines; returns the build record.

    `prediction_type` (epsilon, v_prediction): what the UNet is trained to predict; None keeps the continued
    build's (epsilon for a fresh one). `world` (1, 2): which toy world the models learn (`spo.toy.detail`: world 2
    adds fine detail), with its architecture (`models.ARCHITECTURES`); None keeps the continued build's (2 fresh).

    `build_info.json` keeps one entry per stage in `history`, so a model continued over several sessions
    still says exactly what it took and on what machine.
    """
    from spo.io import atomic_dir, write_json

    torch.manual_seed(seed)
    torch.set_flush_denormal(True)  # tiny weights decay into denormals; on CPU those make steps 5-10x slower
    started = time.time()
    before = json.loads((Path(continue_from) / families[0] / "build_info.json").read_text()) if continue_from else {}
    world = world or (before.get("world", 1) if continue_from else 2)  # a fresh build: the shipped world
    if continue_from is not None and world != before.get("world", 1):
        raise SpoInputError(f"{continue_from} holds toy world {before.get('world', 1)} models; "
                            f"they cannot be continued as world {world}")
    data = render_dataset(n_images, seed=seed, split="train", details=world >= 2)
    captions = [s.caption for s, _, _ in data]
    pixels = images_to_tensor([im for _, _, im in data])
    info = {"seed": seed, "world": world, "n_images": n_images, "vae_steps": 0 if continue_from else vae_steps,
            "decoder_steps": decoder_steps, "unet_steps": unet_steps, "batch": batch,
            "snr_gamma": SNR_GAMMA, "ema_decay": EMA_DECAY,
            "machine": f"{platform.machine()} {platform.processor() or ''} {torch.get_num_threads()} threads".strip(),
            "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}
    history = []
    if continue_from is not None:
        from spo.toy.sampling import load_toy_pipeline

        continue_from = Path(continue_from)
        pipes = {f: load_toy_pipeline(f, continue_from / f) for f in families}
        history = before.get("history") or [before]
        info["continued_from"] = str(continue_from)
        vae = pipes[families[0]].vae
        with torch.no_grad():
            latents = _encode(vae, pixels)
    else:
        pipes = {f: fresh_pipeline(f, seed, world) for f in families}
        vae = pipes[families[0]].vae
        latents = (train_sharp_vae if world >= 2 else train_vae)(vae, pixels, vae_steps, batch, seed)
        vae.register_to_config(scaling_factor=float(1.0 / latents.std()))  # unit-variance latents, as SD's 0.18215
    if decoder_steps:
        finetune_decoder(vae, latents, pixels, decoder_steps, batch, seed, sharp_loss if world >= 2 else flat_loss)
    latents = latents * vae.config.scaling_factor
    info["vae_seconds"] = round(time.time() - started, 1)
    for family in families:
        t0 = time.time()
        pipe = pipes[family]
        pipe.register_modules(vae=vae)
        ptype = info["prediction_type"] = prediction_type or pipe.scheduler.config.prediction_type
        if unet_steps:
            # A continued stage draws fresh batches and noise: re-using the first stage's seed would replay
            # exactly the samples the model has already seen, in the same order.
            train_denoiser(pipe, latents, captions, unet_steps, batch, seed + len(history), prediction_type=ptype)
        _set_prediction_type(pipe, ptype)
        info[f"{family}_unet_seconds"] = round(time.time() - t0, 1)
        with atomic_dir(Path(out_dir) / family) as tmp:
            pipe.to(torch.float16).save_pretrained(tmp, safe_serialization=True)
            pipe.to(torch.float32)
            _mark_float32(tmp)
            _slim_tokenizers(tmp)
            write_json(tmp / "build_info.json", info)
    info["total_seconds"] = round(time.time() - started, 1)
    info["history"] = [*history, {k: v for k, v in info.items() if k != "history"}]
    for family in families:
        write_json(Path(out_dir) / family / "build_info.json", info)
    return info


def _set_prediction_type(pipe, prediction_type: str) -> None:
    """The scheduler config says what the UNet predicts: how diffusers, A1111 and ComfyUI (and spo) read a model."""
    if pipe.scheduler.config.prediction_type != prediction_type:
        pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, prediction_type=prediction_type)


def _encode(vae, pixels: torch.Tensor) -> torch.Tensor:
    return torch.cat([vae.encode(pixels[i : i + 256]).latent_dist.mean for i in range(0, len(pixels), 256)])


def _mark_float32(folder: Path) -> None:
    """Stored fp16, computed fp32: record float32 in every component config."""
    for cfg in folder.glob("*/config.json"):
        data = json.loads(cfg.read_text())
        for key in ("torch_dtype", "dtype"):
            if key in data:
                data[key] = "float32"
        cfg.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _slim_tokenizers(folder: Path) -> None:
    """Keep the BPE files (1.6 MB) instead of the 3.5 MB tokenizer.json; transformers rebuilds it on load."""
    import shutil

    from spo.tokenizer import ASSET_DIR

    for tok in folder.glob("tokenizer*/"):
        (tok / "tokenizer.json").unlink(missing_ok=True)
        for name in ("vocab.json", "merges.txt"):
            shutil.copyfile(ASSET_DIR / name, tok / name)
