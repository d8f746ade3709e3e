"""`spo train`: SPO post-training. With no arguments, the SD1.5-family toy default, end to end on CPU.

`add_run_arguments` and `finish` are shared with `spo dpo`: both recipes end the same way.
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
                        help="skip the before/after judge figures of a toy run")
    parser.add_argument("--no-report", dest="report", action="store_false",
                        help="skip the HTML report at the end (`spo report` writes it later)")
    parser.add_argument("--eval-images", type=positive_int, default=256,
                        help="images per arm for a toy run's judge figures")


def finish(result: dict, cfg, args: argparse.Namespace) -> int:
    """Say where the outputs are; for a toy base, judge before and after on held-out captions; write the HTML report."""
    if "lora" in result:
        print(f"LoRA (diffusers format): {result['lora']}")
        print(f"LoRA (A1111 / ComfyUI):  {result['lora_webui']}")
    else:
        print(f"fine-tuned UNet: {result['unet']}")
    print(f"validation grids (same seeds every epoch): {result['output_dir']}/samples/")
    if args.evaluate and cfg.base.startswith("toy:") and "lora" in result:
        from spo.toy.evaluate import before_after

        report = before_after(cfg.base, result["lora"], n=args.eval_images, seed=cfg.seed, out=result["output_dir"])
        print(report["text"])
    if args.report and "lora" in result:
        from spo.show.report import build_report

        print(f"report: {build_report(result['output_dir'], pairs=8 if cfg.base.startswith('toy:') else 0)}")
    return 0


def run(args: argparse.Namespace) -> int:
    from spo.train.config import from_args
    from spo.train.spo_recipe import train

    cfg = from_args(args)
    return finish(train(cfg), cfg, args)
