"""Sibling agreement: can a preference model steer SPO? (`spo spm siblings`)

SPO never asks a preference model to rank two unrelated images. At each step it branches k candidates from
one x_t, scores each on its own x0-hat at the next timestep, and trains on the best against the worst. What
counts is whether that best, once finished, is better than that worst by a clean-image reference (a human
proxy such as PickScore, or the toy judge). Accuracy on generic pairs does not answer this: siblings share
their parent and differ only by one step's noise, which is a much finer distinction.

For each prompt, one plain trajectory is run to each measured step; there it is branched into k candidates
(one stochastic DDIM step from the shared x_t, as the resampler does), the scorers judge the candidates'
x0-hat at the next timestep, and each candidate is finished on its own for the reference to score. The
hindsight headroom (the reference's best minus worst of the finished siblings) shows how much of the image is
still open at that step.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Mapping, Sequence

import numpy as np
import torch

from spo.stats import paired_difference, proportion_half_width, win_fractions

if TYPE_CHECKING:
    from spo.spm.scoring import Scorer  # the one scorer protocol: what load_scorer returns

DEFAULT_STEPS = (0, 4, 10, 14, 18)


def _best_minus_worst(scores: np.ndarray, reference: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row of k siblings: whether the scorer can choose (its best and worst differ), and the reference's
    score of the scorer's best minus that of its worst."""
    rows = np.arange(len(scores))
    best, worst = scores.argmax(1), scores.argmin(1)
    return best != worst, reference[rows, best] - reference[rows, worst]


def best_worst_agreement(scores: np.ndarray, reference: np.ndarray) -> dict:
    """Over rows of k siblings: how often the scorer's best ends better by the reference than its worst.

    scores, reference: [n, k]. Rows where the scorer cannot choose (all equal) or the reference ties its best
    and worst are left out of the agreement; `pick_gain` averages the reference difference over all rows.
    """
    n = len(scores)
    chose, d = _best_minus_worst(scores, reference)
    decided = chose & (d != 0)
    m = int(decided.sum())
    agree = float((d[decided] > 0).mean()) if m else float("nan")
    ci = proportion_half_width(agree, m)  # the "+-" half-width this field has always held (spo.stats)
    return {"agreement": agree, "ci95": ci, "n": m, "pick_gain": float(d.mean()) if n else float("nan")}


