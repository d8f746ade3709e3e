"""A table of invalid inputs across every command: each is one line on stderr naming the problem, exit code 2,
no traceback, and no output left behind (the output path does not exist afterwards, or is unchanged).

The table runs in this process through spo.cli.main.main (a subprocess costs seconds of imports each); a few
cases run as real subprocesses too, to prove the exit-code path end to end.
"""

from __future__ import annotations

import hashlib
import io
import os
import stat
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch

from spo.toy.defaults import TOY_MODEL_DIR

pytestmark = pytest.mark.slow  # integration: real training runs or subprocess chains

sys.path.insert(0, str(Path(__file__).parent))

# (id, argv, words the error line must contain, output paths that must not exist / stay unchanged afterwards)
# Placeholders: {t} the case's temp folder, {file} a regular file (a path under it cannot be created, even by
# root), {lora} a valid SD1.5 LoRA, {model} a valid SD1.5 single-file toy checkpoint, {imgs} a folder of images,
# {prompts} a valid prompts file, {keep} an existing output file whose bytes must not change.
CASES = [
    # ---- the command line itself
    ("unknown-command", ["fly"], ["unknown command", "fly"], []),
    ("unknown-flag", ["export", "{lora}", "--out", "{t}/o", "--bogus"], ["unrecognized", "--bogus"], ["{t}/o"]),
    # ---- train
    ("train-zero-epochs", ["train", "--epochs", "0", "--output-dir", "{t}/o"], ["epochs"], ["{t}/o"]),
    ("train-negative-lr", ["train", "--learning-rate", "-1", "--output-dir", "{t}/o"], ["learning_rate"], ["{t}/o"]),
    ("train-nan-lr", ["train", "--learning-rate", "nan", "--output-dir", "{t}/o"], ["learning"], ["{t}/o"]),
    ("train-text-batch", ["train", "--sample-batch-size", "two", "--output-dir", "{t}/o"], ["sample"], ["{t}/o"]),
    ("train-huge-steps", ["train", "--num-steps", "10000000000000000000000", "--output-dir", "{t}/o",
                          "--preference", "bad_inputs_scorer:brightness"],
     ["num_steps"], ["{t}/o"]),
    ("train-divert-past-steps", ["train", "--num-steps", "5", "--divert-start-step", "9", "--output-dir", "{t}/o"],
     ["divert"], ["{t}/o"]),
    ("train-bad-precision", ["train", "--mixed-precision", "fp8", "--output-dir", "{t}/o"], ["fp8"], ["{t}/o"]),
    ("train-resolution-off-grid", ["train", "--resolution", "40", "--preference", "bad_inputs_scorer:brightness",
                                   "--output-dir", "{t}/o"], ["resolution 40", "multiple of 16"], ["{t}/o"]),
    ("train-negative-resolution", ["train", "--resolution", "-64", "--output-dir", "{t}/o"], ["resolution"], ["{t}/o"]),
    ("train-unknown-preset", ["train", "--preset", "sd3", "--output-dir", "{t}/o"], ["sd3"], ["{t}/o"]),
    ("train-missing-config", ["train", "--config", "{t}/nope.toml", "--output-dir", "{t}/o"], ["nope.toml"], ["{t}/o"]),
    ("train-missing-base", ["train", "--base", "{t}/nope.safetensors", "--preference", "bad_inputs_scorer:brightness", "--output-dir", "{t}/o"],
     ["nope.safetensors"], ["{t}/o"]),
    ("train-missing-prompts", ["train", "--prompts", "{t}/nope.json", "--preference", "bad_inputs_scorer:brightness", "--output-dir", "{t}/o"],
     ["nope.json"], ["{t}/o"]),
    ("train-output-under-file", ["train", "--output-dir", "{file}/o", "--preference", "bad_inputs_scorer:brightness"], ["{file}"], []),
    # /proc answers os.access(W_OK) with yes for root; only a real write attempt tells
    ("train-output-in-proc", ["train", "--output-dir", "/proc/spo_no_such/o", "--preference", "bad_inputs_scorer:brightness"],
     ["/proc", "not writable"], []),
    ("train-bad-preference", ["train", "--preference", "no_such_module_xyz:f", "--output-dir", "{t}/o",
                              "--max-prompts", "2"], ["no_such_module_xyz"], ["{t}/o"]),
    ("train-negative-seed", ["train", "--seed", "-1", "--out", "{t}/o"], ["seed", "-1"], ["{t}/o"]),
    ("train-seed-past-32-bits", ["train", "--seed", "4294967296", "--out", "{t}/o"], ["seed", "4294967296"], ["{t}/o"]),
    ("spm-train-seed-past-32-bits", ["spm", "train", "{prompts}", "--seed", "4294967296", "--out", "{t}/o"], ["seed"],
     ["{t}/o"]),
    ("dpo-negative-seed", ["dpo", "--seed", "-5", "--out", "{t}/o"], ["seed", "-5"], ["{t}/o"]),
    # ---- the paper presets' settings (issue 19)
    ("spm-train-global-batch-not-divisible", ["spm", "train", "{prompts}", "--global-batch-size", "60",
                                              "--train-batch-size", "16", "--out", "{t}/o"],
     ["global_batch_size", "multiple"], ["{t}/o"]),
    ("dpo-unknown-optimizer", ["dpo", "--optimizer", "sgd", "--out", "{t}/o"], ["optimizer", "sgd"], ["{t}/o"]),
    ("spm-train-unknown-schedule", ["spm", "train", "{prompts}", "--lr-schedule", "step", "--out", "{t}/o"],
     ["lr_schedule", "step"], ["{t}/o"]),
    ("spm-sdxl-preset-without-relabel", ["spm", "train", "{prompts}", "--preset", "spm-sdxl", "--out", "{t}/o"],
     ["--relabel-with"], ["{t}/o"]),
    ("train-unknown-prediction-type", ["train", "--prediction-type", "x0", "--out", "{t}/o"],
     ["prediction_type", "x0"], ["{t}/o"]),
    ("dpo-unknown-prediction-type", ["dpo", "--prediction-type", "sample", "--out", "{t}/o"],
     ["prediction_type", "sample"], ["{t}/o"]),
    ("generate-unknown-prediction-type", ["generate", "--prediction-type", "x0", "--prompt", "a", "--out", "{t}/o"],
     ["--prediction-type", "x0"], ["{t}/o"]),
    ("train-eval-images-zero", ["train", "--eval-images", "0", "--output-dir", "{t}/o"], ["eval-images"], ["{t}/o"]),
    # ---- export
    ("export-missing-lora", ["export", "{t}/nope.safetensors", "--out", "{t}/o"], ["nope.safetensors"], ["{t}/o"]),
    ("export-not-a-lora", ["export", "{model}", "--out", "{t}/o"], ["LoRA"], ["{t}/o"]),
    ("export-wrong-family", ["export", "{lora}", "--out", "{t}/o", "--family", "sdxl"], ["sdxl"], ["{t}/o"]),
    ("export-text-alpha", ["export", "{lora}", "--out", "{t}/o", "--alpha", "big"], ["alpha"], ["{t}/o"]),
    ("export-out-under-file", ["export", "{lora}", "--out", "{file}/o"], ["{file}"], []),
    ("export-summary-is-dir", ["export", "{lora}", "--out", "{t}/o", "--training-summary", "{t}"], ["{t}"], ["{t}/o"]),
    ("export-bad-dtype", ["export", "{lora}", "--out", "{t}/o", "--dtype", "int8"], ["int8"], ["{t}/o"]),
    # ---- merge
    ("merge-missing-recipe", ["merge", "{t}/nope.toml", "--out", "{t}/m.safetensors"], ["nope.toml"],
     ["{t}/m.safetensors"]),
    ("merge-recipe-is-dir", ["merge", "{t}", "--out", "{t}/m.safetensors"], ["{t}"], ["{t}/m.safetensors"]),
    ("merge-out-under-file", ["merge", "{recipe}", "--out", "{file}/m.safetensors"], ["{file}"], []),
    # ---- generate
    ("generate-missing-model", ["generate", "--model", "{t}/nope.safetensors", "--prompt", "x", "--out", "{t}/o"],
     ["nope.safetensors"], ["{t}/o"]),
    ("generate-wrong-family", ["generate", "--model", "{model}", "--family", "sdxl", "--prompt", "x", "--out", "{t}/o"],
     ["sdxl"], ["{t}/o"]),
    ("generate-no-prompt", ["generate", "--out", "{t}/o"], ["prompt"], ["{t}/o"]),
    ("generate-fp16-on-cpu", ["generate", "--prompt", "x", "--dtype", "fp16", "--out", "{t}/o"], ["fp16", "bf16"],
     ["{t}/o"]),
    ("siblings-fp16-on-cpu", ["spm", "siblings", "toy:sd15", "--dtype", "fp16", "-n", "1", "--out", "{t}/o"],
     ["fp16", "bf16"], ["{t}/o"]),
    ("generate-empty-prompt", ["generate", "--prompt", "", "--out", "{t}/o"], ["prompt"], ["{t}/o"]),
    ("generate-huge-prompt", ["generate", "--prompt", "a " * 200000, "--out", "{t}/o"], ["prompt"], ["{t}/o"]),
    ("generate-control-chars", ["generate", "--prompt", "red\x00circle", "--out", "{t}/o"], ["prompt"], ["{t}/o"]),
    ("generate-lone-surrogate", ["generate", "--prompt", "red \udc80 circle", "--out", "{t}/o"], ["prompt"], ["{t}/o"]),
    ("generate-zero-steps", ["generate", "--prompt", "x", "--steps", "0", "--out", "{t}/o"], ["steps"], ["{t}/o"]),
    ("generate-negative-width", ["generate", "--prompt", "x", "--width", "-64", "--out", "{t}/o"], ["width"], ["{t}/o"]),
    ("generate-huge-size", ["generate", "--prompt", "x", "--width", "1000000", "--height", "1000000", "--out", "{t}/o"],
     ["width"], ["{t}/o"]),
    ("generate-odd-size", ["generate", "--prompt", "x", "--width", "33", "--out", "{t}/o"], ["width"], ["{t}/o"]),
    ("generate-text-strength", ["generate", "--prompt", "x", "--lora", "{lora}:strong", "--out", "{t}/o"],
     ["strong"], ["{t}/o"]),
    ("generate-inf-strength", ["generate", "--prompt", "x", "--lora", "{lora}:inf", "--out", "{t}/o"], ["inf"],
     ["{t}/o"]),
    ("generate-missing-lora", ["generate", "--prompt", "x", "--lora", "{t}/nope.safetensors", "--out", "{t}/o"],
     ["nope.safetensors"], ["{t}/o"]),
    ("generate-nan-cfg", ["generate", "--prompt", "x", "--cfg", "nan", "--out", "{t}/o"], ["nan"], ["{t}/o"]),
    ("generate-unknown-scheduler", ["generate", "--prompt", "x", "--scheduler", "warp9", "--out", "{t}/o"], ["warp9"],
     ["{t}/o"]),
    ("generate-zero-images", ["generate", "--prompt", "x", "-n", "0", "--out", "{t}/o"], ["num"], ["{t}/o"]),
    ("generate-denoise-without-init", ["generate", "--prompt", "x", "--denoise", "1.5", "--out", "{t}/o"], ["denoise"],
     ["{t}/o"]),
    ("generate-missing-init", ["generate", "--prompt", "x", "--init-image", "{t}/nope.png", "--out", "{t}/o"],
     ["nope.png"], ["{t}/o"]),
    ("generate-init-not-image", ["generate", "--prompt", "x", "--init-image", "{prompts}", "--out", "{t}/o"],
     ["{prompts}"], ["{t}/o"]),
    ("generate-out-is-file", ["generate", "--prompt", "x", "--out", "{keep}"], ["{keep}"], ["{keep}"]),
    ("generate-missing-prompts-file", ["generate", "--prompts", "{t}/nope.txt", "--out", "{t}/o"], ["nope.txt"],
     ["{t}/o"]),
    # ---- sweep
    ("sweep-no-lora-strengths", ["sweep", "--prompt", "x", "--strengths", "0", "1", "--out", "{t}/o"], ["lora"],
     ["{t}/o"]),
    ("sweep-same-axes", ["sweep", "--prompt", "x", "--lora", "{lora}", "-x", "seed", "-y", "seed", "--out", "{t}/o"],
     ["seed"], ["{t}/o"]),
    ("sweep-text-seeds", ["sweep", "--prompt", "x", "--lora", "{lora}", "--seeds", "a", "b", "--out", "{t}/o"],
     ["seeds"], ["{t}/o"]),
    ("sweep-bad-sweep-lora", ["sweep", "--prompt", "x", "--lora", "{lora}", "--sweep-lora", "5", "--out", "{t}/o"],
     ["sweep-lora"], ["{t}/o"]),
    # sweep strengths (H3): non-finite or absurd strengths are refused before anything is generated
    ("sweep-nan-strength", ["sweep", "--prompt", "x", "--lora", "{lora}", "--strengths", "0", "nan", "--out", "{t}/o"],
     ["strengths", "nan"], ["{t}/o"]),
    ("sweep-inf-strength", ["sweep", "--prompt", "x", "--lora", "{lora}", "--strengths=0,-inf", "--out", "{t}/o"],
     ["strengths", "inf"], ["{t}/o"]),
    ("sweep-huge-strength", ["sweep", "--prompt", "x", "--lora", "{lora}", "--strengths", "0", "1e308", "--out", "{t}/o"],
     ["strength", "1e+308"], ["{t}/o"]),
    ("sweep-nan-cfg", ["sweep", "--prompt", "x", "--lora", "{lora}", "--cfgs", "nan", "--out", "{t}/o"],
     ["cfgs", "nan"], ["{t}/o"]),
    ("sweep-negative-alignment-drop", ["sweep", "--prompt", "x", "--lora", "{lora}", "--max-alignment-drop", "-5",
                                       "--out", "{t}/o"], ["max-alignment-drop", "-5"], ["{t}/o"]),
    # ---- score / report
    ("score-missing-folder", ["score", "{t}/nope", "--out", "{t}/o"], ["nope"], ["{t}/o"]),
    ("score-empty-folder", ["score", "{empty}", "--out", "{t}/o"], ["{empty}"], ["{t}/o"]),
    ("score-missing-spm", ["score", "{imgs}", "--prompt", "x", "--spm", "{t}/nope", "--out", "{t}/o"], ["nope"], ["{t}/o"]),
    ("report-missing-folder", ["report", "{t}/nope", "--out", "{t}/r.html"], ["nope"], ["{t}/r.html"]),
    ("report-empty-folder", ["report", "{empty}", "--out", "{t}/r.html"], ["{empty}"], ["{t}/r.html"]),
    # ---- spm / toy
    ("spm-train-missing-data", ["spm", "train", "{t}/nope.parquet", "--out", "{t}/o"], ["nope.parquet"], ["{t}/o"]),
    ("spm-train-zero-steps", ["spm", "train", "{prompts}", "--steps", "0", "--out", "{t}/o"], ["steps"], ["{t}/o"]),
    ("spm-train-out-is-file", ["spm", "train", "{prompts}", "--out", "{keep}"], ["{keep}"], ["{keep}"]),
    ("spm-eval-missing-spm", ["spm", "eval", "{t}/nope", "--data", "{prompts}", "--out", "{t}/o"], ["nope"],
     ["{t}/o"]),
    ("spm-convert-needs-pickle-flag", ["spm", "convert", "{t}/final_ckpt.bin", "--clip", "{t}", "--family", "sd15",
                                       "--out", "{t}/o"], ["pickle"], ["{t}/o"]),
    ("spm-convert-bad-family", ["spm", "convert", "{t}/x.bin", "--clip", "{t}", "--family", "sd3", "--out", "{t}/o"],
     ["sd3"], ["{t}/o"]),
    ("spm-siblings-missing-scorer", ["spm", "siblings", "{t}/nope", "--out", "{t}/o"], ["nope"], ["{t}/o"]),
    ("spm-siblings-step-past-end", ["spm", "siblings", "spo.toy.judge:preference", "--at-steps", "0,20",
                                    "--out", "{t}/o"], ["at-steps"], ["{t}/o"]),
    ("spm-siblings-empty-prompts", ["spm", "siblings", "spo.toy.judge:preference", "--prompts", "{empty}/p.txt",
                                    "--out", "{t}/o"], ["p.txt"], ["{t}/o"]),
    ("toy-pairs-zero", ["toy", "pairs", "-n", "0", "--out", "{t}/p.parquet"], ["num-pairs"], ["{t}/p.parquet"]),
    ("toy-sample-missing-model", ["toy", "sample", "--model", "{t}/nope", "--out", "{t}/o"], ["nope"], ["{t}/o"]),
    ("toy-sample-family-mismatch", ["toy", "sample", "--family", "sd15", "--model", str(TOY_MODEL_DIR / "sdxl"),
                                    "--out", "{t}/o"], ["sdxl-family", "--family sdxl"], ["{t}/o"]),
    # ---- outputs that are not regular files: never replaced (the atomic rename would turn a device into a file)
    ("merge-out-dev-full", ["merge", "{recipe}", "--out", "/dev/full"], ["/dev/full", "character device"],
     ["/dev/full"]),
    ("merge-out-fifo", ["merge", "{recipe}", "--out", "{fifo}"], ["{fifo}", "FIFO"], ["{fifo}"]),
    ("merge-out-symlink-to-device", ["merge", "{recipe}", "--out", "{devlink}"], ["{devlink}", "device"],
     ["{devlink}"]),
    ("merge-out-is-folder", ["merge", "{recipe}", "--out", "{empty}"], ["{empty}", "directory"], ["{empty}"]),
    ("report-out-dev-full", ["report", "{imgs}", "--out", "/dev/full"], ["/dev/full"], ["/dev/full"]),
    ("report-out-fifo", ["report", "{imgs}", "--out", "{fifo}"], ["{fifo}"], ["{fifo}"]),
    ("toy-pairs-out-dev-full", ["toy", "pairs", "--source", "render", "-n", "2", "--out", "/dev/full"],
     ["/dev/full"], ["/dev/full"]),
    ("toy-pairs-out-symlink-to-device", ["toy", "pairs", "--source", "render", "-n", "2", "--out", "{devlink}"],
     ["{devlink}"], ["{devlink}"]),
    # ---- NaN/inf: refused up front, or found in the result before anything is written
    ("merge-nan-lora", ["merge", "{recipe_nan_lora}"], ["nan_lora", "NaN"], ["{assets}/merged_nan_lora.safetensors"]),
    ("merge-nan-model", ["merge", "{recipe_nan_model}"], ["NaN", "nan_model.safetensors"],
     ["{assets}/merged_nan_model.safetensors"]),
    ("merge-fp16-overflow", ["merge", "{recipe_fp16}"], ["infinite", "overflowed float16", "nothing was written"],
     ["{assets}/merged_fp16.safetensors"]),
    ("merge-huge-multiplier", ["merge", "{recipe_huge}"], ["multiplier", "1e+308"],
     ["{assets}/merged_huge.safetensors"]),
    ("generate-nan-lora", ["generate", "--prompt", "x", "--lora", "{nanlora}", "--steps", "2", "--out", "{t}/o"],
     ["nan_lora", "NaN"], ["{t}/o"]),
    ("generate-nan-model", ["generate", "--model", "{nanmodel}", "--prompt", "x", "--steps", "2", "--out", "{t}/o"],
     ["NaN"], ["{t}/o"]),
    ("generate-huge-strength", ["generate", "--prompt", "x", "--lora", "{lora}:1e308", "--out", "{t}/o"],
     ["strength", "1e308"], ["{t}/o"]),
    ("generate-overflowing-cfg", ["generate", "--prompt", "x", "--cfg-scale", "1e38", "--steps", "2", "--out", "{t}/o"],
     ["NaN"], ["{t}/o"]),
    # ---- seeds beyond what numpy/torch take (-1 is A1111's "random", tested in test_generate.py)
    ("generate-seed-negative", ["generate", "--prompt", "x", "--seed", "-2", "--out", "{t}/o"], ["seed", "-2"],
     ["{t}/o"]),
    ("generate-seed-2**32", ["generate", "--prompt", "x", "--seed", str(2**32), "--out", "{t}/o"],
     ["seed", str(2**32)], ["{t}/o"]),
    ("generate-seed-2**64", ["generate", "--prompt", "x", "--seed", str(2**64), "--out", "{t}/o"],
     ["seed", str(2**64)], ["{t}/o"]),
    ("generate-seeds-run-past-end", ["generate", "--prompt", "x", "--seed", str(2**32 - 1), "-n", "2",
                                     "--out", "{t}/o"], ["seed"], ["{t}/o"]),
    ("sweep-seed-2**64", ["sweep", "--prompt", "x", "--lora", "{lora}", "--seed", str(2**64), "--out", "{t}/o"],
     ["seed"], ["{t}/o"]),
    ("toy-sample-seed-negative", ["toy", "sample", "--seed", "-5", "--out", "{t}/o"], ["seed", "-5"], ["{t}/o"]),
    ("toy-pairs-seed-2**64", ["toy", "pairs", "--source", "render", "--seed", str(2**64), "--out", "{t}/p.parquet"],
     ["seed"], ["{t}/p.parquet"]),
    # ---- sizes of work that are mistakes
    ("generate-billion-steps", ["generate", "--prompt", "x", "--steps", "1000000000", "--out", "{t}/o"], ["steps"],
     ["{t}/o"]),
    ("generate-prompts-over-max-images", ["generate", "--prompts", "{manyprompts}", "--out", "{t}/o"],
     ["10001", "--max-images"], ["{t}/o"]),
    ("generate-over-given-max-images", ["generate", "--prompt", "x", "-n", "3", "--max-images", "2", "--out", "{t}/o"],
     ["3", "--max-images"], ["{t}/o"]),
    # ---- unreadable images
    ("generate-init-bomb", ["generate", "--prompt", "x", "--init-image", "{bomb}", "--out", "{t}/o"],
     ["{bomb}", "decompression bomb"], ["{t}/o"]),
    ("generate-init-truncated", ["generate", "--prompt", "x", "--init-image", "{truncated}", "--out", "{t}/o"],
     ["{truncated}"], ["{t}/o"]),
    ("generate-init-text-named-png", ["generate", "--prompt", "x", "--init-image", "{textpng}", "--out", "{t}/o"],
     ["{textpng}"], ["{t}/o"]),
    ("score-bomb", ["score", "{bombdir}", "--prompt", "x", "--out", "{t}/o"], ["bomb.png", "decompression bomb"],
     ["{t}/o"]),
    ("score-truncated", ["score", "{truncdir}", "--prompt", "x", "--out", "{t}/o"], ["truncated.png"], ["{t}/o"]),
    ("score-text-named-png", ["score", "{textdir}", "--prompt", "x", "--out", "{t}/o"], ["text.png"], ["{t}/o"]),
    # ---- LoRA of the other family, prompt columns
    ("generate-sd15-lora-on-sdxl", ["generate", "--model", "toy:sdxl", "--lora", "{lora}", "--prompt", "x",
                                    "--out", "{t}/o"], ["SD1.5-family LoRA", "SDXL-family model"], ["{t}/o"]),
    ("generate-missing-prompt-column", ["generate", "--prompts", "{csvprompts}", "--prompt-column", "nope",
                                        "--out", "{t}/o"], ["nope"], ["{t}/o"]),
    ("generate-prompt-column-without-file", ["generate", "--prompt", "x", "--prompt-column", "text", "--out", "{t}/o"],
     ["--prompt-column"], ["{t}/o"]),
    # ---- --vae of another family or latent size, or none at all
    ("generate-vae-other-family", ["generate", "--model", "toy:sdxl", "--vae", "{vae_sd15}", "--prompt", "x",
                                   "--out", "{t}/o"], ["scaling_factor 0.18215, an SD1.5 VAE", "family"], ["{t}/o"]),
    ("generate-vae-16-channels", ["generate", "--vae", "{vae16}", "--prompt", "x", "--out", "{t}/o"],
     ["16-channel", "takes 8"], ["{t}/o"]),  # toy world 2's UNets take 8 latent channels
    ("generate-vae-pickle", ["generate", "--vae", "{keep}", "--prompt", "x", "--out", "{t}/o"], ["pickle"], ["{t}/o"]),
    ("sweep-vae-other-family", ["sweep", "--model", "toy:sdxl", "--vae", "{vae_sd15}", "--prompt", "x", "-x", "cfg",
                                "--cfgs", "3", "5", "--score", "none", "--out", "{t}/o"], ["SD1.5 VAE"], ["{t}/o"]),
    ("train-vae-16-channels", ["train", "--vae", "{vae16}", "--preference", "bad_inputs_scorer:brightness",
                               "--max-prompts", "2", "--out", "{t}/o"], ["16-channel"], ["{t}/o"]),
    ("train-missing-vae", ["train", "--vae", "{t}/nope", "--out", "{t}/o"], ["vae", "nope"], ["{t}/o"]),
    ("dpo-vae-other-family", ["dpo", "--base", "toy:sdxl", "--vae", "{vae_sd15}", "--out", "{t}/o"], ["SD1.5 VAE"],
     ["{t}/o"]),
    ("spm-siblings-vae-16-channels", ["spm", "siblings", "toy:sd15", "--vae", "{vae16}", "--out", "{t}/o"],
     ["16-channel"], ["{t}/o"]),
]

