"""Preference losses as pure functions: SPO's clipped-ratio loss, the step-wise pair selection, Diffusion-DPO,
and the step-aware preference model's own loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def spo_loss(logp_w: torch.Tensor, logp_l: torch.Tensor, ref_logp_w: torch.Tensor, ref_logp_l: torch.Tensor,
             beta: float = 10.0, eps: float = 0.1) -> torch.Tensor:
    """-log sigmoid(beta * (log r_w - log r_l)), r = clamp(p_theta / p_ref, 1 - eps, 1 + eps), per pair.

    The clamp stops gradients once a ratio leaves the trust band (as in PPO-style clipping).
    """
    r_w = torch.exp(logp_w - ref_logp_w).clamp(1 - eps, 1 + eps)
    r_l = torch.exp(logp_l - ref_logp_l).clamp(1 - eps, 1 + eps)
    return -F.logsigmoid(beta * (r_w.log() - r_l.log()))


def select_pairs(scores: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """From candidate scores [B, k]: (win index, lose index, keep mask) per row.

    Best and worst of the k; softmax over those two scores; keep the pair iff p_win - p_lose > threshold.
    """
    # Ties: argmax/argmin take the first; the official code (a stable descending sort) takes the first best and
    # the *last* worst. Kept: only which of equally-scored losers is paired changes, never the scores, the keep
    # decision or the loss value (a tie of best and worst has gap 0 and is never kept); float scores of distinct
    # images tie with probability ~0. See docs/presets.md.
    win = scores.argmax(dim=1)
    lose = scores.argmin(dim=1)
    pair = torch.stack([scores.gather(1, win[:, None]), scores.gather(1, lose[:, None])], dim=1).squeeze(-1)
    p = pair.softmax(dim=1)
    keep = (p[:, 0] - p[:, 1]) > threshold
    return win, lose, keep


def diffusion_dpo_loss(err_w: torch.Tensor, err_l: torch.Tensor, ref_err_w: torch.Tensor, ref_err_l: torch.Tensor,
                       beta: float) -> torch.Tensor:
    """Diffusion-DPO (Wallace et al. 2023, arXiv 2311.12908, eq. 14), per pair:

        -log sigmoid(-beta / 2 * [(err_theta(w) - err_ref(w)) - (err_theta(l) - err_ref(l))])

    err = mean squared error of the noise prediction of the winner (w) / loser (l), both noised with the
    same noise at the same t. The model gains by denoising the winner better than the reference does,
    relative to how it does on the loser. The argument of the sigmoid is the implicit reward margin.
    """
    margin = -0.5 * beta * ((err_w - ref_err_w) - (err_l - ref_err_l))
    return -F.logsigmoid(margin)


def preference_loss(s0: torch.Tensor, s1: torch.Tensor, label0: torch.Tensor, label1: torch.Tensor,
                    weight: torch.Tensor) -> torch.Tensor:
    """The SPM's loss: weighted mean of CE(label, softmax(s0, s1)) - H(label), 0 at the optimum for wins and ties."""
    logp = torch.log_softmax(torch.stack([s0, s1], dim=-1).float(), dim=-1)
    labels = torch.stack([label0, label1], dim=-1).float()
    per_example = -(labels * logp).sum(-1) + torch.special.xlogy(labels, labels).sum(-1)
    w = weight.float() / weight.float().sum()
    return (w * per_example).sum()