def pick_outcomes(scores: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Per row of k siblings: 1 where the scorer's best ends better by the reference than its worst, 0 where
    worse, 0.5 where it cannot choose or the reference ties (a coin flip), so that two scorers compare on
    the same rows."""
    chose, d = _best_minus_worst(scores, reference)
    return np.where(chose, win_fractions(d, np.zeros(len(d))), 0.5)


def paired_picks(scores_a: np.ndarray, scores_b: np.ndarray, reference: np.ndarray) -> dict:
    """How much more often scorer b's pick ends better than scorer a's, on the same siblings (b - a, with the
    paired 95 % interval): the comparison that answers "does b steer SPO better than a"."""
    ci = paired_difference(pick_outcomes(scores_b, reference), pick_outcomes(scores_a, reference))
    return {"difference": ci.estimate, "ci95": ci.as_pair(), "n": ci.n,
            "excludes_zero": bool(not ci.contains(0.0))}


def _generators(seed: int, tag: int, index: Sequence[int]) -> list[torch.Generator]:
    # One generator per prompt (trunk) or per candidate (branch), keyed by its global index, so the result
    # does not depend on how prompts are batched.
    return [torch.Generator().manual_seed((seed * 7919 + tag) * 100_003 + i) for i in index]


def _rows(steps, timesteps, num_steps: int, scores: dict, ref: dict) -> list[dict]:
    """Per measured step: headroom by the first reference, each scorer's agreement with it and its pick gain by
    every reference, and every two scorers' paired difference in picks."""
    k = next(iter(ref.values())).shape[2]
    first = next(iter(ref))
    names = list(scores)
    rows = []
    for si, s in enumerate(steps):
        r = ref[first][si]
        row = {"step": s, "t": int(timesteps[s]), "t_judged": int(timesteps[s + 1]) if s + 1 < num_steps else 0,
               "headroom_best_minus_worst": float((r.max(1) - r.min(1)).mean()),
               "within_group_std": float(r.std(axis=1, ddof=1).mean()) if k > 1 else 0.0, "scorers": {}}
        for name in scores:
            res = best_worst_agreement(scores[name][si], r)
            for other in list(ref)[1:]:
                res[f"pick_gain_{other}"] = best_worst_agreement(scores[name][si], ref[other][si])["pick_gain"]
            row["scorers"][name] = res
        row["paired"] = [{"a": a, "b": b, **paired_picks(scores[a][si], scores[b][si], r)}
                         for i, a in enumerate(names) for b in names[i + 1:]]
        rows.append(row)
    return rows


@torch.no_grad()
def sibling_agreement(pipe, scorers: Mapping[str, Scorer], references: Mapping[str, Scorer], prompts: Sequence[str], *,
                      k: int = 4, steps: Sequence[int] = DEFAULT_STEPS, num_steps: int = 20, cfg: float = 5.0,
                      eta: float = 1.0, seed: int = 0, batch: int = 16, progress: bool = True) -> dict:
    """Per measured step: each scorer's agreement with the first reference, and its pick gain by every reference."""
    from tqdm.auto import tqdm

    from spo.ddim import ddim_step, x0_from_output
    from spo.models.family import encode, guided_output
    from spo.models.prediction import parameterisation
    from spo.sampling.resampler import sample_plain, schedule
    from spo.models.vae import decode as vae_decode
    from spo.spm.scoring import score_images

    steps = sorted(set(int(s) for s in steps))
    device = pipe.unet.device
    timesteps, a_t, a_prev = schedule(pipe.scheduler, num_steps, device=device)
    param = parameterisation(pipe)
    pt = param.prediction_type
    shape = (pipe.unet.config.in_channels, pipe.unet.config.sample_size, pipe.unet.config.sample_size)
    n = len(prompts)
    scores = {name: np.zeros((len(steps), n, k)) for name in scorers}
    ref = {name: np.zeros((len(steps), n, k)) for name in references}

    chunks = [list(range(i, min(n, i + batch))) for i in range(0, n, batch)]
    bar = tqdm(total=len(chunks) * len(steps), desc="siblings", unit="branch", disable=not progress)
    for idx in chunks:
        chunk_prompts = [prompts[i] for i in idx]
        cond, uncond = encode(pipe, chunk_prompts), encode(pipe, chunk_prompts, negative=True)
        rows_k = torch.arange(len(idx), device=device).repeat_interleave(k)
        branch_prompts = [chunk_prompts[r] for r in rows_k.tolist()]

        def eps_fn(x, t, rows):
            return guided_output(pipe.unet, x.to(pipe.unet.dtype), t, cond.index(rows), uncond.index(rows), cfg,
                                 param.guidance_rescale).float()

        def eps_branch(x, t, rows):
            return eps_fn(x, t, rows_k[rows])

        x = torch.stack([torch.randn(shape, generator=g) for g in _generators(seed, 0, idx)]).to(device)
        trunk = _generators(seed, 1, idx)
        done = 0
        for si, s in enumerate(steps):
            x = sample_plain(eps_fn, x, timesteps[done:s], a_t[done:s], a_prev[done:s], trunk, eta, pt)
            done = s
            cand = torch.arange(len(idx) * k, device=device)
            branch = _generators(seed, 100 + s, [i * k + j for i in idx for j in range(k)])
            noise = torch.stack([torch.randn(shape, generator=g) for g in branch]).to(device)
            eps = eps_fn(x, timesteps[s].expand(len(idx)), torch.arange(len(idx), device=device))
            child = ddim_step(x.repeat_interleave(k, 0), eps.repeat_interleave(k, 0), a_t[s], a_prev[s], eta, noise, pt)
            if s + 1 < num_steps:
                t_next = timesteps[s + 1].expand(len(cand))
                x0_hat = x0_from_output(eps_branch(child, t_next, cand), child, a_t[s + 1], pt)
                final = sample_plain(eps_branch, child, timesteps[s + 1:], a_t[s + 1:], a_prev[s + 1:], branch, eta, pt)
            else:  # the last step's candidates are already clean
                t_next, x0_hat, final = torch.zeros(len(cand), dtype=torch.long, device=device), child, child
            judged, finished = vae_decode(pipe.vae, x0_hat), vae_decode(pipe.vae, final)  # decoded once for all scorers
            for name, scorer in scorers.items():
                scores[name][si, idx] = score_images(scorer, judged, branch_prompts, t_next).view(-1, k).numpy()
            for name, scorer in references.items():
                ref[name][si, idx] = score_images(scorer, finished, branch_prompts, torch.tensor(0)).view(-1, k).numpy()
            bar.update(1)
    bar.close()

    rows = _rows(steps, timesteps, num_steps, scores, ref)
    return {"n_prompts": n, "k": k, "num_steps": num_steps, "cfg": cfg, "eta": eta, "seed": seed,
            "scorers": list(scorers), "references": list(references), "rows": rows}


def format_table(result: dict) -> str:
    names = result["scorers"]
    width = max(10, *(len(x) for x in names))
    head = f"{'step':>4} {'t':>4} {'headroom':>9}  " + "  ".join(f"{x:>{width}}" for x in names)
    lines = [head, "-" * len(head)]
    for row in result["rows"]:
        cells = [f"{100 * row['scorers'][x]['agreement']:5.1f}% ±{100 * row['scorers'][x]['ci95']:4.1f}".rjust(width)
                 for x in names]
        lines.append(f"{row['step']:>4} {row['t']:>4} {row['headroom_best_minus_worst']:>9.3f}  " + "  ".join(cells))
    for row in result["rows"]:
        for d in row.get("paired", []):
            lo, hi = d["ci95"]
            lines.append(f"step {row['step']:>2}: {d['b']} minus {d['a']}: {100 * d['difference']:+5.1f} points "
                         f"[{100 * lo:+.1f}, {100 * hi:+.1f}] (paired, same siblings)")
    lines.append(f"share of {result['n_prompts']} prompts where the scorer's best of {result['k']} siblings ends better "
                 f"than its worst by {result['references'][0]} (50% = a coin flip); headroom: the reference's best "
                 f"minus worst of the finished siblings")
    return "\n".join(lines)


def plot_siblings(result: dict, target, title: str = "") -> None:
    """Agreement per step (left) and what the pick is worth against the hindsight headroom (right), as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from spo.io import atomic_path

    rows = result["rows"]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4), dpi=120)
    steps = [r["step"] for r in rows]
    for name in result["scorers"]:
        ax.errorbar(steps, [100 * r["scorers"][name]["agreement"] for r in rows],
                    yerr=[100 * r["scorers"][name]["ci95"] for r in rows], marker="o", capsize=3, label=name)
        ax2.plot(steps, [r["scorers"][name]["pick_gain"] for r in rows], marker="o", label=f"{name}: best - worst")
    ax2.plot(steps, [r["headroom_best_minus_worst"] for r in rows], "k--", label="hindsight (finished): max - min")
    ax.axhline(50, color="gray", lw=0.8, ls="--")
    sub = f"of {result['num_steps']}"
    ax.set_xlabel(f"sampling step the siblings branch at ({sub})")
    ax.set_ylabel("scorer's best ends better than its worst (%)")
    ax.set_title(title or f"sibling agreement ({result['n_prompts']} prompts, k = {result['k']})")
    ax2.set_xlabel(f"sampling step the siblings branch at ({sub})")
    ax2.set_ylabel("reference score difference, finished images")
    ax2.set_title(f"what the pick is worth by {result['references'][0]}", fontsize=9)
    for a in (ax, ax2):
        a.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(target, suffix=".png") as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