# export (H4)
# ---- Pick-a-Pic-schema pairs, streamed (spo.data.stream) by every reader: the same errors as the in-memory reader
CASES += [
    (f"{name}-{what}", [*prefix, path, "--out", "{t}/o"], words, ["{t}/o"])
    for name, prefix in (("spm-train", ["spm", "train"]), ("spm-eval", ["spm", "eval", "toy:sd15", "--data"]),
                         ("dpo", ["dpo", "--data"]), ("data-inspect", ["data", "inspect"]))
    for what, path, words in (("empty-folder", "{empty}", ["{empty}", "no .parquet files"]),
                              ("truncated-parquet", "{cutparquet}", ["cut.parquet", "cannot read"]),
                              ("missing-columns", "{nolabels}", ["nolabels.parquet", "label_0, label_1"]))
]
CASES += [
    ("spm-train-negative-workers", ["spm", "train", "{pairs}", "--num-workers", "-1", "--out", "{t}/o"],
     ["num_workers"], ["{t}/o"]),
    ("spm-train-zero-buffer", ["spm", "train", "{pairs}", "--shuffle-buffer-mb", "0", "--out", "{t}/o"],
     ["shuffle_buffer_mb"], ["{t}/o"]),
    ("dpo-text-buffer", ["dpo", "--data", "{pairs}", "--shuffle-buffer-mb", "lots", "--out", "{t}/o"],
     ["shuffle_buffer_mb"], ["{t}/o"]),
    ("data-inspect-out-is-file", ["data", "inspect", "{pairs}", "--out", "{keep}"], ["{keep}"], ["{keep}"]),
    ("data-inspect-zero-sample", ["data", "inspect", "{pairs}", "--sample", "0"], ["sample"], []),
]

