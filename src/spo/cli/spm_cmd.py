"""`spo spm ...`: train, evaluate and convert step-aware preference models."""

from __future__ import annotations

import argparse
from pathlib import Path

from spo.cli.argtypes import finite_float, nonneg_int, positive_int
from spo.errors import SpoInputError


def _timesteps(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated whole numbers, got {text!r}") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="spm_command", metavar="ACTION", required=True, parser_class=type(parser))

    t = sub.add_parser("train", help="train a step-aware preference model on Pick-a-Pic-schema pairs")
    t.add_argument("data", nargs="+", type=Path, help="parquet files, folders of them, or datasets save_to_disk folders")
    t.add_argument("--out", type=Path, required=True, help="output folder: spm/ (the model), checkpoints/, logs/")
    t.add_argument("--base", default=None, help="base model: toy:sd15 (default), toy:sdxl, or a diffusers folder")
    t.add_argument("--init", default="toy", help="toy (tiny CLIP for the toy world), a transformers CLIP folder "
                                                 "(e.g. PickScore_v1), or an SPM folder to continue from")
    t.add_argument("--no-time-conditioning", dest="time_conditioning", action="store_false",
                   help="train the time-unconditioned variant (same CLIP, t ignored) for comparison")
    t.add_argument("--steps", type=positive_int, default=200, help="optimizer steps")
    t.add_argument("--batch-size", type=positive_int, default=8, help="pairs per micro-batch per process")
    t.add_argument("--grad-accum", type=positive_int, default=1)
    t.add_argument("--lr", type=finite_float, default=3e-6, help="AdamW learning rate (paper: 3e-6 SD1.5, 1e-6 SDXL)")
    t.add_argument("--weight-decay", type=finite_float, default=0.3)
    t.add_argument("--warmup", type=nonneg_int, default=500, help="linear warm-up steps")
    t.add_argument("--lr-schedule", choices=["constant", "cosine"], default="constant",
                   help="after warm-up: constant, or cosine decay to 0 at the last step")
    t.add_argument("--max-grad-norm", type=finite_float, default=1.0, help="gradient clipping (0: off)")
    t.add_argument("--max-t", type=positive_int, default=1000, help="train on t ~ U[0, max_t)")
    t.add_argument("--cfg", type=finite_float, default=5.0, help="CFG scale of the base model's x0-hat prediction")
    t.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], default="no")
    t.add_argument("--gradient-checkpointing", action="store_true", help="recompute CLIP activations (saves memory)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--checkpoint-every", type=nonneg_int, default=500, help="steps between checkpoints (0: none)")
    t.add_argument("--keep-checkpoints", type=positive_int, default=2)
    t.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    t.add_argument("--relabel-with", default=None,
                   help="relabel pairs by a clean-image scorer: a CLIP folder (PickScore_v1, as the SDXL recipe), an SPM "
                        "folder at t=0, or package.module:function")
    t.add_argument("--relabel-threshold", type=finite_float, default=0.1,
                   help="tie unless the softmax gap of the clean scores exceeds this (SDXL recipe: 0.1)")
    t.add_argument("--cpu", action="store_true", help="train on CPU even when a GPU is present")
    t.add_argument("--log-every", type=positive_int, default=10)
    t.add_argument("--no-progress", dest="progress", action="store_false")

    e = sub.add_parser("eval", help="pairwise accuracy of one or more SPMs vs timestep, with a plot")
    e.add_argument("spm", nargs="+", type=Path, help="SPM folders (or `spo spm train` output folders)")
    e.add_argument("--data", nargs="+", type=Path, required=True, help="held-out Pick-a-Pic-schema pairs")
    e.add_argument("--base", default=None, help="base model (default toy:sd15); must be the SPMs' family")
    e.add_argument("--timesteps", type=_timesteps, default=[0, 251, 501, 701, 951])
    e.add_argument("--min-judge-gap", type=finite_float, default=None,
                   help="toy data: keep pairs whose toy-judge aesthetic scores differ by at least this")
    e.add_argument("--against", choices=["labels", "judge"], default="labels",
                   help="score agreement with the pairs' labels, or (toy data) with the toy judge's aesthetic order")
    e.add_argument("--same-judge-alignment", action="store_true",
                   help="toy data: keep only pairs whose two images the toy judge finds equally aligned with the caption")
    e.add_argument("--limit", type=positive_int, default=None, help="evaluate at most this many decided pairs")
    e.add_argument("--batch-size", type=positive_int, default=16)
    e.add_argument("--cfg", type=finite_float, default=5.0)
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--out", type=Path, default=Path("outputs/spm_eval"), help="folder for accuracy.json + accuracy.png")
    e.add_argument("--no-progress", dest="progress", action="store_false")

    g = sub.add_parser("siblings", help="does a preference model pick, among SPO's k candidates, the one a clean-image "
                                        "reference prefers once finished? (per sampling step, with a plot)")
    g.add_argument("preference", nargs="+", help="SPM folders (or CLIP folders, package.module:function scorers) to check")
    g.add_argument("--reference", default=None,
                   help="clean-image scorer the finished candidates are judged by: a CLIP folder (e.g. PickScore_v1), "
                        "an SPM folder (scored at t = 0) or package.module:function; toy default: the toy judge's "
                        "aesthetic (spo.toy.judge:aesthetic_preference)")
    g.add_argument("--base", default=None,
                   help="base model: toy:sd15 (default), toy:sdxl, a diffusers folder or a single-file .safetensors")
    g.add_argument("--cpu", action="store_true", help="run on CPU even when a GPU is present")
    g.add_argument("--prompts", default=None, metavar="FILE",
                   help="prompts (JSON list, text, CSV/parquet); toy default: held-out toy captions")
    g.add_argument("--prompt-column", default=None)
    g.add_argument("-n", "--num-prompts", type=positive_int, default=64, help="prompts to branch (at most)")
    g.add_argument("--k", type=positive_int, default=4, help="candidates per branching (SPO: 4 for SD1.5, 2 for SDXL)")
    g.add_argument("--at-steps", type=_timesteps, default=[0, 4, 10, 14, 18],
                   help="sampling steps (0-based, of --num-steps) to branch at")
    g.add_argument("--num-steps", type=positive_int, default=20)
    g.add_argument("--cfg", type=finite_float, default=5.0)
    g.add_argument("--eta", type=finite_float, default=1.0)
    g.add_argument("--batch-size", type=positive_int, default=8, help="prompts per batch (k candidates each)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--out", type=Path, default=Path("outputs/spm_siblings"), help="folder for siblings.json + siblings.png")
    g.add_argument("--no-progress", dest="progress", action="store_false")

    c = sub.add_parser("convert", help="convert an official SPM checkpoint (.bin torch pickle) to an SPM folder")
    c.add_argument("checkpoint", type=Path, help="official final_ckpt.bin")
    c.add_argument("--clip", type=Path, required=True, help="the local CLIP folder it was trained from (PickScore_v1)")
    c.add_argument("--family", choices=["sd15", "sdxl"], required=True, help="the base model family it was trained for")
    c.add_argument("--base-model", default=None, help="name of the base model it was trained for")
    c.add_argument("--out", type=Path, required=True)
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


