"""Generate images with a base model plus LoRAs at any strengths: txt2img and img2img, schedulers by name.

Everything a user needs to reproduce an image goes into its PNG (A1111's "parameters" text) and into the
folder's `index.json`. Image i of a run uses seed + i, with one torch.Generator per image, so an image
depends only on its own seed and settings (not on the batch it was made in): runs compare seed for seed.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from spo import sources
from spo.sampling.images import MAX_SEED  # one seed range for the command line and the API
from spo.errors import SpoInputError
from spo.io import check_output_dir

# name -> (diffusers class, extra config, A1111 sampler name, A1111 schedule type)
SCHEDULERS: dict[str, tuple[str, dict, str, str | None]] = {
    "ddim": ("DDIMScheduler", {}, "DDIM", None),
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}, "PLMS", None),
    "plms": ("PNDMScheduler", {"skip_prk_steps": True}, "PLMS", None),
    "euler": ("EulerDiscreteScheduler", {}, "Euler", None),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}, "Euler a", None),
    "heun": ("HeunDiscreteScheduler", {}, "Heun", None),
    "lms": ("LMSDiscreteScheduler", {}, "LMS", None),
    "dpm2": ("KDPM2DiscreteScheduler", {}, "DPM2", None),
    "dpm2_a": ("KDPM2AncestralDiscreteScheduler", {}, "DPM2 a", None),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}, "DPM++ 2M", None),
    "dpmpp_2m_karras": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "use_karras_sigmas": True},
                        "DPM++ 2M", "Karras"),
    "dpmpp_2m_sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}, "DPM++ 2M SDE", None),
    "dpmpp_2m_sde_karras": ("DPMSolverMultistepScheduler",
                            {"algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": True}, "DPM++ 2M SDE", "Karras"),
    "dpmpp_2s": ("DPMSolverSinglestepScheduler", {}, "DPM++ 2S", None),
    "unipc": ("UniPCMultistepScheduler", {}, "UniPC", None),
    "deis": ("DEISMultistepScheduler", {}, "DEIS", None),
    "ddpm": ("DDPMScheduler", {}, "DDPM", None),
}
DEFAULT_SCHEDULER, DEFAULT_STEPS, DEFAULT_CFG = "ddim", 20, 5.0  # SPO's evaluation setting
DEFAULT_DENOISE = 0.75  # A1111's img2img default
DEFAULT_MODEL = sources.DEFAULT_SOURCE


def check_scheduler(name: str) -> str:
    key = name.strip().lower().replace("-", "_").replace("+", "p").replace(" ", "_")
    if key not in SCHEDULERS:
        raise SpoInputError(f"unknown scheduler {name!r} (choose from {', '.join(SCHEDULERS)})")
    return key


def check_seed(seed: int, count: int = 1) -> int:
    """Image i of a run gets seed + i: all of them must be seeds numpy and torch accept."""
    if seed < 0 or seed + count - 1 > MAX_SEED:
        raise SpoInputError(f"seed {seed}" + (f" (+ {count - 1} more image{'s' if count > 2 else ''})" if count > 1 else "")
                            + f" is outside 0..{MAX_SEED}")
    return seed


def check_denoise(denoise: float, steps: int) -> float:
    if not (0.0 < denoise <= 1.0):
        raise SpoInputError(f"denoise strength must be in (0, 1], got {denoise:g}")
    if int(steps * denoise) < 1:  # diffusers runs int(steps * denoise) steps; zero would be no generation at all
        raise SpoInputError(f"denoise {denoise:g} with {steps} steps runs no denoising step; raise --denoise or --steps")
    return denoise


MAX_STRENGTH = 100.0  # |strength| beyond this only overflows (1e308 gives NaN latents, all-black images)
MAX_STEPS = 1000  # the schedulers' training timesteps: diffusers cannot sample more steps than that


def parse_strength(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise SpoInputError(f"LoRA strength {text!r} is not a number") from None
    return check_strength(value, text)


def check_strength(value: float, text: str | None = None) -> float:
    shown = text if text is not None else f"{value:g}"
    if value != value or value in (float("inf"), float("-inf")):
        raise SpoInputError(f"LoRA strength {shown!r} is not a finite number")
    if abs(value) > MAX_STRENGTH:
        raise SpoInputError(f"LoRA strength {shown} is outside -{MAX_STRENGTH:g}..{MAX_STRENGTH:g}")
    return float(value)


def check_steps(steps: int) -> int:
    if steps < 1:
        raise SpoInputError(f"--steps must be at least 1, got {steps}")
    if steps > MAX_STEPS:
        raise SpoInputError(f"--steps {steps} is more than {MAX_STEPS} (the model's training timesteps)")
    return steps


@dataclass
class LoraSpec:
    path: Path  # the .safetensors file
    strength: float
    name: str  # shown in <lora:name:strength> and "Lora hashes"

    @property
    def hash(self) -> str:
        """A1111's LoRA short hash: the first 12 hex digits of the file's sshs_model_hash, else of the sha256 of the
        data after the header (the order A1111's Lora extension takes them in)."""
        from spo.formats.metadata import data_sha256, read_metadata

        try:
            stored = str(read_metadata(self.path).get("sshs_model_hash", ""))
        except (ValueError, AttributeError, OSError, SpoInputError):  # an odd header: the data hash still tells
            stored = ""
        if re.fullmatch(r"[0-9a-fA-F]{64}", stored):
            return stored[:12].lower()
        return data_sha256(self.path)[:12]


def resolve_lora_file(path: Path) -> Path:
    """A LoRA file, or a folder holding one (diffusers' pytorch_lora_weights.safetensors or a single .safetensors)."""
    if not path.exists():
        raise SpoInputError(f"LoRA {path}: no such file or folder")
    if path.is_dir():
        preferred = path / "pytorch_lora_weights.safetensors"
        if preferred.is_file():
            return preferred
        files = sorted(path.glob("*.safetensors"))
        if len(files) != 1:
            raise SpoInputError(f"LoRA folder {path}: expected one .safetensors file, found {len(files)}")
        return files[0]
    if path.suffix.lower() != ".safetensors":
        raise SpoInputError(f"LoRA {path}: expected a .safetensors file")
    return path


def parse_lora(text: str) -> LoraSpec:
    """"PATH" or "PATH:STRENGTH" (strength may be negative or above 1)."""
    path_text, strength = text, 1.0
    head, sep, tail = text.rpartition(":")
    if sep and head and not Path(text).exists():  # a path may itself contain ':' (then it exists as a whole)
        path_text, strength = head, parse_strength(tail)
    file = resolve_lora_file(Path(path_text))
    name = file.parent.name if file.name == "pytorch_lora_weights.safetensors" else file.stem
    name = re.sub(r"[<>:\s]+", "_", name) or "lora"
    return LoraSpec(file, strength, name)


def model_label(source: str) -> str:
    text = str(source)
    if sources.get(text) is not None:  # a built-in model: its name, with ':' spelled '_' as in a file stem
        return text.replace(":", "_")
    p = Path(text)
    return p.stem if p.is_file() else p.name


def model_hash(source: str) -> str | None:
    """A1111's "Model hash" of a single-file checkpoint; None for a diffusers folder or a built-in model (no file)."""
    from spo.formats.metadata import a1111_model_hash

    path = Path(str(source))
    return a1111_model_hash(path) if path.is_file() else None


MAX_SIDE = 4096  # 4x SDXL's native side; beyond it the latents alone would exhaust memory


def check_size(width: int, height: int) -> None:
    for label, v in (("width", width), ("height", height)):
        if v <= 0 or v % 8:
            raise SpoInputError(f"{label} must be a positive multiple of 8, got {v}")
        if v > MAX_SIDE:
            raise SpoInputError(f"{label} {v} is too large (at most {MAX_SIDE})")


def load_init_image(path: str | os.PathLike):
    from spo.show.scoring import open_image

    return open_image(path, "init image")


def warn_unreadable_prompts(model, prompts: list[str]) -> None:
    """One line when a built-in model cannot read a prompt (the toy reads only its own grammar); the run goes on."""
    import sys

    from spo import sources

    source = sources.get(model)  # None for a path; an unknown name is refused here, before anything loads
    if source is None or source.prompt_warning is None:
        return
    unique = list(dict.fromkeys(prompts))
    bad = [msg for p in unique if (msg := source.prompt_warning(p)) is not None]
    if bad:
        more = f"; {len(bad)} of {len(unique)} prompts are" if len(bad) > 1 else ""
        print(f"warning: {bad[0]} (see docs/toy-world.md{more})", file=sys.stderr)


def read_prompts_file(path: str | os.PathLike, column: str | None = None) -> list[str]:
    """Prompts from a JSON list, text, CSV/parquet/JSONL file: the trainer's reader (spo.data.prompts)."""
    from spo.data.prompts import load_prompts

    prompts = list(load_prompts(path, column))
    if not prompts:
        raise SpoInputError(f"prompts file {path}: no prompts in it")
    return prompts


@dataclass
class Settings:
    """What one image is made with (everything but the prompt and seed)."""
    steps: int = DEFAULT_STEPS
    cfg: float = DEFAULT_CFG
    scheduler: str = DEFAULT_SCHEDULER
    width: int | None = None
    height: int | None = None
    negative_prompt: str = ""
    denoise: float | None = None  # img2img only
    strengths: list[float] = field(default_factory=list)  # one per LoRA
    prediction_type: str = "auto"  # what the UNet predicts: auto (the model's own) | epsilon | v_prediction
    guidance_rescale: float = -1.0  # rescaled CFG phi; -1: auto (0.7 for a zero-terminal-SNR model, else 0)
    dtype: str = "fp32"  # the weights' precision: fp32 | bf16 | fp16 (GPU)


class Generator:
    """A loaded pipeline (txt2img or img2img) with its LoRAs; strengths and scheduler change per call."""

    def __init__(self, model: str = DEFAULT_MODEL, loras: list[LoraSpec] | None = None, *, family: str | None = None,
                 img2img: bool = False, device: str | None = None, vae: str | os.PathLike | None = None,
                 prediction_type: str = "auto", dtype: str = "fp32"):
        import torch

        from spo.dtypes import weights_dtype
        from spo.models.loading import load_pipeline

        self.model = str(model)
        self.vae = str(vae) if vae else None
        self.loras = list(loras or [])
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        pipe = load_pipeline(model, family, dtype=weights_dtype(dtype, torch.device(self.device).type), vae=vae,
                             prediction_type=prediction_type)
        if img2img:
            from diffusers import AutoPipelineForImage2Image

            # Same modules, img2img call: the LoRAs loaded below land in the shared UNet / text encoders.
            pipe = AutoPipelineForImage2Image.from_pipe(pipe)
        pipe = pipe.to(self.device)
        pipe.set_progress_bar_config(disable=True)
        self.pipe = pipe
        self.img2img = img2img
        self.base_scheduler_config = dict(pipe.scheduler.config)
        self.base_scheduler = pipe.scheduler  # the model's own (DDIM) scheduler: its prediction type and schedule
        self.scheduler = None
        self.adapters: list[str] = []
        for i, spec in enumerate(self.loras):
            adapter = f"lora{i}"
            check_lora_file(spec, self.family)
            try:
                with _quiet_diffusers():  # "no text-encoder keys" notices are normal for UNet-only LoRAs
                    pipe.load_lora_weights(str(spec.path.parent), weight_name=spec.path.name, adapter_name=adapter)
            except (ValueError, KeyError, RuntimeError, OSError) as exc:
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise SpoInputError(f"LoRA {spec.path}: cannot apply it to {self.model} ({first[:200]})") from None
            self.adapters.append(adapter)
        bad = first_non_finite(pipe)
        if bad is not None:
            raise SpoInputError(f"model {self.model}: weight {bad} holds NaN or infinite values; its images would "
                                "be blank")
        self._strengths: list[float] | None = None

    @property
    def family(self) -> str:
        from spo.models.family import family_of

        return family_of(self.pipe)

    def set_strengths(self, strengths: list[float]) -> None:
        if not self.adapters:
            return
        if len(strengths) != len(self.adapters):
            raise SpoInputError(f"{len(self.adapters)} LoRAs but {len(strengths)} strengths")
        if strengths != self._strengths:
            self.pipe.set_adapters(self.adapters, adapter_weights=[float(s) for s in strengths])
            self._strengths = list(strengths)

    def set_scheduler(self, name: str) -> None:
        key = check_scheduler(name)
        if key == self.scheduler:
            return
        import diffusers

        cls_name, extra, _, _ = SCHEDULERS[key]
        check_scheduler_supports(key, getattr(diffusers, cls_name), self.base_scheduler_config)
        self.pipe.scheduler = getattr(diffusers, cls_name).from_config(self.base_scheduler_config, **extra)
        self.scheduler = key

    def size(self, settings: Settings, init_image=None) -> tuple[int, int]:
        if init_image is not None and (settings.width is None or settings.height is None):
            w0, h0 = init_image.size
            w, h = settings.width or max(8, w0 // 8 * 8), settings.height or max(8, h0 // 8 * 8)
        else:
            from spo.models.family import native_resolution

            side = native_resolution(self.pipe)
            w, h = settings.width or side, settings.height or side
        check_size(w, h)
        return w, h

    def __call__(self, prompts: list[str], seeds: list[int], settings: Settings, init_image=None, batch: int = 8):
        """One image per (prompt, seed) pair, in order."""
        import numpy as np
        from PIL import Image

        from spo.sampling.images import sample_images

        if len(prompts) != len(seeds):
            raise ValueError("prompts and seeds differ in length")
        for s in seeds:
            check_seed(int(s))
        self.set_scheduler(settings.scheduler)
        self.set_strengths(settings.strengths or [s.strength for s in self.loras])
        w, h = self.size(settings, init_image)
        check_steps(settings.steps)
        trained = int(self.pipe.scheduler.config.get("num_train_timesteps", MAX_STEPS))
        if settings.steps > trained:
            raise SpoInputError(f"--steps {settings.steps} is more than the model's {trained} training timesteps")
        # "np", not "pil": the same pixels (numpy_to_pil below is what "pil" runs), but NaN stays visible
        kwargs = {"num_inference_steps": settings.steps, "guidance_scale": settings.cfg, "output_type": "np"}
        from spo.models.prediction import parameterisation

        rescale = parameterisation(self.base_scheduler, settings.guidance_rescale).guidance_rescale
        if rescale > 0:  # diffusers' pipelines apply it (rescale_noise_cfg); 0 leaves the call as it always was
            kwargs["guidance_rescale"] = rescale
        if init_image is not None:
            if settings.denoise is None:
                raise ValueError("img2img needs a denoise strength")
            kwargs["strength"] = check_denoise(settings.denoise, settings.steps)
            init = init_image if init_image.size == (w, h) else init_image.resize((w, h), Image.LANCZOS)
        elif not self.img2img:
            kwargs.update(width=w, height=h)
        per_image = {"image": [init] * len(prompts)} if init_image is not None else {}
        if settings.negative_prompt:
            per_image["negative_prompt"] = [settings.negative_prompt] * len(prompts)
        pixels = np.stack(sample_images(self.pipe, prompts, seeds, batch=batch, generator_device=self.device,
                                        per_image=per_image, **kwargs))
        finite = np.isfinite(pixels.reshape(len(pixels), -1)).all(axis=1)
        if not finite.all():
            strengths = f", LoRA strengths {', '.join(f'{v:g}' for v in self._strengths)}" if self._strengths else ""
            raise SpoInputError(f"the image for seed {seeds[int(np.argmin(finite))]} came out NaN/inf (the sampling "
                                f"overflowed: CFG {settings.cfg:g}{strengths}); nothing written for it")
        return self.pipe.image_processor.numpy_to_pil(pixels)

    def infotext(self, prompt: str, seed: int, settings: Settings, size: tuple[int, int], extra: dict | None = None) -> str:
        from spo import __version__
        from spo.show import infotext as it

        strengths = settings.strengths or [s.strength for s in self.loras]
        _, _, sampler, schedule = SCHEDULERS[check_scheduler(settings.scheduler)]
        shown = prompt + it.lora_tags([(s.name, v) for s, v in zip(self.loras, strengths)])
        params = {"Steps": settings.steps, "Sampler": sampler, "Schedule type": schedule,
                  "CFG scale": it.fmt_number(settings.cfg), "Seed": it.seed_used(seed), "Size": f"{size[0]}x{size[1]}",
                  "Model hash": model_hash(self.model), "Model": model_label(self.model),
                  "Denoising strength": it.fmt_number(settings.denoise) if settings.denoise is not None else None}
        if self.loras:
            params["Lora hashes"] = it.lora_hashes((s.name, s.hash) for s in self.loras)
        if self.vae:  # as A1111 writes them (the hash: single files only, like "Model hash")
            params.update({"VAE hash": model_hash(self.vae), "VAE": Path(self.vae).name})
        params.update(extra or {})
        params["Version"] = f"spo {__version__}"
        return it.build(shown, settings.negative_prompt, params)

    def record(self, file: str, prompt: str, seed: int, settings: Settings, size, init_image_path=None) -> dict:
        """One entry of index.json."""
        strengths = settings.strengths or [s.strength for s in self.loras]
        return {"file": file, "prompt": prompt, "negative_prompt": settings.negative_prompt, "seed": int(seed),
                "steps": settings.steps, "scheduler": check_scheduler(settings.scheduler),
                "sampler": SCHEDULERS[check_scheduler(settings.scheduler)][2], "cfg": settings.cfg,
                "width": size[0], "height": size[1], "model": self.model,
                "denoise": settings.denoise, "init_image": str(init_image_path) if init_image_path else None,
                "loras": [{"name": s.name, "path": str(s.path), "strength": v, "hash": s.hash}
                          for s, v in zip(self.loras, strengths)], **({"vae": self.vae} if self.vae else {})}


FAMILY_NAMES = {"sd15": "SD1.5", "sdxl": "SDXL"}


def check_scheduler_supports(name: str, cls, base_config: dict) -> None:
    """A zero-terminal-SNR or v-prediction model with a diffusers scheduler that cannot express it is one line,
    not images from the wrong schedule (from_config would drop the setting with a log notice)."""
    import inspect

    params = inspect.signature(cls.__init__).parameters
    if base_config.get("rescale_betas_zero_snr") and "rescale_betas_zero_snr" not in params:
        raise SpoInputError(f"scheduler {name} cannot sample a zero-terminal-SNR model (diffusers' {cls.__name__} has "
                            "no rescale_betas_zero_snr); use ddim, euler, euler_a, dpmpp_2m or unipc")
    if base_config.get("prediction_type", "epsilon") != "epsilon" and "prediction_type" not in params:
        raise SpoInputError(f"scheduler {name} cannot sample a {base_config['prediction_type']} model")


def check_lora_file(spec: LoraSpec, family: str) -> None:
    """Before diffusers loads it: a LoRA of the other family is one line (diffusers prints pages of state-dict
    mismatches), and NaN/inf weights are refused (they turn every image black)."""
    import torch

    from spo.formats.webui_lora import lora_family, read_safetensors

    tensors, meta = read_safetensors(spec.path)
    bad = next((k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all()), None)
    if bad is not None:
        raise SpoInputError(f"LoRA {spec.path}: tensor {bad} holds NaN or infinite values")
    try:
        found = lora_family(tensors, meta, default=family)
    except SpoInputError:
        return  # nothing tells; diffusers' own loader decides
    if found != family:
        raise SpoInputError(f"LoRA {spec.path}: an {FAMILY_NAMES[found]}-family LoRA cannot load on an "
                            f"{FAMILY_NAMES[family]}-family model")


def first_non_finite(pipe) -> str | None:
    """The name of the first weight of the pipeline's models holding NaN/inf (a broken checkpoint), or None."""
    import torch

    for component in ("unet", "text_encoder", "text_encoder_2", "vae"):
        module = getattr(pipe, component, None)
        if module is None:
            continue
        for name, p in module.named_parameters():
            if p.is_floating_point() and not torch.isfinite(p).all():
                return f"{component}.{name}"
    return None


class _quiet_diffusers:
    def __enter__(self):
        from diffusers.utils import logging

        self._level = logging.get_verbosity()
        logging.set_verbosity_error()

    def __exit__(self, *exc):
        from diffusers.utils import logging

        logging.set_verbosity(self._level)


_COUNTER = re.compile(r"^(\d{5})-")


def next_counter(folder: Path) -> int:
    """A1111-style file numbering: continue after the highest NNNNN- prefix already in the folder."""
    numbers = [int(m.group(1)) for p in folder.glob("*.png") if (m := _COUNTER.match(p.name))]
    return max(numbers) + 1 if numbers else 0


def merge_index(path: Path, entries: list[dict], run: dict) -> dict:
    """index.json keeps earlier runs' entries (replaced when a file name repeats)."""
    old: dict = {}
    if path.is_file():
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            old = {}
    images = {e["file"]: e for e in old.get("images", []) if isinstance(e, dict) and "file" in e}
    images.update({e["file"]: e for e in entries})
    return {"format": "spo-generate-index/1", "runs": old.get("runs", []) + [run],
            "images": sorted(images.values(), key=lambda e: e["file"])}


def generate(model: str, prompts: list[str], out: str | os.PathLike, *, loras: list[LoraSpec] | None = None,
             settings: Settings | None = None, seed: int = 0, num_images: int = 1, init_image: str | None = None,
             family: str | None = None, batch: int = 8, log=print, max_images: int | None = None,
             vae: str | os.PathLike | None = None) -> list[Path]:
    """Generate num_images per prompt (image i of the run gets seed + i) into `out`; returns the PNG paths."""
    from tqdm.auto import tqdm

    from spo.io import ensure_writable_dir, save_image, write_json
    from spo.show import infotext as it

    settings = settings or Settings()
    prompts = [p for p in prompts]
    if not prompts or any(not p.strip() for p in prompts):
        raise SpoInputError("give at least one non-empty prompt (--prompt or --prompts FILE)")
    if num_images < 1:
        raise SpoInputError(f"--num-images must be at least 1, got {num_images}")
    check_scheduler(settings.scheduler)
    check_steps(settings.steps)
    n_images = len(prompts) * num_images
    if max_images is not None and n_images > max_images:
        raise SpoInputError(f"{len(prompts)} prompt{'s' if len(prompts) != 1 else ''} x {num_images} = {n_images} "
                            f"images is more than --max-images {max_images}; raise --max-images to make them all")
    check_seed(seed, n_images)
    for spec in loras or []:
        check_strength(spec.strength)
    init = load_init_image(init_image) if init_image else None
    if init is None and settings.denoise is not None:
        raise SpoInputError("--denoise applies to img2img only; give --init-image too")
    if init is not None:
        settings.denoise = DEFAULT_DENOISE if settings.denoise is None else settings.denoise
        check_denoise(settings.denoise, settings.steps)
    if settings.width is not None or settings.height is not None:
        check_size(settings.width or 8, settings.height or 8)
    out = check_output_dir(out)
    warn_unreadable_prompts(model, prompts)

    gen = Generator(model, loras, family=family, img2img=init is not None, vae=vae,
                    prediction_type=settings.prediction_type, dtype=settings.dtype)
    size = gen.size(settings, init)
    jobs = [(p, seed + i) for i, p in enumerate(p for p in prompts for _ in range(num_images))]
    counter = next_counter(out) if out.is_dir() else 0
    written, entries = [], []
    with tqdm(total=len(jobs), desc="generate", unit="img") as bar:  # closed (own line) before any error
        for start in range(0, len(jobs), max(1, batch)):
            chunk = jobs[start:start + batch]
            images = gen([p for p, _ in chunk], [s for _, s in chunk], settings, init, batch=batch)
            ensure_writable_dir(out)  # only now: bad input, or a first batch that came out NaN, leaves no folder behind
            for (prompt, s), image in zip(chunk, images):
                name = f"{counter:05d}-{s}.png"
                counter += 1
                save_image(image, out / name, pnginfo=it.pnginfo(gen.infotext(prompt, s, settings, size)))
                entries.append(gen.record(name, prompt, s, settings, size, init_image))
                written.append(out / name)
            bar.update(len(chunk))
    run = {"model": str(model), "seed": seed, "num_images": num_images, "n_prompts": len(prompts),
           "init_image": str(init_image) if init_image else None}
    write_json(out / "index.json", merge_index(out / "index.json", entries, run))
    return written