NAN_LORA = str(Path(__file__).parent / "data" / "nan_lora.safetensors")  # a one-module SD1.5 webui LoRA, one NaN
CASES += [
    ("export-out-is-file", ["export", "{lora}", "--out", "{keep}"], ["{keep}", "not a folder"], ["{keep}"]),
    ("export-out-names-a-file", ["export", "{lora}", "--out", "{t}/x.safetensors"], ["folder"], ["{t}/x.safetensors"]),
    ("export-nan-lora", ["export", NAN_LORA, "--out", "{t}/o"],
     ["lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight", "non-finite"], ["{t}/o"]),
    ("export-bad-name", ["export", "{lora}", "--out", "{t}/o", "--name", "a/b"], ["a/b"], ["{t}/o"]),
    ("export-zero-alpha", ["export", "{lora}", "--out", "{t}/o", "--alpha", "0"], ["alpha"], ["{t}/o"]),
]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    from PIL import Image

    from show_helpers import make_lora
    from spo.formats.single_file import save_single_file
    from spo.models.loading import load_pipeline

    d = tmp_path_factory.mktemp("assets")
    # a preference function for `spo train` cases that must get past the scorer
    (d / "bad_inputs_scorer.py").write_text("def brightness(images, prompts, t):\n    return images.mean((1, 2, 3))\n")
    sys.path.insert(0, str(d))
    lora = make_lora(d / "lora")
    save_single_file(load_pipeline("toy:sd15"), d / "model.safetensors")
    (d / "a_file").write_text("a regular file\n")
    (d / "keep.bin").write_bytes(b"earlier output")
    (d / "prompts.txt").write_text("a red circle\n")
    (d / "imgs").mkdir()
    Image.new("RGB", (16, 16), "red").save(d / "imgs" / "0.png")
    (d / "empty").mkdir()
    import pyarrow as pa
    import pyarrow.parquet as pq

    from spo.data.pickapic import write_pairs
    red = io.BytesIO()
    Image.new("RGB", (8, 8), "red").save(red, "PNG")
    write_pairs(d / "pairs.parquet", [{"caption": "a red square", "jpg_0": red.getvalue(), "jpg_1": red.getvalue(),
                                       "label_0": 1.0, "label_1": 0.0}] * 4)
    (d / "cut.parquet").write_bytes((d / "pairs.parquet").read_bytes()[:-60])
    pq.write_table(pa.table({"caption": ["a"], "jpg_0": [b"x"], "jpg_1": [b"y"]}), d / "nolabels.parquet")
    (d / "recipe.toml").write_text('base = "model.safetensors"\noutput = "merged.safetensors"\n')
    # outputs that are not regular files (a FIFO here; /dev/full itself is only ever looked at, see _state)
    os.mkfifo(d / "fifo")
    (d / "devlink").symlink_to("/dev/null")
    # NaN weights: a LoRA (in its own folder, so its name shows) and a checkpoint
    from safetensors.torch import load_file, save_file
    tensors = load_file(lora)
    first = sorted(tensors)[0]
    tensors[first] = torch.full_like(tensors[first], float("nan"))
    (d / "nan_lora").mkdir()
    save_file(tensors, d / "nan_lora" / "nan_lora.safetensors")
    model = load_file(d / "model.safetensors")
    key = next(k for k in sorted(model) if k.startswith("model.diffusion_model.") and k.endswith(".weight"))
    model[key][0] = float("nan")
    save_file(model, d / "nan_model.safetensors")
    model[key][0] = 1e6  # finite in fp32, beyond fp16's 65504: a merge to fp16 would write inf
    save_file(model, d / "big_model.safetensors")
    (d / "recipe_fp16.toml").write_text('base = "big_model.safetensors"\noutput = "merged_fp16.safetensors"\n'
                                        'dtype = "fp16"\n')
    (d / "recipe_nan_lora.toml").write_text('base = "model.safetensors"\noutput = "merged_nan_lora.safetensors"\n'
                                           '[[lora]]\npath = "nan_lora/nan_lora.safetensors"\n')
    (d / "recipe_nan_model.toml").write_text('base = "model.safetensors"\noutput = "merged_nan_model.safetensors"\n'
                                            '[[checkpoint]]\nmodel = "nan_model.safetensors"\nmultiplier = 0.5\n')
    (d / "recipe_huge.toml").write_text('base = "model.safetensors"\noutput = "merged_huge.safetensors"\n'
                                        '[[checkpoint]]\nmethod = "add_difference"\nmodel = "model.safetensors"\n'
                                        'minus = "model.safetensors"\nmultiplier = 1e308\n')
    # unreadable images: a decompression bomb (a 1x1 PNG claiming 100000 x 100000), a truncated PNG, text as .png
    for name in ("bombdir", "truncdir", "textdir"):
        (d / name).mkdir()
    png = io.BytesIO()
    Image.new("RGB", (1, 1)).save(png, "PNG")
    raw = bytearray(png.getvalue())
    raw[16:24] = struct.pack(">II", 100_000, 100_000)  # IHDR width, height
    raw[29:33] = struct.pack(">I", zlib.crc32(bytes(raw[12:29])))  # the IHDR chunk's CRC over type + data
    (d / "bombdir" / "bomb.png").write_bytes(bytes(raw))
    png = io.BytesIO()
    Image.effect_noise((64, 64), 50).convert("RGB").save(png, "PNG")
    (d / "truncdir" / "truncated.png").write_bytes(png.getvalue()[: len(png.getvalue()) // 2])
    (d / "textdir" / "text.png").write_text("not an image, despite the name\n")
    (d / "many.txt").write_text("a large red circle on a white background, in the center\n" * 10_001)
    (d / "prompts.csv").write_text("id,text\n1,a large red circle on a white background, in the center\n")
    # VAEs that do not fit: an SD1.5-family one (by its scaling factor) for SDXL, a 16-channel one (SD3/Flux-like)
    from diffusers import AutoencoderKL
    vae = load_pipeline("toy:sd15").vae
    vae.register_to_config(scaling_factor=0.18215)
    vae.save_pretrained(d / "vae_sd15")
    wide = AutoencoderKL.from_config({**vae.config, "latent_channels": 16})
    save_file({k: v.contiguous() for k, v in wide.state_dict().items()}, d / "vae16.safetensors")
    return {"lora": str(lora), "model": str(d / "model.safetensors"), "file": str(d / "a_file"),
            "keep": str(d / "keep.bin"), "prompts": str(d / "prompts.txt"), "imgs": str(d / "imgs"),
            "empty": str(d / "empty"), "recipe": str(d / "recipe.toml"), "fifo": str(d / "fifo"),
            "devlink": str(d / "devlink"), "nanlora": str(d / "nan_lora" / "nan_lora.safetensors"),
            "nanmodel": str(d / "nan_model.safetensors"), "recipe_nan_lora": str(d / "recipe_nan_lora.toml"),
            "recipe_nan_model": str(d / "recipe_nan_model.toml"), "recipe_huge": str(d / "recipe_huge.toml"),
            "recipe_fp16": str(d / "recipe_fp16.toml"),
            "bomb": str(d / "bombdir" / "bomb.png"), "truncated": str(d / "truncdir" / "truncated.png"),
            "textpng": str(d / "textdir" / "text.png"), "bombdir": str(d / "bombdir"),
            "truncdir": str(d / "truncdir"), "textdir": str(d / "textdir"), "manyprompts": str(d / "many.txt"),
            "csvprompts": str(d / "prompts.csv"), "assets": str(d), "vae_sd15": str(d / "vae_sd15"),
            "vae16": str(d / "vae16.safetensors"), "pairs": str(d / "pairs.parquet"),
            "cutparquet": str(d / "cut.parquet"), "nolabels": str(d / "nolabels.parquet")}


def _fill(text: str, values: dict) -> str:
    for k, v in values.items():
        text = text.replace("{" + k + "}", v)
    return text


def _state(path: str):
    p = Path(path)
    st = os.lstat(p) if os.path.lexists(p) else None
    if st is not None and not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
        # a device, FIFO or symlink: its kind (and device number, link target), never its contents
        return (stat.S_IFMT(st.st_mode), st.st_rdev, os.readlink(p) if stat.S_ISLNK(st.st_mode) else None)
    if p.is_file():
        return hashlib.sha256(p.read_bytes()).hexdigest()
    return sorted(str(x) for x in p.rglob("*")) if p.exists() else None


def test_bad_input_table(assets, tmp_path, capsys):
    from spo.cli.main import main

    failures = []
    for case_id, argv, words, outputs in CASES:
        t = tmp_path / case_id
        t.mkdir()
        values = dict(assets, t=str(t))
        argv = [_fill(a, values) for a in argv]
        outputs = [_fill(o, values) for o in outputs]
        before = {o: _state(o) for o in outputs}
        try:
            code = main(argv)
        except SystemExit as exc:  # argparse errors exit from inside main
            code = exc.code
        except BaseException as exc:  # a crash is a failure of this case, not of the whole table
            code = f"crash: {type(exc).__name__}: {exc}"
        err = capsys.readouterr().err
        ours = [ln for ln in err.splitlines() if ln.startswith("spo")]
        problems = []
        if code != 2:
            problems.append(f"exit {code}")
        if "Traceback" in err or len(ours) != 1:
            problems.append(f"stderr {err[-500:]!r}")
        elif not all(_fill(w, values) in ours[0] for w in words):
            problems.append(f"message {ours[0]!r} lacks {words}")
        for o in outputs:
            if _state(o) != before[o]:
                problems.append(f"left output {o}")
        if problems:
            failures.append((case_id, problems))
    dev_full = os.stat("/dev/full")
    if not stat.S_ISCHR(dev_full.st_mode) and os.geteuid() == 0:  # a regression replaced it: put the device back
        os.unlink("/dev/full")
        os.mknod("/dev/full", 0o666 | stat.S_IFCHR, os.makedev(1, 7))
    assert stat.S_ISCHR(dev_full.st_mode), "/dev/full was replaced by a regular file"
    assert not failures, "\n".join(f"{c}: {p}" for c, p in failures)
    assert len(CASES) >= 100


@pytest.mark.parametrize("argv,word", [
    (["train", "--epochs", "-3", "--output-dir", "OUT"], "epochs"),
    (["generate", "--prompt", "x", "--steps", "zero", "--out", "OUT"], "steps"),
    (["export", "MISSING.safetensors", "--out", "OUT"], "missing.safetensors"),
])
def test_bad_input_real_subprocess(tmp_path, argv, word):
    argv = [a.replace("OUT", str(tmp_path / "o")).replace("MISSING", str(tmp_path / "missing")) for a in argv]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    r = subprocess.run([sys.executable, "-m", "spo", *argv], capture_output=True, text=True, env=env, timeout=300)
    ours = [ln for ln in r.stderr.splitlines() if ln.startswith("spo ")]
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(ours) == 1 and word in ours[0], r.stderr
    assert not (tmp_path / "o").exists()
