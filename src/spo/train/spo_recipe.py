"""The SPO recipe: config in, LoRA and images out. Its batches and its loss; the loop is spo.train.engine's.

Each batch: sample a batch of prompts with the step-wise resampler using the current model
(spo.sampling.resampler), then the clipped-ratio loss (spo.losses.spo_loss) on the kept win/lose transitions.
The reference model is the frozen base: with LoRA it is the same UNet with its adapters disabled, so there is
never a second UNet in memory.

Distributed runs (accelerate launch) shard the prompts of each global batch across processes. Every prompt has
its own random generator seeded by (seed, epoch, position), and each process's loss is normalised by its number
of candidate transitions (kept or not), so N processes with batch B give the same update as one process with
batch N*B.
"""

from __future__ import annotations

import contextlib
import math

import torch

from spo.ddim import ddim_sigma, ddim_transition_mean, gaussian_log_prob
from spo.errors import SpoInputError
from spo.losses import spo_loss
from spo.models.family import Conditioning, encode, family_of, guided_output
from spo.models.prediction import EPSILON, Parameterisation, parameterisation
from spo.sampling.resampler import Pairs, sample_pairs, schedule
from spo.train.config import SPOConfig
from spo.train.engine import Run, fit, open_run
from spo.train.finetune import FinetuneMethod, item_generators, setup_unet, validation_prompts


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


def load_preference(spec: str, base: str, family: str):
    """The preference source: an SPM folder, a CLIP folder, "module:function", or a built-in base's shipped SPM."""
    from spo.sources import get
    from spo.spm.scoring import load_scorer

    if not spec:
        source = get(base)
        if source is None or not source.preference:
            raise SpoInputError("no preference model given: pass --preference SPM_FOLDER or module:function "
                                "(train one with `spo spm train`)")
        spec = source.preference
    return load_scorer(spec, family=family)


