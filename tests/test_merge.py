"""`spo merge`: weighted sum, add difference, LoRA baking (incl. SDXL's fused OpenCLIP q/k/v), per-block weights."""

import pytest
import torch
from formats_helpers import make_diffusers_lora, spo, unet_probe
from safetensors.torch import load_file, save_file

from spo.errors import SpoInputError
from spo.formats import single_file as sf
from spo.formats.metadata import data_sha256, read_metadata
from spo.formats.webui_lora import export_lora, read_safetensors
from spo.merge import LoraStep, load_recipe, run_recipe, webui_deltas_by_name
from spo.models.loading import load_pipeline


def _checkpoints(tmp_path, family):
    a = sf.pipeline_to_original(load_pipeline(f"toy:{family}"))
    g = torch.Generator().manual_seed(0)
    b = {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in a.items()}
    c = {k: v - 0.01 * torch.randn(v.shape, generator=g) for k, v in a.items()}
    for name, sd in (("a", a), ("b", b), ("c", c)):
        save_file(sd, str(tmp_path / f"{name}.safetensors"))
    return a, b, c


def _recipe(tmp_path, text):
    (tmp_path / "recipe.toml").write_text(text)
    return tmp_path / "recipe.toml"


def test_weighted_sum_add_difference_and_blocks(tmp_path):
    a, b, c = _checkpoints(tmp_path, "sd15")
    r = _recipe(tmp_path, '''
base = "a.safetensors"
output = "out/m.safetensors"
[[checkpoint]]
method = "weighted_sum"
model = "b.safetensors"
multiplier = 0.3
blocks = { IN01 = 0.0 }
[[checkpoint]]
method = "add_difference"
model = "b.safetensors"
minus = "c.safetensors"
multiplier = 0.5
''')
    summary = run_recipe(load_recipe(r))
    m = load_file(str(tmp_path / "out" / "m.safetensors"))
    for k in a:
        mult = 0.0 if k.startswith("model.diffusion_model.input_blocks.1.") else 0.3
        expect = (1 - mult) * a[k] + mult * b[k] + 0.5 * (b[k] - c[k])
        assert torch.allclose(m[k], expect, atol=1e-6), k
    meta = read_metadata(tmp_path / "out" / "m.safetensors")
    assert 'method = "add_difference"' in meta["spo.merge_recipe"]
    assert meta["sshs_model_hash"] == data_sha256(tmp_path / "out" / "m.safetensors") == summary["hash"]
    load_pipeline(tmp_path / "out" / "m.safetensors")  # a loadable model


@pytest.mark.parametrize("family,text_encoders", [("sd15", True), ("sdxl", True), ("sdxl", False)])
def test_baked_lora_equals_diffusers_fused(family, text_encoders, tmp_path):
    base = sf.save_single_file(load_pipeline(f"toy:{family}"), tmp_path / "base.safetensors")
    src = make_diffusers_lora(family, tmp_path / "lora", text_encoders=text_encoders)
    webui = export_lora(src, tmp_path, formats=("webui",), name="spo")["webui"]
    # An SDXL UNet-only webui LoRA (the published SPO one's layout) is resolved by name against the base's
    # keys; SD1.5's diffusers-named UNet modules and SDXL's OpenCLIP text encoder take diffusers' converter.
    tensors, _ = read_safetensors(webui)
    shapes = {k: v.shape for k, v in load_file(str(base)).items()}
    direct = webui_deltas_by_name(tensors, shapes, LoraStep(webui, 1.0, {}), family)
    assert (direct is not None) == (family == "sdxl" and not text_encoders)
    r = _recipe(tmp_path, f'''
base = "base.safetensors"
output = "baked.safetensors"
output_diffusers = "baked_diffusers"
dtype = "fp32"
[[lora]]
path = "{webui.name}"
strength = -0.7
''')
    run_recipe(load_recipe(r))
    ref = load_pipeline(f"toy:{family}")
    ref.load_lora_weights(str(src), adapter_name="x")
    ref.set_adapters(["x"], [-0.7])
    expected = unet_probe(ref)
    assert torch.allclose(unet_probe(load_pipeline(tmp_path / "baked.safetensors")), expected, atol=1e-4)
    assert torch.allclose(unet_probe(load_pipeline(tmp_path / "baked_diffusers")), expected, atol=1e-4)


