"""`spo data inspect PATH...`: what a Pick-a-Pic-schema set holds, and a preview grid of some of its pairs."""

from __future__ import annotations

import argparse
from pathlib import Path

from spo.cli.argtypes import positive_int, seed


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="data_command", metavar="ACTION", required=True, parser_class=type(parser))
    i = sub.add_parser("inspect", help="counts, skipped rows by reason, caption and image-size summaries, a preview")
    i.add_argument("paths", nargs="+", type=Path, help="parquet files, folders of shards, datasets save_to_disk folders")
    i.add_argument("--sample", type=positive_int, default=64,
                   help="rows whose image headers are read for sizes and formats (default: %(default)s)")
    i.add_argument("--preview", type=int, default=8, help="pairs in the preview grid (default: %(default)s; 0: none)")
    i.add_argument("--seed", type=seed, default=0, help="seed of the sample (0..2**32-1, -1: random)")
    i.add_argument("--out", type=Path, default=None, help="folder for inspect.json and preview.png (default: print only)")


def run(args: argparse.Namespace) -> int:
    from spo.data.inspect import format_summary, inspect_pairs
    from spo.io import check_output_dir, ensure_writable_dir, save_image, write_json

    if args.out is not None:
        check_output_dir(args.out)  # before reading: a folder it cannot write fails at once
    result, pairs = inspect_pairs(args.paths, sample=args.sample, seed=args.seed)
    print(format_summary(result))
    if args.out is None:
        return 0
    out = ensure_writable_dir(args.out)
    write_json(out / "inspect.json", result)
    written = [out / "inspect.json"]
    if args.preview > 0 and pairs:
        save_image(preview_grid(pairs[: args.preview]), out / "preview.png")
        written.append(out / "preview.png")
    print("wrote " + " and ".join(map(str, written)))
    return 0


def preview_grid(pairs, side: int = 128):
    """One row per pair: both images (centre-cropped squares) under 'image 0' / 'image 1', the caption and the
    labels on the left, the preferred image marked."""
    from spo.images import images_to_tensor, tensor_to_images
    from spo.show.grid import labelled_grid

    cells = [tensor_to_images(images_to_tensor(list(p.decode()), side)) for p in pairs]
    labels = [f"{p.caption[:60]}{'…' if len(p.caption) > 60 else ''} | {p.label_0:g} : {p.label_1:g}"
              + ("" if p.preferred is None else f" (image {p.preferred} preferred)") for p in pairs]
    return labelled_grid(cells, labels, ["image 0", "image 1"], title="pairs and their labels")
