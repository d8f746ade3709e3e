"""The SPO training recipe: config in, LoRA and images out (torchtune-style, one readable loop).

Each iteration: sample a batch of prompts with the step-wise resampler using the current model
(spo.sampling.resampler), then one optimizer step on the kept win/lose transitions with the clipped-ratio
loss (spo.losses.spo_loss). The reference model is the frozen base: with LoRA it is the same UNet with
its adapters disabled, so there is never a second UNet in memory.

Distributed runs (accelerate launch) shard the prompts of each global batch across processes. Every
prompt has its own random generator seeded by (seed, epoch, position), and each process's loss is
normalised by its number of candidate transitions (kept or not), so N processes with batch B give the
same update as one process with batch N*B.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from spo.ddim import ddim_mean, ddim_sigma, gaussian_log_prob, predicted_x0
from spo.errors import SpoInputError
from spo.faults import maybe_fail
from spo.losses import spo_loss
from spo.models.family import Conditioning, encode, family_of, guided_eps
from spo.sampling.resampler import Pairs, sample_pairs, schedule
from spo.train import checkpoint
from spo.train.config import SPOConfig, to_dict


class TrainingDiverged(SpoInputError):
    """A non-finite loss or weight: training stops, the last good checkpoint stays."""


# ---------------------------------------------------------------------------------------------- math
def transition_log_probs(unet, pairs: Pairs, cond: Conditioning, uncond: Conditioning, cfg_scale: float,
                         a_t: torch.Tensor, a_prev: torch.Tensor, eta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(x_{t-1}^w | x_t^w) and log p(x_{t-1}^l | x_t^l) under `unet`'s DDIM Gaussian (CFG applied).

    Pairs from one branching point share their parent, so one forward serves both members of the pair.
    """
    i = pairs.step_index
    at, ap = a_t[i].view(-1, 1, 1, 1), a_prev[i].view(-1, 1, 1, 1)
    sigma = ddim_sigma(at, ap, eta)
    shared = bool(torch.equal(pairs.parent_w, pairs.parent_l))
    parents = pairs.parent_w if shared else torch.cat([pairs.parent_w, pairs.parent_l])
    rows = pairs.row if shared else torch.cat([pairs.row, pairs.row])
    t = pairs.timestep if shared else torch.cat([pairs.timestep, pairs.timestep])
    rep = 1 if shared else 2
    eps = guided_eps(unet, parents, t, cond.index(rows), uncond.index(rows), cfg_scale).float()
    mean = ddim_mean(predicted_x0(parents.float(), eps, at.repeat(rep, 1, 1, 1)), eps, ap.repeat(rep, 1, 1, 1),
                     sigma.repeat(rep, 1, 1, 1))
    mean_w, mean_l = (mean, mean) if shared else mean.chunk(2)
    return gaussian_log_prob(pairs.sample_w.float(), mean_w, sigma), gaussian_log_prob(pairs.sample_l.float(), mean_l, sigma)


def pair_losses(unet, reference, pairs: Pairs, cond: Conditioning, uncond: Conditioning, cfg: SPOConfig,
                a_t: torch.Tensor, a_prev: torch.Tensor, autocast=contextlib.nullcontext):
    """SPO loss per pair, with gradients through `unet`; `reference()` is a context giving the frozen model.

    Returns (losses, logp_w, logp_l, ref_logp_w, ref_logp_l).
    """
    with torch.no_grad(), autocast(), reference() as ref:
        ref_w, ref_l = transition_log_probs(ref, pairs, cond, uncond, cfg.cfg_scale, a_t, a_prev, cfg.eta)
    with autocast():
        logp_w, logp_l = transition_log_probs(unet, pairs, cond, uncond, cfg.cfg_scale, a_t, a_prev, cfg.eta)
    return spo_loss(logp_w, logp_l, ref_w, ref_l, cfg.beta, cfg.clip_eps), logp_w, logp_l, ref_w, ref_l


# ------------------------------------------------------------------------------------------ the model
def add_lora(unet, cfg: SPOConfig) -> None:
    from peft import LoraConfig

    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, init_lora_weights="gaussian",
                                target_modules=list(cfg.lora_targets)))
    if not any(p.requires_grad for p in unet.parameters()):
        raise SpoInputError(f"lora_targets {cfg.lora_targets} matched no module of this UNet")


