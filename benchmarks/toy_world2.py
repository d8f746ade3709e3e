"""Toy world 2's checks (issue 23), on a world-2 toy pipeline folder (`spo toy build --world 2`).

`python benchmarks/run.py toy-headroom --model DIR`: can the model show what SPO is for at all?

Measured on a world-2 toy pipeline folder (`spo toy build --world 2`), before any SPM or LoRA is trained on it,
with world 2's aesthetic (`spo.toy.judge_detail.aesthetic`: the judge's defect terms and its detail terms):

- base samples: 256 held-out captions, DDIM 20 steps, CFG 5 (SPO's evaluation setting): aesthetic mean and std
  (the "base std" every gain is measured in) and the judge's alignment;
- the VAE round trip of 400 clean held-out renders (no defect, fine detail): the share of their aesthetic margin
  over the base samples that survives encoding and decoding (bar: >= 80 %);
- headroom, with the project's own tool: `spo spm siblings` with the aesthetic as both preference and reference,
  4 siblings per branching on 64 held-out captions; the reference's best minus worst of the finished siblings at
  each branching step, in base std (bar: >= 0.5 at the presets' divert step and the middle steps after it).

`python benchmarks/run.py toy-oracle --model DIR`: a first look at the oracle arm of deliverable 3. `spo train` with
the toy preset and world 2's aesthetic (or, `--preference spo.toy.judge_detail:preference`, the rater's utility) as
SPO's preference (the judge itself: what a perfect preference gains),
then base and base + LoRA on --n held-out captions with the same seeds, judged by world 2's aesthetic and the judge's
alignment (bar for the full measurement: >= 0.5 base std, alignment drop <= 2 points).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

SCORER = "spo.toy.judge_detail:aesthetic_preference"
LAST_MIDDLE_STEP = 14  # of 20: after it (t < 251) little is left open on real models either


def add_arguments(parser) -> None:
    parser.add_argument("--model", required=True, help="a world-2 toy pipeline folder")
    parser.add_argument("--tag", default="", help="suffix of the result file")
    parser.add_argument("--n-base", type=int, default=256, help="held-out base samples for the base std")
    parser.add_argument("--n-renders", type=int, default=400, help="clean held-out renders round-tripped")
    parser.add_argument("--n-siblings", type=int, default=64, help="held-out captions branched")
    parser.add_argument("--at-steps", default="0,2,4,10,14,18")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", default="outputs/bench-toy-headroom")


def _divert_step() -> int:
    """The earliest divert step of the presets the bar speaks of (sd15, sdxl, toy-sdxl: 4; toy-sd15: 10)."""
    from spo.train.config import build_config

    return min(build_config(p).divert_start_step for p in ("sd15", "sdxl", "toy-sd15", "toy-sdxl"))


def _round_trip(vae, n: int, base_mean: float) -> dict:
    import torch

    from spo.images import images_to_tensor, tensor_to_images
    from spo.toy.detail import FINE
    from spo.toy.judge_detail import aesthetic
    from spo.toy.render import CLEAN, render
    from spo.toy.world import sample_scenes

    clean = [render(s, CLEAN, seed=i, details=FINE) for i, s in enumerate(sample_scenes(n, 99, "heldout"))]
    x = images_to_tensor(clean)
    with torch.no_grad():
        back = tensor_to_images(vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1))
    a0 = np.array([aesthetic(im) for im in clean])
    a1 = np.array([aesthetic(im) for im in back])
    mse = float(((images_to_tensor(back) - x) ** 2).mean())
    return {"n": n, "clean_aesthetic": float(a0.mean()), "round_trip_aesthetic": float(a1.mean()),
            "psnr_db": float(10 * np.log10(4 / mse)),
            "margin_kept": float((a1.mean() - base_mean) / (a0.mean() - base_mean)), "bar": 0.8}


def toy_headroom(args, run_child) -> dict:
    import torch

    from spo.io import save_image, write_json
    from spo.models.loading import load_pipeline
    from spo.show.grid import image_grid
    from spo.toy.evaluate import evaluate_pipeline
    from spo.toy.judge_detail import aesthetic
    from spo.toy.world import sample_scenes

    torch.manual_seed(args.seed)
    work = Path(args.work) / (args.tag or Path(args.model).name)
    work.mkdir(parents=True, exist_ok=True)
    pipe = load_pipeline(args.model)
    scores, images = evaluate_pipeline(pipe, args.n_base, args.seed, aesthetic=aesthetic)
    base = {k: scores[k] for k in ("n", "aesthetic_mean", "aesthetic_std", "alignment")}
    save_image(image_grid(images[:64], cols=8, scale=4), work / "base_samples.png")
    trip = _round_trip(pipe.vae, args.n_renders, base["aesthetic_mean"])
    prompts = work / "heldout_captions.json"
    write_json(prompts, [s.caption for s in sample_scenes(args.n_siblings, 7, "heldout")])
    run_child(["spo", "spm", "siblings", SCORER, "--base", args.model, "--reference", SCORER, "--prompts", str(prompts),
               "-n", str(args.n_siblings), "--k", "4", "--at-steps", args.at_steps, "--seed", str(args.seed),
               "--out", str(work / "siblings"), "--no-progress"])
    rows = json.loads((work / "siblings" / "siblings.json").read_text())["rows"]
    sd = base["aesthetic_std"]
    steps = [{"step": r["step"], "t": r["t"], "headroom": r["headroom_best_minus_worst"],
              "headroom_in_base_std": r["headroom_best_minus_worst"] / sd,
              "oracle_pick_agreement": r["scorers"][SCORER]["agreement"]} for r in rows]
    middle = [s for s in steps if _divert_step() <= s["step"] <= LAST_MIDDLE_STEP]
    return {"model": args.model, "base_samples": base, "round_trip": trip, "siblings": steps,
            "bars": {"round_trip_margin_kept_ge_0.8": trip["margin_kept"] >= 0.8,
                     "headroom_ge_0.5_base_std_divert_to_middle": all(s["headroom_in_base_std"] >= 0.5 for s in middle)},
            "pictures": str(work / "base_samples.png"), "siblings_picture": str(work / "siblings" / "siblings.png")}


def toy_oracle(args, run_child) -> dict:
    import torch

    from spo.io import save_image, write_json
    from spo.models.loading import load_pipeline
    from spo.show.grid import image_grid
    from spo.stats import mean_half_width, win_fractions
    from spo.toy.evaluate import evaluate_pipeline
    from spo.toy.judge_detail import aesthetic
    from spo.toy.world import sample_scenes

    torch.manual_seed(args.seed)
    work = Path(args.work) / (args.tag or Path(args.model).name)
    prompts = work / "train_captions.json"
    work.mkdir(parents=True, exist_ok=True)
    write_json(prompts, [s.caption for s in sample_scenes(args.max_prompts, args.seed, "train")])
    train = ["spo", "train", "--preset", args.preset, "--base", args.model, "--preference", args.preference,
             "--prompts", str(prompts), "--max-prompts", str(args.max_prompts), "--epochs", str(args.epochs),
             "--seed", str(args.seed), "--out", str(work / "spo"), "--no-report", "--no-evaluate", *args.spo_args.split()]
    if not (work / "spo" / "lora").is_dir():
        _, train_s, train_mb = run_child(train)
    else:
        train_s, train_mb = None, None
    pipe = load_pipeline(args.model)
    arms = {}
    for name in ("base", "lora"):
        if name == "lora":
            pipe.load_lora_weights(str(work / "spo" / "lora"), weight_name="pytorch_lora_weights.safetensors")
        scores, images = evaluate_pipeline(pipe, args.n, args.seed, aesthetic=aesthetic)
        arms[name] = (np.asarray(scores["per_image"]["aesthetic"]), np.asarray(scores["per_image"]["alignment"]), images)
    (a0, l0, im0), (a1, l1, im1) = arms["base"], arms["lora"]
    save_image(image_grid([im for ab in zip(im0[:32], im1[:32]) for im in ab], cols=8, scale=4), work / "before_after.png")
    sd = float(a0.std(ddof=1))
    return {"model": args.model, "spo_command": " ".join(train), "train_seconds": train_s, "train_peak_rss_mb": train_mb,
            "n": args.n, "base_aesthetic": float(a0.mean()), "base_std": sd, "base_alignment": float(l0.mean()),
            "gain_in_base_std": float((a1 - a0).mean() / sd), "gain_ci95_in_base_std": mean_half_width(a1 - a0) / sd,
            "win_rate": float(win_fractions(a1, a0).mean()),  # ties count one half
            "alignment_change_points": float(100 * (l1.mean() - l0.mean())),
            "alignment_change_ci95_points": 100 * mean_half_width(l1 - l0),
            "picture": str(work / "before_after.png"),
            "bars": {"gain_ge_0.5_base_std": bool((a1 - a0).mean() / sd >= 0.5),
                     "alignment_drop_le_2_points": bool(100 * (l1.mean() - l0.mean()) >= -2)}}


def add_oracle_arguments(parser) -> None:
    parser.add_argument("--model", required=True, help="a world-2 toy pipeline folder")
    parser.add_argument("--tag", default="", help="suffix of the result file")
    parser.add_argument("--preset", default="toy-sd15")
    parser.add_argument("--preference", default=SCORER,
                        help="SPO's preference: world 2's aesthetic (default) or spo.toy.judge_detail:preference "
                             "(the rater's utility: 2 x alignment + aesthetic)")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--max-prompts", type=int, default=80, help="training captions (the toy default's 80)")
    parser.add_argument("--spo-args", default="", help="more `spo train` flags")
    parser.add_argument("--n", type=int, default=512, help="held-out images per arm")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", default="outputs/bench-toy-oracle")
