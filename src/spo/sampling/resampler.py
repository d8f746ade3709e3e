"""SPO's step-wise resampler (SPEC section 1): sample, branch into k candidates, judge, pair, continue.

`sample_pairs` is the whole sampler in one function, k-diffusion style. It knows nothing about models:
`model_fn` gives the CFG model output of rows of the batch (eps, or v for a v-prediction model: the
`prediction_type` argument says which), `judge_fn` scores predicted clean latents.
With `num_inner_steps = 0` it is the SD1.5 recipe; with 3 it is the SDXL recipe, where each branch runs
for 3 more steps before it is judged and every transition on the winning branch is paired with the
same-index transition of the losing one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from spo.ddim import ddim_step, x0_from_output
from spo.losses import select_pairs

# model_fn(x [N,C,H,W], t [N], rows [N]) -> CFG model output [N,C,H,W]; rows index the prompts of the batch.
ModelFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
# judge_fn(x0 latents [N,C,H,W], rows [N], t [N]) -> scores [N]
JudgeFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class Pairs:
    """Transitions to train on: win and lose share the timestep and prompt; with inner steps, not the parent."""

    parent_w: torch.Tensor
    parent_l: torch.Tensor
    sample_w: torch.Tensor
    sample_l: torch.Tensor
    timestep: torch.Tensor  # [N] long
    step_index: torch.Tensor  # [N] long, index into the sampling schedule (gives a_t, a_prev)
    row: torch.Tensor  # [N] long, prompt index in the batch
    keep: torch.Tensor  # [N] bool: passed the softmax-gap threshold
    score_w: torch.Tensor
    score_l: torch.Tensor

    def __len__(self) -> int:
        return len(self.timestep)

    def select(self, idx) -> "Pairs":
        return Pairs(**{k: v[idx] for k, v in vars(self).items()})

    @staticmethod
    def cat(parts: list["Pairs"]) -> "Pairs":
        return Pairs(**{k: torch.cat([getattr(p, k) for p in parts]) for k in vars(parts[0])})


def schedule(scheduler, num_steps: int, device=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(timesteps, a_t, a_prev) of a diffusers DDIMScheduler's sampling schedule, one entry per step.

    The last step goes to alphas_cumprod[0], as the official SPO code's (it clamps the previous timestep at 0),
    not to the scheduler's final_alpha_cumprod: with set_alpha_to_one=True that is 1, sigma_t would be 0 and the
    last step's log-probability NaN. SD1.5 and SDXL ship set_alpha_to_one=False, where the two are the same.
    """
    scheduler.set_timesteps(num_steps, device=device)
    timesteps = scheduler.timesteps.long()
    ac = scheduler.alphas_cumprod.to(device)
    prev = timesteps - scheduler.config.num_train_timesteps // num_steps
    return timesteps, ac[timesteps], ac[prev.clamp(min=0)]


def _noise(generators: list[torch.Generator], rows: torch.Tensor, shape, device, dtype) -> torch.Tensor:
    """Per-row noise from each prompt's own generator, so a prompt's trajectory does not depend on its batch."""
    out = [torch.randn(shape, generator=generators[r], dtype=torch.float32) for r in rows.tolist()]
    return torch.stack(out).to(device=device, dtype=dtype)


