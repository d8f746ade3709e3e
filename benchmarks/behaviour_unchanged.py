"""Proof that a refactor left behaviour unchanged: fixed-seed outputs of the main commands, hashed tensor by tensor.

    python benchmarks/behaviour_unchanged.py record OUT.json [--work DIR]   # run the commands, hash their outputs
    python benchmarks/behaviour_unchanged.py compare BEFORE.json AFTER.json   # bit-identical or not, per output

Commands (toy world, CPU, one thread so float reductions are ordered the same way every run):
`spo train` (the toy default, full), a short `spo dpo`, a short `spo spm train`, `spo merge` (toy base + the
trained LoRA) and `spo generate` with that LoRA. Every tensor of every safetensors output is hashed (sha256 of
its bytes, with dtype and shape), PNGs by their decoded pixels, history.json by its numbers (wall-clock fields
dropped). Written for issue 18: record before, refactor, record after, compare.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TIME_KEYS = {"seconds", "time", "elapsed", "wall_s", "started", "finished", "steps_per_second"}


def _run_spo(*args: str, cwd: Path) -> float:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONHASHSEED="0")
    started = time.time()
    proc = subprocess.run([sys.executable, "-m", "spo", *args], cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"spo {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return time.time() - started


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def hash_safetensors(path: Path) -> dict[str, str]:
    from safetensors.torch import load_file

    return {k: f"{v.dtype}{list(v.shape)}:{_digest(v.contiguous().view(-1).view(dtype=__import__('torch').uint8).numpy().tobytes())}"
            for k, v in sorted(load_file(str(path)).items())}


def hash_png(path: Path) -> str:
    from PIL import Image

    with Image.open(path) as im:
        return f"{im.size}:{_digest(im.convert('RGB').tobytes())}"


def _strip_times(value):
    if isinstance(value, dict):
        return {k: _strip_times(v) for k, v in value.items() if k not in TIME_KEYS}
    if isinstance(value, list):
        return [_strip_times(v) for v in value]
    return value


def hash_tree(root: Path) -> dict[str, object]:
    out: dict[str, object] = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if path.suffix == ".safetensors":
            out[rel] = hash_safetensors(path)
        elif path.suffix == ".png":
            out[rel] = hash_png(path)
        elif path.name == "history.json":
            out[rel] = _digest(json.dumps(_strip_times(json.loads(path.read_text())), sort_keys=True).encode())
    return out


def record(target: Path, work: Path) -> None:
    """Run the commands in `work` (a command whose output is already there is not run again) and hash the outputs."""
    work.mkdir(parents=True, exist_ok=True)
    seconds = {}

    def _spo(*args: str, cwd: Path, output: str) -> float:
        return 0.0 if (cwd / output).exists() else _run_spo(*args, cwd=cwd)

    seconds["train"] = _spo("train", "--no-evaluate", "--no-report", "--report-to", "none", "--output-dir", "train",
                            cwd=work, output="train/history.json")
    seconds["dpo"] = _spo("dpo", "--no-evaluate", "--no-report", "--report-to", "none", "--epochs", "1",
                          "--max-pairs", "48", "--output-dir", "dpo", cwd=work, output="dpo/history.json")
    seconds["toy pairs"] = _spo("toy", "pairs", "--source", "render", "-n", "48", "--out", "pairs.parquet", cwd=work,
                              output="pairs.parquet")
    seconds["spm train"] = _spo("spm", "train", "pairs.parquet", "--out", "spm", "--steps", "6", "--batch-size", "4",
                                "--warmup", "2", "--checkpoint-every", "3", "--no-progress", cwd=work,
                                output="spm/spm")
    lora = next((work / "train").glob("spo_*.safetensors"))
    if not (work / "base_sd15").is_dir():  # a diffusers folder; recipes read only inside their own folder
        import shutil

        shutil.copytree(Path(__import__("spo").__file__).parent / "assets" / "toy_models" / "sd15", work / "base_sd15")
    (work / "recipe.toml").write_text('base = "base_sd15"\noutput = "merged.safetensors"\n\n'
                                      f'[[lora]]\npath = "train/{lora.name}"\nstrength = 0.75\n')
    seconds["merge"] = _spo("merge", "recipe.toml", "--out", "merged.safetensors", cwd=work,
                            output="merged.safetensors")
    seconds["generate"] = _spo("generate", "--lora", f"train/{lora.name}:1.0", "--prompt", "a red circle",
                               "--prompt", "a blue square on a green background", "--seed", "7", "--out", "generate",
                               cwd=work, output="generate")
    manifest = {"outputs": {}, "seconds": {k: round(v, 1) for k, v in seconds.items()}}
    for name in ("train", "dpo", "spm", "generate"):
        manifest["outputs"][name] = hash_tree(work / name)
    manifest["outputs"]["merge"] = {"merged.safetensors": hash_safetensors(work / "merged.safetensors")}
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    print(f"wrote {target} ({sum(len(v) for v in manifest['outputs'].values())} outputs; seconds {manifest['seconds']})")


def compare(before: Path, after: Path) -> int:
    a, b = (json.loads(p.read_text())["outputs"] for p in (before, after))
    lines, bad = [], 0
    for command in sorted(set(a) | set(b)):
        files = sorted(set(a.get(command, {})) | set(b.get(command, {})))
        same = [f for f in files if a.get(command, {}).get(f) == b.get(command, {}).get(f)]
        differ = [f for f in files if f not in same]
        bad += len(differ)
        lines.append(f"{command}: {len(same)}/{len(files)} outputs bit-identical"
                     + (f"; differ: {', '.join(differ)}" if differ else ""))
    lines.append("ALL BIT-IDENTICAL" if bad == 0 else f"{bad} OUTPUTS DIFFER")
    print("\n".join(lines))
    return 0 if bad == 0 else 1


def grid_cells(before: Path, after: Path, cell: int = 128) -> str:
    """Validation grids that gained per-image labels (a strip under each row): are the image cells the same?"""
    import numpy as np
    from PIL import Image

    a, b = (np.asarray(Image.open(p).convert("RGB")) for p in (before, after))
    cols, rows = a.shape[1] // cell, a.shape[0] // cell
    strip = b.shape[0] // rows - cell
    same = sum(np.array_equal(a[r * cell:(r + 1) * cell, c * cell:(c + 1) * cell],
                              b[r * (cell + strip):r * (cell + strip) + cell, c * cell:(c + 1) * cell])
               for r in range(rows) for c in range(cols))
    return f"{after.name}: {same} of {rows * cols} image cells pixel-identical (label strip {strip} px per row)"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="action", required=True)
    r = sub.add_parser("record")
    r.add_argument("out", type=Path)
    r.add_argument("--work", type=Path, default=None, help="folder for the commands' outputs (default: a temporary one)")
    c = sub.add_parser("compare")
    c.add_argument("before", type=Path)
    c.add_argument("after", type=Path)
    g = sub.add_parser("cells", help="image cells of labelled validation grids against unlabelled ones")
    g.add_argument("pairs", type=Path, nargs="+", help="BEFORE.png AFTER.png [BEFORE.png AFTER.png ...]")
    args = parser.parse_args()
    if args.action == "compare":
        return compare(args.before, args.after)
    if args.action == "cells":
        print("\n".join(grid_cells(a, b) for a, b in zip(args.pairs[::2], args.pairs[1::2])))
        return 0
    if args.work is not None:
        record(args.out.resolve(), args.work.resolve())
    else:
        with tempfile.TemporaryDirectory() as tmp:
            record(args.out.resolve(), Path(tmp))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
