"""Training the step-aware preference model on Pick-a-Pic-schema pairs (`spo spm train`).

For each pair: t ~ U[0, max_t); both images -> base VAE -> same noise at t -> one CFG UNet prediction ->
DDIM x0-hat -> VAE decode -> SPM scores at t. Loss: two-way softmax cross-entropy against the labels minus
the label entropy (so a tie's best loss is 0), examples weighted by 1 / examples of their prompt.

Reproducibility: every random draw of micro-batch m (timesteps, VAE posterior sample, noise) comes from a
generator seeded by (seed, m, process), and the data order is a pure function of (seed, position), so a
resumed run continues exactly where the interrupted one was, given the restored model/optimizer/scheduler.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from spo.errors import SpoInputError
from spo.faults import maybe_fail
from spo.train import checkpoint

CHECKPOINT_DIR = "checkpoints"
SPM_DIR = "spm"
LOG_DIR = "logs"
NUM_TRAIN_TIMESTEPS = 1000


# ------------------------------------------------------------------------------------------- pure math


def preference_loss(s0: torch.Tensor, s1: torch.Tensor, label0: torch.Tensor, label1: torch.Tensor,
                    weight: torch.Tensor) -> torch.Tensor:
    """Weighted mean of CE(label, softmax(s0, s1)) - H(label): 0 at the optimum for wins and ties alike."""
    logp = torch.log_softmax(torch.stack([s0, s1], dim=-1).float(), dim=-1)
    labels = torch.stack([label0, label1], dim=-1).float()
    per_example = -(labels * logp).sum(-1) + torch.special.xlogy(labels, labels).sum(-1)
    w = weight.float() / weight.float().sum()
    return (w * per_example).sum()


def threshold_labels(score0: torch.Tensor, score1: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """SDXL-recipe relabelling: 1/0 or 0/1 when the softmax gap of clean scores exceeds threshold, else a tie."""
    p = torch.softmax(torch.stack([score0, score1], dim=-1).float(), dim=-1)
    gap = p[..., 0] - p[..., 1]
    label0 = torch.where(gap > threshold, 1.0, torch.where(gap < -threshold, 0.0, 0.5))
    return label0, 1.0 - label0


def warmup_factor(step: int, warmup: int, total: int = 0, schedule: str = "constant") -> float:
    """Linear warm-up to the full learning rate over `warmup` optimizer steps, then constant or cosine decay to 0.

    Written here rather than taken from diffusers.optimization: its warm-up starts at 0 (a wasted first step)
    and the shipped toy SPMs were trained with this one.
    """
    if warmup > 0 and step + 1 < warmup:
        return (step + 1) / warmup
    if schedule == "cosine" and total > warmup:
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step + 1 - warmup) / (total - warmup))))
    return 1.0


def stream_indices(n: int, seed: int, start: int, count: int) -> list[int]:
    """Items start..start+count-1 of the endless stream of per-epoch permutations of range(n)."""
    out = []
    pos = start
    while len(out) < count:
        epoch, offset = divmod(pos, n)
        perm = np.random.default_rng([seed, epoch]).permutation(n)
        take = min(count - len(out), n - offset)
        out.extend(int(i) for i in perm[offset:offset + take])
        pos += take
    return out


def step_seed(seed: int, micro: int, process: int) -> int:
    return (seed * 1_000_003 + micro) * 1_009 + process


# ------------------------------------------------------------------------------------------- config


@dataclass
class TrainConfig:
    data: list[str]
    out: str
    base: str | None = None  # None: the toy SD1.5 model
    init: str = "toy"  # "toy", a transformers CLIP folder, or an SPM folder to continue from
    time_conditioning: bool = True
    steps: int = 200
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 3e-6
    weight_decay: float = 0.3
    warmup: int = 500
    lr_schedule: str = "constant"  # after warm-up: "constant" or "cosine" (decay to 0 at the last step)
    max_grad_norm: float = 1.0
    max_t: int = NUM_TRAIN_TIMESTEPS
    cfg_scale: float = 5.0
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False
    seed: int = 0
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    resume: bool = False
    relabel_with: str | None = None
    relabel_threshold: float = 0.1
    cpu: bool = False
    log_every: int = 10
    progress: bool = True

    def validate(self) -> None:
        checks = [
            (self.steps > 0, f"steps must be positive, got {self.steps}"),
            (self.batch_size > 0, f"batch size must be positive, got {self.batch_size}"),
            (self.grad_accum > 0, f"gradient accumulation must be positive, got {self.grad_accum}"),
            (self.lr > 0 and math.isfinite(self.lr), f"learning rate must be positive, got {self.lr}"),
            (self.weight_decay >= 0, f"weight decay must be >= 0, got {self.weight_decay}"),
            (self.warmup >= 0, f"warm-up must be >= 0, got {self.warmup}"),
            (self.lr_schedule in ("constant", "cosine"), f"LR schedule must be constant or cosine, got {self.lr_schedule!r}"),
            (1 <= self.max_t <= NUM_TRAIN_TIMESTEPS, f"max t must be in [1, {NUM_TRAIN_TIMESTEPS}], got {self.max_t}"),
            (self.cfg_scale >= 0, f"CFG scale must be >= 0, got {self.cfg_scale}"),
            (self.mixed_precision in ("no", "fp16", "bf16"), f"mixed precision must be no, fp16 or bf16, got {self.mixed_precision!r}"),
            (self.checkpoint_every >= 0, f"checkpoint interval must be >= 0, got {self.checkpoint_every}"),
            (self.keep_checkpoints >= 1, f"keep-checkpoints must be >= 1, got {self.keep_checkpoints}"),
            (0 <= self.relabel_threshold < 1, f"relabel threshold must be in [0, 1), got {self.relabel_threshold}"),
        ]
        for ok, message in checks:
            if not ok:
                raise SpoInputError(message)


# ------------------------------------------------------------------------------------------- data


def images_to_tensor(images, side: int) -> torch.Tensor:
    """PIL images -> [B, 3, side, side] in [-1, 1]: centre-crop to square, resize (Lanczos) when needed."""
    from PIL import Image

    out = []
    for im in images:
        w, h = im.size
        if (w, h) != (side, side):
            s = min(w, h)
            im = im.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
            im = im.resize((side, side), Image.LANCZOS)
        out.append(torch.from_numpy(np.asarray(im, dtype=np.float32).copy()).permute(2, 0, 1))
    return torch.stack(out) / 127.5 - 1.0


def pair_tensors(pairs, indices: Sequence[int], side: int) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    decoded = [pairs[i].decode() for i in indices]
    return (images_to_tensor([d[0] for d in decoded], side), images_to_tensor([d[1] for d in decoded], side),
            [pairs[i].caption for i in indices])


def relabel_pairs(scorer, pairs, side: int, threshold: float, device, chunk: int = 16) -> tuple[list[float], list[float]]:
    """Clean-image labels from a scorer at t = 0 (deterministic, so computed once before training)."""
    from spo.spm.scoring import score_images

    l0, l1 = [], []
    for s in range(0, len(pairs), chunk):
        idx = list(range(s, min(len(pairs), s + chunk)))
        a, b, prompts = pair_tensors(pairs, idx, side)
        t = torch.zeros(len(idx), dtype=torch.long, device=device)
        sa = score_images(scorer, a.to(device), prompts, t, chunk)
        sb = score_images(scorer, b.to(device), prompts, t, chunk)
        x, y = threshold_labels(sa, sb, threshold)
        l0 += x.tolist()
        l1 += y.tolist()
    return l0, l1


# ------------------------------------------------------------------------------------------- model setup


def build_spm(init: str, time_conditioning: bool, family: str | None):
    """A fresh SPM from the toy config or a CLIP folder, or a saved SPM to train further."""
    from spo.spm.model import StepAwarePreferenceModel, check_family
    from spo.spm.scoring import find_spm_dir

    if init == "toy":
        return StepAwarePreferenceModel.toy(time_conditioning=time_conditioning)
    path = Path(init)
    if not path.exists():
        raise SpoInputError(f"--init {init}: no such folder (give 'toy', a CLIP folder or an SPM folder)")
    spm_dir = find_spm_dir(path)
    if spm_dir is not None:
        spm = StepAwarePreferenceModel.load(spm_dir)
        check_family(spm, family)
        if spm.time_conditioning != time_conditioning:
            raise SpoInputError(f"{spm_dir} is {'' if spm.time_conditioning else 'not '}time-conditioned; "
                                f"drop --no-time-conditioning or start from a CLIP folder")
        return spm
    return StepAwarePreferenceModel.from_clip(path, time_conditioning=time_conditioning)


def latest_checkpoint(root: Path) -> Path | None:
    found = checkpoint.complete_checkpoints(root)
    return found[-1] if found else None


def _config_fingerprint(cfg: TrainConfig, n_pairs: int) -> dict:
    # What must match for a resumed run to continue the same run.
    keys = ("base", "init", "time_conditioning", "batch_size", "grad_accum", "lr", "weight_decay", "warmup",
            "lr_schedule", "max_t", "cfg_scale", "seed", "relabel_with", "relabel_threshold")
    d = {k: getattr(cfg, k) for k in keys}
    d["n_pairs"] = n_pairs
    return d


# ------------------------------------------------------------------------------------------- training


def train(cfg: TrainConfig) -> dict:
    """Train an SPM; writes <out>/spm (the model), <out>/checkpoints, <out>/logs. Returns the summary."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    from spo.data.pickapic import examples_per_prompt, read_pairs
    from spo.io import ensure_writable_dir
    from spo.models.family import family_of
    from spo.models.loading import load_pipeline
    from spo.spm.denoise import base_resolution, freeze, predicted_pair_images

    cfg.validate()
    out = Path(cfg.out)  # created once the data has loaded: bad data leaves no empty folder
    ckpt_root = out / CHECKPOINT_DIR
    if cfg.mixed_precision != "no" and (cfg.cpu or not torch.cuda.is_available()):
        if cfg.mixed_precision == "fp16":
            raise SpoInputError("fp16 mixed precision needs a GPU; use --mixed-precision no (or bf16) on CPU")
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision, gradient_accumulation_steps=cfg.grad_accum,
                              cpu=cfg.cpu)
    device = accelerator.device
    is_main = accelerator.is_main_process

    pairs, summary = read_pairs(cfg.data)
    if not pairs:
        raise SpoInputError(f"no usable preference pairs in {', '.join(map(str, cfg.data))}: {summary.describe()}")
    ensure_writable_dir(out)
    weights = examples_per_prompt(pairs)

    pipe = load_pipeline(cfg.base)
    freeze(pipe)
    pipe.to(device)
    family = family_of(pipe)
    side = base_resolution(pipe)
    base_name = str(cfg.base) if cfg.base is not None else "toy:sd15"

    labels0 = [p.label_0 for p in pairs]
    labels1 = [p.label_1 for p in pairs]
    relabel_info = None
    if cfg.relabel_with:
        from spo.spm.scoring import load_scorer

        scorer = load_scorer(cfg.relabel_with, device=device)
        labels0, labels1 = relabel_pairs(scorer, pairs, side, cfg.relabel_threshold, device)
        del scorer
        relabel_info = {"scorer": str(cfg.relabel_with), "threshold": cfg.relabel_threshold,
                        "ties": int(sum(a == 0.5 for a in labels0))}

    set_seed(cfg.seed)  # the fresh model's initialisation (t-embedder weights, toy CLIP)
    spm = build_spm(cfg.init, cfg.time_conditioning, family)
    spm.family, spm.base_model = family, base_name
    if cfg.gradient_checkpointing:
        spm.set_gradient_checkpointing(True)
    spm.train()
    optimizer = torch.optim.AdamW([p for p in spm.parameters() if p.requires_grad], lr=cfg.lr,
                                  weight_decay=cfg.weight_decay)
    # Not handed to accelerate.prepare: it would step the schedule once per process, and we count optimizer steps.
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, partial(warmup_factor, warmup=cfg.warmup, total=cfg.steps,
                                                                      schedule=cfg.lr_schedule))
    model, optimizer = accelerator.prepare(spm, optimizer)

    fingerprint = _config_fingerprint(cfg, len(pairs))
    start_step = 0
    if cfg.resume:
        last = latest_checkpoint(ckpt_root)
        if last is not None:
            state = json.loads((last / checkpoint.STATE_FILE).read_text(encoding="utf-8"))["progress"]
            if state.get("fingerprint") != fingerprint:
                diff = [k for k in fingerprint if state.get("fingerprint", {}).get(k) != fingerprint[k]]
                raise SpoInputError(f"cannot resume from {last}: the run's settings differ ({', '.join(diff)})")
            checkpoint.load_state(last, accelerator.unwrap_model(model), optimizer, scheduler)
            start_step = int(state["step"])
            if is_main:
                print(f"resuming from {last} (step {start_step})")
    if start_step >= cfg.steps and is_main:
        print(f"already at step {start_step} of {cfg.steps}")

    writer = None
    if is_main:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(out / LOG_DIR))
    n_proc, rank = accelerator.num_processes, accelerator.process_index
    per_micro = cfg.batch_size * n_proc
    t0 = time.time()
    losses: list[float] = []
    bar = tqdm(total=cfg.steps, initial=start_step, desc="spm train", unit="step",
               disable=not (is_main and cfg.progress), dynamic_ncols=True)
    step = start_step
    while step < cfg.steps:
        step_loss = step_correct = step_decided = 0.0
        for a in range(cfg.grad_accum):
            micro = step * cfg.grad_accum + a
            idx = stream_indices(len(pairs), cfg.seed, micro * per_micro, per_micro)
            idx = idx[rank * cfg.batch_size:(rank + 1) * cfg.batch_size]
            gen = torch.Generator(device=device).manual_seed(step_seed(cfg.seed, micro, rank))
            img0, img1, prompts = pair_tensors(pairs, idx, side)
            t = torch.randint(0, cfg.max_t, (len(idx),), generator=gen, device=device)
            x0, x1 = predicted_pair_images(pipe, img0, img1, prompts, t, gen, cfg.cfg_scale)
            l0 = torch.tensor([labels0[i] for i in idx], device=device)
            l1 = torch.tensor([labels1[i] for i in idx], device=device)
            w = torch.tensor([weights[i] for i in idx], device=device)
            with accelerator.accumulate(model):
                with accelerator.autocast():
                    scores = model(torch.cat([x0, x1]), prompts * 2, torch.cat([t, t]))
                s0, s1 = scores.float().chunk(2)
                loss = preference_loss(s0, s1, l0, l1, w)
                accelerator.backward(loss)
                if accelerator.sync_gradients and cfg.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            step_loss += loss.item() / cfg.grad_accum
            decided = (l0 != l1)
            step_decided += decided.sum().item()
            step_correct += ((s0 > s1) == (l0 > l1))[decided].sum().item()
        scheduler.step()
        step += 1
        maybe_fail("spm_step")  # test seam (spo.faults): killed after a step, before its checkpoint
        losses.append(step_loss)
        bar.update(1)
        bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
        if writer is not None and (step % cfg.log_every == 0 or step == cfg.steps):
            writer.add_scalar("train/loss", step_loss, step)
            writer.add_scalar("train/lr", scheduler.get_last_lr()[0], step)
            if step_decided:
                writer.add_scalar("train/batch_accuracy", step_correct / step_decided, step)
        if cfg.checkpoint_every and (step % cfg.checkpoint_every == 0 or step == cfg.steps):
            save_checkpoint(accelerator, ckpt_root, step, fingerprint, cfg.keep_checkpoints, model, optimizer,
                            scheduler)
    bar.close()
    if writer is not None:
        writer.close()

    result = {
        "steps": cfg.steps, "resumed_from_step": start_step, "pairs": len(pairs), "ties": summary.ties,
        "data": [str(f) for f in summary.files], "family": family, "base_model": base_name,
        "time_conditioning": cfg.time_conditioning, "batch_size": cfg.batch_size, "grad_accum": cfg.grad_accum,
        "processes": n_proc, "lr": cfg.lr, "weight_decay": cfg.weight_decay, "warmup": cfg.warmup, "lr_schedule": cfg.lr_schedule,
        "max_t": cfg.max_t, "cfg_scale": cfg.cfg_scale, "mixed_precision": cfg.mixed_precision, "seed": cfg.seed,
        "init": cfg.init, "relabel": relabel_info,
        "final_loss_mean_last_10": float(np.mean(losses[-10:])) if losses else None,
        "seconds_this_run": round(time.time() - t0, 1),
    }
    accelerator.wait_for_everyone()
    if is_main:
        spm_out = accelerator.unwrap_model(model)
        spm_out.training_summary = result
        spm_out.save(out / SPM_DIR)
    accelerator.wait_for_everyone()
    return result


def save_checkpoint(accelerator, root: Path, step: int, fingerprint: dict, keep: int, model, optimizer,
                    scheduler) -> Path:
    """The trainable weights, optimizer, schedule and RNG (spo.train.checkpoint: no pickles) + our position."""
    target = root / f"checkpoint-{step:08d}"
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        checkpoint.save_state(target, accelerator.unwrap_model(model), optimizer, scheduler,
                              {"step": step, "fingerprint": fingerprint})
        checkpoint.prune(root, keep)
    accelerator.wait_for_everyone()
    return target
