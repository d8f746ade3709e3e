"""`spo spm ...`: train, evaluate and convert step-aware preference models."""

from __future__ import annotations

import argparse
from pathlib import Path

from spo.cli.argtypes import finite_float, positive_int, seed
from spo.cli.generate_cmd import add_vae_argument
from spo.deprecation import add_cfg_scale
from spo import sources
from spo.errors import SpoInputError


def _timesteps(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated whole numbers, got {text!r}") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="spm_command", metavar="ACTION", required=True, parser_class=type(parser))

    t = sub.add_parser("train", help="train a step-aware preference model on Pick-a-Pic-schema pairs")
    _add_train_arguments(t)

    e = sub.add_parser("eval", help="pairwise accuracy of one or more SPMs vs timestep, with a plot")
    e.add_argument("spm", nargs="+", help="SPM folders (or `spo spm train` output folders); a built-in model's name "
                                          "stands for its shipped SPM")
    e.add_argument("--data", nargs="+", type=Path, required=True, help="held-out Pick-a-Pic-schema pairs")
    e.add_argument("--base", default=None, help=f"base model (default {sources.DEFAULT_SOURCE}); must be the SPMs' family")
    add_vae_argument(e)
    e.add_argument("--timesteps", type=_timesteps, default=[0, 251, 501, 701, 951], help="comma-separated timesteps to evaluate at (default: 0,251,501,701,951, the paper's)")
    e.add_argument("--min-judge-gap", type=finite_float, default=None,
                   help="toy data: keep pairs whose toy-judge aesthetic scores differ by at least this")
    e.add_argument("--against", choices=["labels", "judge"], default="labels",
                   help="score agreement with the pairs' labels, or (toy data) with the toy judge's aesthetic order")
    e.add_argument("--same-judge-alignment", action="store_true",
                   help="toy data: keep only pairs whose two images the toy judge finds equally aligned with the caption")
    e.add_argument("--limit", type=positive_int, default=None, help="evaluate at most this many decided pairs")
    e.add_argument("--batch-size", type=positive_int, default=16, help="pairs per batch (default: %(default)s)")
    add_cfg_scale(e, 5.0, "CFG scale of the base model's x0-hat prediction", finite_float)
    e.add_argument("--seed", type=seed, default=0, help="seed of the noise at each t (0..2**32-1, -1: random)")
    e.add_argument("--out", type=Path, default=Path("outputs/spm_eval"), help="folder for accuracy.json + accuracy.png")
    e.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")

    g = sub.add_parser("siblings", help="does a preference model pick, among SPO's k candidates, the one a clean-image "
                                        "reference prefers once finished? (per sampling step, with a plot)")
    g.add_argument("preference", nargs="+", help="SPM folders (or CLIP folders, package.module:function scorers) to "
                                                 "check; a built-in model's name stands for its shipped SPM")
    g.add_argument("--reference", default=None,
                   help="clean-image scorer the finished candidates are judged by: a CLIP folder (e.g. PickScore_v1), "
                        "an SPM folder (scored at t = 0) or package.module:function; default for a built-in base "
                        "model: its own reference (the toy judge's aesthetic)")
    g.add_argument("--base", default=None,
                   help=f"base model: {sources.DEFAULT_SOURCE} (default), another built-in model, a diffusers folder or a "
                        "single-file .safetensors")
    add_vae_argument(g)
    g.add_argument("--cpu", action="store_true", help="run on CPU even when a GPU is present")
    g.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32",
                   help="precision of the base model and the scorers: bf16 halves the memory, fp16 needs a GPU "
                        "(default: %(default)s)")
    g.add_argument("--prompts", default=None, metavar="FILE",
                   help="prompts (JSON list, text, CSV/parquet); default for a built-in base model: its held-out prompts")
    g.add_argument("--prompt-column", default=None, help="column of a CSV/parquet prompts file")
    g.add_argument("-n", "--num-prompts", type=positive_int, default=64, help="prompts to branch (at most)")
    g.add_argument("--k", type=positive_int, default=4, help="candidates per branching (SPO: 4 for SD1.5, 2 for SDXL)")
    g.add_argument("--at-steps", type=_timesteps, default=[0, 4, 10, 14, 18],
                   help="sampling steps (0-based, of --num-steps) to branch at")
    g.add_argument("--num-steps", type=positive_int, default=20, help="DDIM sampling steps (default: %(default)s)")
    add_cfg_scale(g, 5.0, "CFG scale of the sampling", finite_float)
    g.add_argument("--eta", type=finite_float, default=1.0, help="DDIM eta of the branching steps (default: %(default)s, SPO's)")
    g.add_argument("--batch-size", type=positive_int, default=8, help="prompts per batch (k candidates each)")
    g.add_argument("--seed", type=seed, default=0, help="seed of the branched trajectories (0..2**32-1, -1: random)")
    g.add_argument("--out", type=Path, default=Path("outputs/spm_siblings"), help="folder for siblings.json + siblings.png")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")

    c = sub.add_parser("convert", help="convert an official SPM checkpoint (.bin torch pickle) to an SPM folder")
    c.add_argument("checkpoint", type=Path, help="official final_ckpt.bin")
    c.add_argument("--clip", type=Path, required=True, help="the local CLIP folder it was trained from (PickScore_v1)")
    c.add_argument("--family", choices=["sd15", "sdxl"], required=True, help="the base model family it was trained for")
    c.add_argument("--base-model", default=None, help="name of the base model it was trained for")
    c.add_argument("--out", type=Path, required=True, help="output SPM folder")
    c.add_argument("--allow-pickle", action="store_true",
                   help="required: the .bin is a torch pickle (read with torch.load(weights_only=True))")


