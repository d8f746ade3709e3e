"""`spo toy ...`: the embedded toy world (registered with spo.sources as a plugin command)."""

from __future__ import annotations

import argparse
from pathlib import Path

from spo.cli.argtypes import finite_float, nonneg_int, positive_int, probability, seed
from spo.deprecation import add_cfg_scale
from spo.errors import SpoInputError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from spo.toy.defaults import MODELS as budget

    sub = parser.add_subparsers(dest="toy_command", metavar="ACTION", required=True, parser_class=type(parser))
    b = sub.add_parser("build", help="train the tiny SD1.5/SDXL-family base models (from scratch, or --continue-from a build)")
    b.add_argument("--out", type=Path, default=None, help="output folder (default: the package's toy_models)")
    b.add_argument("--family", choices=["sd15", "sdxl", "both"], default="both", help="which toy model families to build (default: %(default)s)")
    b.add_argument("--images", type=positive_int, default=budget["n_images"], help="training renders")
    b.add_argument("--vae-steps", type=positive_int, default=budget["vae_steps"], help="VAE training steps (default: %(default)s)")
    b.add_argument("--decoder-steps", type=nonneg_int, default=budget["decoder_steps"],
                   help="decoder-only fine-tuning after the VAE (keeps the latent space)")
    b.add_argument("--unet-steps", type=nonneg_int, default=budget["unet_steps"], help="UNet training steps (default: %(default)s)")
    b.add_argument("--continue-from", type=Path, default=None, metavar="DIR",
                   help="keep training the toy models in DIR (its VAE encoder, hence latent space, is kept)")
    b.add_argument("--batch", type=positive_int, default=budget["batch"], help="training batch size (default: %(default)s)")
    b.add_argument("--seed", type=seed, default=0, help="0..2**32-1, -1 for a random one")
    b.add_argument("--prediction-type", choices=["epsilon", "v_prediction"], default=None,
                   help="what the UNet learns to predict (default: epsilon, or the continued build's); "
                        "v_prediction with --continue-from an epsilon build converts it")
    b.add_argument("--world", type=int, choices=[1, 2], default=None,
                   help="toy world: 2 (the shipped models: fine detail decided late, a weave and lighting; 8 latent "
                        "channels, 32-group UNets), 1 (the first: flat shapes); default: 2, or the continued build's")

    from spo.toy.defaults import CLIP as clip_budget

    c = sub.add_parser("clip", help="pretrain a tiny CLIP on toy renders (the toy's PickScore/CLIP, for `spo spm train --init`)")
    c.add_argument("--out", type=Path, default=Path("outputs/toy_clip"), help="output folder: a transformers CLIP folder (default: %(default)s)")
    c.add_argument("--images", type=positive_int, default=clip_budget["n_images"], help="training renders (default: %(default)s)")
    c.add_argument("--steps", type=positive_int, default=clip_budget["steps"], help="contrastive training steps (default: %(default)s)")
    c.add_argument("--batch", type=positive_int, default=clip_budget["batch"], help="batch size (default: %(default)s)")
    c.add_argument("--seed", type=seed, default=0, help="0..2**32-1, -1 for a random one")

    s = sub.add_parser("sample", help="sample a toy base model on held-out captions and judge the images")
    s.add_argument("--family", choices=["sd15", "sdxl"], default=None,
                   help="toy model family (default: the one --model holds, else sd15)")
    s.add_argument("--model", type=Path, default=None, help="a toy pipeline folder (default: the shipped one)")
    s.add_argument("-n", "--num-images", type=positive_int, default=64, help="images to sample and judge (default: %(default)s)")
    s.add_argument("--split", choices=["heldout", "train"], default="heldout", help="captions from the held-out or the training split (default: %(default)s)")
    s.add_argument("--steps", type=positive_int, default=20, help="DDIM steps (default: %(default)s)")
    add_cfg_scale(s, 5.0, "classifier-free guidance scale", finite_float)
    s.add_argument("--seed", type=seed, default=0, help="0..2**32-1, -1 for a random one")
    s.add_argument("--out", type=Path, default=Path("outputs/toy_sample"), help="output folder: grid.png, scores.json (default: %(default)s)")

    p = sub.add_parser("pairs", help="write Pick-a-Pic-schema preference pairs from toy base-model samples or renders")
    p.add_argument("--source", choices=["model", "render"], default="model",
                   help="two samples of the toy base model per caption, or two renders with random defects "
                        "(Pick-a-Pic-like pairs from 'other generators'; no model needed, thousands per second)")
    p.add_argument("--family", choices=["sd15", "sdxl"], default=None,
                   help="toy model family of the model source (default: the one --model holds, else sd15)")
    p.add_argument("--model", type=Path, default=None, help="a toy pipeline folder (default: the shipped one)")
    p.add_argument("-n", "--num-pairs", type=positive_int, default=256, help="pairs to write (default: %(default)s)")
    p.add_argument("--split", choices=["train", "heldout"], default="train",
                   help="captions from the training set or the held-out combinations (for evaluation pairs)")
    p.add_argument("--p-wrong", type=probability, default=0.3,
                   help="render source: share of images showing another shape or colour than the caption's")
    p.add_argument("--p-missing", type=probability, default=0.1,
                   help="render source: share of images whose subject is faint or missing")
    p.add_argument("--seed", type=seed, default=0, help="0..2**32-1, -1 for a random one")
    p.add_argument("--out", type=Path, default=Path("outputs/toy_pairs.parquet"), help="output parquet file (default: %(default)s)")

    k = sub.add_parser("tokenizer", help="rebuild the shipped CLIP BPE files (vocab.json, merges.txt) from open_clip's wheel")
    k.add_argument("--from-open-clip-wheel", dest="wheel", type=Path, required=True,
                   help="an open_clip_torch .whl (or its bpe_simple_vocab_16e6.txt.gz)")
    k.add_argument("--out", type=Path, default=None, help="output folder (default: the package's clip_tokenizer)")


