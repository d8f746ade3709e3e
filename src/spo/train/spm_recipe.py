"""Training the step-aware preference model on Pick-a-Pic-schema pairs (`spo spm train`): its batches and its loss.

For each pair: t ~ U[0, max_t); both images -> base VAE -> same noise at t -> one CFG UNet prediction ->
DDIM x0-hat -> VAE decode -> SPM scores at t. Loss (spo.losses.preference_loss): two-way softmax cross-entropy
against the labels minus the label entropy (so a tie's best loss is 0), examples weighted by 1 / examples of
their prompt. The loop, checkpoints and resume are spo.train.engine's: one engine batch is one micro-batch of
`train_batch_size` pairs per process, `gradient_accumulation_steps` of them make an optimizer step.

Reproducibility: every random draw of batch m (timesteps, VAE posterior sample, noise) comes from a generator
seeded by (seed, m, process), and the data order is a pure function of (seed, position), so a resumed run
continues exactly where the interrupted one was, given the restored model/optimizer/scheduler.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from accelerate.utils import AutocastKwargs

from spo.images import pair_tensors
from spo.errors import SpoInputError
from spo.losses import preference_loss
from spo.train.config import SPMConfig, describe_batch, for_processes
from spo.train.engine import Method, Run, fit, open_run
from spo.data.stream import buffer_bytes
from spo.train.pair_batches import Layout, each_pair, pair_labels, train_batches

SPM_DIR = "spm"


# ------------------------------------------------------------------------------------------- data
def wait_summary(waits: list[float]) -> dict:
    """Seconds the trainer waited for its batches: the first (a window's read) apart from the rest."""
    rest = waits[1:]
    return {"first_s": round(waits[0], 3) if waits else None, "rest_total_s": round(sum(rest), 3),
            "rest_max_s": round(max(rest), 3) if rest else None, "batches": len(waits)}


def batch_seed(seed: int, batch: int, process: int) -> int:
    return (seed * 1_000_003 + batch) * 1_009 + process


def threshold_labels(score0: torch.Tensor, score1: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """SDXL-recipe relabelling: 1/0 or 0/1 when the softmax gap of clean scores exceeds threshold, else a tie."""
    p = torch.softmax(torch.stack([score0, score1], dim=-1).float(), dim=-1)
    gap = p[..., 0] - p[..., 1]
    label0 = torch.where(gap > threshold, 1.0, torch.where(gap < -threshold, 0.0, 0.5))
    return label0, 1.0 - label0


def relabel_pairs(scorer, items, labels, side: int, threshold: float, device, chunk: int = 16) -> tuple:
    """Clean-image labels from a scorer at t = 0 (deterministic, so computed once before training) for the
    (row, pair) `items`; rows not given (unreadable images) keep `labels`."""
    from itertools import islice

    from spo.spm.scoring import score_images

    l0, l1 = np.array(labels[0], dtype=np.float64), np.array(labels[1], dtype=np.float64)
    items = iter(items)
    while part := list(islice(items, chunk)):
        rows, pairs = [r for r, _ in part], [p for _, p in part]
        a, b, prompts = pair_tensors(pairs, range(len(pairs)), side)
        t = torch.zeros(len(pairs), dtype=torch.long, device=device)
        x, y = threshold_labels(score_images(scorer, a.to(device), prompts, t, chunk),
                                score_images(scorer, b.to(device), prompts, t, chunk), threshold)
        l0[rows], l1[rows] = x.cpu().double().numpy(), y.cpu().double().numpy()
    return l0, l1


# ------------------------------------------------------------------------------------------- model
def build_spm(init: str, time_conditioning: bool, family: str | None, base: str | None = None,
              dtype: torch.dtype = torch.float32):
    """A fresh SPM (a built-in base's tiny CLIP, or a CLIP folder), or a saved SPM to train further."""
    from spo.sources import get
    from spo.spm.model import StepAwarePreferenceModel, check_family
    from spo.spm.scoring import find_spm_dir

    source = get(base)
    if init in ("", "toy") and source is not None and source.spm_init is not None:
        return source.spm_init(time_conditioning=time_conditioning).to(dtype)
    if not init:
        raise SpoInputError("no SPM to start from: pass --init CLIP_FOLDER (e.g. PickScore_v1) or an SPM folder")
    path = Path(init)
    if not path.exists():
        raise SpoInputError(f"--init {init}: no such folder (give a CLIP folder or an SPM folder)")
    spm_dir = find_spm_dir(path)
    if spm_dir is None:
        return StepAwarePreferenceModel.from_clip(path, time_conditioning=time_conditioning, dtype=dtype)
    spm = StepAwarePreferenceModel.load(spm_dir, dtype=dtype)
    check_family(spm, family)
    if spm.time_conditioning != time_conditioning:
        raise SpoInputError(f"{spm_dir} is {'' if spm.time_conditioning else 'not '}time-conditioned; "
                            f"drop --no-time-conditioning or start from a CLIP folder")
    return spm


class SPMMethod(Method):
    name, unit, weights = "spm", "batch", "SPM"

    def __init__(self, cfg: SPMConfig, pipe, batches, world: int, rank: int, summary):
        self.cfg, self.pipe, self.batches, self.world, self.rank = cfg, pipe, batches, world, rank
        self.summary, self._loader, self._next = summary, None, None  # rows found unusable when read: counted there
        self.waits: list[float] = []  # seconds each batch was waited for (does the data loader starve the step?)

    def batches_per_epoch(self) -> int:
        return self.cfg.max_train_steps * self.cfg.gradient_accumulation_steps

    def checkpoint_name(self, p) -> str:
        return f"checkpoint-{p.step:08d}"

    def checkpoint_due(self, run: Run) -> bool:
        every, step = self.cfg.checkpoint_every_steps, run.progress.step
        return bool(every) and (step % every == 0 or step == self.cfg.max_train_steps)

    def train_batch(self, run: Run, sync_now: bool) -> dict:
        from spo.spm.denoise import predicted_pair_images

        cfg, m, device = self.cfg, run.progress.iteration, run.device
        batch = self._batch(m)
        img0, img1, prompts = batch["img0"], batch["img1"], batch["prompts"]
        gen = torch.Generator(device=device).manual_seed(batch_seed(cfg.seed, m, self.rank))
        t = torch.randint(0, cfg.max_t, (len(prompts),), generator=gen, device=device)
        l0, l1, w = (batch[k].to(device) for k in ("label_0", "label_1", "weight"))
        run.fire("batch_ready")
        if not prompts:  # every pair of this share unreadable: a zero gradient keeps the processes in step
            with run.no_sync(True, sync_now):
                run.accelerator.backward(sum(p.sum() for p in run.params) * 0.0)
            return {"loss": 0.0, "pairs": 0, "batch_accuracy": float("nan")}
        x0, x1 = predicted_pair_images(self.pipe, img0, img1, prompts, t, gen, cfg.cfg_scale, cfg.guidance_rescale)
        with run.no_sync(True, sync_now):
            # No cast cache: each weight is used once a forward, so a cached bf16 copy saves no work and holds 2 bytes
            # per SPM parameter to the forward's end (2.6 GB for a PickScore-size SPM under gradient checkpointing).
            with run.accelerator.autocast(AutocastKwargs(cache_enabled=False)):
                scores = run.module(torch.cat([x0, x1]), prompts * 2, torch.cat([t, t]))
            s0, s1 = scores.float().chunk(2)
            loss = preference_loss(s0, s1, l0, l1, w)
            run.accelerator.backward(loss / cfg.gradient_accumulation_steps)
        decided = l0 != l1
        correct = ((s0 > s1) == (l0 > l1))[decided]
        return {"loss": loss.item(), "pairs": len(prompts),
                "batch_accuracy": float(correct.float().mean()) if len(correct) else float("nan")}

    def _batch(self, m: int) -> dict:
        """Batch m from the data loader (started at the first batch this run trains: a resume's)."""
        from spo.train.pair_batches import loader

        import time

        start = time.perf_counter()
        if self._next != m:
            self._loader = loader(self.batches, m, self.cfg.num_workers)
        batch = next(self._loader)
        self.waits.append(time.perf_counter() - start)
        self._next = m + 1
        for reason, text in batch["skipped"]:
            self.summary.skipped[reason] += 1
            print(f"skipped {text}")
        return batch

    def postfix(self, stats: dict) -> dict:
        return {"loss": f"{stats['loss']:.4f}", "lr": f"{stats.get('lr', 0):.2e}"}


# ------------------------------------------------------------------------------------------- training
def load_data(cfg: SPMConfig):
    """The pairs' index (streamed when trained), or with data_in_memory the pairs themselves; and the summary."""
    from spo.data.pickapic import read_pairs
    from spo.data.stream import build_index, filter_pairs, filters_of

    if cfg.data_in_memory:
        data, summary = read_pairs(cfg.data)
        data = filter_pairs(data, filters_of(cfg), summary)
    else:
        data = build_index(cfg.data, filters_of(cfg), buffer_bytes(cfg))
        summary = data.summary
    where = ", ".join(map(str, cfg.data)) or "(no data given)"
    if not len(data):
        raise SpoInputError(f"no usable preference pairs in {where}: {summary.describe()}")
    print(summary.describe())  # rows skipped (corrupt images, bad labels) are counted and said, never silent
    return data, summary


def train(cfg: SPMConfig) -> dict:
    """Train an SPM; writes <out>/spm (the model), <out>/checkpoints, <out>/logs. Returns the summary."""
    from accelerate.utils import set_seed

    from spo.models.family import family_of, native_resolution
    from spo.models.loading import load_pipeline
    from spo.spm.denoise import freeze
    from spo.train.finetune import weight_dtype

    if cfg.relabel_required and not cfg.relabel_with:
        raise SpoInputError("this recipe relabels its pairs with PickScore: pass --relabel-with PICKSCORE_FOLDER "
                            "(a CLIP folder such as PickScore_v1), or --relabel-required false to keep their labels")
    run = open_run(cfg, "spm")
    with run:
        cfg = run.cfg = for_processes(cfg, run.accelerator.num_processes)  # before anything reads the batch or lr
        print(describe_batch(cfg, run.accelerator.num_processes))
        data, summary = load_data(cfg)  # before the model: bad data fails in a second and leaves no folder
        # Frozen, so in the run's half precision; loaded before the folder: a VAE that does not fit leaves none behind.
        pipe = load_pipeline(cfg.base, dtype=weight_dtype(cfg), vae=cfg.vae, prediction_type=cfg.prediction_type)
        run.create_output_dir()
        freeze(pipe)
        pipe.to(run.device)
        family, side = family_of(pipe), native_resolution(pipe)
        labels, relabel_info = pair_labels(data), None
        if cfg.relabel_with:
            from spo.spm.scoring import load_scorer

            scorer = load_scorer(cfg.relabel_with, device=run.device)
            labels = relabel_pairs(scorer, each_pair(data), labels, side, cfg.relabel_threshold, run.device)
            del scorer
            relabel_info = {"scorer": cfg.relabel_with, "threshold": cfg.relabel_threshold,
                            "ties": int(sum(a == 0.5 for a in labels[0]))}
        set_seed(cfg.seed)  # the fresh model's initialisation (t-embedder weights, a fresh CLIP)
        spm = build_spm(cfg.init, cfg.time_conditioning, family, cfg.base, torch.bfloat16 if cfg.full_bf16 else torch.float32)
        spm.family, spm.base_model = family, cfg.base
        if cfg.gradient_checkpointing:
            spm.set_gradient_checkpointing(True)
        spm.train()
        run.attach(spm, [p for p in spm.parameters() if p.requires_grad], total_steps=cfg.max_train_steps)
        start_step = run.progress.step
        world, rank = run.accelerator.num_processes, run.accelerator.process_index
        batches = train_batches(data, labels, cfg.seed, Layout(cfg.train_batch_size, world, rank), side,
                                cfg.max_train_steps * cfg.gradient_accumulation_steps, buffer_bytes(cfg))
        method = SPMMethod(cfg, pipe, batches, world, rank, summary)
        fit(run, method)
        losses = [h["loss"] for h in run.history]
        run_summary = run.summary()
        result = {
            "steps": cfg.max_train_steps, "resumed_from_step": start_step, "pairs": len(data), "ties": summary.ties,
            "skipped_rows": summary.rows_skipped, "filtered_rows": dict(summary.filtered), "data": [str(f) for f in summary.files],
            "family": family, "base_model": cfg.base, "time_conditioning": cfg.time_conditioning,
            "processes": run.accelerator.num_processes, "relabel": relabel_info, "config": run_summary["config"],
            "final_loss_mean_last_10": float(np.mean(losses[-10 * cfg.gradient_accumulation_steps:])) if losses else None,
            "seconds": run_summary["seconds"], "seconds_this_run": run_summary["seconds_this_run"],
            "data_wait": wait_summary(method.waits),
        }
        run.accelerator.wait_for_everyone()
        if run.is_main:
            run.model.training_summary = result
            run.model.save(run.out / SPM_DIR)
        run.close()
        return result