def _train(args) -> int:
    from spo.spm.train import SPM_DIR, TrainConfig, train

    if args.out.exists() and not args.out.is_dir():
        raise SpoInputError(f"{args.out} exists and is not a directory")
    cfg = TrainConfig(data=[str(p) for p in args.data], out=str(args.out), base=args.base, init=args.init,
                      time_conditioning=args.time_conditioning, steps=args.steps, batch_size=args.batch_size,
                      grad_accum=args.grad_accum, lr=args.lr, weight_decay=args.weight_decay, warmup=args.warmup,
                      lr_schedule=args.lr_schedule,
                      max_grad_norm=args.max_grad_norm, max_t=args.max_t, cfg_scale=args.cfg,
                      mixed_precision=args.mixed_precision, gradient_checkpointing=args.gradient_checkpointing,
                      seed=args.seed, checkpoint_every=args.checkpoint_every, keep_checkpoints=args.keep_checkpoints,
                      resume=args.resume, relabel_with=args.relabel_with, relabel_threshold=args.relabel_threshold,
                      cpu=args.cpu, log_every=args.log_every, progress=args.progress)
    result = train(cfg)
    loss = result["final_loss_mean_last_10"]  # None when a resumed run had no steps left (killed while saving)
    print(f"trained {result['family']} SPM for {result['steps']} steps on {result['pairs']} pairs "
          f"(last-10 loss {'n/a' if loss is None else f'{loss:.4f}'}) -> {args.out / SPM_DIR}")
    return 0


