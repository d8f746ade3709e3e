"""Where the shipped toy models live and the toy world's default training budgets: kept apart from the
trainers so that building the CLI (argparse defaults) and finding the toy models import neither torch nor
diffusers; every `spo` command starts seconds sooner."""

from pathlib import Path

TOY_MODEL_DIR = Path(__file__).resolve().parent.parent / "assets" / "toy_models"
TOY_SPM_DIR = Path(__file__).resolve().parent.parent / "assets" / "toy_spm"  # the shipped toy SPMs, one per family
# The shipped base models' total budget (build_info.json's `history` records the stages that made them).
MODELS = {"n_images": 6000, "vae_steps": 400, "decoder_steps": 1200, "unet_steps": 7500, "batch": 32}
# The toy CLIP an SPM starts from (`spo toy clip`).
CLIP = {"n_images": 8000, "steps": 1500, "batch": 128, "lr": 1e-3}
