"""Model sources (spo.sources): built-in names stand for a model, its preference SPM and its judge everywhere."""

import pytest
import torch
from formats_helpers import spo
from safetensors.torch import load_file

from spo import sources
from spo.errors import SpoInputError
from spo.formats import single_file as sf
from spo.merge import load_recipe, run_recipe
from spo.models.family import family_of
from spo.models.loading import load_pipeline
from spo.spm.scoring import load_scorer, load_spm


def test_names_lookup_and_paths():
    assert {"toy:sd15", "toy:sdxl"} <= set(sources.names())
    assert sources.get("toy:sdxl").family == "sdxl" and sources.default().name == sources.DEFAULT_SOURCE
    assert sources.default("sdxl").family == "sdxl"
    assert sources.get("some/folder") is None and sources.get("model.safetensors") is None
    with pytest.raises(SpoInputError, match="unknown model 'toy:sd3'"):
        sources.get("toy:sd3")


def test_a_source_name_is_its_preference_model_wherever_an_spm_is_taken():
    assert sources.preference_spec("toy:sdxl") == sources.get("toy:sdxl").preference
    assert sources.preference_spec("pkg.module:function") == "pkg.module:function"  # same shape, not a source
    spm = load_spm("toy:sdxl", family="sdxl")
    assert spm.family == "sdxl" and load_scorer("toy:sd15").family == "sd15"


def test_judge_columns_and_held_out_prompts():
    source = sources.get("toy:sd15")
    prompts = source.heldout_prompts(3, 5)
    assert len(prompts) == 3 and prompts == source.heldout_prompts(3, 5)
    pipe = load_pipeline("toy:sd15")
    images = pipe(prompts[:2], num_inference_steps=2, output_type="pil",
                  generator=torch.Generator().manual_seed(0)).images
    judged = source.judge(images, prompts[:2])
    assert set(judged) == {"aesthetic", "alignment"} and all(len(v) == 2 for v in judged.values())
    assert all(a in (0.0, 1.0) for a in judged["alignment"])


def test_merge_recipe_takes_a_built_in_model_as_base(tmp_path):
    base = sf.pipeline_to_original(load_pipeline("toy:sd15"))
    sf.save_single_file(load_pipeline("toy:sd15"), tmp_path / "same.safetensors")
    (tmp_path / "recipe.toml").write_text('base = "toy:sd15"\noutput = "m.safetensors"\n'
                                          '[[checkpoint]]\nmodel = "same.safetensors"\nmultiplier = 0.5\n')
    run_recipe(load_recipe(tmp_path / "recipe.toml"))
    merged = load_file(str(tmp_path / "m.safetensors"))
    assert merged.keys() == base.keys()
    assert all(torch.allclose(merged[k], base[k], atol=1e-6) for k in base)  # a model merged with itself
    assert family_of(load_pipeline(tmp_path / "m.safetensors")) == "sd15"


def test_the_toy_command_comes_from_the_plugin():
    r = spo("toy", "--help")
    assert r.returncode == 0 and all(a in r.stdout for a in ("build", "sample", "pairs", "tokenizer"))
    r = spo("toy", "tokenizer", "--from-open-clip-wheel", "no_such.whl")
    assert r.returncode == 2 and "no_such.whl: no such file" in r.stderr
