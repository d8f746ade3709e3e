"""`spo toy ...`: the embedded toy world. Its arguments and actions belong to the toy plugin (spo.sources
finds them), so the CLI package knows the command's name and nothing else of it."""

from __future__ import annotations

import argparse

from spo import sources


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sources.command("toy").add_arguments(parser)


def run(args) -> int:
    return sources.command("toy").run(args)
