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