def continue_lora(unet, path: str, family: str) -> None:
    """Start from an existing LoRA (diffusers or webui format): its rank, alpha and modules replace the config's."""
    from peft import LoraConfig
    from peft.utils import set_peft_model_state_dict

    from spo.formats.webui_lora import load_lora

    state, rank, alpha, _ = load_lora(path, family=family)
    unet_state = {k[len("unet."):]: v for k, v in state.items() if k.startswith("unet.")}
    if not unet_state:
        raise SpoInputError(f"{path}: this LoRA has no UNet weights to continue training from")
    targets = sorted({k.rsplit(".lora_", 1)[0] for k in unet_state})
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets))
    result = set_peft_model_state_dict(unet, unet_state, adapter_name="default")
    if getattr(result, "unexpected_keys", None):
        raise SpoInputError(f"{path}: LoRA keys that do not fit this UNet, e.g. {result.unexpected_keys[:2]}")


@contextlib.contextmanager
def reference_model(unet, frozen_copy):
    """The frozen base: the LoRA UNet with adapters disabled, or the frozen copy when fine-tuning fully."""
    if frozen_copy is not None:
        yield frozen_copy
        return
    unet.disable_adapters()
    try:
        yield unet
    finally:
        unet.enable_adapters()


def lora_state_dict(unet) -> dict[str, torch.Tensor]:
    """peft names (`...to_q.lora_A.weight`): what current diffusers writes and reads."""
    from peft.utils import get_peft_model_state_dict

    return get_peft_model_state_dict(unet)


def save_lora(pipe, unet, folder: Path, summary: dict) -> Path:
    """A diffusers-format LoRA folder (pytorch_lora_weights.safetensors), written atomically."""
    from spo.io import atomic_dir, write_json

    with atomic_dir(folder) as tmp:
        # The adapter metadata records rank and alpha, so loaders do not have to assume alpha = rank.
        type(pipe).save_lora_weights(tmp, unet_lora_layers={k: v.detach().float().cpu().contiguous()
                                                            for k, v in lora_state_dict(unet).items()},
                                     unet_lora_adapter_metadata=unet.peft_config["default"].to_dict(),
                                     safe_serialization=True)
        maybe_fail("lora_save")  # test seam: killed with the weights written, before the summary and the rename
        write_json(tmp / "training_summary.json", summary)
    return folder / "pytorch_lora_weights.safetensors"


# -------------------------------------------------------------------------------------------- inputs
def load_training_prompts(cfg: SPOConfig) -> list[str]:
    import random

    if cfg.prompts:
        from spo.data.prompts import load_prompts

        prompts = list(load_prompts(cfg.prompts, cfg.prompt_column or None))
    else:
        from spo.toy.world import prompts as toy_prompts

        prompts = toy_prompts("train")
        random.Random(cfg.seed).shuffle(prompts)  # the toy list is ordered by shape; take a mixed subset
    if cfg.max_prompts:
        prompts = prompts[: cfg.max_prompts]
    if not prompts:
        raise SpoInputError(f"no usable prompts in {cfg.prompts or 'the toy world'}")
    return prompts


def validation_prompts(cfg: SPOConfig, prompts: list[str]) -> list[str]:
    if cfg.base.startswith("toy:"):
        from spo.toy.world import sample_scenes

        return [s.caption for s in sample_scenes(cfg.validation_images, seed=1234, split="heldout")]
    return [prompts[i % len(prompts)] for i in range(cfg.validation_images)]


