"""--vae (a VAE in place of the base model's) and the fp16-safe decode every decoding path uses."""

import copy
import json

import pytest
import torch
from safetensors.torch import save_file

from spo.errors import SpoInputError
from spo.formats.single_file import pipeline_to_original
from spo.models.family import CONFIG_DIR, VAE_PREFIX
from spo.models.loading import load_pipeline
from spo.models.vae import check_fits, decode, encode, needs_upcast


@pytest.fixture(scope="module")
def pipe():
    return load_pipeline("toy:sd15")


def _latents(pipe, n=2, seed=0):
    side = pipe.unet.config.sample_size
    return torch.randn(n, pipe.unet.config.in_channels, side, side, generator=torch.Generator().manual_seed(seed))


def _overflowing(vae, force_upcast: bool):
    """The toy VAE with its decoder input layer scaled up: finite in fp32, past fp16's range inside the decoder."""
    v = copy.deepcopy(vae)
    with torch.no_grad():
        v.decoder.conv_in.weight.mul_(1e5)
        v.decoder.conv_in.bias.mul_(1e5)
    v.register_to_config(force_upcast=force_upcast)
    return v


def _other_vae(pipe):
    """The base VAE with a visibly different decoder output bias: a VAE that is not the model's own."""
    v = copy.deepcopy(pipe.vae)
    with torch.no_grad():
        v.decoder.conv_out.bias.add_(0.25)
    return v


def test_fp16_decode_needs_the_upcast_and_gets_it(pipe):
    lat = _latents(pipe)
    reference = decode(_overflowing(pipe.vae, True), lat)  # fp32 weights, no autocast: no upcast involved
    assert torch.isfinite(reference).all()

    unsafe = _overflowing(pipe.vae, force_upcast=False).half()  # a config claiming fp16 safety, wrongly
    assert not needs_upcast(unsafe, "cpu")
    assert torch.isnan(decode(unsafe, lat)).any()

    vae = _overflowing(pipe.vae, force_upcast=True).half()  # the original SDXL VAE's config
    assert needs_upcast(vae, "cpu")
    images = decode(vae, lat)
    assert torch.isfinite(images).all() and images.dtype == torch.float32
    assert torch.allclose(images, reference, atol=1e-3)  # fp32 up to the fp16 rounding of the weights
    assert vae.dtype == torch.float16  # restored after the decode, as diffusers' SDXL pipeline does


def test_fp16_autocast_decode_is_upcast_too(pipe):
    """Mixed-precision training: fp32 weights, fp16 autocast; the convolutions would overflow all the same."""
    lat = _latents(pipe)
    vae = _overflowing(pipe.vae, force_upcast=True)
    with torch.autocast("cpu", dtype=torch.float16):
        assert torch.isnan(vae.decode(lat / vae.config.scaling_factor).sample).any()
        assert needs_upcast(vae, "cpu")
        images = decode(vae, lat)
        assert torch.is_autocast_enabled("cpu")  # left as it was for the caller
    assert torch.isfinite(images).all()


def test_fp32_and_bf16_decode_untouched(pipe):
    """No upcast where nothing overflows: fp32 is bit-identical to a plain decode; bf16 keeps fp32's range."""
    lat = _latents(pipe)
    plain = pipe.vae.decode(lat / pipe.vae.config.scaling_factor).sample.float().clamp(-1, 1)
    assert torch.equal(decode(pipe.vae, lat), plain)
    assert not needs_upcast(copy.deepcopy(pipe.vae).to(torch.bfloat16), "cpu")


def test_encode_upcasts_like_decode(pipe):
    vae = copy.deepcopy(pipe.vae)
    with torch.no_grad():
        vae.encoder.conv_in.weight.mul_(1e5)
    images = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    v16 = vae.half()
    lat = encode(v16, images, torch.Generator().manual_seed(0))
    assert torch.isfinite(lat).all()
    v16.register_to_config(force_upcast=False)
    assert not torch.isfinite(encode(v16, images, torch.Generator().manual_seed(0))).all()


def _check_replaced(loaded, other, base):
    assert torch.equal(loaded.vae.decoder.conv_out.bias, other.decoder.conv_out.bias)
    assert not torch.equal(loaded.vae.decoder.conv_out.bias, base.vae.decoder.conv_out.bias)
    a, b = loaded.vae.state_dict(), other.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    lat = _latents(base)
    assert torch.equal(decode(loaded.vae, lat), decode(other, lat))


def test_vae_from_a_diffusers_folder(pipe, tmp_path):
    other = _other_vae(pipe)
    other.save_pretrained(tmp_path / "vae")
    _check_replaced(load_pipeline("toy:sd15", vae=tmp_path / "vae"), other, pipe)
    # a whole diffusers model folder stands for its vae/
    _check_replaced(load_pipeline("toy:sd15", vae=tmp_path), other, pipe)


@pytest.mark.parametrize("layout", ["original", "original-prefixed", "diffusers"])
def test_vae_from_a_single_file(pipe, tmp_path, layout):
    """sdxl_vae.safetensors-style files: original keys (encoder.down.0..., mid attention as 1x1 convolutions),
    the same under first_stage_model., or diffusers' key names."""
    other = _other_vae(pipe)
    if layout == "diffusers":
        tensors = {k: v.contiguous() for k, v in other.state_dict().items()}
    else:
        donor = copy.copy(pipe)
        donor.vae = other
        keep = VAE_PREFIX if layout == "original-prefixed" else ""
        tensors = {keep + k[len(VAE_PREFIX):]: v for k, v in pipeline_to_original(donor).items()
                   if k.startswith(VAE_PREFIX)}
        assert "decoder.up.0.block.0.conv1.weight" in {k[len(keep):] for k in tensors}
    save_file(tensors, str(tmp_path / "vae.safetensors"))
    _check_replaced(load_pipeline("toy:sd15", vae=tmp_path / "vae.safetensors"), other, pipe)