def _quiet_libraries() -> None:
    """Library chatter (weight-loading bars, optional-dependency notices) would bury our one-line errors."""
    import os

    from spo.cli.main import quiet_libraries

    quiet_libraries()  # the notices every command silences; the spm commands keep only errors on top
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    tlog.set_verbosity_error()
    tlog.disable_progress_bar()
    dlog.set_verbosity_error()
    dlog.disable_progress_bar()


def run(args: argparse.Namespace) -> int:
    _quiet_libraries()
    if args.spm_command == "train":
        return _train(args)
    if args.spm_command == "eval":
        return _eval(args)
    if args.spm_command == "convert":
        return _convert(args)
    if args.spm_command == "siblings":
        return _siblings(args)
    raise SpoInputError(f"unknown spm action {args.spm_command!r}")


def _add_train_arguments(parser: argparse.ArgumentParser) -> None:
    from spo.train.config import SPMConfig
    from spo.train.config import add_arguments as add_config_arguments

    parser.add_argument("data", nargs="*", default=None,
                        help="parquet files, folders of them, or datasets save_to_disk folders")
    add_config_arguments(parser, SPMConfig, skip=("data",))


def _train(args) -> int:
    from spo.cli.train_cmd import resolved_config
    from spo.train.config import SPMConfig

    args.data = args.data or None
    cfg = resolved_config(args, SPMConfig)
    if cfg is None:
        return 0
    from spo.train.spm_recipe import SPM_DIR, train

    result = train(cfg)
    loss = result["final_loss_mean_last_10"]  # None when a resumed run had no steps left (killed while saving)
    print(f"trained {result['family']} SPM for {result['steps']} steps on {result['pairs']} pairs "
          f"(last-10 loss {'n/a' if loss is None else f'{loss:.4f}'}) -> {cfg.output_dir}/{SPM_DIR}")
    return 0


def _eval(args) -> int:
    from spo.io import check_output_dir
    from spo.spm.evaluate import evaluate, format_table, plot_accuracy

    check_output_dir(args.out)  # fail early, but create it only once there is a result to write
    result = evaluate([sources.preference_spec(s) for s in args.spm], args.data, base=args.base, timesteps=args.timesteps, min_judge_gap=args.min_judge_gap,
                      seed=args.seed, batch_size=args.batch_size, cfg_scale=args.cfg, limit=args.limit,
                      progress=args.progress, against=args.against, same_judge_alignment=args.same_judge_alignment,
                      vae=args.vae)
    return _publish(args.out, "accuracy", result, plot_accuracy, format_table(result))


