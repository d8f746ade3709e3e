"""`python benchmarks/run.py fullsize --family {sd15,sdxl}`: every user command on a real-size model, on CPU.

No weights can be downloaded here, so the models are the project's random-weight stand-ins at the real sizes
(`spo dev random-checkpoint`: the original single-file layout users have; `spo dev random-clip`: CLIP-ViT-H-14,
the PickScore architecture the SPMs start from). Each command runs as its own process, as a user runs it, with
settings that keep it short (a few steps, one prompt, low resolution where the command has one) and half
precision (bf16) wherever the command offers it. Recorded per command: exit code, wall seconds and the peak
resident memory of that process (`os.wait4`'s ru_maxrss), in benchmarks/results/fullsize-{family}.json.

The figures say whether each command works at full size and what memory it needs on a CPU machine; the random
weights make the images noise, so quality is not measured here.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

# Per family: (the training resolution, the generation resolution) in pixels.
SIZES = {"sd15": (256, 256), "sdxl": (512, 512)}
PROMPTS = ["a lighthouse on a cliff at sunset, oil painting", "a cat sleeping on a windowsill, soft morning light"]
RSS_BAR_GB = {"sd15": 8.0, "sdxl": 20.0}


def add_arguments(parser) -> None:
    parser.add_argument("--family", choices=["sd15", "sdxl"], default="sd15")
    parser.add_argument("--work", default=None, help="scratch folder (default /tmp/spo-fullsize-FAMILY; "
                                                      "SDXL needs about 25 GB)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads per command")
    parser.add_argument("--only", nargs="+", default=None, help="run only these steps (names as in the result file)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder")


def measured(name: str, cmd: list[str], env: dict, log: Path) -> dict:
    """Run `cmd` to its end; its exit code, wall time and peak RSS (this child alone, from wait4)."""
    start = time.time()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
    rc = os.waitstatus_to_exitcode(status)
    row = {"step": name, "command": " ".join(cmd), "rc": rc, "wall_s": round(time.time() - start, 1),
           "peak_rss_gb": round(usage.ru_maxrss / 1024**2, 2)}
    tail = log.read_text(errors="replace").strip().splitlines()[-1:] or [""]
    row["last_line"] = tail[0][-300:]
    print(f"{name:14} rc {rc}  {row['wall_s']:7.1f} s  {row['peak_rss_gb']:6.2f} GB  {row['last_line'][:100]}",
          flush=True)
    return row


def _pairs(path: Path, side: int, n: int = 4, seed: int = 0) -> None:
    """A few Pick-a-Pic-schema pairs of full-size noise images (their content does not matter here)."""
    import io

    import numpy as np
    from PIL import Image

    from spo.data.pickapic import write_pairs

    rng = np.random.default_rng(seed)

    def jpeg() -> bytes:
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(buf, format="JPEG")
        return buf.getvalue()

    rows = [{"caption": PROMPTS[i % len(PROMPTS)], "jpg_0": jpeg(), "jpg_1": jpeg(),
             "label_0": float(i % 2), "label_1": float(1 - i % 2)} for i in range(n)]
    write_pairs(path, rows)


LOAD_LORA = """
import sys, torch
from pathlib import Path
from spo.models.loading import load_pipeline
pipe = load_pipeline(sys.argv[1], dtype=torch.bfloat16)
for path in sys.argv[2:]:
    folder = Path(path).is_dir()  # offline, diffusers needs the file's name inside a folder
    pipe.load_lora_weights(path, weight_name="pytorch_lora_weights.safetensors" if folder else None,
                           adapter_name=path.replace("/", "_").replace(".", "_"))
    lora = [n for n, _ in pipe.unet.named_parameters() if "lora_A" in n]
    assert lora, f"{path}: diffusers loaded no LoRA module"
    print(f"{path}: {len(lora)} LoRA modules on the UNet")
    pipe.unload_lora_weights()