def make_judge(scorer, pipe, prompts: list[str]):
    """judge_fn for the resampler: decode predicted clean latents with the VAE, score at the timestep."""
    vae = pipe.vae

    def judge(x0: torch.Tensor, rows: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        images = vae.decode(x0.to(vae.dtype) / vae.config.scaling_factor).sample.clamp(-1, 1).float()
        return torch.as_tensor(scorer(images, [prompts[r] for r in rows.tolist()], t)).float().to(x0.device)

    return judge


def collect_pairs(pipe, model, scorer, prompts: list[str], generators, cfg: SPOConfig, sched, weight_dtype=torch.float32,
                  autocast=contextlib.nullcontext) -> tuple[Pairs, Conditioning, Conditioning]:
    """Sampling phase of one iteration: the resampler run with the current model on `prompts`."""
    timesteps, a_t, a_prev = sched
    device = model.device
    latent_shape = (model.config.in_channels, model.config.sample_size, model.config.sample_size)
    with torch.no_grad(), autocast():
        cond = encode(pipe, prompts)
        uncond = encode(pipe, prompts, negative=True)

        def eps_fn(x, t, rows):
            return guided_eps(model, x.to(weight_dtype), t, cond.index(rows), uncond.index(rows), cfg.cfg_scale).float()

        x_T = torch.stack([torch.randn(latent_shape, generator=g) for g in generators]).to(device)
        _, pairs = sample_pairs(eps_fn, make_judge(scorer, pipe, prompts), x_T, timesteps, a_t, a_prev, generators,
                                k=cfg.k, divert_start_step=cfg.divert_start_step, threshold=cfg.threshold,
                                num_inner_steps=cfg.num_inner_steps, eta=cfg.eta)
    return pairs, cond, uncond


# -------------------------------------------------------------------------------------------- state
def _generators(seed: int, epoch: int, positions: list[int]) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(hash((seed, epoch, p)) % (2**63)) for p in positions]


@dataclass
class Progress:
    epoch: int = 0
    batch: int = 0  # global batch index within the epoch
    step: int = 0  # optimizer steps
    iteration: int = 0  # sampling batches done


