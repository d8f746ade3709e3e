import numpy as np

from spo.toy.render import CLEAN, Defects, render, render_dataset, sample_defects
from spo.toy.world import BACKGROUNDS, COLORS, SHAPES, all_scenes, parse_caption


def test_world_size_and_held_out_split():
    assert len(SHAPES) >= 4 and len(COLORS) >= 8 and len(BACKGROUNDS) >= 6
    train, held = all_scenes("train"), all_scenes("heldout")
    assert not {s.triplet for s in train} & {s.triplet for s in held}
    assert len(train) + len(held) == len(all_scenes("all"))
    # Every attribute pair of a held-out triplet is still seen in training (composition, not recall).
    seen_pairs = {(s.shape, s.color) for s in train} | {(s.color, s.background) for s in train} | {
        (s.shape, s.background) for s in train}
    for s in held:
        assert {(s.shape, s.color), (s.color, s.background), (s.shape, s.background)} <= seen_pairs


def test_caption_round_trip():
    for scene in all_scenes("all")[::37]:
        assert parse_caption(scene.caption) == scene
    assert parse_caption("a photo of a cat") is None
    assert all_scenes("all")[0].caption.startswith("a small red circle on a white background")


def test_render_is_deterministic_and_defects_change_pixels():
    scene = all_scenes("train")[5]
    a = np.asarray(render(scene, Defects(grain=0.5), seed=3))
    b = np.asarray(render(scene, Defects(grain=0.5), seed=3))
    assert a.shape == (32, 32, 3) and (a == b).all()
    clean = np.asarray(render(scene, CLEAN, seed=3)).astype(int)
    for name in Defects.names():
        d = np.asarray(render(scene, Defects(**{name: 0.8}), seed=3)).astype(int)
        assert np.abs(d - clean).mean() > 1.0, name


def test_dataset_spans_defect_levels():
    levels = [d.level for _, d, _ in render_dataset(200, seed=1)]
    assert min(levels) == 0.0 and max(levels) > 2.0
    rng = np.random.default_rng(0)
    assert all(0 <= v <= 1 for v in vars(sample_defects(rng)).values())
