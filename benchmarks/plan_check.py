"""`python benchmarks/run.py plan-check`: `spo plan`'s training-step activations against the OS's measurement.

For the toy and for the full-size SD1.5 stand-in (`spo dev random-checkpoint`, at a low resolution so that CPU
time stays short), one SPO training micro-batch (reference forward with the adapters off, policy forward, backward)
runs on real CPU tensors in a fresh process, under the trainer's autocast (accelerate's, bf16 on the stand-in);
its peak RSS increase over the resident weights is read from the kernel (VmHWM after resetting it through
/proc/self/clear_refs) and compared with what `spo plan` predicts for the same rows from meta tensors
(spo.plan.estimate.training_call, fitted at 1 and 2 rows). Bar (issue 20): within 20 %.

What the kernel sees is the C library's heap, not the tensors: glibc keeps freed blocks under its (dynamic) mmap
threshold and hands them out again, so a second step looks almost free and a first step carries one-time set-up
(kernel caches, autograd's threads). The measured step is therefore the second one, in a child whose malloc gives
every block of 64 KiB and more its own mapping (MALLOC_MMAP_THRESHOLD_), so that RSS follows the live tensors as
a GPU's caching allocator follows them; the first step's increase is recorded beside it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import json, sys, torch
from accelerate import Accelerator
from spo.models.family import encode, family_of, guided_output
from spo.models.loading import load_pipeline
from spo.plan.estimate import fit_phase, training_call
from spo.plan.meta import meta_models
from spo.train.config import build_config
from spo.train.finetune import load_dtype, reference_model, setup_unet

preset, base, side, rows = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
cfg = build_config(preset, overrides=dict(base=base, mixed_precision="bf16" if preset != "toy-sd15" else "no",
                                          gradient_checkpointing=False))
mem, _ = fit_phase(training_call, meta_models(base, cfg), side, cfg.cfg_scale)  # the SPM does not enter training
pipe = load_pipeline(base, dtype=load_dtype(cfg))
unet, _, params = setup_unet(pipe, cfg, family_of(pipe), "cpu")
factor = pipe.vae_scale_factor
x = torch.randn(rows, unet.config.in_channels, side // factor, side // factor, dtype=unet.dtype)
t = torch.full((rows,), 500, dtype=torch.long)
with torch.no_grad():
    cond = encode(pipe, ["a lighthouse on a cliff at sunset"] * rows, side=side)
    cond.encoder_hidden_states = cond.encoder_hidden_states.to(unet.dtype)
del pipe.text_encoder, pipe.vae
autocast = Accelerator(cpu=True, mixed_precision=cfg.mixed_precision).autocast  # as the trainer runs the step
def rss(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
def step():
    with torch.no_grad(), autocast(), reference_model(unet, None) as ref:
        guided_output(ref, x, t, cond, cond, cfg.cfg_scale)
    with autocast():
        out = guided_output(unet, x, t, cond, cond, cfg.cfg_scale).float()
    out.pow(2).mean().backward()
    unet.zero_grad(set_to_none=True)
def increase():
    open("/proc/self/clear_refs", "w").write("5")  # VmHWM := current RSS
    before = rss("VmRSS")
    step()
    return rss("VmHWM") - before
first = increase()
measured = increase()
from spo.plan.trace import measure
traced = measure(step).peak_bytes  # the planner's own count, on these real CPU tensors
print(json.dumps({"predicted_bytes": mem.at(rows), "measured_bytes": measured, "first_step_bytes": first,
                  "traced_cpu_bytes": traced}))
"""


def add_arguments(parser) -> None:
    parser.add_argument("--side", type=int, default=256, help="SD1.5 stand-in resolution in pixels")
    parser.add_argument("--rows", type=int, default=2, help="UNet rows of the training micro-batch")
    parser.add_argument("--work", default="/tmp/spo-plan-check", help="folder for the stand-in checkpoint")


def plan_check(args) -> dict:
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    base = work / "sd15.safetensors"
    if not base.is_file():
        subprocess.run(["spo", "dev", "random-checkpoint", "--family", "sd15", "--out", str(base)], check=True)
    rows = []
    for name, preset, model, side in (("toy", "toy-sd15", "toy:sd15", 32), ("sd15 stand-in", "sd15", str(base), args.side)):
        proc = subprocess.run([sys.executable, "-c", CHILD, preset, model, str(side), str(args.rows)],
                              capture_output=True, text=True, env=dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(64 << 10)))
        if proc.returncode:
            raise SystemExit(proc.stderr[-3000:])
        got = json.loads(proc.stdout.strip().splitlines()[-1])
        ratio = got["predicted_bytes"] / got["measured_bytes"]
        rows.append({"model": name, "resolution": side, "rows": args.rows, **got, "predicted_over_measured": ratio,
                     "within_20_percent": 0.8 <= ratio <= 1.2})
        print(f"{name}: predicted {got['predicted_bytes'] / 2**20:.1f} MiB, measured RSS increase "
              f"{got['measured_bytes'] / 2**20:.1f} MiB ({ratio:.2f}x; first step {got['first_step_bytes'] / 2**20:.1f} MiB)",
              flush=True)
    return {"rows": rows}