# --------------------------------------------------------------------------------------------- train
def train(cfg: SPOConfig, scorer=None, log=print) -> dict:
    """Run SPO with `cfg`. `scorer(images, prompts, t) -> scores` overrides cfg.preference (tests, API use)."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    from spo.io import check_output_dir, ensure_writable_dir, write_json
    from spo.models.loading import load_pipeline

    # Checked now, created only once the inputs below have loaded: a bad input leaves no empty output folder.
    out = check_output_dir(cfg.output_dir)
    torch.set_flush_denormal(True)  # tiny LoRA/toy weights produce denormals; on CPU they slow steps 5-10x
    if not cfg.resume and checkpoint.complete_checkpoints(out / "checkpoints"):
        raise SpoInputError(f"{out} holds checkpoints of an earlier run: pass --resume to continue it, "
                            "or choose another output_dir")
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision,
                              log_with=None if cfg.report_to == "none" else cfg.report_to, project_dir=str(out))
    set_seed(cfg.seed)
    device = accelerator.device
    prompts = load_training_prompts(cfg)  # before the model: a missing prompts file fails in a second
    pipe = load_pipeline(cfg.base)
    family = family_of(pipe)
    if scorer is None:
        scorer = load_preference(cfg.preference, cfg.base, family)
    ensure_writable_dir(out)
    val_prompts = validation_prompts(cfg, prompts)

    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(cfg.mixed_precision, torch.float32)
    unet, frozen_copy, params, optimizer, lr_sched = setup_model(pipe, cfg, family, device, weight_dtype)
    unet, optimizer, lr_sched = accelerator.prepare(unet, optimizer, lr_sched)
    model = accelerator.unwrap_model(unet)

    timesteps, a_t, a_prev = schedule(pipe.scheduler, cfg.num_steps, device)
    world, rank = accelerator.num_processes, accelerator.process_index
    global_batch = cfg.sample_batch_size * world
    batches_per_epoch = math.ceil(len(prompts) / global_batch)
    progress = start_or_resume(accelerator, cfg, out, model, optimizer, lr_sched, "spo", log)

    # Per process, nominal (a short last batch keeps it): the loss normaliser that makes N x B equal 1 x NB.
    n_candidates = cfg.sample_batch_size * (cfg.num_steps - cfg.divert_start_step)
    history: list[dict] = []
    started = time.time()
    total_iters = cfg.epochs * batches_per_epoch
    bar = tqdm(total=total_iters, initial=progress.epoch * batches_per_epoch + progress.batch, desc="spo",
               unit="batch", disable=not accelerator.is_local_main_process)
    if progress.epoch == 0 and progress.batch == 0 and accelerator.is_main_process:
        _validation_grid(pipe, model, val_prompts, cfg, out / "samples" / "epoch-000.png")
    while progress.epoch < cfg.epochs:
        order = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(cfg.seed * 7919 + progress.epoch))
        while progress.batch < batches_per_epoch:
            lo = progress.batch * global_batch + rank * cfg.sample_batch_size
            positions = order[lo: lo + cfg.sample_batch_size].tolist()
            batch_prompts = [prompts[p] for p in positions] if positions else [prompts[order[0]]]
            gens = _generators(cfg.seed, progress.epoch, positions or [int(order[0])])

            # ---- sampling with the current model (no gradients)
            unet.eval()
            pairs, cond, uncond = collect_pairs(pipe, model, scorer, batch_prompts, gens, cfg, (timesteps, a_t, a_prev),
                                                weight_dtype, accelerator.autocast)
            maybe_fail("sampled")  # test seam: killed between sampling and the optimizer step
            # ---- one optimizer step on the kept pairs (normalised by all candidates: see module docstring)
            unet.train()
            kept = pairs.select(pairs.keep if positions else torch.zeros_like(pairs.keep))
            stats = accumulate_gradients(unet, model, frozen_copy, kept, pairs, cond, uncond, cfg, a_t, a_prev, accelerator,
                                n_candidates, weight_dtype,
                                sync_now=(progress.iteration + 1) % cfg.gradient_accumulation_steps == 0)
            _check_finite(stats["loss"], [])
            progress.iteration += 1
            if (progress.iteration % cfg.gradient_accumulation_steps) == 0:
                accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
                optimizer.step()
                lr_sched.step()
                optimizer.zero_grad(set_to_none=True)
                progress.step += 1
                if maybe_fail("nan_weight"):  # test seam: a weight goes non-finite
                    params[0].data.view(-1)[0] = float("nan")
                maybe_fail("optimizer_step")  # test seam: killed after a step, before its checkpoint
                _check_finite(stats["loss"], params)
            progress.batch += 1
            stats.update(epoch=progress.epoch, step=progress.step, lr=lr_sched.get_last_lr()[0],
                         kept_fraction=float(pairs.keep.float().mean()), mean_score=float(torch.cat([pairs.score_w, pairs.score_l]).mean()),
                         n_candidates=n_candidates)
            history.append(stats)
            bar.set_postfix(loss=f"{stats['loss']:.4f}", kept=f"{stats['kept_fraction']:.2f}")
            after_batch(accelerator, bar, stats, progress, cfg, batches_per_epoch, model, optimizer, lr_sched, out)
        progress.epoch += 1
        progress.batch = 0
        if progress.epoch % cfg.save_every_epochs == 0 or progress.epoch == cfg.epochs:
            end_of_epoch(accelerator, pipe, model, cfg, out, progress, val_prompts, optimizer, lr_sched,
                         lambda: _summary(cfg, family, progress, started))
    bar.close()
    accelerator.wait_for_everyone()
    result = {"output_dir": str(out), "epochs": progress.epoch, "steps": progress.step,
              "seconds": round(time.time() - started, 1), "history": history, "model": model}
    if accelerator.is_main_process:
        result.update(final_outputs(pipe, model, cfg, out, family, _summary(cfg, family, progress, started), "spo"))
        write_json(out / "history.json", history)
    accelerator.end_training()
    return result


def setup_model(pipe, cfg: SPOConfig, family: str, device, weight_dtype):
    """Freeze VAE and text encoders; LoRA (new or continued) or full fine-tuning; optimizer and warm-up schedule.

    Returns (unet, frozen_copy, trainable params, optimizer, lr scheduler); shared by the SPO and DPO trainers.
    """
    pipe.to(device)
    for m in (pipe.vae, pipe.text_encoder, getattr(pipe, "text_encoder_2", None)):
        if m is not None:
            m.requires_grad_(False).eval()
    unet = pipe.unet
    frozen_copy = None
    if cfg.full_finetune:
        # Full fine-tuning cannot disable an adapter to get the base back: keep a frozen copy (documented cost).
        frozen_copy = copy.deepcopy(unet).requires_grad_(False).eval().to(weight_dtype)
        unet.requires_grad_(True)
    else:
        if cfg.init_lora:
            continue_lora(unet, cfg.init_lora, family)
        else:
            add_lora(unet, cfg)
        unet.to(weight_dtype)
        for p in unet.parameters():  # train the LoRA in fp32; the frozen base may be fp16/bf16
            if p.requires_grad:
                p.data = p.data.float()
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = _optimizer(cfg, params)
    warmup = max(cfg.lr_warmup_steps, 0)
    lr_sched = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0)
    return unet, frozen_copy, params, optimizer, lr_sched


def start_or_resume(accelerator, cfg, out: Path, model, optimizer, lr_sched, tracker: str, log) -> Progress:
    """Where the run starts: the latest complete checkpoint with --resume, else the beginning (SPO and DPO)."""
    progress = Progress()
    ckpt_dir = out / "checkpoints"
    if cfg.resume:
        done = checkpoint.complete_checkpoints(ckpt_dir)
        if done:
            progress = Progress(**checkpoint.load_state(done[-1], model, optimizer, lr_sched))
            log(f"resumed from {done[-1]} (epoch {progress.epoch}, batch {progress.batch})")
        else:
            log(f"nothing to resume in {ckpt_dir}; starting fresh")
    if cfg.report_to != "none":
        accelerator.init_trackers(tracker, config={k: str(v) for k, v in to_dict(cfg).items()})
    return progress


def after_batch(accelerator, bar, stats: dict, progress: Progress, cfg, batches_per_epoch: int, model, optimizer,
                lr_sched, out: Path) -> None:
    """Log the batch's scalars, advance the bar, and checkpoint inside the epoch when asked (SPO and DPO)."""
    if cfg.report_to != "none":
        accelerator.log({f"train/{k}": v for k, v in stats.items() if isinstance(v, (int, float))},
                        step=progress.iteration)
    bar.update(1)
    if (cfg.checkpoint_every_batches and progress.batch % cfg.checkpoint_every_batches == 0
            and progress.batch < batches_per_epoch and progress.iteration % cfg.gradient_accumulation_steps == 0):
        _checkpoint(accelerator, out / "checkpoints", model, optimizer, lr_sched, progress, cfg)


