"""`spo sweep`: labelled side-by-side grids over LoRA strength, denoise, seed, sampler, steps, CFG."""

from __future__ import annotations

import argparse
from pathlib import Path


def _list(kind):
    """nargs='+' values, each possibly comma-separated: `--strengths -1 0 0.5` or `--strengths=-1,0,0.5`."""
    def convert(text: str):
        try:
            return [kind(t) for t in text.split(",") if t.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {kind.__name__} values, got {text!r}") from None
    return convert


def _numbers(text: str):
    """Like _list(float), finite numbers only: `--strengths 0 nan` is refused while parsing."""
    from spo.cli.argtypes import finite_float

    return [finite_float(t) for t in text.split(",") if t.strip()]


def _flat(lists):
    return [v for item in (lists or []) for v in item] or None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from spo.cli.argtypes import finite_float as _float
    from spo.cli.generate_cmd import add_common_arguments
    from spo.show.sweep import AXES, DEFAULT_MAX_ALIGNMENT_DROP, DEFAULT_STRENGTHS, MAX_STRENGTH

    add_common_arguments(parser)
    parser.add_argument("--denoise", type=_float, default=None, help="img2img denoise when it is not swept (default 0.75)")
    parser.add_argument("-x", "--x", dest="x_axis", choices=AXES, default="strength", help="columns (default: %(default)s)")
    parser.add_argument("-y", "--y", dest="y_axis", choices=AXES, default="seed", help="rows (default: %(default)s)")
    parser.add_argument("--strengths", type=_numbers, nargs="+", default=None,
                        help=f"strengths of the swept LoRA, finite and within ±{MAX_STRENGTH:g} (default: "
                             f"{' '.join(f'{s:g}' for s in DEFAULT_STRENGTHS)}); 0 is added when the cells are scored")
    parser.add_argument("--sweep-lora", type=int, default=1, help="which --lora the strengths apply to (1 = the first)")
    parser.add_argument("--denoises", type=_numbers, nargs="+", default=None, help="img2img denoise values")
    parser.add_argument("--seeds", type=_list(int), nargs="+", default=None, help="seeds (default: 0 1 2 3)")
    parser.add_argument("--schedulers", type=_list(str), nargs="+", default=None, help="samplers by name")
    parser.add_argument("--steps-list", type=_list(int), nargs="+", default=None, help="step counts")
    parser.add_argument("--cfgs", type=_numbers, nargs="+", default=None, help="CFG scales")
    parser.add_argument("--score", default=None, metavar="judge|SPM_DIR|CLIP_DIR|module:function|none",
                        help="score every cell (at t = 0), plot score vs strength and suggest strengths (default: "
                             "the model source's reference scorer, e.g. the built-in toy models' judge; none for a checkpoint path)")
    parser.add_argument("--max-alignment-drop", type=_float, default=DEFAULT_MAX_ALIGNMENT_DROP, metavar="POINTS",
                        help="a suggested strength loses at most this many alignment points against strength 0 "
                             "(mean over the same seeds; default: %(default)s)")
    parser.add_argument("--tolerance", type=_float, default=None, help=argparse.SUPPRESS)  # the old rule: ignored, said so
    parser.add_argument("--out", type=Path, default=Path("outputs/sweep"), help="output folder: grid, cells, scores, suggestion (default: %(default)s)")


def comparison_line(c: dict) -> str:
    """One strength against strength 0: the score difference and the alignment change, each with its paired 95 %
    interval (the rule uses the alignment mean; its interval says how far the mean can be trusted)."""
    align = (f"; alignment {c['alignment_change_points']:+.1f} points [{c['alignment_ci95_points'][0]:+.1f}, "
             f"{c['alignment_ci95_points'][1]:+.1f}]" if "alignment_change_points" in c else "")
    return (f"  strength {c['strength']:g} vs 0: {c['difference']:+.4g} [{c['ci95'][0]:+.4g}, {c['ci95'][1]:+.4g}], "
            f"{c['wins']} wins of {c['n']}{align}{'  *' if c['significant'] else ''}")


def run(args: argparse.Namespace) -> int:
    import sys

    from spo.cli.generate_cmd import check_rescale, collect_prompts
    from spo.show.generate import Settings, check_scheduler, parse_lora
    from spo.show.sweep import sweep

    if args.tolerance is not None:
        print("spo sweep: --tolerance no longer applies (the suggestion compares each strength with 0 on the same "
              "seeds); ignored", file=sys.stderr)
    loras = [parse_lora(text) for text in args.lora]
    prompts = collect_prompts(args)
    settings = Settings(steps=args.steps, cfg=args.cfg, scheduler=check_scheduler(args.scheduler), width=args.width,
                        height=args.height, negative_prompt=args.negative_prompt, denoise=args.denoise,
                        prediction_type=args.prediction_type, guidance_rescale=check_rescale(args.guidance_rescale),
                        dtype=args.dtype)
    values = {"strength": _flat(args.strengths), "denoise": _flat(args.denoises),
              "seed": _flat(args.seeds) or ([args.seed + i for i in range(4)] if "seed" in (args.x_axis, args.y_axis)
                                            else [args.seed]),
              "scheduler": _flat(args.schedulers), "steps": _flat(args.steps_list), "cfg": _flat(args.cfgs)}
    result = sweep(args.model, prompts, args.out, loras=loras, values=values, x=args.x_axis, y=args.y_axis,
                   settings=settings, init_image=args.init_image, lora_index=args.sweep_lora - 1, score=args.score,
                   family=args.family, max_alignment_drop=args.max_alignment_drop, batch=args.batch, vae=args.vae)
    print(f"{len(result['pages'])} grid page(s), {len(result['cells'])} cells -> {args.out / result['pages'][0]['file']}")
    suggestion = result.get("suggestion")
    if suggestion:
        for c in suggestion["comparisons"]:
            print(comparison_line(c))
        print(suggestion["text"])
    elif result.get("suggestion_note"):
        print(result["suggestion_note"])
    if result.get("plot"):
        print(f"plot: {args.out / result['plot']}")
    return 0
