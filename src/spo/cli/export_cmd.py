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
    parser.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32", help="tensor dtype of the written files (default: %(default)s; the published SPO LoRA is fp32)")
    parser.add_argument("--name", default=None,
                        help="title, file-name stem and A1111 <lora:NAME:...> name (default: <run>_<method>_<family> "
                             "for a training run's lora folder, else the input's name)")
    parser.add_argument("--family", choices=["sd15", "sdxl"], default=None,
                        help="the base model family: checked against the file, and used where the file does not "
                             "tell (a self-attention-only LoRA)")
    parser.add_argument("--alpha", type=float, default=None, help="override alpha (default: the file's, else rank)")
    parser.add_argument("--base-model", default=None,
                        help="the checkpoint it was trained on, written as ss_sd_model_name (default: the run's base)")
    parser.add_argument("--clip-skip", type=int, default=None,
                        help="CLIP skip used in training, written as ss_clip_skip (default: 1 for an SD1.5 run of ours)")
    parser.add_argument("--description", default=None, help="modelspec description shown by model browsers")
    parser.add_argument("--license", default=None, help="e.g. apache-2.0 (written to modelspec.license)")
    parser.add_argument("--training-summary", type=Path, default=None,
                        help="JSON file of the run, stored in the metadata (default: the LoRA folder's training_summary.json)")


def run(args: argparse.Namespace) -> int:
    from spo.formats.webui_lora import export_lora, load_lora, modules_of, read_safetensors

    if args.out.exists() and not args.out.is_dir():
        raise SpoInputError(f"--out {args.out} exists and is not a folder (--out names the folder the files go to)")
    if not args.out.exists() and args.out.suffix.lower() == ".safetensors":
        raise SpoInputError(f"--out {args.out}: --out names a folder, not a file (files are named from --name)")
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
                          alpha=args.alpha, description=args.description, license=args.license, training=training,
                          base_model=args.base_model, clip_skip=args.clip_skip)
    for fmt, path in written.items():
        meta = read_safetensors(path)[1]
        state_dict, rank, alpha, _ = load_lora(path)  # read back as a client would: what the file really holds
        mods = modules_of(state_dict)
        n_par = sum(p["down"].numel() + p["up"].numel() for p in mods.values())
        print(f"{fmt}: {path} | {meta.get('modelspec.architecture')} | {len(mods)} modules, {n_par:,} parameters, "
              f"rank {rank}, alpha {alpha:g}, {args.dtype}, "
              f"{path.stat().st_size / 2**20:.2f} MiB | sha256 {meta.get('modelspec.hash_sha256', '')[2:14]}")
    if "webui" in written:
        name = read_safetensors(written["webui"])[1].get("ss_output_name", written["webui"].stem)
        print(f"A1111 / ComfyUI / kohya: copy {written['webui']} into models/Lora and use <lora:{name}:1>")
    if "diffusers" in written:
        # weight_name: without it diffusers looks the folder up on the hub when HF_HUB_OFFLINE is set, and fails
        print(f"diffusers: pipe.load_lora_weights('{written['diffusers'].parent}', "
              f"weight_name='{written['diffusers'].name}') "
              "(this folder is for diffusers only: A1111 and ComfyUI do not apply its key names)")
    return 0
