"""Old flag spellings: they keep working for one release and say once which flag replaces them."""

from __future__ import annotations

import argparse
import sys


class DeprecatedFlag(argparse.Action):
    """`parser.add_argument(OLD, dest=..., action=DeprecatedFlag, replacement=NEW, help=argparse.SUPPRESS)`."""

    def __init__(self, option_strings, dest, replacement: str, **kwargs):
        self.replacement = replacement
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        # "warning:" first, as every warning of ours: only errors start with "spo COMMAND:"
        print(f"warning: {parser.prog} {option_string} is deprecated, use {self.replacement}", file=sys.stderr)
        setattr(namespace, self.dest, values)


def add_cfg_scale(parser: argparse.ArgumentParser, default: float, help: str, type=float) -> None:  # noqa: A002
    """--cfg-scale (the name every command uses, as `spo train` does), with --cfg as its deprecated spelling."""
    parser.add_argument("--cfg-scale", dest="cfg", type=type, default=default, metavar="CFG_SCALE",
                        help=f"{help} (default: {default:g})")
    parser.add_argument("--cfg", dest="cfg", type=type, action=DeprecatedFlag, replacement="--cfg-scale",
                        help=argparse.SUPPRESS)
