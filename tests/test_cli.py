import json
import subprocess
import sys

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.slow  # integration: real training runs or subprocess chains


def spo(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "spo", *args], capture_output=True, text=True, cwd=cwd, timeout=300)


def test_help_everywhere():
    for args in ([], ["--help"], ["toy", "--help"], ["toy", "sample", "--help"], ["toy", "build", "--help"],
                 ["toy", "pairs", "--help"]):
        r = spo(*args)
        assert r.returncode == 0, (args, r.stderr)
        assert "usage" in r.stdout


@pytest.mark.parametrize("args", [
    ["frobnicate"],
    ["toy", "sample", "-n", "0"],
    ["toy", "sample", "-n", "many"],
    ["toy", "sample", "--family", "sd3"],
    ["toy", "nothing"],
])
def test_bad_input_is_one_line_exit_2(args):
    r = spo(*args)
    assert r.returncode == 2, r
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "Traceback" not in r.stderr


def test_unwritable_output_is_one_line_exit_2(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    r = spo("toy", "sample", "-n", "1", "--out", str(blocker / "sub"))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_toy_sample_writes_grid_and_scores(tmp_path):
    r = spo("toy", "sample", "-n", "4", "--steps", "4", "--out", str(tmp_path / "s"))
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "s" / "grid.png").stat().st_size > 0
    assert "alignment" in r.stdout


