"""`spo generate`: txt2img / img2img with LoRAs at any strength; PNGs carry A1111-style parameters."""

from __future__ import annotations

import argparse
from pathlib import Path

from spo.cli.argtypes import finite_float, integer, positive_int, seed
from spo.deprecation import add_cfg_scale


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """Model, LoRAs, prompts and sampler options shared by `spo generate` and `spo sweep`."""
    from spo import sources
    from spo.show.generate import DEFAULT_CFG, DEFAULT_MODEL, DEFAULT_SCHEDULER, DEFAULT_STEPS, SCHEDULERS

    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help=f"{' / '.join(sources.names())}, a diffusers folder or a single-file checkpoint "
                             "(default: %(default)s; the built-in toy models read only their own caption grammar, "
                             "e.g. 'a large red circle on a white background, in the center': see docs/toy-world.md)")
    parser.add_argument("--family", choices=["sd15", "sdxl"], default=None, help="model family when it cannot be detected")
    add_vae_argument(parser)
    parser.add_argument("--lora", action="append", default=[], metavar="PATH[:STRENGTH]",
                        help="a LoRA file or folder with its strength (default 1; -100..100, negative and above 1 "
                             "allowed); repeatable")
    parser.add_argument("--prompt", action="append", default=[], help="a prompt; repeatable")
    parser.add_argument("--prompts", type=Path, default=None, metavar="FILE",
                        help="prompts file: one a line (.txt), JSON list or JSON lines, CSV/TSV or parquet with a prompt "
                             "column")
    parser.add_argument("--prompt-column", default=None, metavar="NAME",
                        help="the column (CSV/TSV/parquet) or key (JSON objects) of --prompts holding the prompts "
                             "(default: 'prompt' or 'caption', or the only column)")
    parser.add_argument("--negative-prompt", default="", help="what the image should not show (default: none)")
    parser.add_argument("--seed", type=seed, default=0,
                        help="seed of the first image, 0..2**32-1, -1 for a random one (recorded); image i gets seed + i")
    parser.add_argument("--steps", type=integer, default=DEFAULT_STEPS, help="sampling steps (default: %(default)s)")
    add_cfg_scale(parser, DEFAULT_CFG, "classifier-free guidance scale", finite_float)
    parser.add_argument("--scheduler", default=DEFAULT_SCHEDULER,
                        help=f"sampler ({', '.join(SCHEDULERS)}; default: %(default)s, SPO's evaluation setting)")
    parser.add_argument("--width", type=integer, default=None, help="default: the model's native size (or the init image's)")
    parser.add_argument("--height", type=integer, default=None, help="as --width")
    parser.add_argument("--init-image", type=Path, default=None, help="img2img: start from this image")
    parser.add_argument("--batch", type=integer, default=8, help="images per pipeline call (default: %(default)s)")
    from spo.models.prediction import PREDICTION_CHOICES

    parser.add_argument("--prediction-type", choices=PREDICTION_CHOICES, default="auto",
                        help="what the UNet predicts: auto (its scheduler config, or a single file's v_pred key), "
                             "epsilon or v_prediction (default: %(default)s)")
    parser.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32",
                        help="precision of the model's weights: bf16 halves the memory (and is fast on CPUs with "
                             "AVX-512 BF16 or AMX), fp16 needs a GPU (default: %(default)s)")
    parser.add_argument("--guidance-rescale", type=finite_float, default=-1.0, metavar="PHI",
                        help="rescaled CFG phi in [0, 1] (0: plain CFG); -1: auto, 0.7 for a zero-terminal-SNR model "
                             "(default: %(default)s)")


def add_vae_argument(parser: argparse.ArgumentParser) -> None:
    """--vae, for every command that decodes latents into images."""
    parser.add_argument("--vae", type=Path, default=None, metavar="PATH",
                        help="a VAE in place of the model's own: a diffusers folder or a .safetensors file (e.g. the "
                             "fp16-safe madebyollin/sdxl-vae-fp16-fix for SDXL); it must be of the model's family")


