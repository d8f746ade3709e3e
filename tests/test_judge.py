"""The analytic toy judge, checked against real renders (no mocks)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import spearmanr

from spo.toy.detail import FINE
from spo.toy import judge
from spo.toy.render import CLEAN, Defects, render, render_dataset
from spo.toy.world import COLORS, SHAPES, Scene, all_scenes

SPEARMAN_BAR = 0.8  # the bar: never weaken it


@pytest.mark.parametrize("split,seed", [("train", 2024), ("heldout", 2025)])
def test_aesthetic_ranks_defect_level(split, seed):
    data = render_dataset(320, seed=seed, split=split)
    scores = judge.aesthetic_batch([img for _, _, img in data])
    levels = np.array([d.level for _, d, _ in data])
    rho = spearmanr(scores, -levels)[0]
    assert rho >= SPEARMAN_BAR, f"spearman {rho:.3f} < {SPEARMAN_BAR} on {split}"


@pytest.mark.parametrize("name", Defects.names())
def test_each_defect_lowers_the_score(name):
    scenes = all_scenes("train")[::37]
    worse = 0
    for i, scene in enumerate(scenes):
        clean = judge.aesthetic(render(scene, CLEAN, seed=i))
        bad = judge.aesthetic(render(scene, Defects(**{name: 0.9}), seed=i))
        worse += bad < clean
    assert worse >= 0.8 * len(scenes), f"{name}: worse in {worse}/{len(scenes)}"


@pytest.fixture(scope="module")
def clean_renders():
    scenes = all_scenes("all")
    return scenes, [render(s, seed=i) for i, s in enumerate(scenes)]


@pytest.mark.slow
def test_alignment_on_clean_renders(clean_renders):
    scenes, images = clean_renders
    got = judge.alignment_batch(images, [s.caption for s in scenes])
    assert got.mean() >= 0.95, f"alignment accuracy {got.mean():.3f}"


def test_alignment_survives_defects():
    # The base models learn from defective renders, so the judge must read shapes through blur, grain,
    # blocks and cropping too (a silhouette-statistics classifier managed 73 % here).
    data = render_dataset(240, seed=2026, split="heldout")
    got = judge.alignment_batch([img for _, _, img in data], [s.caption for s, _, _ in data])
    assert got.mean() >= 0.90, f"alignment accuracy on defective renders {got.mean():.3f}"


def test_a_missing_subject_is_an_alignment_failure_not_a_defect():
    # Render pairs include subject-less images (opacity 0): the judge must call them unaligned. Aesthetically a
    # clean empty frame beats a typical defective image, so only the rater's alignment weight can teach an SPM
    # that it is bad.
    scenes = all_scenes("all")[:24]
    empty = [render(s, seed=i, opacity=0.0) for i, s in enumerate(scenes)]
    assert judge.alignment_batch(empty, [s.caption for s in scenes]).sum() == 0
    assert all(judge.classify(im) is None for im in empty)
    typical = judge.aesthetic_batch([img for _, _, img in render_dataset(48, seed=3)])
    assert np.mean(judge.aesthetic_batch(empty)) > np.median(typical)


@pytest.mark.slow
def test_mismatched_captions_score_zero(clean_renders):
    scenes, images = clean_renders
    rng = np.random.default_rng(0)
    captions = []
    for s in scenes:
        if rng.random() < 0.5:
            other = Scene(s.shape, str(rng.choice([c for c in COLORS if c != s.color])), s.background, s.size, s.position)
        else:
            other = Scene(str(rng.choice([x for x in SHAPES if x != s.shape])), s.color, s.background, s.size, s.position)
        captions.append(other.caption)
    got = judge.alignment_batch(images, captions)
    assert (got == 0).mean() >= 0.95, f"mismatch rejection {(got == 0).mean():.3f}"


def test_classify_and_non_toy_captions():
    scene = all_scenes("all")[0]
    img = render(scene, seed=0)
    assert judge.classify(img) == (scene.shape, scene.color)
    assert judge.alignment(img, "a photo of a dog") == 0
    assert judge.alignment(img, scene.caption.upper()) == 1


def test_deterministic_and_parts():
    data = render_dataset(12, seed=5)
    for _, _, img in data:
        assert judge.aesthetic(img) == judge.aesthetic(img)
        assert judge.aesthetic_parts(img) == judge.aesthetic_parts(img)
        assert judge.classify(img) == judge.classify(img)
    parts = judge.aesthetic_parts(data[0][2])
    assert all(isinstance(v, float) and np.isfinite(v) for v in parts.values())
    est = sum(v for k, v in parts.items() if k.startswith("est_"))
    assert judge.aesthetic(data[0][2]) == pytest.approx(-est)
    assert len(judge.aesthetic_batch([d[2] for d in data])) == 12


def test_judge_as_spo_scorer_prefers_the_right_clean_image():
    # `--preference spo.toy.judge:preference` (the oracle for diagnosing the trainer) through the same loader
    # and batched scoring the trainer uses: images in [-1, 1], [B, 3, H, W].
    import torch

    from spo.spm.scoring import load_scorer, score_images

    scenes = all_scenes("all")[:6]
    # rendered as the shipped models' world draws them (world 2: with the weave and the light)
    good = [render(s, seed=i, details=FINE) for i, s in enumerate(scenes)]
    empty = [render(s, seed=i, opacity=0.0, details=FINE) for i, s in enumerate(scenes)]
    grainy = [render(s, Defects(grain=0.9), seed=i, details=FINE) for i, s in enumerate(scenes)]

    def batch(images):
        x = torch.tensor(np.stack([np.asarray(im, dtype=np.float32) / 127.5 - 1 for im in images]))
        return x.permute(0, 3, 1, 2)

    scorer = load_scorer("spo.toy.judge:preference")
    captions = [s.caption for s in scenes]
    s_good, s_empty, s_grainy = (score_images(scorer, batch(b), captions, torch.tensor(0)) for b in (good, empty, grainy))
    assert (s_good > s_empty).all() and (s_good > s_grainy).all()
    # its two parts as scorers of their own: the aesthetic ignores the caption, the alignment reads it
    aes, ali = load_scorer("spo.toy.judge:aesthetic_preference"), load_scorer("spo.toy.judge:alignment_preference")
    a_good, a_grainy = (score_images(aes, batch(b), captions, torch.tensor(0)) for b in (good, grainy))
    assert (a_good > a_grainy).all()
    assert torch.equal(a_good, score_images(aes, batch(good), ["a square"] * 6, torch.tensor(0)))
    assert score_images(ali, batch(good), captions, torch.tensor(0)).tolist() == [1.0] * 6
    assert score_images(ali, batch(empty), captions, torch.tensor(0)).tolist() == [0.0] * 6
