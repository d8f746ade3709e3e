"""LoRA interchange: diffusers/peft <-> webui/kohya, metadata, and the full-size SPO SDXL LoRA's numbers."""

import json

import pytest
import torch
from formats_helpers import make_diffusers_lora, spo, unet_probe

from spo.errors import SpoInputError
from spo.formats import single_file as sf
from spo.formats.metadata import data_sha256, read_metadata
from spo.formats.webui_lora import (export_lora, load_lora, modules_of, read_safetensors, safetensors_size,
                                    webui_module_name)
from spo.models.loading import load_pipeline


def _with_lora(family, path):
    pipe = load_pipeline(f"toy:{family}")
    pipe.load_lora_weights(str(path))
    return unet_probe(pipe)


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_webui_export_loads_in_diffusers_identically(family, tmp_path):
    src = make_diffusers_lora(family, tmp_path / "src")
    out = export_lora(src, tmp_path / "out", name="spo", training={"steps": 3, "learning_rate": 1e-5})
    webui, _ = read_safetensors(out["webui"])
    names = {k.split(".")[0] for k in webui}
    if family == "sdxl":
        assert any(n.startswith("lora_unet_input_blocks_") for n in names)
        assert any(n.startswith("lora_unet_middle_block_1_") for n in names)
        assert any(n.startswith("lora_unet_output_blocks_") for n in names)
        assert any(n.startswith("lora_te1_text_model_") for n in names)
        assert any(n.startswith("lora_te2_text_model_") for n in names)
    else:
        # SD1.5 keeps diffusers module names (the toy has cross-attention in its second down block)
        assert any(n.startswith("lora_unet_down_blocks_1_attentions_0_") for n in names)
        assert any(n.startswith("lora_te_text_model_encoder_layers_0_self_attn_q_proj") for n in names)
    assert all(f"{n}.alpha" in webui and f"{n}.lora_up.weight" in webui for n in names)

    reference = _with_lora(family, src)
    base = unet_probe(load_pipeline(f"toy:{family}"))
    assert (reference - base).abs().max() > 1e-3  # the LoRA does something
    assert torch.allclose(_with_lora(family, out["webui"]), reference, atol=1e-6)
    assert torch.allclose(_with_lora(family, out["diffusers"]), reference, atol=1e-6)

    meta = read_metadata(out["webui"])
    assert meta["ss_base_model_version"] == {"sd15": "sd_v1", "sdxl": "sdxl_base_v1-0"}[family]
    assert meta["modelspec.architecture"] == {"sd15": "stable-diffusion-v1/lora", "sdxl": "stable-diffusion-xl-v1-base/lora"}[family]
    assert meta["ss_network_module"] == "networks.lora" and meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "8.0"
    assert meta["sshs_model_hash"] == data_sha256(out["webui"])
    assert meta["modelspec.hash_sha256"] == "0x" + meta["sshs_model_hash"]
    assert json.loads(meta["ss_spo_training"])["steps"] == 3
    for key in ("modelspec.title", "modelspec.implementation", "modelspec.date", "modelspec.resolution",
                "modelspec.description"):
        assert meta[key]


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_load_lora_reads_both_formats_to_the_same_deltas(family, tmp_path):
    src = make_diffusers_lora(family, tmp_path / "src")
    out = export_lora(src, tmp_path / "out", formats=("webui",), dtype="fp32")
    a, ra, aa, fa = load_lora(src)
    b, rb, ab, fb = load_lora(out["webui"])
    assert fa == fb == family and (ra, aa) == (rb, ab)
    assert set(a) == set(b)
    for (c, p), pair in modules_of(a).items():
        other = modules_of(b)[(c, p)]
        delta_a = pair["up"] @ pair["down"] * aa / ra
        delta_b = other["up"] @ other["down"] * ab / rb
        assert torch.allclose(delta_a, delta_b, atol=1e-6), (c, p)
    # the imported dict loads back as a diffusers LoRA and continues to work
    pipe = load_pipeline(f"toy:{family}")
    # diffusers assumes alpha = rank for a bare state dict, so fold alpha/rank into lora_B first
    unit = {k: v * (ab / rb) if ".lora_B." in k else v for k, v in b.items()}
    pipe.load_lora_weights(unit, adapter_name="imported")
    assert torch.allclose(unet_probe(pipe), _with_lora(family, src), atol=1e-5)


