"""Pairwise accuracy of SPMs on held-out pairs at several timesteps (`spo spm eval`).

At t = 0 the SPM sees the clean images (as the official evaluation does); at t > 0 it sees the base
model's x0-hat after noising both images of a pair with the same noise. Ties are excluded. Several SPMs are
scored on the very same predicted images, so their curves compare like for like.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from spo import sources, stats
from spo.errors import SpoInputError

DEFAULT_TIMESTEPS = (0, 251, 501, 701, 951)


def preferred_margin(s0: np.ndarray, s1: np.ndarray, preferred: np.ndarray) -> np.ndarray:
    """Per pair: the preferred image's score minus the other's."""
    return np.where(preferred == 0, s0 - s1, s1 - s0)


def pair_correct(s0: np.ndarray, s1: np.ndarray, preferred: np.ndarray) -> np.ndarray:
    """Per pair: 1 where the preferred image scores higher, 0 where lower, 0.5 for equal scores."""
    diff = preferred_margin(s0, s1, preferred)
    return np.where(diff > 0, 1.0, np.where(diff == 0, 0.5, 0.0))


def pairwise_accuracy(s0: np.ndarray, s1: np.ndarray, preferred: np.ndarray) -> float:
    """Share of pairs where the preferred image scores higher (equal scores count half)."""
    if len(s0) == 0:
        return float("nan")
    return float(np.mean(pair_correct(s0, s1, preferred)))


def pairwise_log_loss(s0: np.ndarray, s1: np.ndarray, preferred: np.ndarray) -> float:
    """Mean -log softmax(s0, s1)[preferred] in nats: ln 2 = 0.693 for a scorer that always says "can't tell".

    Accuracy only asks for the order; SPO also reads the margin (it keeps a pair only when the softmax gap
    exceeds its threshold), so a scorer that knows when it cannot tell, e.g. at high t, shows it here.
    """
    if len(s0) == 0:
        return float("nan")
    margin = preferred_margin(s0, s1, preferred).astype(np.float64)
    return float(np.mean(np.logaddexp(0.0, -margin)))


def paired_difference(correct_a: np.ndarray, correct_b: np.ndarray) -> tuple[float, float]:
    """Accuracy of b minus accuracy of a on the same pairs, with its 95 % half-width (spo.stats: Student t below
    100 pairs, normal above).

    Pairing removes the variance both scorers share (how hard each pair is), so this interval is narrower than
    one combined from the two accuracies' own intervals, and it is the one that answers "is b better than a".
    """
    if len(correct_a) < 2:
        return float("nan"), float("nan")
    d = stats.paired_difference(correct_b, correct_a)
    return d.estimate, d.half_width


def judge_aesthetic_pairs(pairs, judge) -> np.ndarray:
    """(n, 2) judge aesthetic scores of both images of each pair (`judge`: a model source's judge)."""
    return np.array([judge(p.decode(), [p.caption] * 2)["aesthetic"] for p in pairs]).reshape(-1, 2)


def judge_alignment_pairs(pairs, judge) -> np.ndarray:
    """(n, 2) judge alignment (0/1) of both images of each pair with the pair's caption."""
    return np.array([judge(p.decode(), [p.caption] * 2)["alignment"] for p in pairs]).reshape(-1, 2)


def evaluate(spm_paths: Sequence[str | Path], data: Sequence[str | Path], *, base: str | None = None,
             timesteps: Sequence[int] = DEFAULT_TIMESTEPS, min_judge_gap: float | None = None, seed: int = 0,
             batch_size: int = 16, cfg_scale: float = 5.0, limit: int | None = None, device: str | None = None,
             progress: bool = True, against: str = "labels", same_judge_alignment: bool = False,
             vae: str | Path | None = None) -> dict:
    """Accuracy of each SPM at each timestep.

    `against="labels"` scores agreement with the pairs' human (or simulated-rater) labels, ties excluded.
    `against="judge"` (toy world) scores agreement with the toy judge's aesthetic order instead: the rater's
    labels also weigh prompt alignment and mood, so on the toy's model-sample pairs even a perfect aesthetic
    scorer agrees with the labels only about 70 % of the time on clear-aesthetic-gap pairs.
    `same_judge_alignment` (toy world) keeps only pairs whose two images the judge finds equally aligned with
    the caption, where the judge's own preference (alignment first) is its aesthetic order.
    """
    from spo.models.family import family_of, native_resolution
    from spo.models.loading import load_pipeline
    from spo.spm.denoise import freeze
    from spo.spm.scoring import load_spm

    if not spm_paths:
        raise SpoInputError("give at least one SPM folder to evaluate")
    timesteps = _check_settings(timesteps, batch_size, min_judge_gap, against)
    base = base or sources.DEFAULT_SOURCE
    source = sources.get(base)
    judge = source.judge if source is not None else None
    if judge is None and (min_judge_gap is not None or against == "judge" or same_judge_alignment):
        raise SpoInputError(f"{base}: no judge for this base model (--against judge, --min-judge-gap and "
                            "--same-judge-alignment need a built-in model with one)")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    pipe = load_pipeline(base, vae=vae)
    freeze(pipe)
    pipe.to(dev)
    family = family_of(pipe)
    spms = [load_spm(p, family=family, device=dev) for p in spm_paths]
    chosen = choose_pairs(data, source, against, min_judge_gap, same_judge_alignment, limit)
    summary = chosen["summary"]
    scores, preferred = score_pairs(pipe, spms, chosen["pairs"], chosen["n"], timesteps, native_resolution(pipe),
                                    dev, seed, batch_size, cfg_scale, progress)
    if not len(preferred):
        raise SpoInputError(f"no decided (non-tie) pairs left to evaluate ({summary.describe()})")
    models, paired = compare_models(spm_paths, spms, scores, timesteps, preferred)
    return {"timesteps": timesteps, "n_pairs": len(preferred), "ties_excluded": chosen["ties"],
            "against": against, "judge_gap": min_judge_gap, "same_judge_alignment": same_judge_alignment,
            "filtered_by_judge_gap": chosen["filtered"], "base_model": str(base),
            "family": family, "seed": seed, "cfg_scale": cfg_scale, "data": [str(f) for f in summary.files],
            "models": models, "paired": paired, "references": chosen["references"],
            # rows the reader could not use (bad image bytes, labels, prompts), counted by reason, as `spo dpo` says
            "read": {"rows": summary.rows_read, "pairs": summary.pairs_kept, "skipped": summary.rows_skipped,
                     "skipped_by_reason": dict(summary.skipped), "text": summary.describe()}}


def _check_settings(timesteps, batch_size: int, min_judge_gap, against: str) -> list[int]:
    from spo.ddim import NUM_TRAIN_TIMESTEPS

    timesteps = [int(t) for t in timesteps]
    bad = [t for t in timesteps if not 0 <= t < NUM_TRAIN_TIMESTEPS]
    if bad or not timesteps:
        raise SpoInputError(f"timesteps must be in [0, {NUM_TRAIN_TIMESTEPS}), got {bad or 'none'}")
    if batch_size <= 0:
        raise SpoInputError(f"batch size must be positive, got {batch_size}")
    if min_judge_gap is not None and min_judge_gap < 0:
        raise SpoInputError(f"--min-judge-gap must be >= 0, got {min_judge_gap}")
    if against not in ("labels", "judge"):
        raise SpoInputError(f"--against must be 'labels' or 'judge', got {against!r}")
    return timesteps


def choose_pairs(data, source, against: str, min_judge_gap, same_judge_alignment: bool, limit) -> dict:
    """What to evaluate, streamed: {"pairs": iterable of (pair, preferred image), "n": how many at most, "summary",
    "ties", "filtered", "references"}.

    Against the labels only the index is read first (ties are known from it) and the images of the chosen rows are
    then read once, unit by unit; the toy judge's filters need every pair's images, so they read them into memory.
    """
    from spo.data.stream import build_index, iter_pairs

    index = build_index(data)
    if against == "judge" or min_judge_gap is not None or same_judge_alignment:
        pairs = [p for _, p in iter_pairs(index)]
        chosen = select_pairs(pairs, index.summary, source, against, min_judge_gap, same_judge_alignment, limit)
        return {**chosen, "pairs": list(zip(chosen["pairs"], chosen["preferred"])), "n": len(chosen["pairs"]),
                "summary": index.summary}
    decided = np.flatnonzero(~index.ties())
    rows = decided[:limit] if limit is not None else decided
    if not len(rows):
        raise SpoInputError(f"no decided (non-tie) pairs left to evaluate ({index.summary.describe()})")
    return {"pairs": ((p, p.preferred) for _, p in iter_pairs(index, rows)), "n": len(rows), "references": {},
            "ties": len(index) - len(decided), "filtered": 0, "summary": index.summary}


def select_pairs(pairs, summary, source, against: str, min_judge_gap, same_judge_alignment: bool, limit) -> dict:
    """The pairs to evaluate, which image of each is preferred (by the labels or the judge), and the references."""
    # With the judge as target, a rater's tie is no reason to drop a pair: the judge decides it.
    decided = pairs if against == "judge" else [p for p in pairs if not p.is_tie]
    n_ties = len(pairs) - len(decided)
    n_filtered, aligned, judged = 0, None, None
    if min_judge_gap is not None or against == "judge" or same_judge_alignment:
        judged = judge_aesthetic_pairs(decided, source.judge)
        keep = np.abs(judged[:, 0] - judged[:, 1]) >= (min_judge_gap or 0.0)
        keep &= judged[:, 0] != judged[:, 1]
        if same_judge_alignment:
            aligned = judge_alignment_pairs(decided, source.judge)
            keep &= aligned[:, 0] == aligned[:, 1]
        n_filtered = int(len(decided) - keep.sum())
        decided = [p for p, k in zip(decided, keep) if k]
        judged = judged[keep]
        aligned = None if aligned is None else aligned[keep]
    if limit is not None:
        decided = decided[:limit]
    if not decided:
        raise SpoInputError(f"no decided (non-tie) pairs left to evaluate ({summary.describe()})")
    references = {}
    if against == "judge":
        preferred = (judged[: len(decided), 1] > judged[: len(decided), 0]).astype(int)
        if source.rater_references is not None:
            references = source.rater_references(decided, judged[: len(decided)], preferred,
                                                 None if aligned is None else aligned[: len(decided)])
    else:
        preferred = np.array([p.preferred for p in decided])
    return {"pairs": decided, "preferred": preferred, "references": references, "ties": n_ties,
            "filtered": n_filtered}


def score_pairs(pipe, spms, items, n: int, timesteps, side: int, dev, seed: int, batch_size: int, cfg_scale: float,
                progress: bool) -> tuple[dict, np.ndarray]:
    """{(model index, t): (scores of image 0, scores of image 1)} on the base model's x0-hat at each t, and which
    image of each pair is preferred, for the (pair, preferred) `items` (about `n` of them), each batch read once."""
    from itertools import islice

    from tqdm.auto import tqdm

    from spo.images import pair_tensors
    from spo.spm.denoise import predicted_pair_images

    scores = {(m, t): ([], []) for m in range(len(spms)) for t in timesteps}
    preferred: list[int] = []
    bar = tqdm(total=len(timesteps) * math.ceil(n / batch_size), desc="spm eval", unit="batch", disable=not progress)
    items = iter(items)
    with torch.no_grad():
        for b in range(math.ceil(n / batch_size)):
            part = list(islice(items, batch_size))
            if not part:
                break
            pairs = [p for p, _ in part]
            preferred += [int(w) for _, w in part]
            clean0, clean1, prompts = pair_tensors(pairs, range(len(pairs)), side)
            for t in timesteps:
                tt = torch.full((len(pairs),), t, dtype=torch.long, device=dev)
                img0, img1 = clean0, clean1
                if t > 0:
                    gen = torch.Generator(device=dev).manual_seed((seed * 1_000_003 + t) * 10_007 + b)
                    img0, img1 = predicted_pair_images(pipe, clean0, clean1, prompts, tt, gen, cfg_scale)
                for m, spm in enumerate(spms):
                    s = spm(torch.cat([img0, img1]).to(dev), prompts * 2, torch.cat([tt, tt])).float().cpu().numpy()
                    scores[(m, t)][0].extend(s[:len(pairs)])
                    scores[(m, t)][1].extend(s[len(pairs):])
                bar.update(1)
    bar.close()
    return {k: (np.array(a), np.array(b)) for k, (a, b) in scores.items()}, np.array(preferred, dtype=int)


def compare_models(spm_paths, spms, scores: dict, timesteps, preferred) -> tuple[list[dict], list[dict]]:
    """Each SPM's accuracy and log loss per t, and every two SPMs' paired accuracy difference on the same pairs."""
    models, correct = [], {}
    for m, (path, spm) in enumerate(zip(spm_paths, spms)):
        for t in timesteps:
            correct[(m, t)] = pair_correct(*scores[(m, t)], preferred)
        acc = {str(t): float(correct[(m, t)].mean()) for t in timesteps}
        models.append({"path": str(path), "name": model_name(path, spm), "time_conditioning": spm.time_conditioning,
                       "family": spm.family, "accuracy": acc,
                       "ci95": {k: stats.proportion_half_width(v, len(preferred)) for k, v in acc.items()},
                       "log_loss": {str(t): pairwise_log_loss(*scores[(m, t)], preferred) for t in timesteps}})
    paired = []
    for a in range(len(spms)):
        for b in range(a + 1, len(spms)):
            diffs = {str(t): paired_difference(correct[(a, t)], correct[(b, t)]) for t in timesteps}
            paired.append({"a": models[a]["name"], "b": models[b]["name"], "a_index": a, "b_index": b,
                           "b_minus_a": {k: v[0] for k, v in diffs.items()},
                           "ci95": {k: v[1] for k, v in diffs.items()}})
    return models, paired


def as_scores(second_wins) -> tuple[np.ndarray, np.ndarray]:
    """A 0/1 (or 0.5 for a tie) 'image 1 is preferred' vector as a pair of scores for pairwise_accuracy."""
    w = np.asarray(second_wins, dtype=np.float64)
    return 1.0 - w, w


def model_name(path, spm) -> str:
    return display_name(path, spm.time_conditioning)


def display_name(path, time_conditioning: bool) -> str:
    """How results name an SPM: its folder (the training output folder for `.../spm`) and its kind."""
    p = Path(path)
    name = p.parent.name if p.name == "spm" else p.name
    return f"{name} ({'step-aware' if time_conditioning else 'time-unconditioned'})"


def format_table(result: dict) -> str:
    ts = result["timesteps"]
    names = [m["name"] for m in result["models"]]
    width = max(12, *(len(n) for n in names))
    head = f"{'model':<{width}} " + " ".join(f"{'t=' + str(t):>8}" for t in ts)
    lines = [head, "-" * len(head)]
    for m in result["models"]:
        lines.append(f"{m['name']:<{width}} " + " ".join(f"{100 * m['accuracy'][str(t)]:>7.1f}%" for t in ts))
    lines.append("log loss (nats; ln 2 = 0.693 is a scorer that never commits)")
    for m in result["models"]:
        lines.append(f"{m['name']:<{width}} " + " ".join(f"{m['log_loss'][str(t)]:>8.3f}" for t in ts))
    for d in result.get("paired", []):
        lines.append(f"{d['b']} minus {d['a']} on the same pairs (accuracy points ± 95% CI): " + ", ".join(
            f"t={t} {100 * d['b_minus_a'][str(t)]:+.1f}±{100 * d['ci95'][str(t)]:.1f}" for t in ts))
    target = "the toy judge's aesthetic order" if result.get("against") == "judge" else "the labels"
    lines.append(f"agreement with {target} on {result['n_pairs']} pairs (±{100 * _max_ci(result):.1f} pts 95% CI); "
                 f"{result['ties_excluded']} ties excluded"
                 + _filter_note(result) + _reference_note(result))
    if result.get("read"):
        lines.append(f"data: {result['read']['text']}")
    return "\n".join(lines)


def _reference_note(result: dict) -> str:
    ref = result.get("references") or {}
    if not ref:
        return ""
    return (f"\nthe rater's labels agree with the judge's aesthetic order on {100 * ref['rater_labels']['accuracy']:.1f}% "
            f"of {ref['rater_labels']['n']} labelled pairs; its utility without noise (what a scorer that learned "
            f"the labels perfectly would get) on {100 * ref['rater_utility_without_noise']['accuracy']:.1f}%; "
            f"{100 * ref['unequally_aligned']:.0f}% of pairs are unequally aligned")


def _filter_note(result: dict) -> str:
    why = ([f"below judge gap {result['judge_gap']}"] if result["judge_gap"] is not None else []) + (
        ["unequally aligned"] if result.get("same_judge_alignment") else [])
    return f"; {result['filtered_by_judge_gap']} {' or '.join(why)}" if why else ""


def _max_ci(result: dict) -> float:
    vals = [v for m in result["models"] for v in m["ci95"].values() if math.isfinite(v)]
    return max(vals) if vals else float("nan")


def plot_accuracy(result: dict, target: str | Path) -> Path:
    """Accuracy vs t, one line per SPM, as a PNG (matplotlib, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from spo.io import atomic_path

    fig, (ax, ax_loss) = plt.subplots(1, 2, figsize=(11, 4), dpi=120)
    ts = result["timesteps"]
    for m in result["models"]:
        acc = [100 * m["accuracy"][str(t)] for t in ts]
        ci = [100 * m["ci95"][str(t)] for t in ts]
        line = ax.errorbar(ts, acc, yerr=ci, marker="o", capsize=3, label=m["name"])
        if "log_loss" in m:
            ax_loss.plot(ts, [m["log_loss"][str(t)] for t in ts], marker="o", color=line[0].get_color(), label=m["name"])
    ax.axhline(50, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("timestep t")
    ax.set_ylabel("pairwise accuracy (%)" + (", vs judge aesthetic" if result.get("against") == "judge" else ", vs labels"))
    ax.set_title(f"SPM accuracy on {result['n_pairs']} pairs ({result['family']} x0-hat)")
    ax.legend(fontsize=8)
    ax_loss.axhline(math.log(2), color="grey", lw=0.8, ls="--")
    ax_loss.set_xlabel("timestep t")
    ax_loss.set_ylabel("log loss (nats, lower is better)")
    ax_loss.set_title("log loss (dashed: ln 2, a scorer that never commits)", fontsize=9)
    fig.tight_layout()
    target = Path(target)
    with atomic_path(target, suffix=".png") as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return target
