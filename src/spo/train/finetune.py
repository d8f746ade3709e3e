"""The UNet that SPO and Diffusion-DPO fine-tune: LoRA (new or continued) or the whole UNet, its frozen reference,
its per-epoch outputs (LoRA folder, validation grid) and its final forms (diffusers LoRA + webui LoRA, or a UNet).

`FinetuneMethod` is the engine Method both recipes build on: the epoch-0 grid, the epoch-end LoRA and grid, the
in-epoch checkpoint cadence, the data order of an epoch and the per-item generators.
"""

from __future__ import annotations

import contextlib
import copy
from pathlib import Path

import torch

from spo.errors import SpoInputError
from spo.faults import maybe_fail
from spo.train.config import FinetuneConfig
from spo.train.engine import Method, Run

WEIGHT_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def weight_dtype(cfg: FinetuneConfig) -> torch.dtype:
    """The frozen weights' dtype under mixed precision (the trained LoRA stays fp32)."""
    return WEIGHT_DTYPES.get(cfg.mixed_precision, torch.float32)


def load_dtype(cfg: FinetuneConfig) -> torch.dtype:
    """The dtype the base model is loaded in: half under mixed precision (frozen text encoders, VAE and a LoRA's base
    UNet are never upcast, which halves the memory of loading a half-precision checkpoint); fp32 when the whole UNet
    trains."""
    return torch.float32 if cfg.full_finetune else weight_dtype(cfg)


def item_generators(seed: int, epoch: int, positions: list[int]) -> list[torch.Generator]:
    """One generator per data item, from (seed, epoch, position): resumed and sharded runs draw the same numbers."""
    return [torch.Generator().manual_seed(hash((seed, epoch, p)) % (2**63)) for p in positions]


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7919 + epoch))


# ------------------------------------------------------------------------------------------ the model
def add_lora(unet, cfg: FinetuneConfig) -> None:
    from peft import LoraConfig

    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, init_lora_weights="gaussian",
                                target_modules=list(cfg.lora_targets)))
    if not any(p.requires_grad for p in unet.parameters()):
        raise SpoInputError(f"lora_targets {cfg.lora_targets} matched no module of this UNet")


def continue_lora(unet, path: str, family: str) -> None:
    """Start from an existing LoRA (diffusers or webui format): its rank, alpha and modules replace the config's."""
    from peft import LoraConfig
    from peft.utils import set_peft_model_state_dict

    from spo.formats.webui_lora import load_lora

    state, rank, alpha, _ = load_lora(path, family=family)
    unet_state = {k[len("unet."):]: v for k, v in state.items() if k.startswith("unet.")}
    if not unet_state:
        raise SpoInputError(f"{path}: this LoRA has no UNet weights to continue training from")
    targets = sorted({k.rsplit(".lora_", 1)[0] for k in unet_state})
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets))
    result = set_peft_model_state_dict(unet, unet_state, adapter_name="default")
    if getattr(result, "unexpected_keys", None):
        raise SpoInputError(f"{path}: LoRA keys that do not fit this UNet, e.g. {result.unexpected_keys[:2]}")


def setup_unet(pipe, cfg: FinetuneConfig, family: str, device) -> tuple[torch.nn.Module, torch.nn.Module | None, list]:
    """Freeze VAE and text encoders; LoRA (new or continued) or full fine-tuning. Returns (unet, frozen_copy, params)."""
    dtype = weight_dtype(cfg)
    pipe.to(device)
    for m in (pipe.vae, pipe.text_encoder, getattr(pipe, "text_encoder_2", None)):
        if m is not None:
            m.requires_grad_(False).eval()
    unet = pipe.unet
    frozen_copy = None
    if cfg.full_finetune:
        # Full fine-tuning cannot disable an adapter to get the base back: keep a frozen copy (documented cost).
        frozen_copy = copy.deepcopy(unet).requires_grad_(False).eval().to(dtype)
        unet.requires_grad_(True)
    else:
        if cfg.init_lora:
            continue_lora(unet, cfg.init_lora, family)
        else:
            add_lora(unet, cfg)
        unet.to(dtype)
        for p in unet.parameters():  # train the LoRA in fp32; the frozen base may be fp16/bf16
            if p.requires_grad:
                p.data = p.data.float()
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    return unet, frozen_copy, [p for p in unet.parameters() if p.requires_grad]


@contextlib.contextmanager
def reference_model(unet, frozen_copy):
    """The frozen base: the LoRA UNet with adapters disabled, or the frozen copy when fine-tuning fully."""
    if frozen_copy is not None:
        yield frozen_copy
        return
    unet.disable_adapters()
    try:
        yield unet
    finally:
        unet.enable_adapters()


# ------------------------------------------------------------------------------------------ outputs
def lora_state_dict(unet) -> dict[str, torch.Tensor]:
    """peft names (`...to_q.lora_A.weight`): what current diffusers writes and reads."""
    from peft.utils import get_peft_model_state_dict

    return get_peft_model_state_dict(unet)


def save_lora(pipe, unet, folder: Path, summary: dict) -> Path:
    """A diffusers-format LoRA folder (pytorch_lora_weights.safetensors), written atomically."""
    from spo.io import atomic_dir, write_json

    with atomic_dir(folder) as tmp:
        # The adapter metadata records rank and alpha, so loaders do not have to assume alpha = rank.
        type(pipe).save_lora_weights(tmp, unet_lora_layers={k: v.detach().float().cpu().contiguous()
                                                            for k, v in lora_state_dict(unet).items()},
                                     unet_lora_adapter_metadata=unet.peft_config["default"].to_dict(),
                                     safe_serialization=True)
        maybe_fail("lora_save")  # test seam: killed with the weights written, before the summary and the rename
        write_json(tmp / "training_summary.json", summary)
    return folder / "pytorch_lora_weights.safetensors"


