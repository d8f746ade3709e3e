"""`spo plan`: will this `spo train` fit my GPU, and how long will it take? Answered before the run, without
loading the model: every phase is traced on meta tensors (spo.plan)."""

from __future__ import annotations

import argparse
import json

from spo.cli.argtypes import positive_int


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from spo.train.config import add_arguments as add_config_arguments

    add_config_arguments(parser)
    parser.add_argument("--spm", default="", help="the SPM that judges (an SPM or CLIP folder; default: --preference "
                                                  "when it is an SPM folder, a built-in base's own, else CLIP-ViT-H-14)")
    parser.add_argument("--gpu-memory", type=float, default=None, metavar="GIB",
                        help="suggest the cheapest memory options that fit this much accelerator memory")
    parser.add_argument("--utilisation", type=float, default=None, help="share of a GPU's peak bf16 FLOP/s reached "
                                                                         "(default: 0.35)")
    parser.add_argument("--processes", type=positive_int, default=1, help="GPUs of the run (accelerate launch)")
    parser.add_argument("--prompt-count", type=positive_int, default=None,
                        help="prompts per epoch (default: --max-prompts, the prompts file's, a built-in base's, or "
                             "4000 as the paper's SD1.5 run)")
    parser.add_argument("--spm-batch", type=positive_int, default=16,
                        help="pairs per batch of the SPM training step also planned (`spo spm train`; default: "
                             "%(default)s, the spm-sd15 / spm-sdxl presets')")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")


def _prompt_count(cfg, given: int | None) -> int:
    from spo import sources

    if given:
        return given
    if cfg.max_prompts:
        return cfg.max_prompts
    if cfg.prompts:
        from spo.data.prompts import load_prompts

        return len(list(load_prompts(cfg.prompts, cfg.prompt_column or None)))
    source = sources.get(cfg.base) if cfg.base else sources.default()
    return len(source.training_prompts(cfg.seed)) if source is not None else 4000


def _text(result: dict, cfg, fitting: dict | None, budget: float | None, utilisation: float) -> str:
    from spo.plan.estimate import GIB, peak, times

    gib = lambda b: f"{b / GIB:.2f}"  # noqa: E731
    w = result["weights"]
    lines = [f"spo plan: {result['family']} at {result['resolution']} px, precision {result['precision']}, "
             f"{result['trained_parameters'] / 1e6:.3g} M trained parameters; SPM: {result['spm']}",
             "weights (GiB): " + ", ".join(f"{k} {gib(v)}" for k, v in w.items()),
             f"options: gradient checkpointing {'on' if cfg.gradient_checkpointing else 'off'}, judge batch "
             f"{result['phases']['judging']['rows']}, training micro-batch {result['phases']['training']['rows']} "
             f"UNet rows, VAE decode in {'fp32 (not fp16-safe)' if result['upcast_vae'] else 'the run precision'}",
             f"{'phase':10} {'rows':>5} {'activations GiB':>16} {'peak GiB':>9}"]
    for name, ph in result["phases"].items():
        lines.append(f"{name:10} {ph['rows']:>5} {gib(ph['activations']):>16} {gib(ph['peak']):>9}")
    where, top = peak(result)
    c = result["counts"]
    lines.append(f"peak: {gib(top)} GiB in {where}")
    lines.append(f"one iteration ({result['processes']} process(es)): {result['flops_per_iteration'] / 1e12:.1f} TFLOP "
                 f"({c['unet_rows']} UNet CFG rows, {c['decoded']} decoded candidates and {c['transitions']} "
                 f"transitions per process, all kept); {result['iterations_per_epoch']} iterations per epoch")
    for gpu, t in times(result, utilisation).items():
        fits = "fits" if top <= t["memory_gib"] * GIB else "does not fit"
        lines.append(f"  {gpu:10} {t['seconds_per_iteration']:8.3g} s/iteration {t['hours_per_epoch']:7.3g} h/epoch "
                     f"at {utilisation:.0%} of peak bf16 ({t['memory_gib']:.0f} GiB: {fits})")
    spm = result.get("spm_training")
    if spm:
        lines.append(f"SPM training step (`spo spm train`, {spm['pairs']} pairs per batch, AdamW, fp32 master weights "
                     f"of {spm['spm_parameters'] / 1e6:.4g} M parameters): peak {gib(spm['peak'])} GiB, of which "
                     f"activations {gib(spm['activations'])}, SPM weights + gradients + AdamW "
                     f"{gib(sum(spm['weights'][k] for k in ('spm (fp32)', 'spm gradients', 'optimizer state')))}")
        flags = {"adafactor": "--optimizer adafactor",
                 "adafactor, fused backward pass": "--optimizer adafactor --fused-backward-pass",
                 "adafactor, fused backward pass, --full-bf16": "the same with --full-bf16"}
        lines.append("  with " + "; ".join(f"{flag}: {gib(spm['options'][name])} GiB" for name, flag in flags.items()))
    if budget is not None:
        if fitting is None:
            lines.append(f"nothing fits {budget:g} GiB with judge batch, micro-batch and gradient checkpointing: "
                         f"lower --sample-batch-size or --resolution, or use a larger GPU")
        else:
            flags = (f"--judge-batch {fitting['judge_batch']} --train-micro-batch {fitting['train_micro_batch']}"
                     + (" --gradient-checkpointing true" if fitting["gradient_checkpointing"] else ""))
            lines.append(f"fits {budget:g} GiB ({gib(fitting['peak'])} GiB peak) with: {flags}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from spo.cli.train_cmd import resolved_config
    from spo.errors import SpoInputError
    from spo.plan.estimate import DEFAULT_UTILISATION, plan, plan_spm_training, suggest, times
    from spo.models.family import latent_side
    from spo.plan.meta import meta_models
    from spo.train.config import SPOConfig

    cfg = resolved_config(args, SPOConfig)  # the settings `spo train` would run with (--print-config prints them)
    if cfg is None:
        return 0
    utilisation = DEFAULT_UTILISATION if args.utilisation is None else args.utilisation
    if not 0 < utilisation <= 1:
        raise SpoInputError(f"--utilisation {utilisation}: give a share of peak in (0, 1]")
    if args.gpu_memory is not None and args.gpu_memory <= 0:
        raise SpoInputError(f"--gpu-memory {args.gpu_memory}: give the accelerator memory in GiB")
    models = meta_models(cfg.base, cfg, args.spm or cfg.preference)
    side = cfg.resolution or models.resolution
    latent_side(side, 2 ** (len(models.vae.config.block_out_channels) - 1), "--resolution")
    result = plan(models, cfg, side, _prompt_count(cfg, args.prompt_count), args.processes)
    result["spm_training"] = plan_spm_training(models, side, args.spm_batch, cfg.cfg_scale)
    fitting = suggest(models, cfg, result, args.gpu_memory, side) if args.gpu_memory is not None else None
    if args.json:
        out = {k: v for k, v in result.items() if k != "fits"}
        out.update(utilisation=utilisation, gpus=times(result, utilisation), gpu_memory_gib=args.gpu_memory,
                   suggestion=fitting)
        print(json.dumps(out, indent=1))
    else:
        print(_text(result, cfg, fitting, args.gpu_memory, utilisation))
    return 0
