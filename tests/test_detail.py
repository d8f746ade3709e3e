"""Toy world v2's detail layers (spo.toy.detail) and the judge's detail terms (spo.toy.judge_detail), tested on
clean and degraded renders before any model is trained on them."""

import numpy as np
import pytest

from spo.toy.detail import FINE, Details, sample_details
from spo.toy.judge_detail import detail_parts
from spo.toy.render import CLEAN, Defects, render
from spo.toy.world import sample_scenes

SCENES = sample_scenes(60, seed=11, split="train")


def _est(details: Details, defects: Defects = CLEAN, key: str = "est_texture_break") -> np.ndarray:
    return np.array([detail_parts(render(s, defects, seed=i, details=details))[key] for i, s in enumerate(SCENES)])


def test_first_world_renders_are_untouched_and_details_stay_on_the_shape():
    for i, scene in enumerate(SCENES[:10]):
        flat = np.asarray(render(scene, CLEAN, seed=i), dtype=np.int16)
        fine = np.asarray(render(scene, CLEAN, seed=i, details=FINE), dtype=np.int16)
        assert np.array_equal(flat, np.asarray(render(scene, CLEAN, seed=i, details=None), dtype=np.int16))
        changed = np.abs(fine - flat).max(axis=2) > 0
        assert changed.any()
        # the corner away from the shape is beyond it and its shadow: never touched
        far = {"top left": (-1, -1), "top right": (-1, 0), "bottom left": (0, -1)}.get(scene.position, (0, 0))
        assert not changed[far], scene


@pytest.mark.parametrize("key,field", [("est_texture_break", "texture_break"), ("est_flat_light", "flat_light")])
def test_estimates_rank_the_severity_on_clean_renders(key, field):
    fine, half, full = (_est(Details(**{field: s}), key=key).mean() for s in (0.0, 0.5, 1.0))
    assert fine < half < full and full - fine > 0.4, (fine, half, full)
    rng = np.random.default_rng(3)
    drawn = [Details(**{field: float(rng.uniform(0, 1))}) for _ in SCENES]
    est = [detail_parts(render(s, CLEAN, seed=i, details=d))[key] for i, (s, d) in enumerate(zip(SCENES, drawn))]
    assert np.corrcoef(est, [getattr(d, field) for d in drawn])[0, 1] > 0.8


@pytest.mark.parametrize("defects", [Defects(grain=0.3), Defects(low_contrast=0.8), Defects(cramped=0.8)],
                         ids=["grain", "low_contrast", "cramped"])
@pytest.mark.parametrize("key,field", [("est_texture_break", "texture_break"), ("est_flat_light", "flat_light")])
def test_estimates_survive_the_defects_that_keep_the_detail(defects, key, field):
    gap = _est(Details(**{field: 1.0}), defects, key).mean() - _est(FINE, defects, key).mean()
    assert gap > 0.3, gap


@pytest.mark.parametrize("defects", [Defects(blur=0.8), Defects(pixelation=0.6)], ids=["blur", "pixelation"])
def test_blur_and_pixelation_erase_the_weave_and_it_reads_as_lost(defects):
    assert _est(FINE, defects).mean() > _est(FINE).mean() + 0.3


def test_no_fill_no_detail_verdict():
    # a missing subject (opacity 0) has no fill to judge: the detail terms neither add nor take away
    parts = detail_parts(render(SCENES[0], CLEAN, seed=0, opacity=0.0, details=Details(1.0, 1.0)))
    assert parts["est_texture_break"] == parts["est_flat_light"] == 0.0


def test_sampled_details_are_seeded():
    a = [sample_details(np.random.default_rng(5)) for _ in range(2)]
    assert a[0] == a[1] and 0 <= a[0].level <= 2


def test_world_two_dataset_keeps_the_first_worlds_scenes_and_defects_and_adds_detail():
    from spo.toy.render import render_dataset

    first, second = render_dataset(12, seed=4, details=False), render_dataset(12, seed=4, details=True)
    assert [(s, d) for s, d, _ in first] == [(s, d) for s, d, _ in second]
    assert all(np.asarray(a).shape == np.asarray(b).shape for (*_, a), (*_, b) in zip(first, second))
    assert sum(not np.array_equal(np.asarray(a), np.asarray(b)) for (*_, a), (*_, b) in zip(first, second)) >= 10
    again = render_dataset(12, seed=4, details=True)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for (*_, a), (*_, b) in zip(second, again))