def test_fp16_and_bf16_export(tmp_path):
    src = make_diffusers_lora("sd15", tmp_path / "src", text_encoders=False)
    for dtype, torch_dtype in (("fp16", torch.float16), ("bf16", torch.bfloat16)):
        out = export_lora(src, tmp_path / dtype, formats=("webui",), dtype=dtype)
        tensors, _ = read_safetensors(out["webui"])
        assert {v.dtype for v in tensors.values()} == {torch_dtype}
        assert torch.allclose(_with_lora("sd15", out["webui"]), _with_lora("sd15", src), atol=2e-2)


def test_full_size_sdxl_rank64_attention_lora_counts():
    """The published SPO SDXL webui LoRA: 560 modules, 92,897,280 parameters, 354.62 MiB at fp32 (meta device)."""
    from diffusers import UNet2DConditionModel

    cfg = sf.unet_config(sf.CONFIG_DIR / "sdxl")
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(cfg)
    rank, shapes, n_params, names = 64, {}, 0, set()
    for path, module in unet.named_modules():
        if isinstance(module, torch.nn.Linear) and path.split(".")[-1] in ("to_q", "to_k", "to_v") or path.endswith("to_out.0"):
            name = webui_module_name("unet", path, "sdxl", cfg)
            names.add(name)
            shapes[f"{name}.lora_down.weight"] = ((rank, module.in_features), torch.float32)
            shapes[f"{name}.lora_up.weight"] = ((module.out_features, rank), torch.float32)
            shapes[f"{name}.alpha"] = ((), torch.float32)
            n_params += rank * (module.in_features + module.out_features)
    assert len(names) == 560
    assert n_params == 92_897_280
    assert all(n.startswith(("lora_unet_input_blocks_", "lora_unet_middle_block_1_", "lora_unet_output_blocks_")) for n in names)
    from spo.formats.metadata import lora_metadata

    meta = lora_metadata("sdxl", rank, rank, "SPO-SDXL_4k-p_10ep_LoRA_webui")
    meta.update(sshs_model_hash="0" * 64)
    size_mib = safetensors_size(shapes, meta) / 2**20
    # data 354.38 MiB + a ~240 KB header of 1,680 key names; the published file carries more metadata (~15 KB)
    assert abs(size_mib - 354.62) < 0.02, size_mib


@pytest.mark.slow
def test_export_cli(tmp_path):
    src = make_diffusers_lora("sd15", tmp_path / "src", text_encoders=False)
    r = spo("export", str(src.parent), "--out", str(tmp_path / "out"), "--name", "spo_sd15", "--dtype", "fp16",
            "--license", "apache-2.0")
    assert r.returncode == 0, r.stderr
    assert "stable-diffusion-v1/lora" in r.stdout
    path = tmp_path / "out" / "spo_sd15_webui.safetensors"
    # A1111/ComfyUI users are pointed at the webui file, not at the diffusers folder
    [a1111] = [ln for ln in r.stdout.splitlines() if ln.startswith("A1111")]
    assert str(path) in a1111 and "<lora:spo_sd15:1>" in a1111
    assert read_metadata(path)["modelspec.license"] == "apache-2.0"
    assert (tmp_path / "out" / "spo_sd15_diffusers" / "pytorch_lora_weights.safetensors").is_file()
    for args in (["export", str(tmp_path / "nope.safetensors"), "--out", str(tmp_path)],
                 ["export", str(src), "--out", str(tmp_path), "--family", "sdxl"]):
        r = spo(*args)
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_self_attention_only_lora_exports_for_the_family_it_was_trained_for(tmp_path):
    # Nothing in such a file names its family (no metadata, no attn2.to_k width): the trainer says it.
    src = make_diffusers_lora("sd15", tmp_path / "src", text_encoders=False,
                              targets=("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0"))
    with pytest.raises(SpoInputError, match="cannot tell the LoRA's model family"):
        export_lora(src, tmp_path / "guess", formats=("webui",))
    out = export_lora(src, tmp_path / "out", family="sd15")
    assert read_metadata(out["webui"])["ss_base_model_version"] == "sd_v1"
    assert all("attn1" in k for k in read_safetensors(out["webui"])[0])
    assert torch.allclose(_with_lora("sd15", out["webui"]), _with_lora("sd15", src), atol=1e-6)


def test_not_a_lora(tmp_path):
    from safetensors.torch import save_file

    save_file({"foo.weight": torch.zeros(2)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(SpoInputError, match="not a LoRA"):
        load_lora(tmp_path / "x.safetensors")
