"""`spo plan`: peak accelerator memory and time of an SPO run, predicted before it starts.

One SPO iteration (a sampling round of `sample_batch_size` prompts per process, then the train batches of its
kept transitions) is traced phase by phase on meta tensors (spo.plan.trace) with the trainer's own functions:

- sampling: the largest UNet call of the resampler, the k candidates of every prompt with CFG in one batch
  (spo.models.family.guided_output);
- judging: the VAE decode of those candidates (fp32 where the VAE is not fp16-safe, spo.models.vae.decode)
  and the SPM's scores at the timestep;
- training: one micro-batch of transitions through the policy (with gradients) and the frozen reference,
  then the backward pass.

Each phase is traced at two batch sizes and fitted as fixed + per-row bytes and FLOPs, so any batch size (and
the counts of UNet rows per iteration, `round_counts`) follows without tracing again. Resident memory is the
weights of every model in the dtype the trainer holds them, the trained parameters, their gradients (during
training) and the optimizer state. Time is FLOPs over a GPU's peak dense bf16 rate times a stated utilisation.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch

from spo.plan.meta import MetaModels, parameter_bytes
from spo.plan.trace import Measure, measure

GIB = 2**30
# Peak dense bf16 tensor FLOP/s (vendor datasheets, no sparsity) and memory of the named GPUs.
GPUS: dict[str, tuple[float, float]] = {
    "RTX 4090": (165.2e12, 24), "A100 80GB": (312e12, 80), "H100 SXM": (989e12, 80), "H200": (989e12, 141),
}
DEFAULT_UTILISATION = 0.35  # of peak: typical of UNet training with attention kernels, measured by others


@dataclass
class Linear:
    """A cost that is `fixed + per_row * rows` (bytes or FLOPs)."""

    fixed: float
    per_row: float

    def at(self, rows: int) -> float:
        return self.fixed + self.per_row * rows

    @staticmethod
    def fit(a: Measure, b: Measure, rows_a: int, rows_b: int) -> tuple["Linear", "Linear"]:
        span = rows_b - rows_a
        mem = (b.peak_bytes - a.peak_bytes) / span
        flops = (b.flops - a.flops) / span
        return Linear(a.peak_bytes - mem * rows_a, mem), Linear(a.flops - flops * rows_a, flops)


# ------------------------------------------------------------------------------------------------ counts
def round_counts(cfg) -> dict[str, int]:
    """UNet rows (each a CFG pair), decoded candidates and transitions of one sampling round of one process,
    as spo.sampling.resampler.sample_pairs runs it."""
    b, n, d, k, s = cfg.sample_batch_size, cfg.num_steps, cfg.divert_start_step, cfg.k, cfg.num_inner_steps
    rows, judged, i, first = d * b, 0, d, True
    while i < n:
        n_branch = min(1 + s, n - i)
        rows += b * first + k * b * (n_branch - 1) + (k * b if i + n_branch < n else 0)
        judged += k * b
        first, i = False, i + n_branch
    return {"unet_rows": rows, "decoded": judged, "transitions": b * (n - d)}


def training_rows(cfg) -> int:
    """UNet rows per transition in training: win and lose share their parent unless inner steps part them."""
    return 1 if cfg.num_inner_steps == 0 else 2


# ------------------------------------------------------------------------------------------------ phases
def _meta(*shape, dtype) -> torch.Tensor:
    return torch.empty(*shape, dtype=dtype, device="meta")


def _conditioning(models: MetaModels, rows: int):
    from spo.models.family import Conditioning

    dtype = models.unet.dtype
    hidden = _meta(rows, 77, models.unet.config.cross_attention_dim, dtype=dtype)
    if models.family == "sd15":
        return Conditioning(hidden)
    pooled = models.text_encoders[-1].config.projection_dim
    return Conditioning(hidden, {"text_embeds": _meta(rows, pooled, dtype=dtype), "time_ids": _meta(rows, 6, dtype=dtype)})


def _latents(models: MetaModels, rows: int, side: int, dtype) -> torch.Tensor:
    factor = 2 ** (len(models.vae.config.block_out_channels) - 1)
    return _meta(rows, models.unet.config.in_channels, side // factor, side // factor, dtype=dtype)


def sampling_call(models: MetaModels, rows: int, side: int, cfg_scale: float):
    from spo.models.family import guided_output

    def run():
        x, t = _latents(models, rows, side, models.unet.dtype), _meta(rows, dtype=torch.long)
        cond = _conditioning(models, rows)
        with torch.no_grad():
            guided_output(models.unet, x, t, cond, cond, cfg_scale)
    return run


def judging_call(models: MetaModels, rows: int, side: int):
    """VAE decode (as spo.models.vae.decode: the caller upcasts a VAE that is not fp16-safe) and SPM scores."""
    vae = models.vae

    def run():
        with torch.no_grad():
            latents = _latents(models, rows, side, vae.dtype)
            images = vae.decode(latents / vae.config.scaling_factor).sample.float().clamp(-1, 1)
            emb = models.spm.image_embeds(models.spm.preprocess(images), _meta(rows, dtype=torch.long))
            text = _meta(rows, emb.shape[-1], dtype=emb.dtype)  # the prompts' embeddings: once per round, small
            (emb.float() * text.float()).sum(-1)
    return run


def training_call(models: MetaModels, rows: int, side: int, cfg_scale: float):
    """The policy forward with gradients, the reference forward (adapters off) and the backward."""
    from spo.models.family import guided_output
    from spo.train.finetune import reference_model

    def run():
        x, t = _latents(models, rows, side, models.unet.dtype), _meta(rows, dtype=torch.long)
        cond = _conditioning(models, rows)
        frozen = contextlib.nullcontext(models.unet) if models.full_finetune else reference_model(models.unet, None)
        with torch.no_grad(), frozen as ref:  # full fine-tuning: a frozen copy of the same cost
            guided_output(ref, x, t, cond, cond, cfg_scale)
        out = guided_output(models.unet, x, t, cond, cond, cfg_scale).float()
        out.pow(2).mean().backward()
    return run


def spm_training_call(models: MetaModels, pairs: int, side: int, cfg_scale: float):
    """One `spo spm train` batch (spo.spm.denoise.predicted_pair_images, then the SPM's forward and backward):
    both images of each pair VAE-encoded, noised, denoised to x0-hat by the frozen UNet (CFG) and decoded, without
    gradients; then the SPM scores them with gradients (its weights in the run's precision, as under autocast)."""
    from spo.models.family import guided_output

    vae, spm, rows = models.vae, models.spm, 2 * pairs

    def run():
        with torch.no_grad():
            images = _meta(rows, 3, side, side, dtype=vae.dtype)
            latents = vae.encode(images).latent_dist.mean * vae.config.scaling_factor
            cond = _conditioning(models, rows)
            guided_output(models.unet, latents.to(models.unet.dtype), _meta(rows, dtype=torch.long), cond, cond,
                          cfg_scale)
            decoded = vae.decode(latents / vae.config.scaling_factor).sample.float()
        spm.requires_grad_(True)
        try:
            emb = spm.image_embeds(spm.preprocess(decoded), _meta(rows, dtype=torch.long))
            emb.float().pow(2).sum().backward()
        finally:
            spm.requires_grad_(False)
    return run


def adafactor_state_bytes(params) -> int:
    """transformers' Adafactor without momentum: row and column second moments of every matrix (factored), the
    whole second moment of every vector, in the parameters' fp32."""
    count = 0
    for p in params:
        shape = tuple(p.shape)
        count += math.prod(shape[:-1]) + math.prod(shape[:-2]) * shape[-1] if len(shape) >= 2 else p.numel()
    return 4 * count


def plan_spm_training(models: MetaModels, side: int, pairs: int, cfg_scale: float = 5.0) -> dict:
    """Peak memory of one SPM training step: the frozen base and VAE in the run's precision, the SPM's fp32 master
    weights, gradients and optimizer state, and the step's activations (traced at 1 and 2 pairs, fitted).
    `weights` lists AdamW's step (the default); `options` the peak with each optimizer setting of `spo spm train`."""
    mem, flops = fit_phase(spm_training_call, models, side, cfg_scale)
    params = list(models.spm.parameters())
    n = sum(p.numel() for p in params)
    weights = {"unet": parameter_bytes(models.unet), "text encoders": sum(parameter_bytes(m) for m in models.text_encoders),
               "vae": parameter_bytes(models.vae), "spm (fp32)": 4 * n, "spm gradients": 4 * n,
               "optimizer state": 8 * n}
    activations = mem.at(pairs)
    fixed = sum(v for k, v in weights.items() if k not in ("spm gradients", "optimizer state")) + activations
    factored = adafactor_state_bytes(params)
    # the fused backward pass steps each parameter in its gradient hook: one gradient alive at a time; --full-bf16
    # halves the weights, and its step holds one tensor's bf16 gradient, fp32 copies of it and its weight, and the
    # rounding noise (2 + 4 + 4 + 4 bytes)
    biggest = max(p.numel() for p in params)
    options = {"adamw": fixed + 12 * n, "adafactor": fixed + 4 * n + factored,
               "adafactor, fused backward pass": fixed + 4 * biggest + factored,
               "adafactor, fused backward pass, --full-bf16": fixed - 2 * n + 14 * biggest + factored}
    return {"pairs": pairs, "weights": weights, "activations": activations, "options": options,
            "peak": sum(weights.values()) + activations, "flops": flops.at(pairs), "spm_parameters": n}


def fit_phase(make, models: MetaModels, side: int, *extra) -> tuple[Linear, Linear]:
    return Linear.fit(measure(make(models, 1, side, *extra)), measure(make(models, 2, side, *extra)), 1, 2)


def upcasts_vae(models: MetaModels) -> bool:
    """Does judging decode in fp32 because the VAE is not fp16-safe (force_upcast) and the run is in fp16?"""
    return bool(getattr(models.vae.config, "force_upcast", False)) and models.vae.dtype == torch.float16


def fit_judging(models: MetaModels, side: int) -> tuple[Linear, Linear]:
    if not upcasts_vae(models):
        return fit_phase(judging_call, models, side)
    models.vae.to(torch.float32)
    try:
        return fit_phase(judging_call, models, side)
    finally:
        models.vae.to(torch.float16)


# ------------------------------------------------------------------------------------------------ the plan
def optimizer_bytes(cfg, trainable_params: int) -> int:
    """AdamW keeps two fp32 moments per trained parameter; Adafactor factored second moments (about none)."""
    return 8 * trainable_params if cfg.optimizer == "adamw" else 0


def plan(models: MetaModels, cfg, side: int, prompts: int, processes: int = 1) -> dict:
    trained = sum(p.numel() for p in models.unet.parameters() if p.requires_grad)
    from spo.train.finetune import weight_dtype

    frozen_unet = parameter_bytes(models.unet, trainable=False)
    if cfg.full_finetune:  # the trained UNet is counted below in fp32; the frozen reference copy is in the run dtype
        frozen_unet = sum(p.numel() for p in models.unet.parameters()) * torch.finfo(weight_dtype(cfg)).bits // 8
    weights = {"unet": frozen_unet, "text encoders":
               sum(parameter_bytes(m) for m in models.text_encoders), "vae": parameter_bytes(models.vae),
               "spm": parameter_bytes(models.spm), "trained parameters": 4 * trained,
               "optimizer state": optimizer_bytes(cfg, trained)}
    counts = round_counts(cfg)
    k_rows = cfg.k * cfg.sample_batch_size
    micro = min(cfg.train_micro_batch, cfg.train_batch_size, counts["transitions"]) * training_rows(cfg)
    fitted = {"sampling": fit_phase(sampling_call, models, side, cfg.cfg_scale),
              "judging": fit_judging(models, side),
              "training": fit_phase(training_call, models, side, cfg.cfg_scale)}
    rows = {"sampling": k_rows, "judging": min(cfg.judge_batch or k_rows, k_rows), "training": micro}
    resident = sum(weights.values())
    phases = {}
    for name, (mem, _) in fitted.items():
        extra = 4 * trained if name == "training" else 0  # gradients live from backward to the optimizer step
        if name == "judging" and upcasts_vae(models):
            extra = weights["vae"]  # its fp32 copy during the decode is twice its fp16 weights
        phases[name] = {"rows": rows[name], "activations": mem.at(rows[name]), "extra": extra,
                        "peak": resident + extra + mem.at(rows[name])}
    kept = counts["transitions"]  # every transition kept: the worst case for time
    flops = (fitted["sampling"][1].per_row * counts["unet_rows"] + fitted["judging"][1].per_row * counts["decoded"]
             + fitted["training"][1].per_row * kept * training_rows(cfg)) * processes
    iterations = math.ceil(prompts / (cfg.sample_batch_size * processes))  # FLOPs above: all processes together
    return {"family": models.family, "resolution": side, "precision": cfg.mixed_precision,
            "spm": models.spm_source, "upcast_vae": upcasts_vae(models),
            "weights": weights, "phases": phases, "counts": counts, "flops_per_iteration": flops,
            "iterations_per_epoch": iterations, "processes": processes, "trained_parameters": trained,
            "fits": fitted}


def times(result: dict, utilisation: float = DEFAULT_UTILISATION) -> dict[str, dict[str, float]]:
    out = {}
    for gpu, (peak, memory) in GPUS.items():
        per_it = result["flops_per_iteration"] / (peak * utilisation)
        out[gpu] = {"seconds_per_iteration": per_it, "hours_per_epoch": per_it * result["iterations_per_epoch"] / 3600,
                    "memory_gib": memory}
    return out


def peak(result: dict) -> tuple[str, float]:
    name = max(result["phases"], key=lambda n: result["phases"][n]["peak"])
    return name, result["phases"][name]["peak"]


def suggest(models: MetaModels, cfg, result: dict, budget_gib: float, side: int) -> dict | None:
    """The cheapest memory options that fit `budget_gib`: first smaller judging and training micro-batches (no
    extra FLOPs), then gradient checkpointing (one more forward in training) with them. None if nothing fits."""
    budget = budget_gib * GIB

    def peak_with(res: dict, judge: int, micro: int) -> float:
        ph, fits = res["phases"], res["fits"]
        base = {n: ph[n]["peak"] - ph[n]["activations"] for n in ph}
        return max(base["sampling"] + fits["sampling"][0].at(ph["sampling"]["rows"]),
                   base["judging"] + fits["judging"][0].at(judge), base["training"] + fits["training"][0].at(micro))

    def halvings(n: int) -> list[int]:
        out = [n]
        while out[-1] > 1:
            out.append(math.ceil(out[-1] / 2))
        return out

    per_transition = training_rows(cfg)
    tries = [(result, False)]
    if not cfg.gradient_checkpointing:  # only training's activations change: re-trace that phase alone
        models.unet.enable_gradient_checkpointing()
        try:
            checked = fit_phase(training_call, models, side, cfg.cfg_scale)
        finally:
            models.unet.disable_gradient_checkpointing()
        tries.append(({**result, "fits": {**result["fits"], "training": checked}}, True))
    for res, checkpointing in tries:
        for micro in halvings(res["phases"]["training"]["rows"] // per_transition):
            for judge in halvings(res["phases"]["judging"]["rows"]):
                need = peak_with(res, judge, micro * per_transition)
                if need <= budget:
                    return {"gradient_checkpointing": checkpointing or cfg.gradient_checkpointing, "judge_batch": judge,
                            "train_micro_batch": micro, "peak": need}
    return None
