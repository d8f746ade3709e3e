import subprocess
import sys

import pytest


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


def test_toy_build_trains_and_writes_loadable_pipelines(tmp_path):
    from diffusers import StableDiffusionXLPipeline

    r = spo("toy", "build", "--out", str(tmp_path / "m"), "--family", "sdxl", "--images", "64",
            "--vae-steps", "2", "--unet-steps", "2", "--batch", "8")
    assert r.returncode == 0, r.stderr
    pipe = StableDiffusionXLPipeline.from_pretrained(tmp_path / "m" / "sdxl", local_files_only=True)
    assert pipe.vae.config.scaling_factor != 0.18215  # set from the trained latents
    assert (tmp_path / "m" / "sdxl" / "build_info.json").is_file()
