"""`spo report`: one self-contained HTML page for a training run, a sweep, or scored folders."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("folder", type=Path, help="a `spo train` output, `spo sweep` output, or `spo score` output folder")
    parser.add_argument("--sweep", action="append", type=Path, default=[], metavar="DIR", help="add a sweep folder; repeatable")
    parser.add_argument("--scores", action="append", type=Path, default=[], metavar="DIR",
                        help="add a `spo score` output folder; repeatable")
    parser.add_argument("--pairs", type=int, default=8, help="before/after pairs to generate for a training run (0: none)")
    parser.add_argument("--base", default=None, help="base model for the pairs (default: the one the run trained)")
    parser.add_argument("--prompt", action="append", default=[], help="prompts for the pairs (default for a built-in base model: its held-out prompts)")
    parser.add_argument("--title", default=None, help="page title (default: from the folder)")
    parser.add_argument("--out", type=Path, default=None, help="the HTML file (default: FOLDER/report.html)")


def run(args: argparse.Namespace) -> int:
    from spo.io import check_output_file
    from spo.show.report import build_report

    if args.out is not None:
        check_output_file(args.out)  # before the pairs are generated; the writer checks again
    path = build_report(args.folder, args.out, sweeps=args.sweep, scores=args.scores, pairs=max(0, args.pairs),
                        base=args.base, prompts=args.prompt or None, title=args.title)
    print(f"report -> {path}")
    return 0