def test_world_two_aesthetic_adds_the_detail_terms_to_the_judges():
    import torch

    from spo.toy import judge, judge_detail

    fine = [render(s, CLEAN, seed=i, details=FINE) for i, s in enumerate(SCENES[:20])]
    worn = [render(s, CLEAN, seed=i, details=Details(1.0, 1.0)) for i, s in enumerate(SCENES[:20])]
    for im in fine[:5]:
        parts = detail_parts(im)
        assert judge_detail.aesthetic(im) == pytest.approx(
            judge.aesthetic(im) - parts["est_texture_break"] - parts["est_flat_light"])
    gap = np.mean([judge_detail.aesthetic(a) - judge_detail.aesthetic(b) for a, b in zip(fine, worn)])
    assert gap > 0.6, gap
    # the scorer protocol: [B, 3, H, W] in [-1, 1] -> one score per image, prompt and t ignored
    x = torch.stack([torch.from_numpy(np.asarray(im, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)
                     for im in (fine[0], worn[0])])
    scores = judge_detail.aesthetic_preference(x, ["a", "b"], None)
    assert scores.shape == (2,) and scores[0] > scores[1]
    # the rater's utility in world 2, whatever world the shipped models are
    captions = [SCENES[0].caption, SCENES[1].caption]
    utility = judge_detail.preference(x, captions, None)
    assert utility.tolist() == pytest.approx([2 * judge.alignment(im, c) + judge_detail.aesthetic(im)
                                              for im, c in zip((fine[0], worn[0]), captions)], abs=1e-4)


def test_the_toy_world_follows_the_shipped_models_and_world_two_judges_with_its_detail_terms():
    import json

    from spo.toy import judge, judge_detail
    from spo.toy.defaults import TOY_MODEL_DIR, shipped_world

    shipped = json.loads((TOY_MODEL_DIR / "sd15" / "build_info.json").read_text()).get("world", 1)
    assert shipped_world() == shipped
    worn = [render(s, CLEAN, seed=i, details=Details(1.0, 1.0)) for i, s in enumerate(SCENES[:6])]
    assert [judge.world_aesthetic(im, 1) for im in worn] == [judge.aesthetic(im) for im in worn]
    assert [judge.world_aesthetic(im, 2) for im in worn] == [judge_detail.aesthetic(im) for im in worn]
    assert list(judge.aesthetic_batch(worn, 2)) == [judge_detail.aesthetic(im) for im in worn]
    assert list(judge.aesthetic_batch(worn)) == [judge.world_aesthetic(im, shipped) for im in worn]


def test_world_two_render_pairs_carry_detail_and_are_rated_by_world_two():
    import io

    from PIL import Image

    from spo.toy import judge, judge_detail
    from spo.toy.pairs import _rated_rows, make_render_pair_rows

    def images(rows):
        return [[Image.open(io.BytesIO(r[k])).convert("RGB") for k in ("jpg_0", "jpg_1")] for r in rows]

    first, second = make_render_pair_rows(80, seed=3, world=1), make_render_pair_rows(80, seed=3, world=2)
    assert [r["caption"] for r in first] == [r["caption"] for r in second]
    ims_1, ims_2 = images(first), images(second)
    # same scenes, defects and noise; world 2 adds the weave and the light inside the shapes
    assert sum(not np.array_equal(np.asarray(a[0]), np.asarray(b[0])) for a, b in zip(ims_1, ims_2)) >= 60
    # The rater's noise is seeded, so the same images rated in each world part only where the detail terms
    # decide; there the margin moves toward the image whose detail world 2 judges better.
    captions = [r["caption"] for r in second]
    relabelled = {w: _rated_rows(captions, *zip(*ims_2), seed=3, source="render", world=w) for w in (1, 2)}
    parted = [(r2, r1, a, b) for r2, r1, (a, b) in zip(relabelled[2], relabelled[1], ims_2)
              if r2["label_0"] != r1["label_0"]]
    assert len(parted) >= 3

    def penalty(im):
        return judge.aesthetic(im) - judge_detail.aesthetic(im)  # the detail terms world 2 adds

    for r2, r1, a, b in parted:
        assert (r2["label_0"] - r1["label_0"] > 0) == (penalty(a) < penalty(b)), r2["caption"]
    # the pairs as written were rated in world 2 (before their JPEG encoding, which moves a few close calls)
    same = {w: np.mean([r["label_0"] == q["label_0"] for r, q in zip(second, relabelled[w])]) for w in (1, 2)}
    assert same[2] > same[1], same
    # the labels follow the world-2 aesthetic: where the rater's noise cannot flip them (alignment equal,
    # a large aesthetic gap), the preferred image is the one world 2 scores higher
    checked = 0
    for r, (a, b) in zip(second, ims_2):
        gap = judge_detail.aesthetic(a) - judge_detail.aesthetic(b)
        if judge.alignment(a, r["caption"]) == judge.alignment(b, r["caption"]) and abs(gap) > 1.0:
            checked += 1
            assert (r["label_0"] > r["label_1"]) == (gap > 0), r["caption"]
    assert checked >= 3
