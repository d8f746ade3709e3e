"""`spo train`: SPO post-training. With no arguments, the SD1.5-family toy default, end to end on CPU.

`add_run_arguments`, `print_config_or_none` and `finish` are shared with `spo dpo` and `spo spm train`.
"""

from __future__ import annotations

import argparse

from spo.cli.argtypes import positive_int


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from spo.train.config import add_arguments as add_config_arguments

    add_config_arguments(parser)
    add_run_arguments(parser)


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-evaluate", dest="evaluate", action="store_false",
                        help="skip the before/after judge figures of a run on a built-in base")
    parser.add_argument("--no-report", dest="report", action="store_false",
                        help="skip the HTML report at the end (`spo report` writes it later)")
    parser.add_argument("--eval-images", type=positive_int, default=256,
                        help="images per arm for the before/after figures of a run on a built-in base")


def resolved_config(args: argparse.Namespace, cls):
    """The config of the command line; with --print-config, print it as TOML and return None (nothing runs)."""
    from spo.train.config import from_args, to_toml

    cfg = from_args(args, cls)
    if args.print_config:
        print(to_toml(cfg), end="")
        return None
    return cfg


def finish(result: dict, cfg, args: argparse.Namespace) -> int:
    """Say where the outputs are; for a built-in base, its before/after figures; write the HTML report."""
    from spo.sources import get

    if "lora" in result:
        print(f"LoRA (diffusers format): {result['lora']}")
        print(f"LoRA (A1111 / ComfyUI):  {result['lora_webui']}")
    else:
        print(f"fine-tuned UNet: {result['unet']}")
    print(f"validation grids (same seeds every epoch): {result['output_dir']}/samples/")
    source = get(cfg.base)
    if args.evaluate and source is not None and source.evaluate is not None and "lora" in result:
        report = source.evaluate(result["lora"], n=args.eval_images, seed=cfg.seed, out=result["output_dir"])
        print(report["text"])
    if args.report and "lora" in result:
        from spo.show.report import build_report

        print(f"report: {build_report(result['output_dir'], pairs=source.report_pairs if source else 0)}")
    return 0


def run(args: argparse.Namespace) -> int:
    from spo.train.config import SPOConfig

    cfg = resolved_config(args, SPOConfig)
    if cfg is None:
        return 0
    from spo.train.spo_recipe import train

    return finish(train(cfg), cfg, args)
