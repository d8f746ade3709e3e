"""`spo export` read by the clients users load it in: ComfyUI's key mapping, diffusers' loader, A1111's metadata.

The webui file goes through ComfyUI's own kohya-name mapping (copied below, licence noted) onto original-layout
weights that diffusers' single-file converter certifies, and each module's delta must equal the source LoRA's.
The diffusers-format file goes through diffusers' load_lora_weights, text encoders included.
"""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from formats_helpers import make_diffusers_lora, spo

from spo.errors import SpoInputError
from spo.formats import single_file as sf
from spo.formats.metadata import read_metadata, save_with_hashes
from spo.formats.webui_lora import export_lora, modules_of, read_safetensors, webui_module_name
from spo.models.loading import load_pipeline

# ------------------------------------------------------------------------------------------------------------------
# ComfyUI's LoRA key mapping: LORA_CLIP_MAP, model_lora_keys_clip and model_lora_keys_unet from comfy/lora.py and the
# plain-LoRA weight patch (lora_up @ lora_down * alpha / rank) from comfy/weight_adapter/lora.py, reduced to the
# SD1.5/SDXL kohya ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_") branches.
# Source: https://github.com/comfyanonymous/ComfyUI, Copyright (C) comfyanonymous and contributors,
# licensed under the GNU General Public License v3.0 (https://www.gnu.org/licenses/gpl-3.0.html).
# Change: ComfyUI's `utils.unet_to_diffusers` table (diffusers UNet key -> original key) is replaced by the same
# correspondence read off diffusers' own converter (convert_ldm_unet_checkpoint), see `_original_unet`.
COMFY_LORA_CLIP_MAP = {
    "mlp.fc1": "mlp_fc1",
    "mlp.fc2": "mlp_fc2",
    "self_attn.k_proj": "self_attn_k_proj",
    "self_attn.q_proj": "self_attn_q_proj",
    "self_attn.v_proj": "self_attn_v_proj",
    "self_attn.out_proj": "self_attn_out_proj",
}


def comfy_model_lora_keys_clip(sdk, key_map):
    text_model_lora_key = "lora_te_text_model_encoder_layers_{}_{}"
    clip_l_present = False
    for b in range(32):
        for c in COMFY_LORA_CLIP_MAP:
            k = "clip_l.transformer.text_model.encoder.layers.{}.{}.weight".format(b, c)
            if k in sdk:
                key_map[text_model_lora_key.format(b, COMFY_LORA_CLIP_MAP[c])] = k
                key_map["lora_te1_text_model_encoder_layers_{}_{}".format(b, COMFY_LORA_CLIP_MAP[c])] = k  # SDXL base
                clip_l_present = True
                key_map["text_encoder.text_model.encoder.layers.{}.{}".format(b, c)] = k  # diffusers lora
            k = "clip_g.transformer.text_model.encoder.layers.{}.{}.weight".format(b, c)
            if k in sdk and clip_l_present:
                key_map["lora_te2_text_model_encoder_layers_{}_{}".format(b, COMFY_LORA_CLIP_MAP[c])] = k  # SDXL base
                key_map["text_encoder_2.text_model.encoder.layers.{}.{}".format(b, c)] = k  # diffusers lora
    return key_map


def comfy_model_lora_keys_unet(sdk, diffusers_keys, key_map):
    for k in sdk:
        if k.startswith("diffusion_model.") and k.endswith(".weight"):
            key_lora = k[len("diffusion_model."):-len(".weight")].replace(".", "_")
            key_map["lora_unet_{}".format(key_lora)] = k
    for k in diffusers_keys:
        if k.endswith(".weight"):
            unet_key = "diffusion_model.{}".format(diffusers_keys[k])
            key_lora = k[:-len(".weight")].replace(".", "_")
            key_map["lora_unet_{}".format(key_lora)] = unet_key
    return key_map


def comfy_load_lora(lora, to_load):
    """{model key: ("lora", (up, down, alpha))} and the file's keys nothing used."""
    patch_dict, loaded_keys = {}, set()
    for x in to_load:
        alpha_name = "{}.alpha".format(x)
        alpha = None
        if alpha_name in lora:
            alpha = lora[alpha_name].item()
            loaded_keys.add(alpha_name)
        a_name, b_name = "{}.lora_up.weight".format(x), "{}.lora_down.weight".format(x)
        if a_name in lora:
            patch_dict[to_load[x]] = ("lora", (lora[a_name], lora[b_name], alpha))
            loaded_keys.update((a_name, b_name))
    return patch_dict, [k for k in lora if k not in loaded_keys]


