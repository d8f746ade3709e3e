"""`spo generate`: seeds, A1111 parameters, LoRA strengths, img2img, schedulers, bad input (toy SD1.5, 32 px)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from show_helpers import PROMPT, error_lines, main_in_process, make_lora, run_cli

pytestmark = pytest.mark.slow  # integration: real training runs or subprocess chains

STEPS = 4


@pytest.fixture(scope="module")
def lora(tmp_path_factory):
    return make_lora(tmp_path_factory.mktemp("lora"))


@pytest.fixture(scope="module")
def gen_lora(lora):
    from spo.show.generate import Generator, parse_lora

    return Generator("toy:sd15", [parse_lora(str(lora))])


@pytest.fixture(scope="module")
def gen_base():
    from spo.show.generate import Generator

    return Generator("toy:sd15")


def _arr(im):
    return np.asarray(im, dtype=np.float64)


def test_cli_same_seed_identical_and_parameters_chunk(tmp_path, lora):
    from spo.show.infotext import read_png

    outs = []
    for name in ("a", "b"):
        r = run_cli("generate", "--prompt", PROMPT, "--negative-prompt", "blurry, noisy", "--lora", f"{lora}:0.7",
                    "-n", "2", "--seed", "123", "--steps", STEPS, "--out", tmp_path / name)
        assert r.returncode == 0, r.stderr
        outs.append(tmp_path / name)
    files = sorted(p.name for p in outs[0].glob("*.png"))
    assert files == ["00000-123.png", "00001-124.png"]
    for f in files:
        assert np.array_equal(_arr(Image.open(outs[0] / f)), _arr(Image.open(outs[1] / f)))
    assert not np.array_equal(_arr(Image.open(outs[0] / files[0])), _arr(Image.open(outs[0] / files[1])))

    info = read_png(outs[0] / files[1])
    assert info["prompt_text"] == PROMPT
    assert info["loras"] == [(lora.parent.name, 0.7)]
    assert info["negative_prompt"] == "blurry, noisy"
    p = info["params"]
    assert (p["Seed"], p["Steps"], p["Sampler"], p["CFG scale"], p["Size"]) == ("124", str(STEPS), "DDIM", "5", "32x32")
    assert p["Model"] == "toy_sd15" and p["Lora hashes"].startswith(f"{lora.parent.name}: ")
    index = json.loads((outs[0] / "index.json").read_text())
    assert [e["seed"] for e in index["images"]] == [123, 124]
    assert index["images"][0]["loras"][0]["strength"] == 0.7


def test_bf16_weights_give_the_fp32_picture_closely(gen_base):
    from spo.show.generate import Generator, Settings

    half = Generator("toy:sd15", dtype="bf16")
    assert half.pipe.unet.dtype == half.pipe.vae.dtype == half.pipe.text_encoder.dtype == torch.bfloat16
    settings = Settings(steps=4)
    a = _arr(gen_base([PROMPT], [3], settings)[0])
    b = _arr(half([PROMPT], [3], settings)[0])
    other = _arr(gen_base([PROMPT], [4], settings)[0])
    assert np.abs(a - b).mean() < 0.25 * np.abs(a - other).mean()  # closer to its fp32 twin than another seed is


def test_infotext_roundtrip_quotes():
    from spo.show import infotext as it

    text = it.build("a cat, sitting: on a mat <lora:x:1.5>", "ugly, bad", {"Steps": 20, "Sampler": "Euler a",
                    "CFG scale": "5", "Seed": 7, "Size": "64x64", "Lora hashes": "x: abc, y: def"})
    parsed = it.parse(text)
    assert parsed["prompt_text"] == "a cat, sitting: on a mat"
    assert parsed["negative_prompt"] == "ugly, bad"
    assert parsed["params"]["Lora hashes"] == "x: abc, y: def"
    assert parsed["params"]["Sampler"] == "Euler a" and parsed["loras"] == [("x", 1.5)]


def test_strength_zero_equals_no_lora_and_one_differs(gen_base, gen_lora):
    from spo.show.generate import Settings

    base = gen_base([PROMPT, PROMPT], [5, 6], Settings(steps=STEPS))
    zero = gen_lora([PROMPT, PROMPT], [5, 6], Settings(steps=STEPS, strengths=[0.0]))
    one = gen_lora([PROMPT, PROMPT], [5, 6], Settings(steps=STEPS, strengths=[1.0]))
    neg = gen_lora([PROMPT], [5], Settings(steps=STEPS, strengths=[-1.0]))
    for b, z in zip(base, zero):
        assert np.array_equal(_arr(b), _arr(z))
    assert np.abs(_arr(one[0]) - _arr(base[0])).mean() > 1.0
    assert np.abs(_arr(neg[0]) - _arr(one[0])).mean() > 1.0
    # A batch of one gives the same image as the same seed inside a batch: images depend only on their seed.
    again = gen_lora([PROMPT], [6], Settings(steps=STEPS, strengths=[1.0]))
    assert np.abs(_arr(again[0]) - _arr(one[1])).max() <= 1.0


def test_img2img_small_denoise_stays_close(tmp_path, gen_base):
    from spo.show.generate import Settings

    init = gen_base([PROMPT], [3], Settings(steps=10))[0]
    init.save(tmp_path / "init.png")
    # 0.2 of 10 steps runs two denoising steps. Toy world 2 (its VAE's posterior pinned narrow): 2.9 / 255 mean
    # change at 0.1, 5.4 at 0.2, 16.5 at 1.0; before the pin a posterior sample added noise as large as the
    # latents (18.7 at 0.2). The first world's toys: 11.4 / 12.05 at 0.1, 5.1 at 0.2, 25 at 1.0.
    r = run_cli("generate", "--prompt", PROMPT, "--init-image", tmp_path / "init.png", "--denoise", "0.2",
                "--steps", 10, "--seed", 1, "--out", tmp_path / "low")
    assert r.returncode == 0, r.stderr
    from spo.show.infotext import read_png

    low = Image.open(tmp_path / "low" / "00000-1.png")
    assert read_png(tmp_path / "low" / "00000-1.png")["params"]["Denoising strength"] == "0.2"
    from spo.show.generate import Generator

    full = Generator("toy:sd15", img2img=True)([PROMPT], [1], Settings(steps=10, denoise=1.0), init_image=init)[0]
    d_low = np.abs(_arr(low) - _arr(init)).mean()
    d_full = np.abs(_arr(full) - _arr(init)).mean()
    assert d_low < 12 and d_low < d_full


def test_other_schedulers_run(gen_base):
    from spo.show.generate import Settings

    a = gen_base([PROMPT], [0], Settings(steps=STEPS, scheduler="euler_a"))[0]
    b = gen_base([PROMPT], [0], Settings(steps=STEPS, scheduler="dpmpp_2m"))[0]
    c = gen_base([PROMPT], [0], Settings(steps=STEPS, scheduler="ddim"))[0]
    assert a.size == b.size == c.size == (32, 32)
    assert not np.array_equal(_arr(a), _arr(c))


@pytest.mark.parametrize("extra, message", [
    (["--lora", "missing/lora.safetensors"], "no such file"),
    (["--lora", "LORA:abc"], "not a number"),
    (["--scheduler", "warp_drive"], "unknown scheduler"),
    (["--init-image", "INIT", "--denoise", "0"], "denoise"),
    (["--init-image", "INIT", "--denoise", "1.5"], "denoise"),
    (["--denoise", "0.5"], "--init-image"),
    (["--prompt", "  "], "prompt"),
])
def test_bad_input_one_line_exit_2_no_output(tmp_path, capsys, lora, extra, message):
    Image.new("RGB", (32, 32), (200, 10, 10)).save(tmp_path / "init.png")
    extra = [str(lora) + ":abc" if e == "LORA:abc" else str(tmp_path / "init.png") if e == "INIT" else e for e in extra]
    out = tmp_path / "out"
    prompt = [] if "--prompt" in extra else ["--prompt", PROMPT]
    code, err = main_in_process(capsys, "generate", *prompt, "--steps", STEPS, "--out", out, *extra)
    assert code == 2
    lines = error_lines(err)
    assert len(lines) == 1 and message in lines[0], err
    assert not out.exists()


def test_unwritable_output_and_subprocess_error(tmp_path, capsys):
    (tmp_path / "a_file").write_text("x")
    out = tmp_path / "a_file" / "out"
    code, err = main_in_process(capsys, "generate", "--prompt", PROMPT, "--out", out)
    assert code == 2 and len(error_lines(err)) == 1 and "not writable" in err
    r = run_cli("generate", "--prompt", PROMPT, "--lora", tmp_path / "nope.safetensors", "--out", tmp_path / "o2")
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "no such file" in r.stderr
    assert not (tmp_path / "o2").exists()


def test_random_seed_is_recorded_prompt_column_warning_and_quiet_libraries(tmp_path):
    """--seed -1 picks a seed (A1111's convention) and the files, PNG and index carry the one used; a CSV
    column is named with --prompt-column; a prompt outside the toy grammar gets one warning line and still
    runs; third-party notices nobody can act on stay silent; one image is "1 image"."""
    from spo.show.infotext import read_png

    csv = tmp_path / "p.csv"
    csv.write_text(f'id,text\n1,"{PROMPT}"\n')
    r = run_cli("generate", "--prompts", csv, "--prompt-column", "text", "--seed", "-1", "--steps", 2,
                "--out", tmp_path / "a")
    assert r.returncode == 0, r.stderr
    (png,) = (tmp_path / "a").glob("*.png")
    seed = int(png.stem.split("-", 1)[1])
    info = read_png(png)
    assert info["prompt_text"] == PROMPT and info["params"]["Seed"] == str(seed) and 0 <= seed < 2**32
    index = json.loads((tmp_path / "a" / "index.json").read_text())
    assert index["images"][0]["seed"] == seed
    assert f"wrote 1 image -> " in r.stdout and f"(seed {seed}," in r.stdout
    assert "warning" not in r.stderr  # a toy caption: no warning

    r = run_cli("generate", "--prompt", "a red circle on a blue background", "--steps", 2, "--out", tmp_path / "b")
    assert r.returncode == 0, r.stderr
    warnings = [ln for ln in r.stderr.splitlines() if "warning" in ln.lower()]
    assert len(warnings) == 1 and "toy grammar" in warnings[0] and "docs/toy-world.md" in warnings[0], r.stderr
    for noise in ("kept in float32", "requires torchvision", "No LoRA keys", "torch_dtype"):
        assert noise not in r.stderr, r.stderr
    assert len(list((tmp_path / "b").glob("*.png"))) == 1


def test_help_names_the_toy_grammar_and_prompt_column():
    r = run_cli("generate", "--help")
    assert r.returncode == 0 and "docs/toy-world.md" in r.stdout and "--prompt-column" in r.stdout
    assert "--max-images" in r.stdout
