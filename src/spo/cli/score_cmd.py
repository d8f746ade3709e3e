"""`spo score`: score a folder of images (toy judge, SPM at t = 0, PickScore, ...) or compare two folders."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("folder", nargs="?", type=Path, help="folder of images (PNG/JPEG/WebP)")
    parser.add_argument("--compare", nargs=2, type=Path, metavar=("A_DIR", "B_DIR"),
                        help="seed-matched win rate of A against B (images matched by seed and prompt, else file name)")
    parser.add_argument("--prompt", default=None, help="one prompt for every image (overrides PNG metadata)")
    parser.add_argument("--prompts", type=Path, default=None, metavar="FILE",
                        help="CSV with file,prompt columns or JSON {file: prompt}")
    parser.add_argument("--judge", action="store_true", help="the toy judge: aesthetic + alignment (default if no other scorer)")
    parser.add_argument("--spm", default=None, metavar="DIR",
                        help="a step-aware preference model folder (or module:function), scored at t = 0")
    parser.add_argument("--family", choices=["sd15", "sdxl"], default=None, help="check the SPM was trained for this family")
    parser.add_argument("--pickscore", default=None, metavar="DIR", help="a local PickScore (CLIPModel) folder")
    parser.add_argument("--hpsv2", action="store_true", help="HPSv2.1 via the hpsv2 package (weights must be cached)")
    parser.add_argument("--imagereward", default=None, metavar="FILE", help="ImageReward.pt via the image-reward package")
    parser.add_argument("--laion-aesthetic", default=None, metavar="FILE", help="LAION aesthetic MLP head (.pth/.safetensors)")
    parser.add_argument("--laion-clip", default=None, metavar="DIR", help="CLIP ViT-L/14 folder for --laion-aesthetic")
    parser.add_argument("--out", type=Path, default=None,
                        help="output folder (default: FOLDER/scores, or A_DIR/compare-B_DIR for --compare)")


def run(args: argparse.Namespace) -> int:
    from spo.errors import SpoInputError
    from spo.io import check_output_dir, ensure_writable_dir, write_json, write_text
    from spo.show import scoring

    if (args.folder is None) == (args.compare is None):
        raise SpoInputError("give a FOLDER to score, or --compare A_DIR B_DIR")
    folders = [args.folder] if args.folder is not None else list(args.compare)
    records = [scoring.image_records(f, args.prompt, args.prompts) for f in folders]  # bad folders fail here
    if args.out is not None:
        out = args.out
    elif args.folder is not None:
        out = args.folder / "scores"
    else:
        out = args.compare[0] / f"compare-{args.compare[1].resolve().name}"
    check_output_dir(out)
    scorers = scoring.build_scorers(judge=args.judge, spm=args.spm, family=args.family, pickscore=args.pickscore,
                                    hpsv2=args.hpsv2, imagereward=args.imagereward,
                                    laion_aesthetic=args.laion_aesthetic, laion_clip=args.laion_clip)
    if args.folder is not None:
        rows = scoring.score_records(records[0], scorers)
        summary = {"folder": str(args.folder), "scorers": list(scorers), "scores": scoring.summarize(rows)}
        ensure_writable_dir(out)
        write_text(out / "scores.csv", scoring.rows_csv(rows))
        write_json(out / "summary.json", summary)
        print(f"{len(rows)} image{'s' if len(rows) != 1 else ''} in {args.folder}:")
        for col, s in summary["scores"].items():
            print(f"  {col}: {s['mean']:.4f} (95% CI {s['ci95'][0]:.4f} .. {s['ci95'][1]:.4f}, {s['interval']}, n={s['n']})")
        print(f"-> {out / 'scores.csv'}, {out / 'summary.json'}")
        return 0
    pairs = scoring.match_records(records[0], records[1])
    rows_a = scoring.score_records([p[0] for p in pairs], scorers, desc="scoring A")
    rows_b = scoring.score_records([p[1] for p in pairs], scorers, desc="scoring B")
    result = {"a": str(args.compare[0]), "b": str(args.compare[1]), "n_pairs": len(pairs),
              "unmatched_a": len(records[0]) - len(pairs), "unmatched_b": len(records[1]) - len(pairs),
              "scorers": list(scorers), "a_scores": scoring.summarize(rows_a), "b_scores": scoring.summarize(rows_b),
              "a_vs_b": scoring.win_rates(rows_a, rows_b)}
    merged = [{"file_a": ra["file"], "file_b": rb["file"], "prompt": ra["prompt"], "seed": ra["seed"],
               **{f"a_{k}": ra[k] for k in scoring.score_columns(rows_a)},
               **{f"b_{k}": rb[k] for k in scoring.score_columns(rows_b)}} for ra, rb in zip(rows_a, rows_b)]
    ensure_writable_dir(out)
    write_text(out / "pairs.csv", scoring.rows_csv(merged))
    write_json(out / "summary.json", result)
    print(f"{len(pairs)} seed-matched pairs, {args.compare[0]} (A) vs {args.compare[1]} (B):")
    for col, r in result["a_vs_b"].items():
        w = r["win_rate"]
        d = r["difference"]
        print(f"  {col}: A wins {100 * w['mean']:.1f}% (95% Wilson CI {100 * w['ci95'][0]:.1f}..{100 * w['ci95'][1]:.1f}%; "
              f"{r['wins']} wins, {r['ties']} ties, {r['losses']} losses, a tie counting half), "
              f"mean difference {d['mean']:+.4f} (95% CI {d['ci95'][0]:+.4f}..{d['ci95'][1]:+.4f})")
    print(f"-> {out / 'pairs.csv'}, {out / 'summary.json'}")
    return 0
