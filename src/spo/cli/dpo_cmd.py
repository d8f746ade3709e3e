"""`spo dpo`: the Diffusion-DPO baseline on offline Pick-a-Pic-schema pairs.

With no arguments: the SD1.5-family toy default, with pairs sampled from the toy base and labelled by the
simulated rater (made once in the output folder), end to end on CPU.
"""

from __future__ import annotations

import argparse

from spo.cli.train_cmd import add_run_arguments, finish, resolved_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from spo.train.config import DPOConfig
    from spo.train.config import add_arguments as add_config_arguments

    parser.add_argument("--data", dest="data", nargs="+", default=None, metavar="PARQUET",
                        help="Pick-a-Pic-schema pairs: parquet files, folders of them, or a datasets save_to_disk "
                             "folder (default for a built-in base: pairs made from the base model's samples)")
    add_config_arguments(parser, DPOConfig, skip=("data",))
    add_run_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from spo.train.config import DPOConfig

    cfg = resolved_config(args, DPOConfig)
    if cfg is None:
        return 0
    from spo.train.dpo_recipe import train_dpo

    return finish(train_dpo(cfg), cfg, args)
