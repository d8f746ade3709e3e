"""One SPO sampling round: the pairs the resampler collects with the current model (`collect_pairs`, judged by
`make_judge`), and the official update structure that turns a round's kept transitions into train batches
(`round_train_batches`, in one `canonical_order` however the round was sharded, `gather_pairs` across processes).
"""

from __future__ import annotations

import contextlib

import torch

from spo.models.family import Conditioning, encode, guided_output, latent_side
from spo.models.prediction import parameterisation
from spo.sampling.resampler import Pairs, sample_pairs
from spo.train.config import SPOConfig


def make_judge(scorer, pipe, prompts: list[str], chunk: int = 0):
    """judge_fn for the resampler: decode predicted clean latents with the VAE, score at the timestep; `chunk`
    candidates at a time (0: all at once): the decoded images of every candidate are the judging memory peak."""
    from spo.models.vae import decode

    vae = pipe.vae

    def judge(x0: torch.Tensor, rows: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        step = chunk or len(x0)
        scores = []
        for s in range(0, len(x0), step):
            images = decode(vae, x0[s:s + step])  # in fp32 where fp16 would overflow (the original SDXL VAE)
            got = scorer(images, [prompts[r] for r in rows[s:s + step].tolist()], t[s:s + step])
            scores.append(torch.as_tensor(got).float().to(x0.device))
        return torch.cat(scores)

    return judge


def collect_pairs(pipe, model, scorer, prompts: list[str], generators, cfg: SPOConfig, sched, weight_dtype=torch.float32,
                  autocast=contextlib.nullcontext) -> tuple[Pairs, Conditioning, Conditioning]:
    """Sampling phase of one batch: the resampler run with the current model on `prompts`."""
    timesteps, a_t, a_prev = sched
    param = parameterisation(pipe, cfg.guidance_rescale)
    device = model.device
    side = cfg.resolution or None
    latent = latent_side(side, pipe.vae_scale_factor) if side else model.config.sample_size
    latent_shape = (model.config.in_channels, latent, latent)
    with torch.no_grad(), autocast():
        cond = encode(pipe, prompts, side=side)
        uncond = encode(pipe, prompts, negative=True, side=side)

        def model_fn(x, t, rows):
            return guided_output(model, x.to(weight_dtype), t, cond.index(rows), uncond.index(rows), cfg.cfg_scale,
                                 param.guidance_rescale).float()

        x_T = torch.stack([torch.randn(latent_shape, generator=g) for g in generators]).to(device)
        judge = make_judge(scorer, pipe, prompts, cfg.judge_batch)
        _, pairs = sample_pairs(model_fn, judge, x_T, timesteps, a_t, a_prev, generators,
                                k=cfg.k, divert_start_step=cfg.divert_start_step, threshold=cfg.threshold,
                                num_inner_steps=cfg.num_inner_steps, eta=cfg.eta, prediction_type=param.prediction_type)
    return pairs, cond, uncond


# -------------------------------------------------------------------------------------------- update structure
def round_train_batches(n_kept: int, global_batch: int, inner_epochs: int, seed: int, epoch: int,
                        round_index: int) -> list[torch.Tensor]:
    """The official SPO update structure for one sampling round: its kept transitions, shuffled (seeded by the run's
    seed, the epoch, the round and the inner epoch), split into train batches of `global_batch` (the last one
    shorter), once per inner epoch. Each train batch is one backward on its mean loss."""
    batches = []
    for inner in range(inner_epochs):
        g = torch.Generator().manual_seed(hash((seed, epoch, round_index, inner)) % (2**63))
        perm = torch.randperm(n_kept, generator=g)
        batches += list(perm.split(global_batch)) if n_kept else []
    return batches


def canonical_order(pairs: Pairs, rows_per_round: int) -> Pairs:
    """Transitions ordered by (step, prompt of the round): the same order however the round was sharded."""
    key = pairs.step_index * rows_per_round + pairs.row
    return pairs.select(torch.argsort(key, stable=True))


def gather_pairs(accelerator, pairs: Pairs) -> Pairs:
    """Every process's transitions, in process order (lengths differ: padded for the all-gather, then trimmed)."""
    counts = accelerator.gather(torch.tensor([len(pairs)], device=accelerator.device)).tolist()
    fields = {}
    for name, value in vars(pairs).items():
        padded = accelerator.gather(accelerator.pad_across_processes(value.contiguous(), dim=0))
        width = padded.shape[0] // len(counts)
        fields[name] = torch.cat([padded[r * width: r * width + n] for r, n in enumerate(counts)])
    return Pairs(**fields)