def final_outputs(pipe, model, cfg: FinetuneConfig, out: Path, family: str, summary: dict, method: str) -> dict:
    """The fine-tuned UNet, or the LoRA in diffusers format plus its A1111/ComfyUI (webui) version."""
    from spo.formats.webui_lora import export_lora
    from spo.io import atomic_dir

    if cfg.full_finetune:
        with atomic_dir(out / "unet") as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
        return {"unet": str(out / "unet")}
    lora = save_lora(pipe, model, out / "lora", summary)
    webui = export_lora(out / "lora", out, formats=("webui",), name=f"{method}_{family}", family=family,
                        training=summary)["webui"]
    return {"lora": str(lora), "lora_webui": str(webui)}


def validation_prompts(cfg: FinetuneConfig, prompts: list[str]) -> list[str]:
    """A built-in base's own held-out prompts, else the first training prompts; the same every epoch."""
    from spo.sources import get

    source = get(cfg.base)
    if source is not None:
        return source.heldout_prompts(cfg.validation_images, 1234)
    return [prompts[i % len(prompts)] for i in range(cfg.validation_images)]


@torch.no_grad()
def validation_grid(pipe, unet, prompts: list[str], cfg: FinetuneConfig, target: Path) -> None:
    """Same prompts and seeds every epoch: DDIM 20 steps, CFG 5, eta 0 (the paper's evaluation setting)."""
    if not prompts:
        return
    from spo.io import save_image
    from spo.sampling.images import sample_native, spread_seeds
    from spo.show.grid import image_grid

    was_training = unet.training
    unet.eval()
    seeds = spread_seeds(cfg.seed, len(prompts))
    images = sample_native(pipe, prompts, seeds, steps=20, cfg=5.0, batch=16, progress=False)
    unet.train(was_training)
    labels = [f"seed {s} · {p}" for s, p in zip(seeds, prompts)]  # the seed first: a long prompt is cut, not it
    save_image(image_grid(images, scale=max(1, 128 // images[0].size[0]), labels=labels), target)


# ------------------------------------------------------------------------------------------ the method
class FinetuneMethod(Method):
    """What SPO and Diffusion-DPO share as engine methods: per-epoch LoRA and grid, in-epoch checkpoints."""

    title = ""  # "SPO", "Diffusion-DPO": the summary's method name

    def __init__(self, cfg: FinetuneConfig, pipe, family: str, frozen_copy, val_prompts: list[str]):
        self.cfg, self.pipe, self.family, self.frozen_copy, self.val_prompts = cfg, pipe, family, frozen_copy, val_prompts
        self.weights = "UNet" if cfg.full_finetune else "LoRA"
        self.dtype = weight_dtype(cfg)
        self._order: tuple[int, torch.Tensor] | None = None

    def epochs(self) -> int:
        return self.cfg.epochs

    def order(self, n: int, epoch: int) -> torch.Tensor:
        """This epoch's data order (a pure function of seed and epoch), computed once per epoch."""
        if self._order is None or self._order[0] != epoch:
            self._order = (epoch, epoch_order(n, self.cfg.seed, epoch))
        return self._order[1]

    def reference(self, run: Run):
        return lambda: reference_model(run.model, self.frozen_copy)

    def checkpoint_due(self, run: Run) -> bool:
        every, batch = self.cfg.checkpoint_every_batches, run.progress.batch
        return bool(every) and batch % every == 0 and batch < self.batches_per_epoch()

    def on_start(self, run: Run) -> None:
        validation_grid(self.pipe, run.model, self.val_prompts, self.cfg, run.out / "samples" / "epoch-000.png")

    def on_epoch_end(self, run: Run) -> bool:
        """The epoch's LoRA and validation grid, then (returning True) its checkpoint.

        This order matters: a run killed in between redoes them on resume; the other order would resume past
        them and never write them.
        """
        epoch = run.progress.epoch
        if epoch % self.cfg.save_every_epochs and epoch != self.cfg.epochs:
            return False
        run.accelerator.wait_for_everyone()
        if run.is_main:
            if not self.cfg.full_finetune:
                save_lora(self.pipe, run.model, run.out / f"lora-epoch-{epoch:03d}", self.summary(run))
            validation_grid(self.pipe, run.model, self.val_prompts, self.cfg, run.out / "samples" / f"epoch-{epoch:03d}.png")
        return True

    def summary(self, run: Run) -> dict:
        return {"method": self.title, "family": self.family, "base": self.cfg.base, **run.summary()}

    def finish(self, run: Run) -> dict:
        """Final outputs and history (main process); the result dict of the recipe."""
        from spo.io import write_json

        result = {"output_dir": str(run.out), "epochs": run.progress.epoch, "steps": run.progress.step,
                  "seconds": round(run.summary()["seconds"], 1), "history": run.history, "model": run.model}
        run.accelerator.wait_for_everyone()
        if run.is_main:
            result.update(final_outputs(self.pipe, run.model, self.cfg, run.out, self.family, self.summary(run),
                                        self.name))
            write_json(run.out / "history.json", run.history)
        run.close()
        return result
