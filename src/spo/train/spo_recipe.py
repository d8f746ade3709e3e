"""The SPO recipe: config in, LoRA and images out. Its batches and its loss; the loop is spo.train.engine's.

Each batch of the engine is a sampling round: a batch of prompts through the step-wise resampler with the current
model (spo.sampling.resampler), then the official SPO update structure on the round's kept win/lose transitions:
shuffled, split into train batches, one backward of the clipped-ratio loss (spo.losses.spo_loss, mean over the
train batch) per train batch, one optimizer step every `gradient_accumulation_steps` train batches. The reference
model is the frozen base: with LoRA it is the same UNet with its adapters disabled, so there is never a second
UNet in memory.

Distributed runs (accelerate launch) shard the prompts of each round across processes; every prompt has its own
random generator seeded by (seed, epoch, position). The kept transitions of all processes are gathered and put in
one canonical order before the shuffle, global train batch j is the j-th slice of N x train_batch_size
transitions, and each process takes its share of it, so N processes with batches B give the same updates as one
process with batches N*B. (The official loop instead deals every process a contiguous block of the shuffled round
and drops the remainder, so its updates depend on the number of processes.)
"""

from __future__ import annotations

import contextlib
import math

import torch

from spo.ddim import ddim_sigma, ddim_transition_mean, gaussian_log_prob
from spo.errors import SpoInputError
from spo.losses import spo_loss
from spo.models.family import Conditioning, encode, family_of, guided_output, latent_side
from spo.models.prediction import EPSILON, Parameterisation, parameterisation
from spo.sampling.resampler import Pairs, schedule
from spo.train.config import SPOConfig
from spo.train.engine import Run, fit, open_run
from spo.train.finetune import (FinetuneMethod, item_generators, load_dtype, setup_unet, validation_prompts,
                                weight_dtype)
from spo.train.spo_round import canonical_order, collect_pairs, gather_pairs, round_train_batches


