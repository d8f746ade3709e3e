"""`spo spm siblings`: does a scorer pick, among k siblings, the one a clean-image reference prefers once finished."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from spo.spm.siblings import best_worst_agreement, paired_picks, pick_outcomes, sibling_agreement

pytestmark = pytest.mark.slow  # integration: real training runs or subprocess chains

BRIGHTNESS = '''

def brightness(images, prompts, timesteps=None):
    return images.float().mean(dim=(1, 2, 3))

def darkness(images, prompts, timesteps=None):
    return -images.float().mean(dim=(1, 2, 3))
'''


def test_best_worst_agreement_by_hand():
    scores = np.array([[0.0, 2.0, 1.0],   # best 1, worst 0: reference 5 - 1 > 0: agrees
                       [3.0, 1.0, 2.0],   # best 0, worst 1: reference 0 - 4 < 0: disagrees
                       [1.0, 1.0, 1.0],   # cannot choose: left out of the agreement
                       [0.0, 1.0, 0.5]])  # best 1, worst 0: reference tie: left out
    reference = np.array([[1.0, 5.0, 0.0], [0.0, 4.0, 9.0], [1.0, 2.0, 3.0], [7.0, 7.0, 0.0]])
    got = best_worst_agreement(scores, reference)
    assert got["n"] == 2 and got["agreement"] == 0.5
    assert got["ci95"] == pytest.approx(1.96 * np.sqrt(0.25 / 2))
    assert got["pick_gain"] == pytest.approx((4.0 - 4.0 + 0.0 + 0.0) / 4)


def test_pick_outcomes_and_paired_picks_by_hand():
    reference = np.array([[1.0, 5.0, 0.0], [0.0, 4.0, 9.0], [1.0, 2.0, 3.0], [7.0, 7.0, 0.0]])
    a = np.array([[0.0, 2.0, 1.0], [3.0, 1.0, 2.0], [1.0, 1.0, 1.0], [0.0, 1.0, 0.5]])
    # wins, loses, cannot choose (a coin flip), reference tie (a coin flip)
    assert pick_outcomes(a, reference).tolist() == [1.0, 0.0, 0.5, 0.5]
    b = -a  # the reverse order: loses, wins, a coin flip, a coin flip
    got = paired_picks(a, b, reference)
    assert got["difference"] == pytest.approx((-1 + 1 + 0 + 0) / 4) and got["n"] == 4
    assert not got["excludes_zero"]
    perfect = np.tile(reference, (25, 1))
    got = paired_picks(np.tile(-reference, (25, 1)), perfect, perfect)  # b picks by the reference itself, a against it
    assert got["difference"] > 0.5 and got["excludes_zero"]


@pytest.fixture(scope="module")
def toy_pipe():
    from spo.models.loading import load_pipeline
    from spo.spm.denoise import freeze

    pipe = load_pipeline("toy:sd15")
    freeze(pipe)
    return pipe


def _brightness(images, prompts, timesteps=None):
    return images.float().mean(dim=(1, 2, 3))


def test_the_reference_agrees_with_itself_on_clean_siblings_and_batching_changes_nothing(toy_pipe):
    prompts = ["a red circle in the center", "a blue square at the top left", "a green triangle", "a yellow star"]
    refs = {"bright": _brightness}
    scorers = {"bright": _brightness, "dark": lambda im, p, t: -_brightness(im, p, t)}
    one = sibling_agreement(toy_pipe, scorers, refs, prompts, k=3, steps=[19, 5], num_steps=20, batch=4, progress=False)
    assert [r["step"] for r in one["rows"]] == [5, 19]
    last = one["rows"][1]
    # at the last step the siblings are clean: the scorer sees exactly what the reference sees
    assert last["t_judged"] == 0
    assert last["scorers"]["bright"]["agreement"] == 1.0 and last["scorers"]["dark"]["agreement"] == 0.0
    assert last["scorers"]["bright"]["pick_gain"] == pytest.approx(last["headroom_best_minus_worst"])
    assert last["scorers"]["dark"]["pick_gain"] == pytest.approx(-last["headroom_best_minus_worst"])
    # the two scorers compared on the same siblings: every prompt flips from a win to a loss
    (paired,) = last["paired"]
    assert (paired["a"], paired["b"]) == ("bright", "dark") and paired["difference"] == pytest.approx(-1.0)
    # earlier, the siblings still differ once finished: the trajectory is open
    assert one["rows"][0]["headroom_best_minus_worst"] > last["headroom_best_minus_worst"] > 0
    # each prompt and candidate has its own generator: batching prompts one at a time gives the same result
    two = sibling_agreement(toy_pipe, scorers, refs, prompts, k=3, steps=[5, 19], num_steps=20, batch=1, progress=False)
    for a, b in zip(one["rows"], two["rows"]):
        assert a["headroom_best_minus_worst"] == pytest.approx(b["headroom_best_minus_worst"], abs=1e-5)
        assert a["scorers"]["dark"]["agreement"] == b["scorers"]["dark"]["agreement"]


def _spo(tmp_path, *args):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "spo", "spm", "siblings", *args], capture_output=True, text=True,
                          timeout=600, env=env, cwd=tmp_path)


def test_cli_siblings_writes_json_and_plot_and_refuses_bad_input(tmp_path):
    (tmp_path / "sib_scorers.py").write_text(BRIGHTNESS)
    (tmp_path / "prompts.txt").write_text("a red circle\na blue square at the top\na green triangle\n")
    out = tmp_path / "sib"
    r = _spo(tmp_path, "sib_scorers:brightness", "sib_scorers:darkness", "--reference", "sib_scorers:brightness",
             "--prompts", "prompts.txt", "-n", "2", "--k", "2", "--at-steps", "19", "--out", str(out), "--no-progress")
    assert r.returncode == 0, r.stderr[-2000:]
    result = json.loads((out / "siblings.json").read_text())
    assert result["n_prompts"] == 2 and result["prompts"] == "prompts.txt"
    (row,) = result["rows"]
    assert row["scorers"]["sib_scorers:brightness"]["agreement"] == 1.0
    assert row["scorers"]["sib_scorers:darkness"]["agreement"] == 0.0
    assert result["references"] == ["sib_scorers:brightness", "spo.toy.judge:alignment_preference"]
    assert "pick_gain_spo.toy.judge:alignment_preference" in row["scorers"]["sib_scorers:darkness"]
    assert (out / "siblings.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "coin flip" in r.stdout
    half = _spo(tmp_path, "toy:sd15", "--prompts", "prompts.txt", "-n", "2", "--k", "2", "--at-steps", "10",
                "--dtype", "bf16", "--out", str(tmp_path / "half"), "--no-progress")  # the toy SPM and judge in bf16
    assert half.returncode == 0, half.stderr[-2000:]
    assert json.loads((tmp_path / "half" / "siblings.json").read_text())["rows"][0]["step"] == 10
    for bad, why in [(["--at-steps", "20"], "--at-steps must be in [0, 20)"), (["--k", "1"], "at least 2"),
                     (["--base", str(tmp_path)], "give --reference")]:
        r = _spo(tmp_path, "sib_scorers:brightness", "--out", str(tmp_path / "x"), *bad)
        assert r.returncode == 2 and why in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "x").exists()
