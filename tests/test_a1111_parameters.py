"""PNG "parameters" read back the way A1111 reads them: Model hash, Lora hashes (names with commas), the seed.

A1111's parsers are copied below (licence noted) so the test reads our text exactly as A1111 does.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil

import numpy as np
import pytest
from PIL import Image

from show_helpers import PROMPT, make_lora

# ------------------------------------------------------------------------------------------------------------------
# From AUTOMATIC1111/stable-diffusion-webui (https://github.com/AUTOMATIC1111/stable-diffusion-webui), Copyright (C)
# AUTOMATIC1111 and contributors, licensed under the GNU Affero General Public License v3.0: the parameter-line
# regex and unquoting of modules/infotext_utils.py (parse_generation_parameters), and the "Lora hashes" parsing of
# extensions-builtin/Lora/scripts/lora_script.py (infotext_pasted), reduced to what reads our values.
A1111_RE_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
A1111_RE_LORA = re.compile("<lora:([^:]+):")


def a1111_unquote(text):
    if len(text) == 0 or text[0] != '"' or text[-1] != '"':
        return text
    try:
        return json.loads(text)
    except Exception:
        return text


def a1111_parameter_line(line):
    return {k: a1111_unquote(v) for k, v in A1111_RE_PARAM.findall(line)}


def a1111_lora_hashes(hashes):
    hashes = [x.strip().split(':', 1) for x in hashes.split(",")]
    return {x[0].strip().replace(",", ""): x[1].strip() for x in hashes}
# ------------------------------------------------------------------------------------------------ end of A1111 code


def _params(png):
    with Image.open(png) as im:
        text = im.info["parameters"]
    return text, a1111_parameter_line(text.strip().split("\n")[-1])


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from spo.formats.single_file import save_single_file
    from spo.models.loading import load_pipeline

    d = tmp_path_factory.mktemp("a1111")
    lora = make_lora(d / "lora")
    shutil.copy(lora, d / "my,style.safetensors")  # a comma in the name: A1111's hash parser splits on it
    save_single_file(load_pipeline("toy:sd15"), d / "base model.safetensors")
    return d


def test_model_and_lora_hashes_as_a1111_reads_them(files, tmp_path):
    from spo.formats.metadata import data_sha256
    from spo.show.generate import generate, parse_lora

    lora = parse_lora(f"{files / 'my,style.safetensors'}:0.8")
    [png] = generate(str(files / "base model.safetensors"), [PROMPT], tmp_path / "o", loras=[lora], seed=3,
                     log=lambda *a: None)
    text, p = _params(png)
    model_bytes = (files / "base model.safetensors").read_bytes()
    # A1111's checkpoint short hash: sha256 of the whole file, 10 hex digits
    assert p["Model hash"] == hashlib.sha256(model_bytes).hexdigest()[:10]
    assert p["Model"] == "base model" and p["Seed"] == "3"
    hashes = a1111_lora_hashes(p["Lora hashes"])  # raised IndexError on "my,style: ..." before
    assert hashes == {"mystyle": data_sha256(files / "my,style.safetensors")[:12]}
    assert A1111_RE_LORA.findall(text) == ["my,style"]  # the prompt tag keeps the file's name, as A1111's does


def test_no_model_hash_without_a_checkpoint_file(files, tmp_path):
    from spo.show.generate import generate

    [png] = generate("toy:sd15", [PROMPT], tmp_path / "o", seed=0, log=lambda *a: None)
    _, p = _params(png)
    assert "Model hash" not in p and p["Model"] == "toy_sd15"


def test_seed_written_is_the_seed_the_image_was_made_with(tmp_path):
    """--seed -1 draws a random seed (as A1111 does); the PNG names that seed, and it makes the same image again."""
    from spo.cli.main import main

    assert main(["generate", "--prompt", PROMPT, "--seed", "-1", "--steps", "2", "--out", str(tmp_path / "a")]) == 0
    png = next((tmp_path / "a").glob("*.png"))
    seed = int(a1111_parameter_line(Image.open(png).text["parameters"].split("\n")[-1])["Seed"])
    assert 0 <= seed < 2**32 and png.stem.endswith(f"-{seed}")
    assert main(["generate", "--prompt", PROMPT, "--seed", str(seed), "--steps", "2", "--out", str(tmp_path / "b")]) == 0
    again = next((tmp_path / "b").glob("*.png"))
    assert np.array_equal(np.asarray(Image.open(png)), np.asarray(Image.open(again)))


def test_checkpoint_hash_streamed_and_cached_while_the_file_is_unchanged(tmp_path, monkeypatch):
    from spo.formats import metadata as md

    f = tmp_path / "ckpt.safetensors"
    f.write_bytes(bytes(range(256)) * 5000)
    monkeypatch.setenv("SPO_HASH_CACHE", str(tmp_path / "cache" / "sha256.json"))
    monkeypatch.setattr(md, "PERSISTENT_MIN_BYTES", 1000)  # treat this small file as a big checkpoint
    want = hashlib.sha256(f.read_bytes()).hexdigest()
    assert md.a1111_model_hash(f) == want[:10]
    entry = json.loads((tmp_path / "cache" / "sha256.json").read_text())[str(f.resolve())]
    assert entry["sha256"] == want and entry["size"] == f.stat().st_size
    # a later run (empty in-process cache) takes the stored hash: proven by a stored value that is not the file's
    md._SHA_CACHE.clear()
    entry["sha256"] = "f" * 64
    (tmp_path / "cache" / "sha256.json").write_text(json.dumps({str(f.resolve()): entry}))
    assert md.file_sha256(f) == "f" * 64
    # the file changes: its size/mtime no longer match, so it is hashed again
    md._SHA_CACHE.clear()
    f.write_bytes(b"changed" * 500)
    assert md.file_sha256(f) == hashlib.sha256(b"changed" * 500).hexdigest()
