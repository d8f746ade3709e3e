"""`spo plan`: the counts it multiplies are the resampler's, its memory count agrees with torch's own tracker and
with real tensors, the judging chunk it suggests leaves the scores unchanged, and the command works end to end."""

import json
import subprocess
import sys

import pytest
import torch

from spo.models.family import encode, guided_output
from spo.models.loading import load_pipeline
from spo.plan.estimate import Linear, round_counts, training_rows
from spo.plan.trace import LiveBytes, measure
from spo.sampling.resampler import sample_pairs, schedule
from spo.train.config import build_config
from spo.train.spo_round import make_judge


def _run_resampler(cfg, judge_chunk=0, batch=2):
    """The real resampler on the toy, with the UNet rows and judged candidates it asks for counted."""
    pipe = load_pipeline("toy:sd15")
    prompts = ["a small red circle on a white background, top left", "a large blue square on a black background"][:batch]
    with torch.no_grad():
        cond, uncond = encode(pipe, prompts), encode(pipe, prompts, negative=True)
    timesteps, a_t, a_prev = schedule(pipe.scheduler, cfg.num_steps)
    gens = [torch.Generator().manual_seed(i) for i in range(batch)]
    shape = (pipe.unet.config.in_channels, pipe.unet.config.sample_size, pipe.unet.config.sample_size)
    x_T = torch.stack([torch.randn(shape, generator=g) for g in gens])
    seen = {"unet_rows": 0, "decoded": 0}

    def model_fn(x, t, rows):
        seen["unet_rows"] += len(x)
        return guided_output(pipe.unet, x, t, cond.index(rows), uncond.index(rows), cfg.cfg_scale)

    judge = make_judge(lambda images, p, t: images.mean(dim=(1, 2, 3)), pipe, prompts, judge_chunk)

    def judge_fn(x0, rows, t):
        seen["decoded"] += len(x0)
        return judge(x0, rows, t)

    _, pairs = sample_pairs(model_fn, judge_fn, x_T, timesteps, a_t, a_prev, gens, k=cfg.k,
                            divert_start_step=cfg.divert_start_step, threshold=0.0, num_inner_steps=cfg.num_inner_steps)
    return seen, pairs


@pytest.mark.parametrize("k,inner,divert", [(4, 0, 2), (2, 3, 1), (3, 2, 0)])
def test_round_counts_are_the_resamplers(k, inner, divert):
    cfg = build_config("toy-sd15", overrides=dict(k=k, num_inner_steps=inner, num_steps=7, divert_start_step=divert,
                                                  sample_batch_size=2))
    seen, pairs = _run_resampler(cfg)
    counts = round_counts(cfg)
    assert counts["unet_rows"] == seen["unet_rows"]
    assert counts["decoded"] == seen["decoded"]
    assert counts["transitions"] == len(pairs)
    shared = bool(torch.equal(pairs.parent_w, pairs.parent_l))
    assert training_rows(cfg) == (1 if shared else 2)


def test_judging_in_chunks_gives_the_same_scores():
    cfg = build_config("toy-sd15", overrides=dict(k=4, num_steps=5, divert_start_step=2))
    _, whole = _run_resampler(cfg)
    _, chunked = _run_resampler(cfg, judge_chunk=3)
    torch.testing.assert_close(chunked.score_w, whole.score_w, atol=1e-6, rtol=1e-6)
    assert torch.equal(chunked.sample_w, whole.sample_w)


def _toy_training_step(device):
    """Forward and backward of a fresh toy-size UNet (LoRA-free: every weight trains) on `device`."""
    from diffusers import UNet2DConditionModel

    from spo.toy.defaults import TOY_MODEL_DIR

    config = UNet2DConditionModel.load_config(TOY_MODEL_DIR / "sd15" / "unet")
    with torch.device(device):
        torch.manual_seed(0)
        unet = UNet2DConditionModel.from_config(config)
    x = torch.randn(3, config["in_channels"], config["sample_size"], config["sample_size"], device=device)
    e = torch.randn(3, 77, config["cross_attention_dim"], device=device)
    return lambda: unet(x, torch.tensor([10, 500, 900], device=device), e).sample.pow(2).mean().backward()


def test_live_bytes_agree_with_torch_memtracker_and_with_real_tensors():
    """Three counts of one training step's activation peak: ours on meta, ours on real CPU tensors, and torch's
    MemTracker (torch.distributed._tools, an independent implementation) on meta."""
    mem_tracker = pytest.importorskip("torch.distributed._tools.mem_tracker")
    meta = measure(_toy_training_step("meta")).peak_bytes
    real = measure(_toy_training_step("cpu")).peak_bytes
    tracker = mem_tracker.MemTracker()
    step = _toy_training_step("meta")
    with tracker:
        step()
    snap = tracker.get_tracker_snapshot("peak")
    theirs = sum(v for dev in snap.values() for k, v in dev.items() if k in ("Activation", "Temp", "Gradient"))
    assert meta == real  # shapes decide it: meta tensors and real ones take the same path
    assert 0.8 * theirs <= meta <= 1.25 * theirs, (meta, theirs)


def test_live_bytes_frees_what_dies_and_ignores_views_of_existing_storages():
    w = torch.empty(1000, 1000, device="meta")  # 4 MB made before the mode: never counted
    with LiveBytes() as live:
        w.t()  # a view of w
        a = torch.empty(256, 1024, device="meta")  # 1 MiB
        del a
        b = torch.empty(512, 1024, device="meta")  # 2 MiB, after a died
    assert live.peak == 2 * 2**20 and b.shape[0] == 512


