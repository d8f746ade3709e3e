"""`spo sweep`, `spo score`, `spo report` on the toy SD1.5 model (32 px, 4 steps): real PNGs, real CLI runs."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from show_helpers import PROMPT, error_lines, main_in_process, make_lora, run_cli

STEPS = 4


@pytest.fixture(scope="module")
def lora(tmp_path_factory):
    return make_lora(tmp_path_factory.mktemp("swlora"))


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory, lora):
    from spo.cli.main import main

    out = tmp_path_factory.mktemp("sweep") / "s"
    code = main(["sweep", "--prompt", PROMPT, "--lora", str(lora), "--strengths", "-1", "0", "1", "--seeds", "0", "1",
                 "--steps", str(STEPS), "--score", "judge", "--out", str(out)])
    assert code == 0
    return out


@pytest.fixture(scope="module")
def gen_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("gen") / "g"
    r = run_cli("generate", "--prompt", PROMPT, "--prompt", "a small blue circle on a black background, top left",
                "-n", "2", "--steps", STEPS, "--out", out)
    assert r.returncode == 0, r.stderr
    return out


def test_sweep_grid_size_labels_and_seed_matching(sweep_dir):
    from spo.show.generate import Generator, Settings
    from spo.show.sweep import MIN_CELL

    data = json.loads((sweep_dir / "sweep.json").read_text())
    assert (data["x"], data["y"]) == ("strength", "seed")
    assert data["values"]["strength"] == [-1.0, 0.0, 1.0] and data["values"]["seed"] == [0, 1]
    assert len(data["cells"]) == 6 and all((sweep_dir / c["file"]).is_file() for c in data["cells"])
    grid = np.asarray(Image.open(sweep_dir / "grid.png").convert("L"))
    h, w = grid.shape
    assert w > 3 * MIN_CELL and h > 2 * MIN_CELL and w - 3 * MIN_CELL < 3 * MIN_CELL
    top, left = h - 2 * MIN_CELL, w - 3 * MIN_CELL
    assert (grid[:top, left:] < 128).any(), "column labels drawn above the cells"
    assert (grid[top:, :left] < 128).any(), "row labels drawn left of the cells"
    # Seed-matched: the strength-0 cell of seed 1 is the base model's seed-1 image.
    cell = next(c for c in data["cells"] if c["strength"] == 0.0 and c["seed"] == 1)
    base = Generator("toy:sd15")([PROMPT], [1], Settings(steps=STEPS))[0]
    assert np.array_equal(np.asarray(Image.open(sweep_dir / cell["file"])), np.asarray(base))
    # Scores, plot and a suggested range inside the swept strengths.
    assert (sweep_dir / "score_vs_strength.png").is_file() and (sweep_dir / "scores.csv").is_file()
    s = data["suggestion"]
    assert -1.0 <= s["low"] <= s["best"] <= s["high"] <= 1.0
    assert "parameters" in Image.open(sweep_dir / "grid.png").info


def test_suggest_strengths():
    from spo.show.sweep import suggest_strengths

    s = suggest_strengths([-1, 0, 0.5, 1, 1.5, 2], [-3, -2, -1.5, -1.0, -1.05, -2], [0.1] * 6)
    assert (s["low"], s["best"], s["high"]) == (1.0, 1.0, 1.5)
    # Alignment collapsing at 1.5 moves the range down.
    s = suggest_strengths([-1, 0, 0.5, 1, 1.5, 2], [-3, -2, -1.5, -1.0, -1.05, -2], [0.1] * 6,
                          alignment=[0.9, 0.9, 0.9, 0.88, 0.5, 0.4])
    assert (s["low"], s["high"]) == (1.0, 1.0)


def test_score_cli_csv_and_ci(gen_dir):
    r = run_cli("score", gen_dir, "--judge")
    assert r.returncode == 0, r.stderr
    lines = (gen_dir / "scores" / "scores.csv").read_text().strip().splitlines()
    assert lines[0] == "file,prompt,seed,aesthetic,alignment" and len(lines) == 5
    assert "a small blue circle" in (gen_dir / "scores" / "scores.csv").read_text()  # prompts from PNG/index
    summary = json.loads((gen_dir / "scores" / "summary.json").read_text())["scores"]
    a = summary["aesthetic"]
    assert a["n"] == 4 and a["ci95"][0] <= a["mean"] <= a["ci95"][1] and a["ci95"][1] > a["ci95"][0]


def test_compare_identical_folders_is_50_percent(gen_dir, tmp_path):
    r = run_cli("score", "--compare", gen_dir, gen_dir, "--out", tmp_path / "cmp")
    assert r.returncode == 0, r.stderr
    res = json.loads((tmp_path / "cmp" / "summary.json").read_text())
    assert res["n_pairs"] == 4
    for col in ("aesthetic", "alignment"):
        assert res["a_vs_b"][col]["win_rate"]["mean"] == 0.5 and res["a_vs_b"][col]["ties"] == 4


def test_score_prompts_from_png_only(gen_dir, tmp_path):
    from spo.show.scoring import image_records

    for f in sorted(gen_dir.glob("*.png")):  # no index.json: prompts and seeds come from the parameters chunk
        Image.open(f).save(tmp_path / f.name, pnginfo=__import__("spo.show.infotext", fromlist=["x"]).pnginfo(
            Image.open(f).info["parameters"]))
    recs = image_records(tmp_path)
    assert [r["seed"] for r in recs] == [0, 1, 2, 3] and recs[0]["prompt"] == PROMPT


def test_score_bad_input(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code, err = main_in_process(capsys, "score", tmp_path / "empty")
    assert code == 2 and len(error_lines(err)) == 1 and "no images" in err
    assert not (tmp_path / "empty" / "scores").exists()
    Image.new("RGB", (32, 32)).save(tmp_path / "x.png")  # no metadata and no --prompt
    code, err = main_in_process(capsys, "score", tmp_path)
    assert code == 2 and "no prompt" in err and not (tmp_path / "scores").exists()
    code, err = main_in_process(capsys, "score", tmp_path, "--prompt", "p", "--pickscore", tmp_path / "nope")
    assert code == 2 and "--pickscore" in err and not (tmp_path / "scores").exists()


def test_sweep_bad_input(tmp_path, capsys, lora):
    out = tmp_path / "out"
    code, err = main_in_process(capsys, "sweep", "--prompt", PROMPT, "--out", out)
    assert code == 2 and "needs a LoRA" in err
    code, err = main_in_process(capsys, "sweep", "--prompt", PROMPT, "--lora", lora, "--schedulers", "nope", "--out", out)
    assert code == 2 and "unknown scheduler" in err
    code, err = main_in_process(capsys, "sweep", "--prompt", PROMPT, "--lora", lora, "-x", "denoise", "--out", out)
    assert code == 2 and "--init-image" in err
    assert not out.exists()


def _training_run(tmp_path, lora):
    """A training output folder as `spo train` leaves it."""
    import shutil

    run = tmp_path / "run"
    (run / "lora").mkdir(parents=True)
    shutil.copy(lora, run / "lora" / "pytorch_lora_weights.safetensors")
    (run / "lora" / "training_summary.json").write_text(json.dumps({"method": "SPO", "family": "sd15",
                                                                     "base": "toy:sd15", "epochs": 2, "steps": 4}))
    (run / "samples").mkdir()
    for e in range(3):
        Image.new("RGB", (64, 64), (40 * e, 90, 90)).save(run / "samples" / f"epoch-{e:03d}.png")
    history = [{"loss": 0.69 - 0.01 * i, "kept_fraction": 0.5, "mean_score": 0.1 * i, "epoch": i // 2} for i in range(4)]
    (run / "history.json").write_text(json.dumps(history))
    return run


def test_report_for_sweep_and_training_run(sweep_dir, lora, tmp_path):
    from spo.show.report import build_report

    # A sweep report: grid, plot and suggested strengths inline.
    html = build_report(sweep_dir).read_text()
    assert "grid.png" in html and "score_vs_strength.png" in html and "suggested strength" in html
    assert all(c["file"] in html for c in json.loads((sweep_dir / "sweep.json").read_text())["cells"])

    run = _training_run(tmp_path, lora)
    r = run_cli("report", run, "--pairs", 2, "--sweep", sweep_dir, "--out", tmp_path / "report.html")
    assert r.returncode == 0, r.stderr
    html = (tmp_path / "report.html").read_text()
    for name in ("samples/epoch-000.png", "samples/epoch-001.png", "samples/epoch-002.png", "training_curves",
                 "before_after_pairs", "grid.png", "score_vs_strength.png", "judge aesthetic"):
        assert name in html, name
    assert html.count("data:image/png;base64,") >= 7


def _chromium():
    import os
    import shutil

    found = shutil.which("chromium") or shutil.which("chromium-browser"), shutil.which("chromedriver")
    if not all(found):
        if os.environ.get("SPO_REQUIRE_BROWSER"):  # CI installs Debian's chromium: there a skip would hide a failure
            pytest.fail("SPO_REQUIRE_BROWSER is set but chromium/chromedriver are not installed")
        pytest.skip("Debian's chromium and chromium-driver are not installed")
    return found


def test_report_renders_in_headless_chromium(sweep_dir, lora, tmp_path):
    """The report opens in a real browser: no console errors, every image decodes, the page is not blank."""
    pytest.importorskip("selenium")
    import io

    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    browser, driver_path = _chromium()
    run = _training_run(tmp_path, lora)
    r = run_cli("report", run, "--pairs", 2, "--sweep", sweep_dir, "--out", tmp_path / "report.html")
    assert r.returncode == 0, r.stderr
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1200,1600"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    try:
        driver.get((tmp_path / "report.html").resolve().as_uri())
        assert driver.execute_script("return document.readyState") == "complete"
        images = driver.execute_script(
            "return Array.from(document.images).map(i => [i.complete, i.naturalWidth, i.alt])")
        assert len(images) >= 7
        broken = [alt for complete, width, alt in images if not (complete and width > 0)]
        assert not broken, f"images that did not decode: {broken}"
        errors = [e for e in driver.get_log("browser") if e["level"] in ("SEVERE", "ERROR")]
        assert not errors, errors
        shot = Image.open(io.BytesIO(driver.get_screenshot_as_png())).convert("RGB")
    finally:
        driver.quit()
    pixels = np.asarray(shot)
    assert pixels.std() > 10, "blank screenshot"
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 200, "screenshot shows almost no distinct colours"