def end_of_epoch(accelerator, pipe, model, cfg, out: Path, progress: Progress, val_prompts, optimizer, lr_sched,
                 summary) -> None:
    """The epoch's LoRA and validation grid, then its checkpoint (shared by the SPO and DPO recipes).

    This order matters: a run killed in between redoes them on resume; the other order would resume past
    them and never write them.
    """
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if not cfg.full_finetune:
            save_lora(pipe, model, out / f"lora-epoch-{progress.epoch:03d}", summary())
        _validation_grid(pipe, model, val_prompts, cfg, out / "samples" / f"epoch-{progress.epoch:03d}.png")
    _checkpoint(accelerator, out / "checkpoints", model, optimizer, lr_sched, progress, cfg)


def final_outputs(pipe, model, cfg, out: Path, family: str, summary: dict, method: str) -> dict:
    """The fine-tuned UNet, or the LoRA in diffusers format plus its A1111/ComfyUI (webui) version."""
    from spo.formats.webui_lora import export_lora
    from spo.io import atomic_dir

    if cfg.full_finetune:
        with atomic_dir(out / "unet") as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
        return {"unet": str(out / "unet")}
    lora = save_lora(pipe, model, out / "lora", summary)
    webui = export_lora(out / "lora", out, formats=("webui",), name=f"{method}_{family}", family=family,
                       training=summary)["webui"]
    return {"lora": str(lora), "lora_webui": str(webui)}


