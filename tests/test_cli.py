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
