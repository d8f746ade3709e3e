"""`spo sweep`, `spo score`, `spo report` on the toy SD1.5 model (32 px, 4 steps): real PNGs, real CLI runs."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from show_helpers import PROMPT, error_lines, main_in_process, make_lora, run_cli

pytestmark = pytest.mark.slow  # integration: real training runs or subprocess chains

STEPS = 4


@pytest.fixture(scope="module")
def lora(tmp_path_factory):
    return make_lora(tmp_path_factory.mktemp("swlora"))


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory, lora):
    from spo.cli.main import main

    out = tmp_path_factory.mktemp("sweep") / "s"
    # no --score: a toy model is scored by its source's reference (the judge); no 0: the sweep adds it
    code = main(["sweep", "--prompt", PROMPT, "--lora", str(lora), "--strengths", "-1", "1", "--seeds", "0", "1",
                 "--steps", str(STEPS), "--out", str(out)])
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
    from spo.show.grid import MIN_CELL

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
    # in the sweep's batch (its two seeds together): CPU kernels may round differently at another batch size
    base = Generator("toy:sd15")([PROMPT, PROMPT], [0, 1], Settings(steps=STEPS))[1]
    assert np.array_equal(np.asarray(Image.open(sweep_dir / cell["file"])), np.asarray(base))
    # Scored by default (the toy judge through spo.sources), plot, and every strength compared with 0.
    assert data["scorer"] == "spo.toy.judge:aesthetic_preference, spo.toy.judge:alignment_preference"
    assert (sweep_dir / "score_vs_strength.png").is_file() and (sweep_dir / "scores.csv").is_file()
    assert set(data["cells"][0]["scores"]) == {"aesthetic", "alignment"}
    s = data["suggestion"]
    assert [c["strength"] for c in s["comparisons"]] == [-1.0, 1.0] and all(c["n"] == 2 for c in s["comparisons"])
    for c in s["comparisons"]:
        # the paired difference from strength 0, recomputed from the cells
        diffs = [next(x for x in data["cells"] if x["strength"] == c["strength"] and x["seed"] == seed)["scores"]["aesthetic"]
                 - next(x for x in data["cells"] if x["strength"] == 0.0 and x["seed"] == seed)["scores"]["aesthetic"]
                 for seed in (0, 1)]
        assert c["difference"] == pytest.approx(np.mean(diffs))
        assert c["ci95"][0] <= c["difference"] <= c["ci95"][1] and c["interval"] == "t"
        assert -100 <= c["alignment_ci95_points"][0] <= c["alignment_ci95_points"][1] <= 100
    assert s["low"] is None or (s["low"] <= s["best"] <= s["high"] and 0.0 not in (s["low"], s["high"]))
    assert "parameters" in Image.open(sweep_dir / "grid.png").info


def _comparison(strength, ci, alignment_points=0.0):
    lo, hi = ci
    return {"strength": strength, "n": 8, "difference": (lo + hi) / 2, "ci95": [lo, hi], "significant": lo > 0,
            "alignment_change_points": alignment_points}


def test_suggest_strengths():
    from spo.show.sweep import suggest_strengths

    comps = [_comparison(-1, (-0.3, -0.1)), _comparison(0.5, (0.01, 0.2)), _comparison(1, (0.05, 0.4)),
             _comparison(1.5, (0.02, 0.5)), _comparison(2, (-0.1, 0.6))]
    s = suggest_strengths(comps, score_name="aesthetic")
    assert (s["low"], s["best"], s["high"]) == (0.5, 1.5, 1.5) and s["text"].startswith("suggested strength 0.5 to 1.5")
    # an alignment cost beyond the limit takes 1.5 out; within it (exactly 2 points) keeps 1
    comps[2]["alignment_change_points"], comps[3]["alignment_change_points"] = -2.0, -2.5
    s = suggest_strengths(comps, max_alignment_drop=2.0)
    assert (s["low"], s["best"], s["high"]) == (0.5, 1.0, 1.0)
    s = suggest_strengths(comps, max_alignment_drop=3.0)
    assert (s["low"], s["high"]) == (0.5, 1.5)
    # significant on both sides of 0: the range stays on the best one's side
    both = suggest_strengths([_comparison(-1, (0.1, 0.3)), _comparison(0.5, (0.2, 0.6)), _comparison(1, (0.1, 0.5))])
    assert (both["low"], both["best"], both["high"]) == (0.5, 0.5, 1.0)
    # nothing significant: said so, no range
    none = suggest_strengths([_comparison(-1, (-0.3, 0.1)), _comparison(1, (-0.01, 0.4))], score_name="aesthetic")
    assert none["low"] is None and none["best"] is None
    assert none["text"].startswith("no strength is significantly better than 0 by aesthetic")
    # significant but too costly in alignment: said so
    costly = suggest_strengths([_comparison(1, (0.1, 0.4), alignment_points=-10.0)])
    assert costly["low"] is None and "lose more than 2 alignment points" in costly["text"]


def test_compare_with_zero_pairs_by_seed():
    from spo.show.sweep import compare_with_zero

    scores = {0.0: [1.0, 2.0, 3.0, 4.0], -1.0: [0.0, 1.0, 2.5, 3.0], 1.0: [1.5, 2.5, 3.5, 4.5]}
    got = {c["strength"]: c for c in compare_with_zero([-1.0, 0.0, 1.0], scores)}
    # +1: a constant +0.5 on every seed: a zero-width interval, significant, 4 wins
    assert got[1.0]["difference"] == 0.5 and got[1.0]["ci95"] == [0.5, 0.5] and got[1.0]["significant"]
    assert (got[1.0]["wins"], got[1.0]["ties"], got[1.0]["losses"]) == (4, 0, 0)
    # -1: differences -1, -1, -0.5, -1 (unpaired, the two strengths' intervals would overlap widely)
    d = np.array([-1.0, -1.0, -0.5, -1.0])
    half = 3.182446305284263 * d.std(ddof=1) / 2
    assert got[-1.0]["ci95"] == [pytest.approx(d.mean() - half), pytest.approx(d.mean() + half)]
    assert not got[-1.0]["significant"] and got[-1.0]["losses"] == 4
    align = {0.0: [1, 1, 0, 1], -1.0: [1, 0, 0, 1], 1.0: [1, 1, 1, 1]}
    got = {c["strength"]: c for c in compare_with_zero([-1.0, 0.0, 1.0], scores, align)}
    assert got[-1.0]["alignment_change_points"] == -25.0 and got[1.0]["alignment_change_points"] == 25.0
    assert all(-100 <= v <= 100 for c in got.values() for v in c["alignment_ci95_points"])


def test_sweep_prints_each_alignment_change_with_its_interval(sweep_dir):
    from spo.cli.sweep_cmd import comparison_line

    comps = json.loads((sweep_dir / "sweep.json").read_text())["suggestion"]["comparisons"]
    assert comps and all("alignment_change_points" in c for c in comps)  # the judge measures alignment
    for c in comps:
        lo, hi = c["alignment_ci95_points"]
        assert f"alignment {c['alignment_change_points']:+.1f} points [{lo:+.1f}, {hi:+.1f}]" in comparison_line(c)


def test_sweep_suggestion_excludes_a_clearly_worse_negative_strength(tmp_path):
    """A real LoRA and a real scorer: brightness. This LoRA darkens every seed's image at -1 and brightens
    most at +0.5 and +1, so -1 is significantly worse than 0 on the same seeds and must not be suggested."""
    import sys

    import torch

    from spo.show.sweep import sweep

    torch.manual_seed(0)  # make_lora's lora_A comes from the global generator: the same LoRA whatever ran before
    lora = make_lora(tmp_path / "lora", seed=0, scale=0.3)

    (tmp_path / "sweep_brightness.py").write_text("def brightness(images, prompts, t=None):\n"
                                                  "    return images.mean((1, 2, 3))\n")
    sys.path.insert(0, str(tmp_path))
    try:
        from spo.show.generate import Settings, parse_lora

        result = sweep("toy:sd15", [PROMPT], tmp_path / "out", loras=[parse_lora(str(lora))],
                       values={"strength": [-1.0, 0.5, 1.0], "seed": list(range(8))}, settings=Settings(steps=STEPS),
                       score="sweep_brightness:brightness", log=lambda *a: None)
    finally:
        sys.path.remove(str(tmp_path))
    assert result["values"]["strength"] == [-1.0, 0.0, 0.5, 1.0]  # 0 added for the comparison
    comps = {c["strength"]: c for c in result["suggestion"]["comparisons"]}
    assert comps[-1.0]["ci95"][1] < 0 and comps[-1.0]["losses"] == 8  # clearly worse, on every seed
    s = result["suggestion"]
    assert s["low"] is None or s["low"] > 0, s["text"]  # whatever else it says, never -1
    if s["low"] is None:
        assert s["text"].startswith("no strength is significantly better than 0")
    else:
        assert all(comps[v]["significant"] for v in (0.5, 1.0) if s["low"] <= v <= s["high"])
    # The same cells scored by darkness: -1 is now clearly better; a range never spans 0 and holds only
    # significant strengths.
    from spo.show.sweep import compare_with_zero, suggest_strengths

    darkness = {v: [-c["scores"]["score"] for c in sorted(result["cells"], key=lambda c: c["seed"]) if c["strength"] == v]
                for v in result["values"]["strength"]}
    dark = compare_with_zero(result["values"]["strength"], darkness)
    assert dark[0]["strength"] == -1.0 and dark[0]["significant"] and dark[0]["wins"] == 8
    flipped = suggest_strengths(dark, score_name="darkness")
    assert flipped["low"] is not None and (flipped["low"] > 0) == (flipped["high"] > 0), flipped["text"]
    assert all(c["significant"] for c in dark if flipped["low"] <= c["strength"] <= flipped["high"])
    best = max((c for c in dark if c["significant"]), key=lambda c: c["difference"])
    assert flipped["best"] == best["strength"] and flipped["text"].startswith(
        f"suggested strength {flipped['low']:g} to {flipped['high']:g} (best {best['strength']:g}: darkness +")


def test_default_scorers_come_from_the_model_source(tmp_path):
    from spo.show.sweep import _scorer_specs
    from spo.sources import get

    source = get("toy:sd15")
    assert _scorer_specs(None, "toy:sd15") == [("aesthetic", source.reference), ("alignment", source.references[0])]
    assert _scorer_specs(None, tmp_path / "my_model.safetensors") == []  # a checkpoint path: no scorer known
    assert _scorer_specs("none", "toy:sd15") == [] and _scorer_specs("x:y", "toy:sd15") == [("", "x:y")]


def test_sweep_without_scorer_says_how_to_get_a_suggestion(lora, tmp_path):
    from spo.show.generate import Settings, parse_lora
    from spo.show.sweep import sweep

    result = sweep("toy:sd15", [PROMPT], tmp_path / "out", loras=[parse_lora(str(lora))],
                   values={"strength": [0.0, 1.0], "seed": [0]}, settings=Settings(steps=STEPS), score="none",
                   log=lambda *a: None)
    assert "suggestion" not in result and "--score none" in result["suggestion_note"]


def test_score_cli_csv_and_ci(gen_dir):
    r = run_cli("score", gen_dir, "--judge")
    assert r.returncode == 0, r.stderr
    lines = (gen_dir / "scores" / "scores.csv").read_text().strip().splitlines()
    assert lines[0] == "file,prompt,seed,aesthetic,alignment" and len(lines) == 5
    assert "a small blue circle" in (gen_dir / "scores" / "scores.csv").read_text()  # prompts from PNG/index
    summary = json.loads((gen_dir / "scores" / "summary.json").read_text())["scores"]
    a = summary["aesthetic"]
    assert a["n"] == 4 and a["ci95"][0] <= a["mean"] <= a["ci95"][1] and a["ci95"][1] > a["ci95"][0]
    assert a["interval"] == "t"  # 4 images: Student t
    al = summary["alignment"]  # a proportion: Wilson, inside [0, 1]
    assert al["interval"] == "wilson" and 0.0 <= al["ci95"][0] <= al["mean"] <= al["ci95"][1] <= 1.0
    assert "wilson" in r.stdout


def test_compare_identical_folders_is_50_percent(gen_dir, tmp_path):
    r = run_cli("score", "--compare", gen_dir, gen_dir, "--out", tmp_path / "cmp")
    assert r.returncode == 0, r.stderr
    res = json.loads((tmp_path / "cmp" / "summary.json").read_text())
    assert res["n_pairs"] == 4
    for col in ("aesthetic", "alignment"):
        w = res["a_vs_b"][col]["win_rate"]
        assert w["mean"] == 0.5 and res["a_vs_b"][col]["ties"] == 4
        # Wilson on 2 of 4: inside [0, 1] (the normal approximation with t would print 0.5 +- 0.9)
        assert w["interval"] == "wilson" and w["ci95"] == pytest.approx([0.150036, 0.849964], abs=1e-6)
    assert "95% Wilson CI 15.0..85.0%" in r.stdout


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
    suggestion = json.loads((sweep_dir / "sweep.json").read_text())["suggestion"]["text"]
    assert "grid.png" in html and "score_vs_strength.png" in html and suggestion in html.replace("&#x27;", "'")
    assert "difference from strength 0" in html and "win rate: the share of seed-matched pairs" in html.lower()
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
