"""`python benchmarks/run.py vpred-toy`: SPO on a v-prediction model does what it does on an epsilon one.

The shipped epsilon SD1.5 toy is converted to velocity prediction by the project's own builder
(`spo toy build --continue-from ... --prediction-type v_prediction`: UNet and text encoder fine-tuned on the
v target, as SD 2.0-v was made from SD 2.0; its scheduler config then says v_prediction, which `spo train`
detects). The same short `spo train` runs on both toys with the shipped toy SPM as the preference; both are
judged base vs LoRA on held-out captions with the same seeds: the SPM's score of the final images (t = 0, what
SPO optimises) and the toy judge's aesthetic and alignment (independent of the SPM).
"""

from __future__ import annotations

import json
from pathlib import Path


def _train(base: str, out: Path, prompts: Path, spm: Path, args, run_child) -> None:
    if (out / "lora").is_dir():
        return  # reuse a finished run in the work folder
    run_child(["spo", "train", "--base", base, "--prompts", str(prompts), "--preference", str(spm),
               "--epochs", str(args.epochs), "--max-prompts", str(args.max_prompts), "--seed", str(args.seed),
               "--out", str(out), "--no-report", "--no-evaluate"])


def _judge(base: str, lora: Path, spm: Path, n: int, seed: int) -> dict:
    """Paired base / LoRA figures on n held-out captions (same seed per image)."""
    import numpy as np
    import torch

    from spo.images import images_to_tensor
    from spo.models.loading import load_pipeline
    from spo.models.prediction import parameterisation
    from spo.spm.scoring import load_scorer, score_images
    from spo.stats import mean_half_width
    from spo.toy.sampling import judge_images, sample
    from spo.toy.world import sample_scenes

    torch.set_flush_denormal(True)
    prompts = [s.caption for s in sample_scenes(n, seed=seed + 77, split="heldout")]
    scorer = load_scorer(spm, family="sd15")
    pipe = load_pipeline(base)
    arms = {}
    for name in ("base", "lora"):
        if name == "lora":
            pipe.load_lora_weights(str(lora), weight_name="pytorch_lora_weights.safetensors", adapter_name="spo")
        images = sample(pipe, prompts, seed=seed)
        with torch.no_grad():
            spm_scores = score_images(scorer, images_to_tensor(images), prompts, torch.zeros(n, dtype=torch.long))
        judged = judge_images(images, prompts)["per_image"]
        arms[name] = {"spm": spm_scores.numpy().astype(np.float64), "aesthetic": np.asarray(judged["aesthetic"]),
                      "alignment": np.asarray(judged["alignment"])}
    b, a = arms["base"], arms["lora"]
    d_spm, d_aes = a["spm"] - b["spm"], a["aesthetic"] - b["aesthetic"]
    return {"prediction_type": parameterisation(pipe).prediction_type, "n": n,
            "judge_aesthetic_base": float(b["aesthetic"].mean()), "judge_alignment_base": float(b["alignment"].mean()),
            "spm_score_base": float(b["spm"].mean()), "spm_score_lora": float(a["spm"].mean()),
            "spm_gain": float(d_spm.mean()), "spm_gain_ci95": mean_half_width(d_spm),
            "spm_gain_in_base_std": float(d_spm.mean() / b["spm"].std(ddof=1)),
            "judge_aesthetic_gain_in_base_std": float(d_aes.mean() / b["aesthetic"].std(ddof=1)),
            "judge_aesthetic_gain_ci95_in_base_std": mean_half_width(d_aes) / float(b["aesthetic"].std(ddof=1)),
            "alignment_change_points": float(100 * (a["alignment"].mean() - b["alignment"].mean()))}


def vpred_toy(args, run_child) -> dict:
    from spo.io import write_json
    from spo.sources import get
    from spo.toy.defaults import TOY_MODEL_DIR, TOY_SPM_DIR

    work = Path(args.work)
    models = work / "models"
    build_cmd = ["spo", "toy", "build", "--family", "sd15", "--continue-from", str(TOY_MODEL_DIR),
                 "--prediction-type", "v_prediction", "--unet-steps", str(args.unet_steps), "--decoder-steps", "0",
                 "--images", str(args.images), "--seed", str(args.seed), "--out", str(models)]
    if not (models / "sd15" / "model_index.json").is_file():
        run_child(build_cmd)
    build_info = json.loads((models / "sd15" / "build_info.json").read_text())
    prompts = work / "prompts.json"
    write_json(prompts, get("toy:sd15").training_prompts(args.seed))
    spm = TOY_SPM_DIR / "sd15"
    arms = {"epsilon": "toy:sd15", "v_prediction": str(models / "sd15")}
    results = {}
    for name, base in arms.items():
        _train(base, work / name, prompts, spm, args, run_child)
        results[name] = _judge(base, work / name / "lora", spm, args.n, args.seed)
        summary = json.loads((work / name / "lora" / "training_summary.json").read_text())
        results[name].update(train_seconds=summary["seconds"], optimizer_steps=summary["steps"])
    return {"conversion": " ".join(build_cmd), "conversion_seconds": build_info.get("sd15_unet_seconds"),
            "spo_command": f"spo train --base BASE --prompts {prompts} --preference {spm} --epochs {args.epochs} "
                           f"--max-prompts {args.max_prompts} --seed {args.seed} (toy-sd15 preset otherwise)",
            "arms": results,
            "reading": "spm_gain: the shipped toy SPM's score (t = 0) of base + LoRA minus base, same seeds; the "
                       "judge's aesthetic is independent of the SPM"}