def make_judge(scorer, pipe, prompts: list[str]):
    """judge_fn for the resampler: decode predicted clean latents with the VAE, score at the timestep."""
    vae = pipe.vae

    def judge(x0: torch.Tensor, rows: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        images = vae.decode(x0.to(vae.dtype) / vae.config.scaling_factor).sample.clamp(-1, 1).float()
        return torch.as_tensor(scorer(images, [prompts[r] for r in rows.tolist()], t)).float().to(x0.device)

    return judge


def collect_pairs(pipe, model, scorer, prompts: list[str], generators, cfg: SPOConfig, sched, weight_dtype=torch.float32,
                  autocast=contextlib.nullcontext) -> tuple[Pairs, Conditioning, Conditioning]:
    """Sampling phase of one batch: the resampler run with the current model on `prompts`."""
    timesteps, a_t, a_prev = sched
    param = parameterisation(pipe, cfg.guidance_rescale)
    device = model.device
    latent_shape = (model.config.in_channels, model.config.sample_size, model.config.sample_size)
    with torch.no_grad(), autocast():
        cond = encode(pipe, prompts)
        uncond = encode(pipe, prompts, negative=True)

        def model_fn(x, t, rows):
            return guided_output(model, x.to(weight_dtype), t, cond.index(rows), uncond.index(rows), cfg.cfg_scale,
                                 param.guidance_rescale).float()

        x_T = torch.stack([torch.randn(latent_shape, generator=g) for g in generators]).to(device)
        _, pairs = sample_pairs(model_fn, make_judge(scorer, pipe, prompts), x_T, timesteps, a_t, a_prev, generators,
                                k=cfg.k, divert_start_step=cfg.divert_start_step, threshold=cfg.threshold,
                                num_inner_steps=cfg.num_inner_steps, eta=cfg.eta, prediction_type=param.prediction_type)
    return pairs, cond, uncond


# -------------------------------------------------------------------------------------------- the method
class SPOMethod(FinetuneMethod):
    name, title = "spo", "SPO"

    def __init__(self, cfg: SPOConfig, pipe, family, frozen_copy, prompts, scorer, sched, world: int, rank: int):
        super().__init__(cfg, pipe, family, frozen_copy, validation_prompts(cfg, prompts))
        self.prompts, self.scorer, self.sched, self.world, self.rank = prompts, scorer, sched, world, rank
        # Per process, nominal (a short last batch keeps it): the loss normaliser that makes N x B equal 1 x NB.
        self.n_candidates = cfg.sample_batch_size * (cfg.num_steps - cfg.divert_start_step)

    def batches_per_epoch(self) -> int:
        return math.ceil(len(self.prompts) / (self.cfg.sample_batch_size * self.world))

    def train_batch(self, run: Run, sync_now: bool) -> dict:
        cfg, p = self.cfg, run.progress
        order = self.order(len(self.prompts), p.epoch)
        lo = p.batch * cfg.sample_batch_size * self.world + self.rank * cfg.sample_batch_size
        positions = order[lo: lo + cfg.sample_batch_size].tolist()
        batch_prompts = [self.prompts[i] for i in positions] if positions else [self.prompts[order[0]]]
        gens = item_generators(cfg.seed, p.epoch, positions or [int(order[0])])
        run.module.eval()  # sampling with the current model, no gradients
        pairs, cond, uncond = collect_pairs(self.pipe, run.model, self.scorer, batch_prompts, gens, cfg, self.sched,
                                            self.dtype, run.accelerator.autocast)
        run.fire("batch_ready")
        run.module.train()
        kept = pairs.select(pairs.keep if positions else torch.zeros_like(pairs.keep))
        stats = self.backward(run, kept, pairs, cond, uncond, sync_now)
        stats.update(kept_fraction=float(pairs.keep.float().mean()),
                     mean_score=float(torch.cat([pairs.score_w, pairs.score_l]).mean()), n_candidates=self.n_candidates)
        return stats

    def backward(self, run: Run, kept: Pairs, pairs: Pairs, cond, uncond, sync_now: bool) -> dict:
        """Backward of sum(loss of kept pairs) / n_candidates in micro-batches; gradients all-reduced once, on the last.

        Ranks keep different numbers of pairs, so accelerate's per-backward sync could deadlock; every rank
        runs at least one (possibly zero-weight) micro-batch and syncs exactly once per optimizer step.
        """
        cfg, (_, a_t, a_prev) = self.cfg, self.sched
        micro = cfg.train_micro_batch
        source, weight = (kept, 1.0) if len(kept) else (pairs.select(slice(0, 1)), 0.0)
        chunks = [source.select(slice(s, s + micro)) for s in range(0, len(source), micro)]
        total_loss, ratio_w, ratio_l = 0.0, [], []
        scale = weight / (self.n_candidates * cfg.gradient_accumulation_steps)
        for n, chunk in enumerate(chunks):
            with run.no_sync(n == len(chunks) - 1, sync_now):
                losses, logp_w, logp_l, ref_w, ref_l = pair_losses(
                    run.module, self.reference(run), _cast(chunk, self.dtype), cond, uncond, cfg, a_t, a_prev,
                    run.accelerator.autocast, parameterisation(self.pipe, cfg.guidance_rescale))
                run.accelerator.backward(losses.sum() * scale)
            total_loss += float(losses.detach().sum())
            ratio_w.append(torch.exp(logp_w - ref_w).detach())
            ratio_l.append(torch.exp(logp_l - ref_l).detach())
        return {"loss": total_loss / max(len(kept), 1) if len(kept) else 0.0, "pairs": len(kept),
                "ratio_win": float(torch.cat(ratio_w).mean()), "ratio_lose": float(torch.cat(ratio_l).mean())}

    def postfix(self, stats: dict) -> dict:
        return {"loss": f"{stats['loss']:.4f}", "kept": f"{stats['kept_fraction']:.2f}"}


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
        pipe = load_pipeline(cfg.base, prediction_type=cfg.prediction_type)
        family = family_of(pipe)
        if scorer is None:
            scorer = load_preference(cfg.preference, cfg.base, family)
        run.create_output_dir()
        unet, frozen_copy, params = setup_unet(pipe, cfg, family, run.device)
        sched = schedule(pipe.scheduler, cfg.num_steps, run.device)
        method = SPOMethod(cfg, pipe, family, frozen_copy, prompts, scorer, sched, run.accelerator.num_processes,
                           run.accelerator.process_index)
        run.attach(unet, params, total_steps=cfg.epochs * method.batches_per_epoch() // cfg.gradient_accumulation_steps)
        fit(run, method)
        return method.finish(run)