def accumulate_gradients(unet, model, frozen_copy, kept: Pairs, pairs: Pairs, cond, uncond, cfg, a_t, a_prev, accelerator,
                n_norm: int, weight_dtype, sync_now: bool) -> dict:
    """Backward of sum(loss of kept pairs) / n_norm in micro-batches; gradients all-reduced once, on the last.

    Ranks keep different numbers of pairs, so accelerate's per-backward sync could deadlock; every rank
    runs at least one (possibly zero-weight) micro-batch and syncs exactly once per optimizer step.
    """
    micro = cfg.train_micro_batch
    source, weight = (kept, 1.0) if len(kept) else (pairs.select(slice(0, 1)), 0.0)
    chunks = [source.select(slice(s, s + micro)) for s in range(0, len(source), micro)]
    total_loss, ratio_w, ratio_l = 0.0, [], []
    scale = weight / (n_norm * cfg.gradient_accumulation_steps)
    for n, chunk in enumerate(chunks):
        last = n == len(chunks) - 1
        ctx = contextlib.nullcontext() if (last and sync_now) else accelerator.no_sync(unet)
        with ctx:
            losses, logp_w, logp_l, ref_w, ref_l = pair_losses(
                unet, lambda: reference_model(model, frozen_copy), _cast(chunk, weight_dtype), cond, uncond, cfg,
                a_t, a_prev, accelerator.autocast)
            if maybe_fail("nan_loss"):  # test seam: the loss goes non-finite
                losses = losses * float("nan")
            accelerator.backward(losses.sum() * scale)
        total_loss += float(losses.detach().sum())
        ratio_w.append(torch.exp(logp_w - ref_w).detach())
        ratio_l.append(torch.exp(logp_l - ref_l).detach())
    n = max(len(kept), 1)
    return {"loss": total_loss / n if len(kept) else 0.0, "pairs": len(kept),
            "ratio_win": float(torch.cat(ratio_w).mean()), "ratio_lose": float(torch.cat(ratio_l).mean())}


def _cast(pairs: Pairs, dtype) -> Pairs:
    """Parents go into the UNet in its dtype; samples stay fp32 for the log-probability."""
    return Pairs(**{k: (v.to(dtype) if k.startswith("parent") else v) for k, v in vars(pairs).items()})


def _check_finite(loss: float, params) -> None:
    """Stop before a non-finite loss reaches the weights, or as soon as a weight is non-finite."""
    bad_weight = any(not torch.isfinite(p).all() for p in params)
    if not math.isfinite(loss) or bad_weight:
        what = "a non-finite LoRA weight" if bad_weight else f"loss {loss}"
        raise TrainingDiverged(f"training diverged ({what}); stopped before saving it. The last good checkpoint "
                               "is kept: lower the learning rate and resume with --resume")


def _optimizer(cfg: SPOConfig, params):
    kwargs = dict(lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps,
                  weight_decay=cfg.weight_decay)
    if cfg.use_8bit_adam:
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise SpoInputError("use_8bit_adam needs bitsandbytes (pip install bitsandbytes)") from None
        return bnb.optim.AdamW8bit(params, **kwargs)
    return torch.optim.AdamW(params, **kwargs)


def _checkpoint(accelerator, ckpt_dir: Path, model, optimizer, lr_sched, progress: Progress, cfg: SPOConfig) -> None:
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        checkpoint.save_state(ckpt_dir / f"checkpoint-{progress.epoch:04d}-{progress.batch:05d}", model, optimizer,
                              lr_sched, asdict(progress))
        checkpoint.prune(ckpt_dir, cfg.keep_checkpoints)
    accelerator.wait_for_everyone()


def _summary(cfg: SPOConfig, family: str, progress: Progress, started: float) -> dict:
    return {"method": "SPO", "family": family, "base": cfg.base, "epochs": progress.epoch, "steps": progress.step,
            "seconds": round(time.time() - started, 1), "threads": torch.get_num_threads(), "config": to_dict(cfg)}


@torch.no_grad()
def _validation_grid(pipe, unet, prompts: list[str], cfg: SPOConfig, target: Path) -> None:
    """Same prompts and seeds every epoch: DDIM 20 steps, CFG 5, eta 0 (the paper's evaluation setting)."""
    if not prompts:
        return
    from spo.io import save_image
    from spo.toy.sampling import grid, sample

    was_training = unet.training
    unet.eval()
    images = sample(pipe, prompts, seed=cfg.seed, steps=20, cfg=5.0, batch=16)
    unet.train(was_training)
    save_image(grid(images, scale=max(1, 128 // images[0].size[0])), target)


def load_preference(spec: str, base: str, family: str):
    """The preference source: an SPM folder, "module:function", or (for a toy base) the shipped toy SPM."""
    from spo.spm.scoring import TOY_SPM_DIR, load_scorer

    if not spec:
        if not base.startswith("toy:"):
            raise SpoInputError("no preference model given: pass --preference SPM_FOLDER or module:function "
                                "(train one with `spo spm train`)")
        spec = str(TOY_SPM_DIR / base.split(":", 1)[1])
    return load_scorer(spec, family=family)
