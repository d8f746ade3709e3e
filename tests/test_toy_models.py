import numpy as np
import pytest
import torch

from spo.models.family import encode
from spo.toy.build import TOY_MODEL_DIR
from spo.toy.models import fresh_pipeline
from spo.toy.sampling import load_toy_pipeline, sample

pytestmark = pytest.mark.slow  # integration: real training runs or subprocess chains


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_shipped_toy_pipeline_loads_offline_with_diffusers(family):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    cls = StableDiffusionPipeline if family == "sd15" else StableDiffusionXLPipeline
    pipe = cls.from_pretrained(TOY_MODEL_DIR / family, local_files_only=True)
    assert pipe.unet.dtype == torch.float32
    if family == "sdxl":
        assert pipe.text_encoder_2.config.projection_dim == pipe.unet.config.projection_class_embeddings_input_dim - 48
        assert pipe.tokenizer_2.pad_token == "!"
    images = sample(load_toy_pipeline(family), ["a large blue square on a white background, top left"] * 2,
                    seed=0, steps=4)
    assert images[0].size == (32, 32)
    # the shipped VAE round-trips a render through a posterior sample as through its mean (pinned posterior)
    from spo.models.vae import decode, encode as vae_encode

    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        mean = pipe.vae.encode(x).latent_dist.mean * pipe.vae.config.scaling_factor
        drawn = vae_encode(pipe.vae, x, torch.Generator().manual_seed(0))
        assert (drawn - mean).abs().max() < 1e-2 * mean.abs().mean()
        assert (decode(pipe.vae, drawn) - decode(pipe.vae, mean)).abs().max() < 1e-2


def test_sampling_is_deterministic_for_a_seed():
    pipe = load_toy_pipeline("sd15")
    prompts = ["a small red circle on a gray background, bottom right"] * 2
    a = [np.asarray(im) for im in sample(pipe, prompts, seed=3, steps=4)]
    b = [np.asarray(im) for im in sample(pipe, prompts, seed=3, steps=4)]
    assert all((x == y).all() for x, y in zip(a, b))


def test_family_conditioning_shapes():
    sd = fresh_pipeline("sd15")
    c = encode(sd, ["a red circle", "a blue square"])
    assert c.encoder_hidden_states.shape[:2] == (2, 77) and c.added_cond_kwargs is None
    xl = fresh_pipeline("sdxl")
    c = encode(xl, ["a red circle"])
    assert c.added_cond_kwargs["text_embeds"].shape == (1, 32)
    assert c.added_cond_kwargs["time_ids"].tolist() == [[32.0, 32.0, 0.0, 0.0, 32.0, 32.0]]
    u = encode(xl, ["a red circle"], negative=True)
    assert torch.count_nonzero(u.encoder_hidden_states) == 0
    out = xl.unet(torch.zeros(1, 4, 16, 16), torch.tensor([10]), **c.unet_kwargs()).sample
    assert out.shape == (1, 4, 16, 16)


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_world_two_architecture_has_eight_latent_channels_and_32_group_unets(family):
    pipe = fresh_pipeline(family, world=2)
    assert pipe.vae.config.latent_channels == pipe.unet.config.in_channels == pipe.unet.config.out_channels == 8
    assert pipe.unet.config.norm_num_groups == 32  # as in every SD model: ComfyUI's UNet loader assumes it
    assert all(m.num_groups == 32 for m in pipe.unet.modules() if isinstance(m, torch.nn.GroupNorm))
    with torch.no_grad():
        z = pipe.vae.encode(torch.zeros(1, 3, 32, 32)).latent_dist.mean
        c = encode(pipe, ["a small red circle on a gray background, bottom right"])
        assert pipe.unet(z, torch.tensor([10]), **c.unet_kwargs()).sample.shape == z.shape == (1, 8, 16, 16)


def test_toy_build_of_world_two_records_it_and_keeps_it_when_continued(tmp_path):
    import json
    import subprocess
    import sys

    small = ["--images", "32", "--batch", "4", "--unet-steps", "2", "--decoder-steps", "1"]
    cmd = [sys.executable, "-m", "spo", "toy", "build", "--family", "sd15", *small]
    assert subprocess.run([*cmd, "--world", "2", "--vae-steps", "2", "--out", str(tmp_path / "a")],
                          capture_output=True, text=True).returncode == 0
    assert json.loads((tmp_path / "a" / "sd15" / "build_info.json").read_text())["world"] == 2
    run = subprocess.run([*cmd, "--continue-from", str(tmp_path / "a"), "--out", str(tmp_path / "b")],
                         capture_output=True, text=True)
    assert run.returncode == 0 and load_toy_pipeline("sd15", tmp_path / "b" / "sd15").unet.config.in_channels == 8
    # its VAE's posterior is pinned narrow: a sample (img2img, DPO and SPM training draw one) is the mean
    vae = load_toy_pipeline("sd15", tmp_path / "a" / "sd15").vae
    with torch.no_grad():
        posterior = vae.encode(torch.rand(2, 3, 32, 32) * 2 - 1).latent_dist
    assert posterior.std.max() < 2e-3 and posterior.mean.abs().mean() > 10 * posterior.std.max()
    # a world-1 build (other latent channels) cannot turn into a world-2 one by more training
    assert subprocess.run([*cmd, "--world", "1", "--vae-steps", "2", "--out", str(tmp_path / "w1")],
                          capture_output=True, text=True).returncode == 0
    refused = subprocess.run([*cmd, "--continue-from", str(tmp_path / "w1"), "--world", "2", "--out", str(tmp_path / "c")],
                             capture_output=True, text=True)
    assert refused.returncode == 2 and "cannot be continued as world 2" in refused.stderr
    assert "Traceback" not in refused.stderr and not (tmp_path / "c").exists()


def test_one_cycle_schedule_runs_for_every_short_budget():
    # torch's OneCycleLR divides by zero when its warm-up is exactly one step (20 steps at 5 % crashed
    # `spo toy build --decoder-steps 20`); every step count a user may give must run to the end.
    import torch

    from spo.toy.build import one_cycle

    for steps in range(1, 130):
        opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
        sched = one_cycle(opt, 1e-3, steps)
        for _ in range(steps):
            opt.step()
            sched.step()