def test_fp16_fix_config_is_kept(pipe, tmp_path):
    """A folder's own config comes with it: force_upcast false (the fp16-fix VAE) means no upcast in fp16."""
    other = _other_vae(pipe)
    other.register_to_config(force_upcast=False)
    other.save_pretrained(tmp_path / "fix")
    loaded = load_pipeline("toy:sd15", vae=tmp_path / "fix")
    assert loaded.vae.config.force_upcast is False
    assert not needs_upcast(loaded.vae.half(), "cpu")
    other.save_pretrained(tmp_path / "fp16-only", variant="fp16")  # a folder with only the fp16 weights
    _check_replaced(load_pipeline("toy:sd15", vae=tmp_path / "fp16-only"), other, pipe)


def test_vae_from_a_whole_checkpoint(pipe, tmp_path):
    """A full single-file checkpoint given as --vae: its first_stage_model.* part, the rest not even read."""
    from spo.formats.single_file import save_single_file

    other = _other_vae(pipe)
    donor = copy.copy(pipe)
    donor.vae = other
    path = save_single_file(donor, tmp_path / "model.safetensors")
    _check_replaced(load_pipeline("toy:sd15", vae=path), other, pipe)


def _real(family):
    return json.loads((CONFIG_DIR / family / "vae" / "config.json").read_text())


def test_fit_rules_on_the_real_configs():
    sd15, sdxl = _real("sd15"), _real("sdxl")
    check_fits({**sdxl, "force_upcast": False}, sdxl, 4, "fix")  # the fp16-fix VAE: same latents
    check_fits(sd15, sd15, 4, "own")
    with pytest.raises(SpoInputError, match=r"scaling_factor 0.18215, an SD1.5 VAE.*0.13025, an SDXL VAE.*family"):
        check_fits(sd15, sdxl, 4, "sd15-vae")
    with pytest.raises(SpoInputError, match=r"an SDXL VAE.*an SD1.5 VAE"):
        check_fits(sdxl, sd15, 4, "sdxl-vae")
    with pytest.raises(SpoInputError, match="16-channel latents.*takes 4"):
        check_fits({**sdxl, "latent_channels": 16}, sdxl, 4, "flux-like")
    with pytest.raises(SpoInputError, match="1/4 of the image side.*1/8"):
        check_fits({**sdxl, "block_out_channels": [128, 256, 512]}, sdxl, 4, "shallow")


def test_wrong_vae_files_refused(pipe, tmp_path):
    from diffusers import AutoencoderKL

    wide = AutoencoderKL.from_config({**pipe.vae.config, "latent_channels": 16})
    save_file({k: v.contiguous() for k, v in wide.state_dict().items()}, str(tmp_path / "wide.safetensors"))
    with pytest.raises(SpoInputError, match="16-channel"):
        load_pipeline("toy:sd15", vae=tmp_path / "wide.safetensors")
    # the right latent channels, so what is refused is the missing rest of the VAE
    z = pipe.vae.config.latent_channels
    save_file({"decoder.conv_in.weight": torch.zeros(8, z, 3, 3)}, str(tmp_path / "torn.safetensors"))
    with pytest.raises(SpoInputError, match="does not fit"):
        load_pipeline("toy:sd15", vae=tmp_path / "torn.safetensors")
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(4, 4)}, str(tmp_path / "lora.safetensors"))
    with pytest.raises(SpoInputError, match="not a VAE file"):
        load_pipeline("toy:sd15", vae=tmp_path / "lora.safetensors")
    (tmp_path / "vae.ckpt").write_bytes(b"pickle")
    with pytest.raises(SpoInputError, match="pickle"):
        load_pipeline("toy:sd15", vae=tmp_path / "vae.ckpt")


def test_generate_and_train_take_vae(pipe, tmp_path):
    """--vae reaches the images `spo generate` writes, and `spo train`'s config."""
    import numpy as np
    from PIL import Image

    from spo.cli.main import main
    from spo.train.config import SPOConfig, build_config

    other = _other_vae(pipe)
    other.save_pretrained(tmp_path / "vae")
    common = ["generate", "--prompt", "a large red circle on a white background, in the center", "--steps", "2"]
    assert main(common + ["--out", str(tmp_path / "own")]) == 0
    assert main(common + ["--vae", str(tmp_path / "vae"), "--out", str(tmp_path / "other")]) == 0
    own, theirs = (np.asarray(Image.open(next((tmp_path / d).glob("*.png")))) for d in ("own", "other"))
    assert own.shape == theirs.shape and not np.array_equal(own, theirs)
    png = next((tmp_path / "other").glob("*.png"))
    assert "VAE: vae" in Image.open(png).text["parameters"]  # A1111's infotext key
    assert json.loads((tmp_path / "other" / "index.json").read_text())["images"][0]["vae"] == str(tmp_path / "vae")
    assert build_config(overrides={"vae": str(tmp_path / "vae")}, cls=SPOConfig).vae == str(tmp_path / "vae")
