"""Generic preference pairs from the toy base model, labelled by a simulated rater.

Like Pick-a-Pic users, the rater weighs prompt alignment, aesthetics and its own mood (noise), and calls
near-equal pairs a tie; its labels are therefore not purely aesthetic, which is the setting SPO is for.
"""

from __future__ import annotations

import io

import numpy as np


def rate(aesthetic_0: float, aesthetic_1: float, aligned_0: int, aligned_1: int, rng: np.random.Generator,
         w_align: float = 2.0, w_aes: float = 1.0, noise: float = 0.35, tie_band: float = 0.1) -> tuple[float, float]:
    """(label_0, label_1): 1/0, 0/1, or 0.5/0.5 for a tie."""
    margin = w_align * (aligned_0 - aligned_1) + w_aes * (aesthetic_0 - aesthetic_1) + rng.normal(0, noise)
    p0 = 1.0 / (1.0 + np.exp(-4.0 * margin))
    if abs(p0 - 0.5) < tie_band:
        return 0.5, 0.5
    return (1.0, 0.0) if p0 > 0.5 else (0.0, 1.0)


def make_pair_rows(pipe, n_pairs: int, seed: int, steps: int = 20, cfg: float = 5.0, split: str = "train",
                   world: int | None = None) -> list[dict]:
    """Pairs of two base-model samples per caption (different seeds; eta = 1 for a spread of quality), rated
    with the aesthetic of toy `world` (None: the shipped models')."""
    from spo.toy.sampling import sample
    from spo.toy.world import sample_scenes

    captions = [s.caption for s in sample_scenes(n_pairs, seed, split=split)]
    images_0 = sample(pipe, captions, seed=seed * 2, steps=steps, cfg=cfg, eta=1.0)
    images_1 = sample(pipe, captions, seed=seed * 2 + 1, steps=steps, cfg=cfg, eta=1.0)
    return _rated_rows(captions, images_0, images_1, seed, source="toy", world=world)


def make_render_pair_rows(n_pairs: int, seed: int, split: str = "train", p_wrong: float = 0.3,
                          p_missing: float = 0.1, world: int | None = None) -> list[dict]:
    """Pairs of two renders per caption, each with its own random defects.

    Pick-a-Pic's images come from many generators, not from the model an SPM is trained for; renders are
    the toy's "other generators". They are cheap to make and span the whole bad-to-good range of the
    training data. Like real generators, they sometimes miss the prompt: with probability `p_wrong` an image
    shows another shape or colour than its caption says, and with probability `p_missing` its subject is
    faint or missing altogether, so the labels teach alignment as well as aesthetics. Without missing subjects
    an SPM never sees that a clean empty frame is a failure, and SPO learns to erase low-contrast shapes.
    In toy world 2 (`world`, None: the shipped models') each render also has its own detail qualities.
    """
    from spo.toy.defaults import shipped_world
    from spo.toy.world import sample_scenes

    world = world or shipped_world()
    scenes = sample_scenes(n_pairs, seed, split=split)
    rng = np.random.default_rng([seed, 11])
    # World 2's details come from a stream of their own: the scenes, defects and noise stay those of world 1.
    detail_rng = np.random.default_rng([seed, 13]) if world >= 2 else None
    images = [[_render_generated(s, rng, p_wrong, p_missing, detail_rng) for s in scenes] for _ in range(2)]
    return _rated_rows([s.caption for s in scenes], images[0], images[1], seed, source="render", world=world)


def _render_generated(scene, rng: np.random.Generator, p_wrong: float, p_missing: float,
                      detail_rng: np.random.Generator | None = None):
    """One "other generator" image for the scene's caption: right, wrong (another shape or colour), or subject-less;
    with sampled detail qualities when `detail_rng` is given (toy world 2)."""
    from dataclasses import replace

    from spo.toy.detail import sample_details
    from spo.toy.render import render, sample_defects
    from spo.toy.world import COLORS, SHAPES

    u = rng.random()
    opacity = 1.0
    if u < p_wrong:
        if rng.random() < 0.5:
            scene = replace(scene, shape=str(rng.choice([s for s in SHAPES if s != scene.shape])))
        else:
            scene = replace(scene, color=str(rng.choice([c for c in COLORS if c != scene.color])))
    elif u < p_wrong + p_missing:
        opacity = float(rng.uniform(0.0, 0.3))
    details = sample_details(detail_rng) if detail_rng is not None else None
    return render(scene, sample_defects(rng), seed=int(rng.integers(2**31)), opacity=opacity, details=details)


def _rated_rows(captions, images_0, images_1, seed: int, source: str, world: int | None = None) -> list[dict]:
    from spo.toy import judge

    rng = np.random.default_rng([seed, 7])
    rows = []
    for i, (cap, a, b) in enumerate(zip(captions, images_0, images_1)):
        l0, l1 = rate(judge.world_aesthetic(a, world), judge.world_aesthetic(b, world),
                      judge.alignment(a, cap), judge.alignment(b, cap), rng)
        rows.append({"caption": cap, "jpg_0": _jpeg(a), "jpg_1": _jpeg(b), "label_0": l0, "label_1": l1,
                     "are_different": True, "image_0_uid": f"{source}-{seed}-{i}-0",
                     "image_1_uid": f"{source}-{seed}-{i}-1",
                     "user_id": int(rng.integers(1, 50)), "ranking_id": i})
    return rows


def _jpeg(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def rater_references(pairs, judged: np.ndarray, preferred: np.ndarray, aligned: np.ndarray | None = None) -> dict:
    """How often the rater's labels, and the rater's utility without its mood noise, agree with the judge's
    aesthetic order on these pairs. The second is what a scorer that learned the labels perfectly would score
    against the judge: the rater weighs alignment first, so where one image misses its caption the two orders part."""
    from spo.spm.evaluate import as_scores, judge_alignment_pairs, pairwise_accuracy
    from spo.toy.judge import columns

    aligned = judge_alignment_pairs(pairs, columns) if aligned is None else aligned
    calm = np.random.default_rng(0)  # with noise = 0 it is never drawn from
    utility = np.array([rate(a[0], a[1], int(l[0]), int(l[1]), calm, noise=0.0, tie_band=0.0)[1]
                        for a, l in zip(judged, aligned)])
    labelled = [i for i, p in enumerate(pairs) if not p.is_tie]
    return {"rater_labels": {"accuracy": pairwise_accuracy(*as_scores([pairs[i].preferred for i in labelled]),
                                                           preferred[labelled]), "n": len(labelled)},
            "rater_utility_without_noise": {"accuracy": pairwise_accuracy(*as_scores(utility), preferred), "n": len(pairs)},
            "unequally_aligned": float(np.mean(aligned[:, 0] != aligned[:, 1]))}