"""


COMPARISONS = ("spm-train-fp32", "spm-train-unfused")


def steps(family: str, w: Path) -> list[tuple[str, list[str]]]:
    """The benchmark's commands, in order (later ones use earlier outputs)."""
    train_side, gen_side = SIZES[family]
    base, other, clip, spm = w / "base.safetensors", w / "other.safetensors", w / "clip-h", w / "spm" / "spm"
    lora, export, prompts = w / "train" / "lora", w / "export", w / "prompts.json"
    webui = export / "spo_lora_webui.safetensors"
    gen = ["--steps", "2", "--width", str(gen_side), "--height", str(gen_side), "--dtype", "bf16", "--batch", "1"]
    return [
        ("checkpoint", ["spo", "dev", "random-checkpoint", "--family", family, "--dtype", "fp16", "--out", str(base)]),
        ("checkpoint-2", ["spo", "dev", "random-checkpoint", "--family", family, "--dtype", "fp16", "--seed", "1",
                          "--out", str(other)]),
        ("clip-h", ["spo", "dev", "random-clip", "--out", str(clip)]),
        # The SPM's full fine-tune of 1.3 B parameters (CLIP-H with time conditioning): Adafactor's factored moments
        # instead of AdamW's two fp32 copies, gradient checkpointing, the fused backward pass (each weight stepped
        # as its gradient completes: no 5 GB of gradients) and bf16 master weights (--full-bf16, stochastic
        # rounding) bring it down; the frozen base model is in bf16. Measured beside it: fp32 master weights (the
        # paper's precision) fused and unfused, the memory each option saves.
        *[(name, ["spo", "spm", "train", "--base", str(base), "--init", str(clip),
                  "--max-train-steps", "2", "--train-batch-size", "2", "--lr-warmup-steps", "0",
                  "--mixed-precision", "bf16", "--gradient-checkpointing", "--optimizer", "adafactor", *options,
                  "--report-to", "none", "--output-dir", str(w / out), str(w / "pairs.parquet")])
          for name, options, out in [("spm-train", ["--fused-backward-pass", "--full-bf16"], "spm"),
                                     ("spm-train-fp32", ["--fused-backward-pass"], "spm-fp32"),
                                     ("spm-train-unfused", [], "spm-unfused")]],
        ("spm-siblings", ["spo", "spm", "siblings", str(spm), "--base", str(base), "--reference", str(clip),
                          "--prompts", str(prompts), "-n", "1", "--k", "2", "--num-steps", "2", "--at-steps", "1",
                          "--batch-size", "1", "--dtype", "bf16", "--no-progress", "--out", str(w / "siblings")]),
        ("train", ["spo", "train", "--preset", family, "--base", str(base), "--preference", str(spm),
                   "--prompts", str(prompts), "--max-prompts", "1", "--sample-batch-size", "1",
                   "--num-steps", "3" if family == "sd15" else "5",  # sdxl: the preset's 3 inner steps need room
                   "--divert-start-step", "1", "--k", "2", "--threshold", "0", "--epochs", "1",
                   "--mixed-precision", "bf16", "--resolution", str(train_side), "--validation-images", "0",
                   "--report-to", "none", "--no-report", "--no-evaluate", "--output-dir", str(w / "train")]),
        ("export", ["spo", "export", str(lora), "--format", "both", "--out", str(export), "--name", "spo_lora"]),
        ("diffusers-load", [sys.executable, "-c", LOAD_LORA, str(base), str(webui), str(export / "spo_lora_diffusers")]),
        ("merge", ["spo", "merge", str(w / "merge.toml")]),
        ("generate", ["spo", "generate", "--model", str(base), "--lora", f"{webui}:1.0", "--prompt", PROMPTS[0],
                      *gen, "--out", str(w / "generate")]),
        ("generate-merged", ["spo", "generate", "--model", str(w / "merged.safetensors"), "--prompt", PROMPTS[0],
                             *gen, "--out", str(w / "generate-merged")]),
        ("sweep", ["spo", "sweep", "--model", str(base), "--lora", str(webui), "--strengths", "0.5", "1",
                   "--prompt", PROMPTS[0], *gen, "--score", "none", "--out", str(w / "sweep")]),
        ("score", ["spo", "score", str(w / "generate"), "--spm", str(spm), "--out", str(w / "scores")]),
    ]


def fullsize(args) -> dict:
    import torch

    family = args.family
    w = Path(args.work or f"/tmp/spo-fullsize-{family}")
    w.mkdir(parents=True, exist_ok=True)
    (w / "logs").mkdir(exist_ok=True)
    (w / "prompts.json").write_text(json.dumps(PROMPTS))
    _pairs(w / "pairs.parquet", 1024 if family == "sdxl" else 512)
    (w / "merge.toml").write_text(  # HotArt-style: two checkpoints weighted, the SPO LoRA baked at 0.333
        'base = "base.safetensors"\noutput = "merged.safetensors"\ndtype = "fp16"\ntitle = "fullsize merge"\n\n'
        '[[checkpoint]]\nmethod = "weighted_sum"\nmodel = "other.safetensors"\nmultiplier = 0.5\n\n'
        '[[lora]]\npath = "export/spo_lora_webui.safetensors"\nstrength = 0.333\n')
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
               TQDM_MININTERVAL="30", HF_HUB_OFFLINE="1")
    rows = []
    for name, cmd in steps(family, w):
        if args.only and name not in args.only:
            continue
        rows.append(measured(name, cmd, env, w / "logs" / f"{name}.log"))
        (w / "rows.json").write_text(json.dumps(rows, indent=1))  # the steps so far, should the run be cut short
    cpu = "AVX-512 BF16" if "avx512_bf16" in Path("/proc/cpuinfo").read_text() else "no AVX-512 BF16"
    result = {"family": family, "threads": args.threads, "torch": torch.__version__, "cpu_bf16": cpu,
              "resolution": {"train": SIZES[family][0], "generate": SIZES[family][1]},
              "rss_bar_gb": RSS_BAR_GB[family], "steps": rows,
              "all_exit_0": all(r["rc"] == 0 for r in rows),
              # the bar is the run's: the fp32-master SPM trainings are the comparison, not steps a user needs
              "peak_rss_gb": max((r["peak_rss_gb"] for r in rows if r["step"] not in COMPARISONS), default=0.0),
              "peak_rss_gb_without_spm_train": max((r["peak_rss_gb"] for r in rows if not r["step"].startswith("spm-train")),
                                                   default=0.0)}
    if not args.keep and not args.only:
        shutil.rmtree(w)
    return result
