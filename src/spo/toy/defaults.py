"""Where the shipped toy models live and the toy world's default training budgets: kept apart from the
trainers so that building the CLI (argparse defaults) and finding the toy models import neither torch nor
diffusers; every `spo` command starts seconds sooner."""

import json
from functools import lru_cache
from pathlib import Path

TOY_MODEL_DIR = Path(__file__).resolve().parent.parent / "assets" / "toy_models"
TOY_SPM_DIR = Path(__file__).resolve().parent.parent / "assets" / "toy_spm"  # the shipped toy SPMs, one per family
# The shipped base models' total budget (build_info.json's `history` records the stages that made them).
MODELS = {"n_images": 6000, "vae_steps": 400, "decoder_steps": 1200, "unet_steps": 7500, "batch": 32}
# The toy CLIP an SPM starts from (`spo toy clip`).
CLIP = {"n_images": 8000, "steps": 1500, "batch": 128, "lr": 1e-3}


@lru_cache(maxsize=1)
def shipped_world() -> int:
    """The toy world (1, 2: `spo.toy.detail`) the shipped models were built for, read from their build record.

    The judge's aesthetic, the renders behind `spo toy pairs` and the toy CLIP follow it, so that rebuilding the
    models (tools/rebuild_toy_world.sh copies them in first) switches every later step to their world at once.
    """
    return model_world(TOY_MODEL_DIR / "sd15")


def model_world(folder: Path) -> int:
    """The toy world a toy pipeline folder was built for (its build_info.json; 1 when it has none)."""
    info = Path(folder) / "build_info.json"
    return int(json.loads(info.read_text()).get("world", 1)) if info.is_file() else 1
