"""`python benchmarks/run.py plan-presets`: what `spo plan` predicts for the paper presets (sd15 at 512 px, sdxl
at 1024 px, 4,000 prompts, one GPU) and the cheapest memory options for 24, 48 and 80 GiB cards."""

from __future__ import annotations

import time


def plan_presets(args) -> dict:
    from spo.plan.estimate import GIB, plan, suggest, times
    from spo.plan.meta import meta_models
    from spo.train.config import build_config

    out = {}
    for preset in args.presets:
        started = time.time()
        cfg = build_config(preset)
        models = meta_models(preset, cfg)  # the family's real-size architecture from the shipped configs
        side = models.resolution
        result = plan(models, cfg, side, args.prompts)
        fits = {gib: suggest(models, cfg, result, gib, side) for gib in (24, 48, 80)}
        out[preset] = {
            "resolution": side, "weights_gib": {k: v / GIB for k, v in result["weights"].items()},
            "phases_gib": {k: {"rows": v["rows"], "activations": v["activations"] / GIB, "peak": v["peak"] / GIB}
                           for k, v in result["phases"].items()},
            "tflop_per_iteration": result["flops_per_iteration"] / 1e12, "counts": result["counts"],
            "iterations_per_epoch": result["iterations_per_epoch"],
            "seconds_per_iteration_at_35pct": {g: t["seconds_per_iteration"] for g, t in times(result).items()},
            "fits": {str(g): (None if f is None else {**f, "peak": f["peak"] / GIB}) for g, f in fits.items()},
            "plan_seconds_on_this_cpu": round(time.time() - started, 1)}
    return {"presets": out, "prompts": args.prompts,
            "equivalent_command": "spo plan --preset P --base P --gpu-memory G",
            "note": "predicted on meta tensors; not yet checked against a GPU run (none lent)"}