def _eval(args) -> int:
    from spo.io import check_output_dir
    from spo.spm.evaluate import evaluate, format_table, plot_accuracy

    check_output_dir(args.out)  # fail early, but create it only once there is a result to write
    result = evaluate(args.spm, args.data, base=args.base, timesteps=args.timesteps, min_judge_gap=args.min_judge_gap,
                      seed=args.seed, batch_size=args.batch_size, cfg_scale=args.cfg, limit=args.limit,
                      progress=args.progress, against=args.against, same_judge_alignment=args.same_judge_alignment)
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

    base = args.base or "toy:sd15"
    toy = base.startswith("toy:")
    bad = [s for s in args.at_steps if not 0 <= s < args.num_steps]
    if bad or not args.at_steps:
        raise SpoInputError(f"--at-steps must be in [0, {args.num_steps}), got {bad or 'none'}")
    if args.eta < 0:
        raise SpoInputError(f"--eta must be >= 0, got {args.eta}")
    if args.k < 2:
        raise SpoInputError(f"--k must be at least 2 to have siblings, got {args.k}")
    if args.reference is None and not toy:
        raise SpoInputError("give --reference: the clean-image scorer the finished candidates are judged by "
                            "(a CLIP folder such as PickScore_v1, an SPM folder, or package.module:function)")
    if args.prompts:
        from spo.data.prompts import load_prompts

        prompts = list(load_prompts(args.prompts, args.prompt_column))[:args.num_prompts]
    elif toy:
        from spo.toy.world import sample_scenes

        prompts = [s.caption for s in sample_scenes(args.num_prompts, args.seed + 4321, split="heldout")]
    else:
        raise SpoInputError("give --prompts FILE (the toy's held-out captions are only the default for toy bases)")
    if not prompts:
        raise SpoInputError(f"{args.prompts}: no prompts")
    check_output_dir(args.out)
    import torch

    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    pipe = load_pipeline(base)
    freeze(pipe)
    pipe.to(device)
    family = family_of(pipe)

    scorers = {}
    for spec in args.preference:
        scorer = load_scorer(spec, family=family, device=device)
        scorers[model_name(spec, scorer) if find_spm_dir(spec) else spec] = scorer
    reference = args.reference or "spo.toy.judge:aesthetic_preference"
    references = {reference: load_scorer(reference, device=device)}
    if toy:  # the toy judge can also say what the pick costs in alignment
        references.setdefault("spo.toy.judge:alignment_preference", load_scorer("spo.toy.judge:alignment_preference"))
    result = sibling_agreement(pipe, scorers, references, prompts, k=args.k, steps=args.at_steps,
                               num_steps=args.num_steps, cfg=args.cfg, eta=args.eta, seed=args.seed,
                               batch=args.batch_size, progress=args.progress)
    result.update(base_model=base, family=family, prompts=args.prompts or "toy held-out captions")
    return _publish(args.out, "siblings", result, plot_siblings, format_table(result))


def _convert(args) -> int:
    from spo.spm.model import StepAwarePreferenceModel

    spm = StepAwarePreferenceModel.from_official(args.checkpoint, args.clip, allow_pickle=args.allow_pickle,
                                                 family=args.family, base_model=args.base_model,
                                                 training={"converted_from": str(args.checkpoint)})
    spm.save(args.out)
    print(f"converted {args.checkpoint} ({args.family}) -> {args.out}")
    return 0
