"""The step-aware preference model: identity at init, save/load, official checkpoints, loss math, scoring."""

import subprocess
import sys

import numpy as np
import pytest
import torch

from spo.errors import SpoInputError
from spo.spm.model import (
    StepAwarePreferenceModel,
    check_family,
    map_official_state_dict,
    modulate,
    official_state_dict,
    timestep_frequencies,
    toy_config,
)
from spo.losses import preference_loss
from spo.train.engine import learning_rate_factor as warmup_factor
from spo.train.pair_batches import stream_indices
from spo.train.spm_recipe import threshold_labels

PROMPTS = ["a red circle on a white background", "a small blue square at the top left", "a green triangle"]


def spo(*args):
    return subprocess.run([sys.executable, "-m", "spo", *args], capture_output=True, text=True, timeout=300)


def _images(n=3, side=32, seed=0):
    return torch.rand(n, 3, side, side, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _perturb_time_modules(spm, seed=1):
    """Give the (zero-initialised) modulation non-zero weights, as training would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in spm.named_parameters():
            if name.startswith(("layer_adaln", "pooled_adaln", "t_embedder")):
                p.add_(torch.randn(p.shape, generator=g) * 0.05)


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    """A tiny real CLIP checkpoint in transformers format (config.json + safetensors), no tokenizer."""
    from transformers import CLIPModel

    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("clip")
    CLIPModel(toy_config()).save_pretrained(d)
    return d


def _reference_scores(clip, spm, images, prompts):
    """Plain CLIPModel's score on the same pixels and tokens."""
    tok = spm.tokenize(prompts)
    out = clip(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"], pixel_values=spm.preprocess(images))
    return out.logits_per_image.diag()


@pytest.mark.parametrize("time_conditioning", [True, False])
@pytest.mark.parametrize("side", [32, 48])
def test_fresh_spm_equals_its_clip(clip_dir, time_conditioning, side):
    from transformers import CLIPModel

    clip = CLIPModel.from_pretrained(clip_dir, local_files_only=True).eval()
    spm = StepAwarePreferenceModel.from_clip(clip_dir, time_conditioning=time_conditioning).eval()
    images = _images(side=side)
    with torch.no_grad():
        ref = _reference_scores(clip, spm, images, PROMPTS)
        for t in ([0, 0, 0], [1, 500, 999], [951, 251, 701]):
            got = spm(images, PROMPTS, torch.tensor(t))
            assert got.shape == (3,)
            torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_half_precision_clip_folder_streams_into_the_dtype_asked_for(tmp_path, dtype):
    """from_clip reads model.safetensors tensor by tensor (no memory map): the same weights and buffers as
    transformers' from_pretrained, in `dtype`, and the same scores."""
    from transformers import CLIPModel

    torch.manual_seed(1)
    CLIPModel(toy_config()).half().save_pretrained(tmp_path)
    ref = CLIPModel.from_pretrained(tmp_path, local_files_only=True, torch_dtype=dtype).eval()
    spm = StepAwarePreferenceModel.from_clip(tmp_path, time_conditioning=False, dtype=dtype).eval()
    got, want = spm.clip.state_dict(), ref.state_dict()
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) and got[k].dtype == dtype for k in got)
    assert all(b.device.type == "cpu" for b in spm.buffers())
    tolerance = {} if dtype == torch.float32 else dict(atol=3e-2, rtol=3e-2)  # bf16: pixels are cast differently
    with torch.no_grad():
        torch.testing.assert_close(spm(_images(), PROMPTS, torch.tensor([0, 0, 0])).float(),
                                   _reference_scores(ref, spm, _images(), PROMPTS).float(), **tolerance)


def test_preprocess_maps_range_and_normalises():
    spm = StepAwarePreferenceModel.toy()
    x = torch.full((1, 3, 32, 32), -1.0)
    px = spm.preprocess(x)
    torch.testing.assert_close(px[0, :, 0, 0], -spm.image_mean.flatten() / spm.image_std.flatten())
    assert spm.preprocess(_images(2, side=64)).shape == (2, 3, 32, 32)
    assert spm.preprocess(torch.rand(2, 3, 40, 64)).shape == (2, 3, 32, 32)  # non-square: resize + centre crop
    with pytest.raises(SpoInputError):
        spm.preprocess(torch.rand(2, 32, 32))