# ---------------------------------------------------------------------------------------------- math
def transition_log_probs(unet, pairs: Pairs, cond: Conditioning, uncond: Conditioning, cfg_scale: float,
                         a_t: torch.Tensor, a_prev: torch.Tensor, eta: float,
                         param: Parameterisation = EPSILON) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(x_{t-1}^w | x_t^w) and log p(x_{t-1}^l | x_t^l) under `unet`'s DDIM Gaussian (CFG applied).

    Pairs from one branching point share their parent, so one forward serves both members of the pair.
    `param` says what the UNet predicts (and the CFG rescale): the mean comes from its output directly.
    """
    i = pairs.step_index
    at, ap = a_t[i].view(-1, 1, 1, 1), a_prev[i].view(-1, 1, 1, 1)
    sigma = ddim_sigma(at, ap, eta)
    shared = bool(torch.equal(pairs.parent_w, pairs.parent_l))
    parents = pairs.parent_w if shared else torch.cat([pairs.parent_w, pairs.parent_l])
    rows = pairs.row if shared else torch.cat([pairs.row, pairs.row])
    t = pairs.timestep if shared else torch.cat([pairs.timestep, pairs.timestep])
    rep = 1 if shared else 2
    out = guided_output(unet, parents, t, cond.index(rows), uncond.index(rows), cfg_scale,
                        param.guidance_rescale).float()
    mean = ddim_transition_mean(parents.float(), out, at.repeat(rep, 1, 1, 1), ap.repeat(rep, 1, 1, 1),
                                sigma.repeat(rep, 1, 1, 1), param.prediction_type)
    mean_w, mean_l = (mean, mean) if shared else mean.chunk(2)
    return gaussian_log_prob(pairs.sample_w.float(), mean_w, sigma), gaussian_log_prob(pairs.sample_l.float(), mean_l, sigma)


def pair_losses(unet, reference, pairs: Pairs, cond: Conditioning, uncond: Conditioning, cfg: SPOConfig,
                a_t: torch.Tensor, a_prev: torch.Tensor, autocast=contextlib.nullcontext, param: Parameterisation = EPSILON):
    """SPO loss per pair, with gradients through `unet`; `reference()` is a context giving the frozen model.

    Returns (losses, logp_w, logp_l, ref_logp_w, ref_logp_l). `param`: spo.models.prediction.parameterisation.
    """
    with torch.no_grad(), autocast(), reference() as ref:
        ref_w, ref_l = transition_log_probs(ref, pairs, cond, uncond, cfg.cfg_scale, a_t, a_prev, cfg.eta, param)
    with autocast():
        logp_w, logp_l = transition_log_probs(unet, pairs, cond, uncond, cfg.cfg_scale, a_t, a_prev, cfg.eta, param)
    return spo_loss(logp_w, logp_l, ref_w, ref_l, cfg.beta, cfg.clip_eps), logp_w, logp_l, ref_w, ref_l


# -------------------------------------------------------------------------------------------- inputs
def load_training_prompts(cfg: SPOConfig) -> list[str]:
    from spo.sources import get

    source = get(cfg.base)
    if cfg.prompts:
        from spo.data.prompts import load_prompts

        prompts = list(load_prompts(cfg.prompts, cfg.prompt_column or None))
    elif source is not None:
        prompts = source.training_prompts(cfg.seed)
    else:
        raise SpoInputError("no training prompts given: pass --prompts FILE (JSON list, text, CSV or parquet)")
    if cfg.max_prompts:
        prompts = prompts[: cfg.max_prompts]
    if not prompts:
        raise SpoInputError(f"no usable prompts in {cfg.prompts or cfg.base}")
    return prompts


def load_preference(spec: str, base: str, family: str, dtype=torch.float32):
    """The preference source: an SPM folder, a CLIP folder, "module:function", or a built-in base's shipped SPM
    (a model in `dtype`: frozen, so half precision under mixed precision)."""
    from spo.sources import get
    from spo.spm.scoring import load_scorer

    if not spec:
        source = get(base)
        if source is None or not source.preference:
            raise SpoInputError("no preference model given: pass --preference SPM_FOLDER or module:function "
                                "(train one with `spo spm train`)")
        spec = source.preference
    return load_scorer(spec, family=family, dtype=dtype)


# -------------------------------------------------------------------------------------------- the method
class SPOMethod(FinetuneMethod):
    """One batch of the engine is one sampling round: `sample_batch_size` prompts per process through the resampler,
    then the official update structure on the round's kept transitions (gathered from every process): shuffled,
    split into train batches of `train_batch_size` per process, one backward each on the mean loss of its train
    batch, an optimizer step every `gradient_accumulation_steps` train batches (flushed at the end of the epoch).
    """

    name, title = "spo", "SPO"
    steps_inside = True

    def __init__(self, cfg: SPOConfig, pipe, family, frozen_copy, prompts, scorer, sched, world: int, rank: int):
        super().__init__(cfg, pipe, family, frozen_copy, validation_prompts(cfg, prompts))
        self.prompts, self.scorer, self.sched, self.world, self.rank = prompts, scorer, sched, world, rank
        self.trained_steps = cfg.num_steps - cfg.divert_start_step  # transitions per prompt per round

    def batches_per_epoch(self) -> int:
        return math.ceil(len(self.prompts) / (self.cfg.sample_batch_size * self.world))

    def planned_steps(self) -> int:
        """Optimizer steps of the run if every transition were kept (the cosine schedule's length)."""
        cfg = self.cfg
        per_round = math.ceil(cfg.sample_batch_size * self.trained_steps / cfg.train_batch_size) * cfg.inner_epochs
        return max(1, cfg.epochs * self.batches_per_epoch() * per_round // cfg.gradient_accumulation_steps)

    def round_positions(self, epoch: int, round_index: int) -> list[int]:
        """Prompt positions of a global sampling round (this process samples its slice of them)."""
        n = self.cfg.sample_batch_size * self.world
        return self.order(len(self.prompts), epoch)[round_index * n: (round_index + 1) * n].tolist()

    def train_batch(self, run: Run, sync_now: bool) -> dict:
        cfg, p, size = self.cfg, run.progress, self.cfg.sample_batch_size
        positions = self.round_positions(p.epoch, p.batch)
        mine = positions[self.rank * size: (self.rank + 1) * size]
        # A process with no prompt left in a short last round samples one (unkept) so that it can still take part.
        fallback = int(self.order(len(self.prompts), p.epoch)[0])
        gens = item_generators(cfg.seed, p.epoch, mine or [fallback])
        run.module.eval()  # sampling with the current model, no gradients
        pairs, cond, uncond = collect_pairs(self.pipe, run.model, self.scorer, [self.prompts[i] for i in mine or [fallback]],
                                            gens, cfg, self.sched, self.dtype, run.accelerator.autocast)
        run.fire("batch_ready")
        run.module.train()
        kept = pairs.select(pairs.keep if mine else torch.zeros_like(pairs.keep))
        if self.world > 1:
            kept.row = kept.row + self.rank * size  # rows of the global round
            kept = gather_pairs(run.accelerator, kept)
            with torch.no_grad(), run.accelerator.autocast():
                round_prompts = [self.prompts[i] for i in positions]
                side = cfg.resolution or None
                cond = encode(self.pipe, round_prompts, side=side)
                uncond = encode(self.pipe, round_prompts, negative=True, side=side)
        kept = canonical_order(kept, size * self.world)
        stats = self.update(run, kept, pairs.select(slice(0, 1)), cond, uncond)
        stats.update(pairs=len(kept), kept_fraction=len(kept) / (len(positions) * self.trained_steps),
                     mean_score=float(torch.cat([pairs.score_w, pairs.score_l]).mean()))
        return stats

    def update(self, run: Run, kept: Pairs, spare: Pairs, cond, uncond) -> dict:
        """The round's train batches (`round_train_batches`), each through `run.train_step`."""
        cfg, p = self.cfg, run.progress
        batches = round_train_batches(len(kept), cfg.train_batch_size * self.world, cfg.inner_epochs, cfg.seed,
                                      p.epoch, p.batch)
        last_round = p.batch == self.batches_per_epoch() - 1
        if last_round and not batches and p.pending:
            batches = [torch.zeros(0, dtype=torch.long)]  # nothing kept: a zero-weight batch flushes the epoch's step
        losses, ratio_w, ratio_l = [], [], []
        for j, idx in enumerate(batches):
            share = torch.tensor_split(idx, self.world)[self.rank]
            stats = run.train_step(lambda sync: self.backward(run, kept.select(share), spare, len(idx), cond, uncond,
                                                              sync), self.weights, flush=last_round and j == len(batches) - 1)
            if len(idx):
                losses.append(stats["loss"])
            ratio_w += stats["ratio_win"]
            ratio_l += stats["ratio_lose"]
        return {"loss": sum(losses) / len(losses) if losses else 0.0, "train_batches": len(batches),
                "ratio_win": float(torch.cat(ratio_w).mean()) if ratio_w else 1.0,
                "ratio_lose": float(torch.cat(ratio_l).mean()) if ratio_l else 1.0}

    def backward(self, run: Run, mine: Pairs, spare: Pairs, n_global: int, cond, uncond, sync: bool) -> dict:
        """Backward of this process's share of a train batch, scaled so that the all-reduced (averaged) gradient is
        that of the train batch's mean loss over all `n_global` transitions, divided by the accumulation steps.

        Micro-batches of `train_micro_batch` bound the memory; a process with no share (or a flushing batch with no
        transition) runs one zero-weight micro-batch so that every process all-reduces together.
        """
        cfg, (_, a_t, a_prev) = self.cfg, self.sched
        source, weight = (mine, 1.0) if len(mine) else (spare, 0.0)
        scale = weight * self.world / (max(n_global, 1) * cfg.gradient_accumulation_steps)
        micro = cfg.train_micro_batch
        chunks = [source.select(slice(s, s + micro)) for s in range(0, len(source), micro)]
        total, ratio_w, ratio_l = 0.0, [], []
        for n, chunk in enumerate(chunks):
            with run.no_sync(n == len(chunks) - 1, sync):
                losses, logp_w, logp_l, ref_w, ref_l = pair_losses(
                    run.module, self.reference(run), _cast(chunk, self.dtype), cond, uncond, cfg, a_t, a_prev,
                    run.accelerator.autocast, parameterisation(self.pipe, cfg.guidance_rescale))
                run.accelerator.backward(losses.sum() * scale)
            total += float(losses.detach().sum())
            if weight:
                ratio_w.append(torch.exp(logp_w - ref_w).detach())
                ratio_l.append(torch.exp(logp_l - ref_l).detach())
        return {"loss": total / len(mine) if len(mine) else 0.0, "ratio_win": ratio_w, "ratio_lose": ratio_l}

    def postfix(self, stats: dict) -> dict:
        return {"loss": f"{stats['loss']:.4f}", "kept": f"{stats['kept_fraction']:.2f}",
                "steps": str(stats["train_batches"])}


def _cast(pairs: Pairs, dtype) -> Pairs:
    """Parents go into the UNet in its dtype; samples stay fp32 for the log-probability."""
    return Pairs(**{k: (v.to(dtype) if k.startswith("parent") else v) for k, v in vars(pairs).items()})


# --------------------------------------------------------------------------------------------- train
def train(cfg: SPOConfig, scorer=None, log=print) -> dict:
    """Run SPO with `cfg`. `scorer(images, prompts, t) -> scores` overrides cfg.preference (tests, API use)."""
    from accelerate.utils import set_seed

    from spo.models.loading import load_pipeline

    run = open_run(cfg, "spo", log)
    with run:
        set_seed(cfg.seed)
        prompts = load_training_prompts(cfg)  # before the model: a missing prompts file fails in a second
        pipe = load_pipeline(cfg.base, dtype=load_dtype(cfg), vae=cfg.vae, prediction_type=cfg.prediction_type)
        family = family_of(pipe)
        if cfg.resolution:
            latent_side(cfg.resolution, pipe.vae_scale_factor)  # a bad side fails before the SPM is loaded
        if scorer is None:
            scorer = load_preference(cfg.preference, cfg.base, family, weight_dtype(cfg))
        run.create_output_dir()
        unet, frozen_copy, params = setup_unet(pipe, cfg, family, run.device)
        sched = schedule(pipe.scheduler, cfg.num_steps, run.device)
        method = SPOMethod(cfg, pipe, family, frozen_copy, prompts, scorer, sched, run.accelerator.num_processes,
                           run.accelerator.process_index)
        run.attach(unet, params, total_steps=method.planned_steps())
        fit(run, method)
        return method.finish(run)