def comfy_lora_delta(v, strength=1.0):
    mat1, mat2, alpha = v
    scale = alpha / mat2.shape[0] if alpha is not None else 1.0
    return strength * scale * torch.mm(mat1.flatten(start_dim=1), mat2.flatten(start_dim=1))
# ------------------------------------------------------------------------------------------------ end of ComfyUI code


def _hf_name(key: str) -> str:
    """A transformers CLIP key without the `text_model.` level (transformers >= 5.6 dropped it from CLIPTextModel)."""
    return key[len("text_model."):] if key.startswith("text_model.") else key


def _original_unet(pipe):
    """(original-layout UNet keys as ComfyUI names them, diffusers key -> original key), the correspondence taken
    from diffusers' own ldm -> diffusers converter: each converted tensor is the very tensor it came from."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    original = {k: v for k, v in sf.pipeline_to_original(pipe).items() if k.startswith("model.diffusion_model.")}
    by_storage = {v.data_ptr(): k[len("model.diffusion_model."):] for k, v in original.items()}
    assert len(by_storage) == len(original)
    back = convert_ldm_unet_checkpoint(dict(original), dict(pipe.unet.config))
    unet = pipe.unet.state_dict()
    assert set(back) == set(unet)
    diffusers_to_original = {k: by_storage[v.data_ptr()] for k, v in back.items()}
    return ["diffusion_model." + k[len("model.diffusion_model."):] for k in original], diffusers_to_original


def _comfy_clip_keys(pipe, family):
    names = {"text_encoder": "clip_l", "text_encoder_2": "clip_g"}
    comps = ["text_encoder"] + (["text_encoder_2"] if family == "sdxl" else [])
    out = {}  # ComfyUI clip key -> (component, transformers key without text_model.)
    for comp in comps:
        for k in getattr(pipe, comp).state_dict():
            out[f"{names[comp]}.transformer.text_model.{_hf_name(k)}"] = (comp, _hf_name(k))
    return out


def _source_deltas(path):
    """(component, module path without text_model.) -> lora_B @ lora_A * alpha / rank of a diffusers LoRA."""
    from spo.formats.webui_lora import adapter_alphas

    tensors, meta = read_safetensors(path)
    alphas = adapter_alphas(meta, tensors)
    return {(c, _hf_name(p)): pair["up"] @ pair["down"] * (alphas[(c, p)] / pair["down"].shape[0])
            for (c, p), pair in modules_of(tensors).items()}


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_webui_export_through_comfyui_mapping_every_module_exact(family, tmp_path):
    src = make_diffusers_lora(family, tmp_path / "src")
    out = export_lora(src, tmp_path / "out", formats=("webui",), name="spo")
    webui, _ = read_safetensors(out["webui"])
    pipe = load_pipeline(f"toy:{family}")

    original_keys, d2o = _original_unet(pipe)
    clip = _comfy_clip_keys(pipe, family)
    key_map = comfy_model_lora_keys_unet(original_keys, {k: v for k, v in d2o.items()}, {})
    comfy_model_lora_keys_clip(set(clip), key_map)
    modules = sorted({k.split(".", 1)[0] for k in webui})
    unmapped = [m for m in modules if m not in key_map]
    assert not unmapped, unmapped[:5]
    patches, unused = comfy_load_lora(webui, {m: key_map[m] for m in modules})
    assert not unused and len(patches) == len(modules)

    o2d = {"diffusion_model." + o: d for d, o in d2o.items()}
    expected = _source_deltas(src)
    seen = set()
    for model_key, (kind, v) in patches.items():
        assert kind == "lora"
        if model_key.startswith("diffusion_model."):
            module = ("unet", o2d[model_key][:-len(".weight")])
        else:
            comp, hf_key = clip[model_key]
            module = (comp, hf_key[:-len(".weight")])
        delta = comfy_lora_delta(v)
        assert delta.shape == expected[module].shape, module
        assert torch.allclose(delta, expected[module], rtol=1e-6, atol=0), module
        seen.add(module)
    assert seen == set(expected)  # every module of the source arrives, on the module it was trained on


def test_full_size_sdxl_webui_names_all_map_in_comfyui():
    """The real SDXL base (meta device, no memory): all 560 attention modules of a rank-64 webui LoRA and every
    text-encoder projection have a ComfyUI key."""
    from types import SimpleNamespace

    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    folder = sf.CONFIG_DIR / "sdxl"
    cfg = sf.unet_config(folder)
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(cfg)
        pipe = SimpleNamespace(unet=unet, vae=AutoencoderKL.from_config(sf.vae_config(folder)),
                               text_encoder=CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder")),
                               text_encoder_2=CLIPTextModelWithProjection(
                                   CLIPTextConfig.from_pretrained(folder / "text_encoder_2")))
    original = ["diffusion_model." + k[len("model.diffusion_model."):] for k in sf.pipeline_to_original(pipe)
                if k.startswith("model.diffusion_model.")]
    key_map = comfy_model_lora_keys_unet(original, {}, {})
    comfy_model_lora_keys_clip(set(_comfy_clip_keys(pipe, "sdxl")), key_map)
    names = [webui_module_name("unet", p, "sdxl", cfg) for p, m in unet.named_modules()
             if isinstance(m, torch.nn.Linear) and p.split(".")[-1] in ("to_q", "to_k", "to_v") or p.endswith("to_out.0")]
    assert len(names) == 560 and all(n in key_map for n in names)
    te = [webui_module_name(c, p, "sdxl", cfg) for c in ("text_encoder", "text_encoder_2")
          for p, m in getattr(pipe, c).named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in p]
    assert len(te) == (12 + 32) * 6 and all(n in key_map for n in te)


def _text_features(pipe, family):
    out = []
    with torch.no_grad():
        for tok, enc in ((pipe.tokenizer, pipe.text_encoder), (getattr(pipe, "tokenizer_2", None),
                                                               getattr(pipe, "text_encoder_2", None))):
            if enc is None:
                continue
            ids = tok(["a red circle above a blue square"], padding="max_length", max_length=tok.model_max_length,
                      return_tensors="pt").input_ids
            out.append(enc(ids)[0])
    return out


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_diffusers_export_text_encoders_load_in_diffusers(family, tmp_path):
    src = make_diffusers_lora(family, tmp_path / "src")
    out = export_lora(src, tmp_path / "out", formats=("diffusers",), name="spo")
    tensors, meta = read_safetensors(out["diffusers"])
    te_keys = [k for k in tensors if k.startswith("text_encoder")]
    assert te_keys and all(k.split(".", 1)[1].startswith("text_model.encoder.layers.") for k in te_keys), te_keys[:3]

    base_pipe = load_pipeline(f"toy:{family}")
    # ComfyUI maps diffusers-format text-encoder keys only under these names (its "diffusers lora" entries)
    key_map = comfy_model_lora_keys_clip(set(_comfy_clip_keys(base_pipe, family)), {})
    assert all(k.rsplit(".lora_", 1)[0] in key_map for k in te_keys)

    base = _text_features(base_pipe, family)
    got, want = load_pipeline(f"toy:{family}"), load_pipeline(f"toy:{family}")
    got.load_lora_weights(str(out["diffusers"].parent))
    want.load_lora_weights(str(src.parent))
    for b, g, w in zip(base, _text_features(got, family), _text_features(want, family)):
        assert (g - b).abs().max() > 1e-3  # the text-encoder LoRA is applied ...
        assert torch.allclose(g, w, atol=1e-6)  # ... exactly as the source applies

    # diffusers-only: no kohya keys for A1111 to take it for one of its LoRAs; a note names the right file
    assert not [k for k in meta if k.startswith(("ss_", "sshs_"))]
    assert meta["spo.lora_format"] == "diffusers" and "spo_webui.safetensors" in meta["spo.note"]
    assert meta["modelspec.implementation"] == "diffusers" and meta["format"] == "pt"


def test_kohya_metadata_as_a1111_reads_it(tmp_path):
    run = tmp_path / "my_run"
    src = make_diffusers_lora("sd15", run / "lora", text_encoders=False)
    summary = {"method": "SPO", "family": "sd15", "base": str(tmp_path / "base.safetensors"), "epochs": 2, "steps": 8,
               "seconds": 120.5, "config": {"learning_rate": 6e-5, "seed": 3}}
    (run / "lora" / "training_summary.json").write_text(json.dumps(summary))
    (tmp_path / "base.safetensors").write_bytes(b"not really a checkpoint, but a file with bytes to hash")
    out = export_lora(src, tmp_path / "out", formats=("webui",))
    assert out["webui"].name == "my_run_spo_sd15_webui.safetensors"  # named after the run
    meta = read_metadata(out["webui"])
    assert meta["ss_output_name"] == "my_run_spo_sd15"
    assert meta["ss_network_alpha"] == "8.0" and meta["ss_network_dim"] == "4"  # str(float), as kohya writes
    assert meta["modelspec.sai_model_spec"] == "1.0.1"
    assert meta["modelspec.implementation"] == "diffusers"  # kohya's value for an SD1 LoRA
    assert meta["ss_sd_model_name"] == "base.safetensors"
    base_bytes = (tmp_path / "base.safetensors").read_bytes()
    assert meta["ss_new_sd_model_hash"] == hashlib.sha256(base_bytes).hexdigest()
    assert meta["ss_clip_skip"] == "1"
    started, finished = float(meta["ss_training_started_at"]), float(meta["ss_training_finished_at"])
    assert finished - started == pytest.approx(120.5)
    assert abs(finished - (run / "lora" / "training_summary.json").stat().st_mtime) < 1
    assert meta["ss_steps"] == "8" and meta["ss_epoch"] == "2" and meta["ss_learning_rate"] == "6e-05"
    assert len(meta["sshs_legacy_hash"]) == 8 and len(meta["sshs_model_hash"]) == 64
    sdxl = export_lora(make_diffusers_lora("sdxl", tmp_path / "x", text_encoders=False), tmp_path / "out",
                       formats=("webui",), name="x")
    assert read_metadata(sdxl["webui"])["modelspec.implementation"] == "https://github.com/Stability-AI/generative-models"


def test_legacy_hash_is_kohyas(tmp_path):
    """sshs_legacy_hash: sha256 of the 64 KiB at 1 MiB of the file saved with its ss_* keys only (kohya's
    precalculate_safetensors_hashes); needs a file over 1 MiB to mean anything."""
    from safetensors.torch import save

    from spo.formats.metadata import lora_metadata

    g = torch.Generator().manual_seed(0)
    tensors = {"lora_unet_a.lora_down.weight": torch.randn(4, 200_000, generator=g),
               "lora_unet_a.lora_up.weight": torch.randn(8, 4, generator=g), "lora_unet_a.alpha": torch.tensor(4.0)}
    meta = lora_metadata("sd15", 4, 4, "big")
    save_with_hashes(tensors, tmp_path / "big.safetensors", meta)
    written = read_metadata(tmp_path / "big.safetensors")
    kohya_bytes = save(tensors, {k: v for k, v in meta.items() if k.startswith("ss_")})
    assert written["sshs_legacy_hash"] == hashlib.sha256(kohya_bytes[0x100000:0x110000]).hexdigest()[:8]
    n = int.from_bytes(kohya_bytes[:8], "little")
    assert written["sshs_model_hash"] == hashlib.sha256(kohya_bytes[8 + n:]).hexdigest()


@pytest.mark.slow
def test_export_refuses_nan_and_an_output_that_is_a_file(tmp_path):
    from safetensors.torch import save_file

    src = make_diffusers_lora("sd15", tmp_path / "src", text_encoders=False)
    tensors, meta = read_safetensors(src)
    key = sorted(k for k in tensors if "lora_B" in k)[3]
    tensors[key][0, 0] = float("nan")
    save_file(tensors, str(tmp_path / "nan.safetensors"), metadata=meta)
    with pytest.raises(SpoInputError, match=key.replace(".", r"\.")):
        export_lora(tmp_path / "nan.safetensors", tmp_path / "o")
    assert not (tmp_path / "o").exists()
    (tmp_path / "file").write_text("x")
    with pytest.raises(SpoInputError, match="not a directory"):
        export_lora(src, tmp_path / "file")
    r = spo("export", str(src), "--out", str(tmp_path / "file"))
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert (tmp_path / "file").read_text() == "x"