def test_time_conditioning_makes_scores_depend_on_t():
    spm = StepAwarePreferenceModel.toy().eval()
    _perturb_time_modules(spm)
    images = _images()
    with torch.no_grad():
        a = spm(images, PROMPTS, torch.tensor([0, 0, 0]))
        b = spm(images, PROMPTS, torch.tensor([900, 900, 900]))
        # batched == one at a time
        one = torch.cat([spm(images[i:i + 1], PROMPTS[i:i + 1], torch.tensor([0])) for i in range(3)])
    assert (a - b).abs().max() > 1e-3
    torch.testing.assert_close(a, one, atol=1e-5, rtol=1e-5)

    flat = StepAwarePreferenceModel.toy(time_conditioning=False).eval()
    assert not any(n.startswith(("layer_adaln", "t_embedder")) for n, _ in flat.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(flat(images, PROMPTS, torch.tensor([0, 0, 0])),
                                   flat(images, PROMPTS, torch.tensor([999, 5, 700])))


def test_gradients_reach_spm_parameters_with_and_without_checkpointing():
    for ckpt in (False, True):
        spm = StepAwarePreferenceModel.toy()
        spm.set_gradient_checkpointing(ckpt)
        spm.train()
        spm(_images(), PROMPTS, torch.tensor([3, 400, 800])).sum().backward()
        grads = {n: p.grad for n, p in spm.named_parameters()}
        assert grads["t_embedder.mlp.0.weight"] is not None
        assert grads["layer_adaln.0.1.bias"].abs().sum() > 0
        assert grads["clip.text_model.encoder.layers.0.mlp.fc1.weight"].abs().sum() > 0


def test_math_helpers():
    t = torch.tensor([0, 10, 999])
    f = timestep_frequencies(t, 8)
    assert f.shape == (3, 8)
    torch.testing.assert_close(f[0], torch.tensor([1.0] * 4 + [0.0] * 4))
    x = torch.randn(2, 5, 4)
    torch.testing.assert_close(modulate(x, torch.zeros(2, 4), torch.zeros(2, 4)), x)
    assert warmup_factor(0, 4) == 0.25 and warmup_factor(3, 4) == 1.0 and warmup_factor(10, 0) == 1.0
    # cosine: full rate right after warm-up, half way at the middle of the rest, 0 at the last step
    cos = [warmup_factor(s, 4, total=104, schedule="cosine") for s in range(104)]
    assert cos[0] == 0.25 and cos[3] == 1.0 and abs(cos[53] - 0.5) < 1e-12 and cos[103] == 0.0
    assert all(a >= b for a, b in zip(cos[3:], cos[4:]))


def test_preference_loss_tie_optimum_is_zero_and_weights_count():
    s = torch.tensor([2.0, -1.0])
    tie = preference_loss(s, s, torch.tensor([0.5, 0.5]), torch.tensor([0.5, 0.5]), torch.ones(2))
    assert abs(tie.item()) < 1e-6
    # a decided pair: plain cross-entropy, -log softmax(s_win)
    win = preference_loss(torch.tensor([1.0]), torch.tensor([0.0]), torch.tensor([1.0]), torch.tensor([0.0]), torch.ones(1))
    assert abs(win.item() - np.log(1 + np.exp(-1.0))) < 1e-6
    # a tie with unequal scores costs more than zero
    assert preference_loss(torch.tensor([3.0]), torch.tensor([0.0]), torch.tensor([0.5]), torch.tensor([0.5]), torch.ones(1)) > 0.1
    # weights: the example with weight 1/3 counts a third as much
    s0, s1 = torch.tensor([0.0, 0.0]), torch.tensor([2.0, -2.0])
    l0, l1 = torch.tensor([1.0, 1.0]), torch.tensor([0.0, 0.0])
    per = [np.log(1 + np.exp(2.0)), np.log(1 + np.exp(-2.0))]
    got = preference_loss(s0, s1, l0, l1, torch.tensor([1.0, 1 / 3])).item()
    assert abs(got - (0.75 * per[0] + 0.25 * per[1])) < 1e-6


def test_threshold_labels_and_data_stream():
    l0, l1 = threshold_labels(torch.tensor([5.0, 0.0, 0.0, 0.1]), torch.tensor([0.0, 5.0, 0.0, 0.0]), 0.1)
    assert l0.tolist() == [1.0, 0.0, 0.5, 0.5] and l1.tolist() == [0.0, 1.0, 0.5, 0.5]
    first = stream_indices(5, 0, 0, 5)
    assert sorted(first) == list(range(5))
    assert stream_indices(5, 0, 3, 4) == first[3:] + stream_indices(5, 0, 5, 2)
    assert stream_indices(5, 0, 0, 12) == stream_indices(5, 0, 0, 12)


def test_save_load_roundtrip_and_size(tmp_path):
    spm = StepAwarePreferenceModel.toy(family="sdxl", base_model="toy:sdxl", training={"steps": 3})
    _perturb_time_modules(spm)
    spm.save(tmp_path / "spm")
    assert (tmp_path / "spm" / "model.safetensors").stat().st_size <= 10 * 1024 * 1024
    back = StepAwarePreferenceModel.load(tmp_path / "spm")
    assert back.family == "sdxl" and back.base_model == "toy:sdxl" and back.training_summary == {"steps": 3}
    with torch.no_grad():
        t = torch.tensor([0, 300, 900])
        torch.testing.assert_close(back(_images(), PROMPTS, t), spm.eval()(_images(), PROMPTS, t), atol=0, rtol=0)
    # overwriting is atomic and leaves no temporary folders
    spm.save(tmp_path / "spm")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["spm"]
    with pytest.raises(SpoInputError, match="no spm_config.json"):
        StepAwarePreferenceModel.load(tmp_path)


def test_load_in_bf16_fills_every_weight_from_the_file(tmp_path):
    """Built on meta and filled from the file: no weight is left uninitialised, all are bf16, scores follow fp32's."""
    spm = StepAwarePreferenceModel.toy(family="sd15")
    _perturb_time_modules(spm)
    spm.save(tmp_path / "spm")
    half = StepAwarePreferenceModel.load(tmp_path / "spm", dtype=torch.bfloat16)
    assert not any(p.is_meta for p in half.parameters()) and not any(b.is_meta for b in half.buffers())
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    saved = spm.state_dict()
    for k, v in half.state_dict().items():
        torch.testing.assert_close(v, saved[k].to(torch.bfloat16), atol=0, rtol=0)
    with torch.no_grad():
        t = torch.tensor([0, 300, 900])
        full, low = spm.eval()(_images(), PROMPTS, t), half(_images(), PROMPTS, t).float()
    torch.testing.assert_close(low, full, atol=0.05 * float(full.abs().max()), rtol=0.05)


def test_check_family():
    spm = StepAwarePreferenceModel.toy(family="sd15", base_model="toy:sd15")
    check_family(spm, "sd15")
    with pytest.raises(SpoInputError, match="trained for sd15.*base model is sdxl"):
        check_family(spm, "sdxl")


def _fake_official(seed=3):
    """A state dict in the official layout (StepAwarePreferenceModel wrapper -> `model.` + HF names)."""
    src = StepAwarePreferenceModel.toy(seed=seed)
    _perturb_time_modules(src, seed)
    sd = official_state_dict(src)
    assert "model.vision_model.encoder.layers.0.adaLN_modulation.1.weight" in sd
    assert "model.t_embedder.mlp.2.bias" in sd and "model.vision_model.adaLN_modulation.1.bias" in sd
    # older transformers saved these constant buffers; they must be accepted and dropped
    sd["model.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    sd["model.vision_model.embeddings.position_ids"] = torch.arange(65)[None]
    return src, sd


def test_official_checkpoint_loads_only_with_allow_pickle(tmp_path):
    src, sd = _fake_official()
    path = tmp_path / "final_ckpt.bin"
    torch.save(sd, path)
    with pytest.raises(SpoInputError, match="--allow-pickle"):
        StepAwarePreferenceModel.from_official(path, clip_config=toy_config())
    got = StepAwarePreferenceModel.from_official(path, clip_config=toy_config(), allow_pickle=True).eval()
    with torch.no_grad():
        t = torch.tensor([0, 501, 951])
        torch.testing.assert_close(got(_images(), PROMPTS, t), src.eval()(_images(), PROMPTS, t), atol=0, rtol=0)
    # keys that do not map are named
    sd["model.vision_model.mystery_block.weight"] = torch.zeros(3)
    torch.save(sd, tmp_path / "bad.bin")
    with pytest.raises(SpoInputError, match="do not map.*mystery_block"):
        StepAwarePreferenceModel.from_official(tmp_path / "bad.bin", clip_config=toy_config(), allow_pickle=True)
    # not a state dict (weights_only refuses arbitrary objects)
    torch.save({"x": [1, 2]}, tmp_path / "odd.bin")
    with pytest.raises(SpoInputError):
        StepAwarePreferenceModel.from_official(tmp_path / "odd.bin", clip_config=toy_config(), allow_pickle=True)
    assert len(map_official_state_dict(official_state_dict(got))) == len(got.state_dict())


@pytest.mark.slow
def test_cli_convert_official(tmp_path, clip_dir):
    _, sd = _fake_official()
    torch.save(sd, tmp_path / "final_ckpt.bin")
    out = tmp_path / "converted"
    r = spo("spm", "convert", str(tmp_path / "final_ckpt.bin"), "--clip", str(clip_dir), "--family", "sd15",
            "--out", str(out))
    assert r.returncode == 2 and "--allow-pickle" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = spo("spm", "convert", str(tmp_path / "final_ckpt.bin"), "--clip", str(clip_dir), "--family", "sd15",
            "--out", str(out), "--allow-pickle")
    assert r.returncode == 0, r.stderr
    assert StepAwarePreferenceModel.load(out).family == "sd15"


def test_load_scorer_and_score_latents(tmp_path):
    from spo.spm.scoring import load_scorer, score_images, score_latents
    from spo.toy.sampling import load_toy_pipeline

    spm = StepAwarePreferenceModel.toy(family="sd15", base_model="toy:sd15")
    _perturb_time_modules(spm)
    spm.save(tmp_path / "spm")
    scorer = load_scorer(tmp_path / "spm", family="sd15")
    assert load_scorer(tmp_path, family="sd15") is not None  # a training output folder holding spm/
    with pytest.raises(SpoInputError, match="trained for sd15"):
        load_scorer(tmp_path / "spm", family="sdxl")
    with pytest.raises(SpoInputError, match="has no function 'nope'"):
        load_scorer("spo.spm.evaluate:nope")
    with pytest.raises(SpoInputError, match="cannot import module"):
        load_scorer("spo.no_such_module:f")
    with pytest.raises(SpoInputError, match="no such folder"):
        load_scorer(str(tmp_path / "missing"))
    f = load_scorer("spo.spm.evaluate:pairwise_accuracy")
    assert callable(f)

    vae = load_toy_pipeline("sd15").vae.eval()
    k, b = 3, 2
    latents = torch.randn(b * k, vae.config.latent_channels, 16, 16, generator=torch.Generator().manual_seed(0))
    prompts = [p for p in PROMPTS[:b] for _ in range(k)]
    t = torch.tensor([500] * (b * k))
    s1 = score_latents(scorer, vae, latents, prompts, t, chunk=2)
    s2 = score_latents(scorer, vae, latents, prompts, 500, chunk=6)
    with torch.no_grad():
        images = vae.decode(latents / vae.config.scaling_factor).sample.clamp(-1, 1)
        ref = scorer(images, prompts, t)
    assert s1.shape == (b * k,)
    torch.testing.assert_close(s1, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(s1, s2, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(score_images(scorer, images, prompts, t, chunk=4), ref, atol=1e-5, rtol=1e-5)
    with pytest.raises(SpoInputError):
        score_latents(scorer, vae, latents, prompts[:2], t)


def test_pairwise_log_loss_and_paired_difference_by_hand():
    from spo.spm.evaluate import pair_correct, paired_difference, pairwise_log_loss

    preferred = np.array([0, 1, 1, 0])
    s0, s1 = np.array([2.0, 0.0, 1.0, 0.0]), np.array([0.0, 1.0, 1.0, 3.0])
    assert pair_correct(s0, s1, preferred).tolist() == [1.0, 1.0, 0.5, 0.0]
    # margins of the preferred image: 2, 1, 0, -3
    want = np.mean([np.log1p(np.exp(-2.0)), np.log1p(np.exp(-1.0)), np.log(2.0), np.log1p(np.exp(3.0))])
    assert pairwise_log_loss(s0, s1, preferred) == pytest.approx(want, rel=1e-12)
    # a scorer that never commits sits at ln 2 whatever the labels
    assert pairwise_log_loss(np.zeros(4), np.zeros(4), preferred) == pytest.approx(np.log(2.0))
    a, b = np.array([1.0, 0.0, 1.0, 0.5]), np.array([1.0, 1.0, 1.0, 1.0])
    diff, ci = paired_difference(a, b)
    d = b - a
    # 4 pairs: Student t(0.975, 3) = 3.18245 (spo.stats), not the normal 1.96
    assert diff == pytest.approx(0.375) and ci == pytest.approx(3.182446305284263 * d.std(ddof=1) / 2.0)
    # identical scorers: zero difference with zero width, however noisy each one is
    assert paired_difference(a, a) == (0.0, 0.0)


def test_a_clip_folder_is_a_clean_image_scorer(clip_dir):
    # PickScore_v1 as the user has it (a transformers CLIP folder) can relabel pairs, judge finished images
    # for `spo spm siblings`, or be SPO's preference, with no conversion: its score is plain CLIP's, t ignored.
    from transformers import CLIPModel

    from spo.spm.scoring import is_clip_dir, load_scorer

    assert is_clip_dir(clip_dir) and not is_clip_dir(clip_dir.parent)
    scorer = load_scorer(clip_dir, family="sdxl")  # a plain CLIP belongs to no family
    clip = CLIPModel.from_pretrained(clip_dir, local_files_only=True).eval()
    images = _images()
    with torch.no_grad():
        ref = _reference_scores(clip, scorer, images, PROMPTS)
        torch.testing.assert_close(scorer(images, PROMPTS, torch.tensor([0, 500, 999])), ref, atol=1e-5, rtol=1e-6)
    assert not scorer.time_conditioning and not any(p.requires_grad for p in scorer.parameters())
