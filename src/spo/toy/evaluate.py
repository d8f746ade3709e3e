"""Judge a toy model before and after post-training: same held-out captions, same seeds, >= 256 images per arm."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def evaluate_pipeline(pipe, n: int, seed: int, split: str = "heldout", aesthetic=None) -> tuple[dict, list]:
    """(judge figures, images) of `n` samples on the split's captions; `aesthetic` as in `judge_images`."""
    from spo.toy.sampling import judge_images, sample
    from spo.toy.world import sample_scenes

    prompts = [s.caption for s in sample_scenes(n, seed=seed + 77, split=split)]
    images = sample(pipe, prompts, seed=seed)
    return judge_images(images, prompts, aesthetic), images


def before_after(base: str, lora: str | Path, n: int = 256, seed: int = 0, out: str | Path | None = None,
                 strength: float = 1.0) -> dict:
    """Judge figures of the base and of base + LoRA; the gain is in units of the base's per-image std."""
    from spo.io import save_image, write_json
    from spo.models.loading import load_pipeline
    from spo.show.grid import image_grid
    from spo.stats import mean_half_width, proportion_interval, win_fractions

    pipe = load_pipeline(base)
    before, images_before = evaluate_pipeline(pipe, n, seed)
    pipe.load_lora_weights(str(Path(lora).parent), weight_name=Path(lora).name, adapter_name="spo")
    pipe.set_adapters(["spo"], adapter_weights=[strength])
    after, images_after = evaluate_pipeline(pipe, n, seed)
    a0 = np.asarray(before["per_image"]["aesthetic"])
    a1 = np.asarray(after["per_image"]["aesthetic"])
    diff = a1 - a0
    wins = proportion_interval(win_fractions(a1, a0))
    gain_sd = float(diff.mean() / a0.std(ddof=1)) if a0.std(ddof=1) > 0 else 0.0
    report = {
        "base": base, "lora": str(lora), "n": n, "seed": seed, "strength": strength,
        "aesthetic_before": before["aesthetic_mean"], "aesthetic_after": after["aesthetic_mean"],
        "aesthetic_gain": float(diff.mean()), "aesthetic_gain_ci95": mean_half_width(diff),  # spo.stats
        "aesthetic_gain_in_base_std": gain_sd,
        "win_rate": wins.estimate, "win_rate_ci95": wins.as_pair(),  # ties count one half (spo.stats)
        "alignment_before": before["alignment"], "alignment_after": after["alignment"],
        "alignment_change_points": 100 * (after["alignment"] - before["alignment"]),
    }
    report["text"] = (
        f"judge on {n} held-out captions, same seeds: aesthetic {report['aesthetic_before']:.3f} -> "
        f"{report['aesthetic_after']:.3f} ({gain_sd:+.2f} base std, 95% CI of gain ±{report['aesthetic_gain_ci95']:.3f}, "
        f"win rate {100 * wins.estimate:.0f}% [{100 * wins.low:.0f}, {100 * wins.high:.0f}]), "
        f"alignment {100 * before['alignment']:.1f}% -> "
        f"{100 * after['alignment']:.1f}%")
    if out is not None:
        out = Path(out)
        write_json(out / "before_after.json", report)
        pairs = [im for ab in zip(images_before[:32], images_after[:32]) for im in ab]
        save_image(image_grid(pairs, cols=8, scale=4), out / "before_after.png")
    return report