@torch.no_grad()
def sample_pairs(model_fn: ModelFn, judge_fn: JudgeFn, x: torch.Tensor, timesteps: torch.Tensor, a_t: torch.Tensor,
                 a_prev: torch.Tensor, generators: list[torch.Generator], *, k: int, divert_start_step: int,
                 threshold: float, num_inner_steps: int = 0, eta: float = 1.0,
                 prediction_type: str = "epsilon") -> tuple[torch.Tensor, Pairs]:
    """Run the resampler from x_T [B,...] and return (final latents x_0, the win/lose transition pairs).

    Steps before `divert_start_step` are plain DDIM sampling. From there, at the shared x_t: one CFG
    prediction, k candidates from the same mean with independent noise, each branch run `num_inner_steps`
    more steps, each judged on its own predicted x0 at the next timestep (at t = 0 when the branch ends at
    the clean image), best vs worst kept if their softmax gap exceeds `threshold`, and one branch chosen
    uniformly at random to continue. The chosen branch's judging prediction is reused as its next step's
    prediction, so judging costs no extra UNet call on the continuing path.
    """
    batch, shape, n_steps = x.shape[0], x.shape[1:], len(timesteps)
    rows = torch.arange(batch, device=x.device)
    branch_rows = rows.repeat_interleave(k)
    pairs: list[Pairs] = []
    pt = prediction_type
    eps = None  # the model output at the shared x_t (eps for an epsilon model)
    i = 0
    while i < n_steps:
        t = timesteps[i].expand(batch)
        if eps is None:
            eps = model_fn(x, t, rows)
        if i < divert_start_step:
            x = ddim_step(x, eps, a_t[i], a_prev[i], eta, _noise(generators, rows, shape, x.device, x.dtype), pt)
            eps, i = None, i + 1
            continue
        # Branch: k candidates from the shared x_t, each continued on its own for the inner steps.
        n_branch = min(1 + num_inner_steps, n_steps - i)
        xb, eps_b, path = x.repeat_interleave(k, dim=0), eps.repeat_interleave(k, dim=0), []
        for j in range(n_branch):
            if j > 0:
                eps_b = model_fn(xb, timesteps[i + j].expand(len(xb)), branch_rows)
            child = ddim_step(xb, eps_b, a_t[i + j], a_prev[i + j], eta,
                              _noise(generators, branch_rows, shape, x.device, x.dtype), pt)
            path.append((xb, child, i + j))
            xb = child
        # Judge each branch on its own predicted clean image at the next timestep (t = 0 if it is clean).
        nxt = i + n_branch
        if nxt < n_steps:
            t_next = timesteps[nxt].expand(len(xb))
            eps_next = model_fn(xb, t_next, branch_rows)
            scores = judge_fn(x0_from_output(eps_next, xb, a_t[nxt], pt), branch_rows, t_next)
        else:
            eps_next = None
            scores = judge_fn(xb, branch_rows, torch.zeros(len(xb), dtype=torch.long, device=x.device))
        scores = scores.float().view(batch, k)
        win, lose, keep = select_pairs(scores, threshold)
        w_idx, l_idx = rows * k + win, rows * k + lose
        for parent, child, step in path:
            pairs.append(Pairs(parent_w=parent[w_idx], parent_l=parent[l_idx], sample_w=child[w_idx],
                               sample_l=child[l_idx], timestep=timesteps[step].expand(batch).clone(),
                               step_index=torch.full((batch,), step, device=x.device), row=rows.clone(), keep=keep,
                               score_w=scores[rows, win], score_l=scores[rows, lose]))
        # Continue from one branch chosen uniformly at random (not the winner: SPEC section 1).
        choice = torch.stack([torch.randint(k, (), generator=generators[r]) for r in rows.tolist()]).to(x.device)
        pick = rows * k + choice
        x = xb[pick]
        eps = None if eps_next is None else eps_next[pick]
        i = nxt
    return x, Pairs.cat(pairs)


@torch.no_grad()
def sample_plain(model_fn: ModelFn, x: torch.Tensor, timesteps, a_t, a_prev, generators, eta: float = 1.0,
                 prediction_type: str = "epsilon") -> torch.Tensor:
    """Plain DDIM sampling with the same per-row noise convention (no branching)."""
    rows = torch.arange(x.shape[0], device=x.device)
    for i in range(len(timesteps)):
        out = model_fn(x, timesteps[i].expand(len(x)), rows)
        noise = _noise(generators, rows, x.shape[1:], x.device, x.dtype) if eta > 0 else torch.zeros_like(x)
        x = ddim_step(x, out, a_t[i], a_prev[i], eta, noise, prediction_type)
    return x