def test_linear_fit_recovers_fixed_and_per_row():
    from spo.plan.trace import Measure

    mem, flops = Linear.fit(Measure(150, 30), Measure(250, 50), 1, 2)
    assert (mem.fixed, mem.per_row, flops.fixed, flops.per_row) == (50, 100, 10, 20)
    assert mem.at(8) == 850


def _plan(*args):
    return subprocess.run([sys.executable, "-m", "spo", "plan", *args], capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_spo_plan_json_for_the_toy_default_and_a_fitting_suggestion():
    # Train batches of 64 transitions in one micro-batch: training is the peak, which smaller micro-batches lower.
    proc = _plan("--json", "--train-batch-size", "64", "--train-micro-batch", "64", "--gpu-memory", "0.2")
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout)
    assert set(out["phases"]) == {"sampling", "judging", "training"}
    assert out["counts"] == round_counts(build_config("toy-sd15"))
    assert out["iterations_per_epoch"] == 5  # 80 prompts, rounds of 16
    for name, ph in out["phases"].items():
        assert ph["peak"] > ph["activations"] > 0, name
    assert set(out["gpus"]) == {"RTX 4090", "A100 80GB", "H100 SXM", "H200"}
    assert out["phases"]["training"]["peak"] > 0.2 * 2**30  # as configured it does not fit
    fit = out["suggestion"]
    assert fit is not None and fit["peak"] <= 0.2 * 2**30
    assert fit["train_micro_batch"] < 64 and not fit["gradient_checkpointing"]  # the free option comes first


@pytest.mark.parametrize("args,needle", [
    (["--base", "/nonexistent/model.safetensors"], "no such file"),
    (["--utilisation", "1.5"], "--utilisation"),
    (["--resolution", "30"], "--resolution"),
    (["--gpu-memory", "-1"], "--gpu-memory"),
])
def test_spo_plan_bad_input_is_one_line_exit_2(args, needle):
    proc = _plan(*args)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert needle in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_spm_training_step_plan_agrees_with_the_real_step():
    """The SPM step as `spo plan` traces it on meta tensors against the real step on the toy's CPU tensors
    (spo.spm.denoise.predicted_pair_images, then the SPM's forward and backward): activations within 20 %."""
    from spo.plan.estimate import plan_spm_training
    from spo.plan.meta import meta_models
    from spo.spm.denoise import freeze, predicted_pair_images
    from spo.spm.scoring import load_spm

    cfg = build_config("toy-sd15")
    models = meta_models(cfg.base, cfg, "")
    side, pairs = models.resolution, 2
    planned = plan_spm_training(models, side, pairs, cfg.cfg_scale)
    pipe = load_pipeline("toy:sd15")
    freeze(pipe)
    spm = load_spm("toy:sd15").requires_grad_(True).train()
    assert planned["spm_parameters"] == sum(p.numel() for p in spm.parameters())
    assert planned["weights"]["spm (fp32)"] == 4 * planned["spm_parameters"]
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(pairs, 3, side, side, generator=g) * 2 - 1 for _ in range(2)]
    prompts = ["a small red circle on a white background, top left", "a large blue square on a black background"]
    t = torch.tensor([300, 700])

    def step():
        x0, x1 = predicted_pair_images(pipe, *images, prompts, t, torch.Generator().manual_seed(1), cfg.cfg_scale)
        spm.image_embeds(spm.preprocess(torch.cat([x0, x1])), torch.cat([t, t])).float().pow(2).sum().backward()

    real = measure(step).peak_bytes
    assert 0.8 * real <= planned["activations"] <= 1.2 * real, (planned["activations"], real)
    assert planned["peak"] > sum(planned["weights"].values())


def test_spm_optimizer_options_count_adafactor_state_as_transformers_keeps_it():
    """The plan's Adafactor state is what transformers' Adafactor (as `spo spm train` makes it) holds after a step on
    the toy SPM; the fused backward pass keeps one gradient, so its option plans the least memory."""
    from spo.plan.estimate import adafactor_state_bytes, plan_spm_training
    from spo.plan.meta import meta_models
    from spo.spm.scoring import load_spm
    from spo.train.config import SPMConfig
    from spo.train.engine import make_optimizer

    spm = load_spm("toy:sd15").requires_grad_(True)
    params = [p for p in spm.parameters()]
    opt = make_optimizer(SPMConfig(optimizer="adafactor"), params)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    held = sum(t.numel() * t.element_size() for s in opt.state.values() for k, t in s.items()
               if torch.is_tensor(t) and k not in ("RMS", "step"))  # the per-parameter bookkeeping scalars aside
    assert adafactor_state_bytes(params) == held > 0
    cfg = build_config("toy-sd15")
    models = meta_models(cfg.base, cfg, "")
    options = plan_spm_training(models, 32, 2, cfg.cfg_scale)["options"]
    assert options["adafactor, fused backward pass"] < options["adafactor"] < options["adamw"]
    # --full-bf16: 2 bytes less per SPM weight, 10 more for the one tensor being stepped (a saving once no tensor
    # holds a fifth of the SPM: CLIP-H's largest is 4 %, the toy's token embedding more)
    n, biggest = sum(p.numel() for p in models.spm.parameters()), max(p.numel() for p in models.spm.parameters())
    assert options["adafactor, fused backward pass, --full-bf16"] == options["adafactor, fused backward pass"] - 2 * n + 10 * biggest