def collect_prompts(args, warn: bool = True) -> list[str]:
    from spo.errors import SpoInputError
    from spo.show.generate import read_prompts_file

    prompts = list(args.prompt)
    if args.prompts is not None:
        prompts += read_prompts_file(args.prompts, getattr(args, "prompt_column", None))
    elif getattr(args, "prompt_column", None) is not None:
        raise SpoInputError("--prompt-column names a column of --prompts FILE; give --prompts too")
    if not prompts or any(not p.strip() for p in prompts):
        raise SpoInputError("give at least one non-empty prompt (--prompt TEXT or --prompts FILE)")
    for i, p in enumerate(prompts, 1):
        check_prompt(p, f"prompt {i}")
    check_prompt(args.negative_prompt, "--negative-prompt")
    if warn:
        from spo.show.generate import warn_unreadable_prompts

        warn_unreadable_prompts(args.model, prompts)
    return prompts


MAX_PROMPT_CHARS = 10_000  # CLIP reads 77 tokens; a prompt this long is a mistake (a file pasted in)


def check_prompt(text: str, what: str = "prompt") -> None:
    """Refuse what the tokenizer or the PNG metadata cannot carry: lone surrogates, control characters, huge."""
    from spo.errors import SpoInputError

    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise SpoInputError(f"{what} is not valid unicode (undecodable bytes in the argument?)") from None
    bad = next((c for c in text if (ord(c) < 32 and c not in "\t\n\r") or 0x7f <= ord(c) < 0xa0), None)
    if bad is not None:
        raise SpoInputError(f"{what} contains the control character {bad!r}")
    if len(text) > MAX_PROMPT_CHARS:
        raise SpoInputError(f"{what} is {len(text)} characters long (at most {MAX_PROMPT_CHARS})")


def check_rescale(value: float) -> float:
    from spo.errors import SpoInputError

    if value != -1 and not 0 <= value <= 1:
        raise SpoInputError(f"--guidance-rescale must be in [0, 1], or -1 (auto), got {value:g}")
    return value


MAX_IMAGES = 10_000  # a prompts file of 900k lines is a mistake more often than a plan: say so before hours of sampling


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser)
    parser.add_argument("--denoise", type=finite_float, default=None,
                        help="img2img denoising strength in (0, 1] (default 0.75 with --init-image)")
    parser.add_argument("-n", "--num-images", type=integer, default=1, help="images per prompt (default: %(default)s)")
    parser.add_argument("--max-images", type=positive_int, default=MAX_IMAGES,
                        help="refuse runs of more images than this (prompts x --num-images; default: %(default)s)")
    parser.add_argument("--out", type=Path, default=Path("outputs/generate"),
                        help="output folder; files are numbered after those already there (default: %(default)s)")


def run(args: argparse.Namespace) -> int:
    from spo.show.generate import Settings, check_scheduler, generate, parse_lora

    loras = [parse_lora(text) for text in args.lora]  # bad paths / strengths fail before anything loads
    prompts = collect_prompts(args, warn=False)  # generate() warns once the rest of the input is checked
    settings = Settings(steps=args.steps, cfg=args.cfg, scheduler=check_scheduler(args.scheduler), width=args.width,
                        height=args.height, negative_prompt=args.negative_prompt, denoise=args.denoise,
                        prediction_type=args.prediction_type, guidance_rescale=check_rescale(args.guidance_rescale),
                        dtype=args.dtype)
    paths = generate(args.model, prompts, args.out, loras=loras, settings=settings, seed=args.seed,
                     num_images=args.num_images, init_image=args.init_image, family=args.family, batch=args.batch,
                     max_images=args.max_images, vae=args.vae)
    lora_text = ", ".join(f"{s.name}:{s.strength:g}" for s in loras) or "none"
    seeds = f"seed {args.seed}" if len(paths) == 1 else f"seeds {args.seed}..{args.seed + len(paths) - 1}"
    print(f"wrote {len(paths)} image{'s' if len(paths) != 1 else ''} -> {args.out} ({seeds}, "
          f"{args.scheduler} {args.steps} steps, CFG {args.cfg:g}, LoRAs: {lora_text}); index: {args.out / 'index.json'}")
    return 0