def test_recipe_validation_is_one_line(tmp_path):
    _checkpoints(tmp_path, "sd15")
    cases = {
        'base = "a.safetensors"\noutput = "m.safetensors"\ncolour = 1\n': "unknown key 'colour'",
        'base = "../a.safetensors"\noutput = "m.safetensors"\n': "outside the recipe's folder",
        'base = "a.safetensors"\noutput = "m.safetensors"\n[[lora]]\npath = "nope.safetensors"\n': "not found",
        'base = "a.safetensors"\noutput = "m.safetensors"\n[[checkpoint]]\nmodel = "b.safetensors"\nmultiplier = "x"\n': "number",
        'base = "a.safetensors"\noutput = "m.safetensors"\n[[checkpoint]]\nmodel = "b.safetensors"\nmultiplier = 1\nblocks = { IN99 = 1 }\n': "unknown block",
    }
    for text, needle in cases.items():
        with pytest.raises(SpoInputError, match=needle):
            run_recipe(load_recipe(_recipe(tmp_path, text)))
    r = spo("merge", str(_recipe(tmp_path, 'base = "/etc/passwd"\noutput = "m.safetensors"\n')))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "outside" in r.stderr, r.stderr


def test_output_equal_to_an_input_is_refused(tmp_path):
    _checkpoints(tmp_path, "sd15")
    before = (tmp_path / "b.safetensors").read_bytes()
    r = _recipe(tmp_path, 'base = "a.safetensors"\noutput = "b.safetensors"\n'
                          '[[checkpoint]]\nmodel = "b.safetensors"\nmultiplier = 0.5\n')
    with pytest.raises(SpoInputError, match="one of the recipe's inputs"):
        run_recipe(load_recipe(r))
    # The same through the CLI override, spelled differently (./a.safetensors is the base).
    res = spo("merge", str(r), "--out", str(tmp_path / "." / "a.safetensors"))
    assert res.returncode == 2 and "never overwritten" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert (tmp_path / "b.safetensors").read_bytes() == before


def test_lora_for_the_wrong_family_lists_what_did_not_match(tmp_path):
    sf.save_single_file(load_pipeline("toy:sdxl"), tmp_path / "base.safetensors")
    webui = export_lora(make_diffusers_lora("sd15", tmp_path / "lora"), tmp_path, formats=("webui",), name="sd15lora")["webui"]
    r = _recipe(tmp_path, f'base = "base.safetensors"\noutput = "m.safetensors"\n[[lora]]\npath = "{webui.name}"\n')
    with pytest.raises(SpoInputError, match=r"a sd15 LoRA on a sdxl base: \d+ of \d+ modules match no base weight, e\.g\. unet\."):
        run_recipe(load_recipe(r))
    assert not (tmp_path / "m.safetensors").exists()


def test_half_precision_weighted_sum_equals_the_fp32_path(tmp_path):
    # fp16 inputs and output take the fast native-lerp path; the LoRA'd keys take the fp32 path. Both must
    # equal (1 - m) A + m B computed in fp32 and rounded once.
    a, b, _ = _checkpoints(tmp_path, "sd15")
    for name, sd in (("a16", a), ("b16", b)):
        save_file({k: v.half() for k, v in sd.items()}, str(tmp_path / f"{name}.safetensors"))
    r = _recipe(tmp_path, 'base = "a16.safetensors"\noutput = "m16.safetensors"\n'
                          '[[checkpoint]]\nmodel = "b16.safetensors"\nmultiplier = 0.3\n')
    run_recipe(load_recipe(r))
    got = load_file(str(tmp_path / "m16.safetensors"))
    for k in a:
        expected = torch.lerp(a[k].half().float(), b[k].half().float(), 0.3).half()
        assert torch.equal(got[k], expected), k
