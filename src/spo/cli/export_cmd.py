"""`spo export`: a diffusers-format LoRA -> webui/kohya and/or diffusers files with full metadata."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from spo.errors import SpoInputError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("lora", type=Path, help="LoRA file (.safetensors) or folder with pytorch_lora_weights.safetensors")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--format", choices=["webui", "diffusers", "both"], default="both",
                        help="webui: A1111/ComfyUI/kohya keys; diffusers: peft keys (default: both)")
    parser.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32")
    parser.add_argument("--name", default=None, help="title and file-name stem (default: from the input)")
    parser.add_argument("--family", choices=["sd15", "sdxl"], default=None,
                        help="the base model family: checked against the file, and used where the file does not "
                             "tell (a self-attention-only LoRA)")
    parser.add_argument("--alpha", type=float, default=None, help="override alpha (default: the file's, else rank)")
    parser.add_argument("--description", default=None)
    parser.add_argument("--license", default=None, help="e.g. apache-2.0 (written to modelspec.license)")
    parser.add_argument("--training-summary", type=Path, default=None, help="JSON file of the run, stored in the metadata")


def run(args: argparse.Namespace) -> int:
    from spo.formats.webui_lora import export_lora, read_safetensors

    training = None
    if args.training_summary is not None:
        try:
            training = json.loads(args.training_summary.read_text())
        except FileNotFoundError:
            raise SpoInputError(f"{args.training_summary}: no such file") from None
        except (OSError, UnicodeDecodeError) as exc:  # a folder, unreadable, not text
            raise SpoInputError(f"{args.training_summary}: cannot read ({getattr(exc, 'strerror', None) or exc})") from None
        except json.JSONDecodeError as exc:
            raise SpoInputError(f"{args.training_summary}: not JSON ({exc})") from None
    formats = ("webui", "diffusers") if args.format == "both" else (args.format,)
    written = export_lora(args.lora, args.out, formats=formats, dtype=args.dtype, name=args.name, family=args.family,
                          alpha=args.alpha, description=args.description, license=args.license, training=training)
    for fmt, path in written.items():
        tensors, meta = read_safetensors(path)
        lora = {k: v for k, v in tensors.items() if not k.endswith(".alpha")}
        n_mod = len({k.split(".lora_")[0] for k in lora})
        n_par = sum(v.numel() for v in lora.values())
        print(f"{fmt}: {path} | {meta.get('modelspec.architecture')} | {n_mod} modules, {n_par:,} parameters, "
              f"rank {meta.get('ss_network_dim')}, alpha {meta.get('ss_network_alpha')}, {args.dtype}, "
              f"{path.stat().st_size / 2**20:.2f} MiB | sshs {meta.get('sshs_model_hash', '')[:12]}")
    return 0
