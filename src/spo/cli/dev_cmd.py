"""`spo dev ...`: tools for developing and checking spo itself at full size, where no weights can be downloaded:
random-weight stand-ins of the models users have (spo.stand_ins)."""

from __future__ import annotations

import argparse
from pathlib import Path

from spo.cli.argtypes import seed


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="dev_command", metavar="ACTION", required=True, parser_class=type(parser))
    c = sub.add_parser("random-checkpoint", help="a random-weight single-file checkpoint of a real-size family")
    c.add_argument("--family", choices=["sd15", "sdxl"], required=True)
    c.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], default="fp16")
    c.add_argument("--seed", type=seed, default=0, help="0..2**32-1, -1 for a random one")
    c.add_argument("--out", type=Path, required=True, help="the .safetensors file to write")
    k = sub.add_parser("random-clip", help="a random-weight transformers CLIP folder (for spo spm train --init)")
    k.add_argument("--config", choices=["clip-h"], default="clip-h", help="clip-h: CLIP-ViT-H-14, PickScore's size")
    k.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], default="fp16")
    k.add_argument("--seed", type=seed, default=0, help="0..2**32-1, -1 for a random one")
    k.add_argument("--out", type=Path, required=True, help="the folder to write")


def run(args: argparse.Namespace) -> int:
    from spo.errors import SpoInputError
    from spo.io import check_output_dir
    from spo.stand_ins import random_checkpoint, random_clip

    if args.dev_command == "random-checkpoint":
        if args.out.suffix != ".safetensors":
            raise SpoInputError(f"--out {args.out}: give a .safetensors file name")
        if args.out.exists():
            raise SpoInputError(f"--out {args.out} exists: give a new file name")
        info = random_checkpoint(args.family, args.out, args.dtype, args.seed)
    else:
        check_output_dir(args.out)
        info = random_clip(args.out, args.config, args.dtype, args.seed)
    print(f"wrote {info['path']}: {info['tensors']} tensors, {info['parameters'] / 1e9:.3f} B parameters, {info['dtype']}")
    return 0