def test_toy_sample_takes_the_family_and_world_of_the_model_folder(tmp_path):
    import json

    from spo.toy.defaults import TOY_MODEL_DIR, model_world

    r = spo("toy", "sample", "--model", str(TOY_MODEL_DIR / "sdxl"), "-n", "2", "--steps", "2", "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr
    world = model_world(TOY_MODEL_DIR / "sdxl")
    assert r.stdout.startswith(f"sdxl (world {world}):"), r.stdout
    scores = json.loads((tmp_path / "scores.json").read_text())
    assert scores["family"] == "sdxl" and scores["world"] == world


def test_toy_sample_on_a_torn_model_index_is_one_line(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "model_index.json").write_text("{torn")
    r = spo("toy", "sample", "--model", str(tmp_path / "m"), "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "model_index.json" in r.stderr, r.stderr
    assert not (tmp_path / "o").exists()


def test_toy_pairs_round_trip_through_pickapic_reader(tmp_path):
    from spo.data.pickapic import read_pairs

    out = tmp_path / "pairs.parquet"
    r = spo("toy", "pairs", "-n", "6", "--out", str(out))
    assert r.returncode == 0, r.stderr
    pairs, summary = read_pairs(out, skip_bad=False)
    assert len(pairs) == 6
    for p in pairs:
        assert abs(p.label_0 + p.label_1 - 1) < 1e-9 and p.label_0 in (0.0, 0.5, 1.0)
        a, b = p.decode()
        assert a.size == (32, 32)


def test_toy_render_pairs_span_the_aesthetic_range_and_labels_follow_the_judge(tmp_path):
    from spo.data.pickapic import read_pairs
    from spo.toy import judge

    out = tmp_path / "render_pairs.parquet"
    r = spo("toy", "pairs", "--source", "render", "-n", "80", "--seed", "4", "--out", str(out))
    assert r.returncode == 0, r.stderr
    pairs, _ = read_pairs(out, skip_bad=False)
    assert len(pairs) == 80 and len({p.caption for p in pairs}) > 40
    scores = np.array([[judge.aesthetic(im) for im in p.decode()] for p in pairs])
    assert scores.std() > 0.3  # renders with random defects: bad to good, not one quality level
    aligned = np.array([[judge.alignment(im, p.caption) for im in p.decode()] for p in pairs])
    assert 0.5 < aligned.mean() < 0.9  # some images miss the caption, as other generators' do
    assert sum(judge.classify(im) is None for p in pairs for im in p.decode()) >= 3  # some miss the subject
    # where both images are aligned and clearly differ in quality, the rater prefers the better one;
    # where only one is aligned, it prefers that one
    decided = [(s, p) for s, a, p in zip(scores, aligned, pairs) if not p.is_tie and a.all() and abs(s[0] - s[1]) > 0.5]
    agree = np.mean([(s[1] > s[0]) == (p.preferred == 1) for s, p in decided])
    assert len(decided) >= 5 and agree >= 0.8, (len(decided), agree)
    one_sided = [(a, p) for a, p in zip(aligned, pairs) if not p.is_tie and a[0] != a[1]]
    assert len(one_sided) >= 5 and np.mean([a[p.preferred] == 1 for a, p in one_sided]) >= 0.8
    # same seed, same bytes
    again = tmp_path / "again.parquet"
    assert spo("toy", "pairs", "--source", "render", "-n", "80", "--seed", "4", "--out", str(again)).returncode == 0
    assert [p.image_0 for p in read_pairs(again)[0]] == [p.image_0 for p in pairs]


def test_toy_build_trains_and_writes_loadable_pipelines(tmp_path):
    from diffusers import StableDiffusionXLPipeline

    r = spo("toy", "build", "--out", str(tmp_path / "m"), "--family", "sdxl", "--images", "64",
            "--vae-steps", "2", "--decoder-steps", "2", "--unet-steps", "2", "--batch", "8")
    assert r.returncode == 0, r.stderr
    pipe = StableDiffusionXLPipeline.from_pretrained(tmp_path / "m" / "sdxl", local_files_only=True)
    assert pipe.vae.config.scaling_factor != 0.18215  # set from the trained latents
    assert (tmp_path / "m" / "sdxl" / "build_info.json").is_file()

    # Continuing keeps the latent space (encoder and scaling untouched), trains the rest, records both stages.
    r = spo("toy", "build", "--continue-from", str(tmp_path / "m"), "--out", str(tmp_path / "m2"), "--family", "sdxl",
            "--images", "64", "--decoder-steps", "2", "--unet-steps", "2", "--batch", "8")
    assert r.returncode == 0, r.stderr
    more = StableDiffusionXLPipeline.from_pretrained(tmp_path / "m2" / "sdxl", local_files_only=True)
    assert more.vae.config.scaling_factor == pipe.vae.config.scaling_factor
    enc0, enc1 = pipe.vae.encoder.state_dict(), more.vae.encoder.state_dict()
    assert all(torch.equal(enc0[k], enc1[k]) for k in enc0)
    assert not torch.equal(pipe.vae.decoder.conv_out.weight, more.vae.decoder.conv_out.weight)
    assert not torch.equal(pipe.unet.conv_in.weight, more.unet.conv_in.weight)
    info = json.loads((tmp_path / "m2" / "sdxl" / "build_info.json").read_text())
    assert [h.get("continued_from") for h in info["history"]] == [None, str(tmp_path / "m")]

    r = spo("toy", "build", "--continue-from", str(tmp_path / "nothing"), "--out", str(tmp_path / "m3"))
    assert r.returncode == 2 and "no toy model folders" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_toy_clip_pretrains_a_clip_an_spm_can_start_from(tmp_path):
    from spo.train.spm_recipe import build_spm

    r = spo("toy", "clip", "--out", str(tmp_path / "clip"), "--images", "64", "--steps", "3", "--batch", "16")
    assert r.returncode == 0, r.stderr
    spm = build_spm(str(tmp_path / "clip"), True, "sd15")
    from transformers import CLIPModel

    clip = CLIPModel.from_pretrained(tmp_path / "clip", local_files_only=True)
    assert all(torch.equal(v, spm.clip.state_dict()[k]) for k, v in clip.state_dict().items())
    scores = spm(torch.zeros(2, 3, 32, 32), ["a small red circle on a blue background, top left"] * 2, torch.tensor([0, 500]))
    assert torch.isfinite(scores).all()
