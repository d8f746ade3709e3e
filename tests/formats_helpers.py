"""Shared by the interchange tests: a real peft LoRA on a toy pipeline, and a fixed UNet probe."""

import subprocess
import sys
from pathlib import Path

import torch

from spo.models.family import encode
from spo.models.loading import load_pipeline


def spo(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "spo", *args], capture_output=True, text=True, cwd=cwd, timeout=300)


def make_diffusers_lora(family: str, out_dir: Path, rank: int = 4, alpha: float = 8, text_encoders: bool = True,
                        targets: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")) -> Path:
    """Train-free LoRA: peft adapters with random (non-zero) B on the toy, saved by diffusers' save_lora_weights."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(0)
    pipe = load_pipeline(f"toy:{family}")
    cfg = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), init_lora_weights=False)
    pipe.unet.add_adapter(cfg)
    kw = dict(unet_lora_layers=get_peft_model_state_dict(pipe.unet), unet_lora_adapter_metadata=cfg.to_dict())
    if text_encoders:
        tcfg = LoraConfig(r=2, lora_alpha=1, target_modules=["q_proj", "k_proj", "v_proj", "out_proj", "fc1"],
                          init_lora_weights=False)
        pipe.text_encoder.add_adapter(tcfg)
        kw.update(text_encoder_lora_layers=get_peft_model_state_dict(pipe.text_encoder),
                  text_encoder_lora_adapter_metadata=tcfg.to_dict())
        if family == "sdxl":
            pipe.text_encoder_2.add_adapter(tcfg)
            kw.update(text_encoder_2_lora_layers=get_peft_model_state_dict(pipe.text_encoder_2),
                      text_encoder_2_lora_adapter_metadata=tcfg.to_dict())
    type(pipe).save_lora_weights(str(out_dir), **kw)
    return Path(out_dir) / "pytorch_lora_weights.safetensors"


def unet_probe(pipe) -> torch.Tensor:
    """UNet noise prediction on fixed latents and real prompts (so text-encoder LoRAs count too)."""
    g = torch.Generator().manual_seed(1)
    side = pipe.unet.config.sample_size
    x = torch.randn(2, pipe.unet.config.in_channels, side, side, generator=g)
    cond = encode(pipe, ["a red circle above a blue square", "two green triangles"])
    with torch.no_grad():
        return pipe.unet(x, torch.tensor([500, 100]), **cond.unet_kwargs()).sample