def run(args: argparse.Namespace) -> int:
    if args.toy_command == "build":
        from spo.toy.build import build
        from spo.toy.defaults import TOY_MODEL_DIR

        families = ("sd15", "sdxl") if args.family == "both" else (args.family,)
        if args.continue_from is not None and not all(
                (args.continue_from / f / "model_index.json").is_file() for f in families):
            raise SpoInputError(f"{args.continue_from}: no toy model folders for {', '.join(families)} to continue from")
        info = build(args.out or TOY_MODEL_DIR, families, args.images, args.vae_steps, args.unet_steps, args.batch,
                     args.seed, decoder_steps=args.decoder_steps, continue_from=args.continue_from,
                     prediction_type=args.prediction_type, world=args.world)
        print(f"built {', '.join(families)} in {info['total_seconds']} s on {info['machine']} -> {args.out or TOY_MODEL_DIR}")
        return 0
    if args.toy_command == "clip":
        from spo.io import check_output_dir
        from spo.toy.clip import pretrain_clip

        check_output_dir(args.out)
        info = pretrain_clip(args.out, args.images, args.steps, args.batch, seed=args.seed)
        print(f"toy CLIP: loss {info['final_loss']} after {info['steps']} steps in {info['seconds']} s -> {args.out}")
        return 0
    if args.toy_command == "sample":
        return _sample(args)
    if args.toy_command == "tokenizer":
        from spo.tokenizer import ASSET_DIR
        from spo.toy.tokenizer import build_vocab_files

        print(f"wrote vocab.json and merges.txt -> {build_vocab_files(args.wheel, args.out or ASSET_DIR)}")
        return 0
    if args.toy_command == "pairs":
        from spo.data.pickapic import write_pairs
        from spo.toy.pairs import make_pair_rows, make_render_pair_rows

        _check_output_file(args.out)
        if args.source == "render":
            if args.p_wrong + args.p_missing > 1:
                raise SpoInputError(f"--p-wrong + --p-missing must be <= 1, got {args.p_wrong + args.p_missing}")
            rows = make_render_pair_rows(args.num_pairs, args.seed, split=args.split, p_wrong=args.p_wrong,
                                         p_missing=args.p_missing)
        else:
            pipe, _, world = _toy_model(args)
            rows = make_pair_rows(pipe, args.num_pairs, args.seed, split=args.split, world=world)
        write_pairs(args.out, rows)
        ties = sum(r["label_0"] == 0.5 for r in rows)
        print(f"wrote {len(rows)} pair{'s' if len(rows) != 1 else ''} ({ties} tie{'s' if ties != 1 else ''}) -> {args.out}")
        return 0
    raise SpoInputError(f"unknown toy action {args.toy_command!r}")


def _check_output_file(path: Path) -> None:
    from spo.io import check_output_file

    if path.exists() and path.is_dir():
        raise SpoInputError(f"{path} is a directory; give a file path")
    check_output_file(path)  # a device, FIFO or socket there is never replaced


def _toy_model(args):
    """(pipeline, family, toy world) of `--model` (its own family unless `--family` is given) or the shipped model."""
    from spo.models.family import family_of
    from spo.toy.defaults import TOY_MODEL_DIR, model_world
    from spo.toy.sampling import load_toy_pipeline

    pipe = load_toy_pipeline(args.family or (None if args.model else "sd15"), args.model)
    family = family_of(pipe)
    return pipe, family, model_world(args.model or TOY_MODEL_DIR / family)


def _sample(args) -> int:
    from functools import partial

    from spo.io import check_output_dir, ensure_writable_dir, save_image, write_json
    from spo.show.grid import image_grid
    from spo.toy.judge import world_aesthetic
    from spo.toy.sampling import judge_images, sample
    from spo.toy.world import sample_scenes

    check_output_dir(args.out)  # fail early, but create it only once the model has loaded
    pipe, family, world = _toy_model(args)  # a world-2 build is judged by world 2's aesthetic
    out = ensure_writable_dir(args.out)
    prompts = [s.caption for s in sample_scenes(args.num_images, seed=args.seed, split=args.split)]
    images = sample(pipe, prompts, seed=args.seed, steps=args.steps, cfg=args.cfg)
    scores = judge_images(images, prompts, aesthetic=partial(world_aesthetic, world=world))
    save_image(image_grid(images[:64], cols=8, scale=4), out / "grid.png")
    write_json(out / "scores.json", {"family": family, "world": world, "split": args.split, "seed": args.seed,
                                      "steps": args.steps, "cfg": args.cfg, "prompts": prompts, **scores})
    print(f"{family} (world {world}): {scores['n']} images on {args.split} captions | judge aesthetic "
          f"{scores['aesthetic_mean']:.3f} ± {scores['aesthetic_ci95']:.3f} (std {scores['aesthetic_std']:.3f}) | "
          f"alignment {100 * scores['alignment']:.1f}% | grid: {out / 'grid.png'}")
    return 0
