"""Random-weight full-size stand-ins (`spo dev`): the single file has the original layout real checkpoints use and
loads through the same single-file loader as a user's file; the CLIP folder starts an SPM; both are seeded."""

import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

from spo.stand_ins import random_tensor


def test_random_tensor_is_a_pure_function_of_seed_key_and_shape():
    a = random_tensor("model.diffusion_model.out.2.weight", (4, 320, 3, 3), torch.float16, 0)
    assert torch.equal(a, random_tensor("model.diffusion_model.out.2.weight", (4, 320, 3, 3), torch.float16, 0))
    assert not torch.equal(a, random_tensor("model.diffusion_model.out.2.weight", (4, 320, 3, 3), torch.float16, 1))
    assert abs(float(a.float().std()) - (320 * 9) ** -0.5) < 0.2 * (320 * 9) ** -0.5
    assert torch.equal(random_tensor("x.norm.weight", (8,), torch.float32, 0), torch.ones(8))
    assert torch.equal(random_tensor("x.norm.bias", (8,), torch.float32, 0), torch.zeros(8))


def _dev(*args):
    return subprocess.run([sys.executable, "-m", "spo", "dev", *args], capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_sd15_stand_in_loads_as_a_user_checkpoint_and_runs(tmp_path):
    from spo.models.checkpoint import detect_family
    from spo.models.loading import load_pipeline

    out = tmp_path / "base.safetensors"
    proc = _dev("random-checkpoint", "--family", "sd15", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    with safe_open(str(out), framework="pt") as f:
        keys = set(f.keys())
        assert f.get_slice("model.diffusion_model.input_blocks.0.0.weight").get_shape() == [320, 4, 3, 3]
        assert f.metadata()["modelspec.architecture"].startswith("stable-diffusion-v1")
    assert detect_family(keys) == "sd15"
    assert "cond_stage_model.transformer.text_model.encoder.layers.11.mlp.fc2.weight" in keys
    assert "first_stage_model.decoder.mid.attn_1.q.weight" in keys
    pipe = load_pipeline(str(out))  # diffusers' single-file loader, offline, as for a downloaded model
    assert sum(p.numel() for p in pipe.unet.parameters()) == 859_520_964
    with torch.no_grad():
        x = pipe.unet(torch.randn(1, 4, 8, 8), torch.tensor([500]), torch.randn(1, 77, 768)).sample
    assert x.shape == (1, 4, 8, 8) and torch.isfinite(x).all()
    assert _dev("random-checkpoint", "--family", "sd15", "--out", str(out)).returncode == 2  # never overwritten


@pytest.mark.slow
def test_clip_h_stand_in_starts_an_spm(tmp_path):
    from spo.spm.model import StepAwarePreferenceModel

    proc = _dev("random-clip", "--out", str(tmp_path / "clip"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    spm = StepAwarePreferenceModel.from_clip(tmp_path / "clip")
    assert sum(p.numel() for p in spm.clip.parameters()) == 986_109_441  # CLIP-ViT-H-14
    with torch.no_grad():
        s = spm(torch.zeros(2, 3, 64, 64), ["a cat", "a dog"], torch.tensor([0, 500]))
    assert s.shape == (2,) and torch.isfinite(s).all()