def _publish(out_dir: Path, stem: str, result: dict, plot, table: str) -> int:
    """Write `stem`.json and its plot `stem`.png into out_dir (each atomically), then print the table."""
    from spo.io import ensure_writable_dir, write_json

    out = ensure_writable_dir(out_dir)
    write_json(out / f"{stem}.json", result)
    plot(result, out / f"{stem}.png")
    print(table)
    print(f"wrote {out / f'{stem}.json'} and {out / f'{stem}.png'}")
    return 0


def _siblings(args) -> int:
    from spo.io import check_output_dir
    from spo.models.family import family_of
    from spo.models.loading import load_pipeline
    from spo.spm.denoise import freeze
    from spo.spm.evaluate import model_name
    from spo.spm.scoring import find_spm_dir, load_scorer
    from spo.spm.siblings import format_table, plot_siblings, sibling_agreement

    base = args.base or sources.DEFAULT_SOURCE
    source = sources.get(base)
    bad = [s for s in args.at_steps if not 0 <= s < args.num_steps]
    if bad or not args.at_steps:
        raise SpoInputError(f"--at-steps must be in [0, {args.num_steps}), got {bad or 'none'}")
    if args.eta < 0:
        raise SpoInputError(f"--eta must be >= 0, got {args.eta}")
    if args.k < 2:
        raise SpoInputError(f"--k must be at least 2 to have siblings, got {args.k}")
    if args.reference is None and (source is None or not source.reference):
        raise SpoInputError("give --reference: the clean-image scorer the finished candidates are judged by "
                            "(a CLIP folder such as PickScore_v1, an SPM folder, or package.module:function)")
    if args.prompts:
        from spo.data.prompts import load_prompts

        prompts = list(load_prompts(args.prompts, args.prompt_column))[:args.num_prompts]
    elif source is not None:
        prompts = source.heldout_prompts(args.num_prompts, args.seed + 4321)
    else:
        raise SpoInputError("give --prompts FILE (held-out prompts are the default only for built-in base models)")
    if not prompts:
        raise SpoInputError(f"{args.prompts}: no prompts")
    check_output_dir(args.out)
    import torch

    from spo.dtypes import weights_dtype

    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    dtype = weights_dtype(args.dtype, device.type)
    pipe = load_pipeline(base, dtype=dtype, vae=args.vae)
    freeze(pipe)
    pipe.to(device)
    family = family_of(pipe)

    scorers = {}
    for spec in map(sources.preference_spec, args.preference):
        scorer = load_scorer(spec, family=family, device=device, dtype=dtype)
        scorers[model_name(spec, scorer) if find_spm_dir(spec) else spec] = scorer
    reference = args.reference or source.reference
    references = {reference: load_scorer(reference, device=device, dtype=dtype)}
    for extra in source.references if source is not None else ():  # e.g. what the pick costs in alignment
        references.setdefault(extra, load_scorer(extra, device=device, dtype=dtype))
    result = sibling_agreement(pipe, scorers, references, prompts, k=args.k, steps=args.at_steps,
                               num_steps=args.num_steps, cfg=args.cfg, eta=args.eta, seed=args.seed,
                               batch=args.batch_size, progress=args.progress)
    result.update(base_model=base, family=family, prompts=args.prompts or f"{base} held-out prompts")
    return _publish(args.out, "siblings", result, plot_siblings, format_table(result))


def _convert(args) -> int:
    from spo.spm.model import StepAwarePreferenceModel

    spm = StepAwarePreferenceModel.from_official(args.checkpoint, args.clip, allow_pickle=args.allow_pickle,
                                                 family=args.family, base_model=args.base_model,
                                                 training={"converted_from": str(args.checkpoint)})
    spm.save(args.out)
    print(f"converted {args.checkpoint} ({args.family}) -> {args.out}")
    return 0
