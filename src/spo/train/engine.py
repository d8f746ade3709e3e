"""The training engine: everything SPO, Diffusion-DPO and the SPM trainer share, so each recipe is only its batches
and its loss.

A run (`open_run`, then `Run.attach`) owns the accelerator, the output folder (locked against a second run), the
optimizer and its warm-up schedule, the position in the data (Progress), the history, trackers and the progress
bar. `fit(run, method)` is the one loop: epochs of batches; each batch is the method's forward and backward
(`Method.train_batch`), every `gradient_accumulation_steps` train batches one optimizer step (`Run.train_step`;
gradients all-reduced once: the method runs its micro-batches under `run.no_sync` but the last). A batch is one
train batch, or (SPO) a sampling round the method splits into train batches itself; a NaN/inf loss or weight stops the run before
it is saved; checkpoints at the method's cadence are pickle-free (spo.train.checkpoint) and carry the config
fingerprint and the history, so `--resume` continues the same run exactly and refuses a different one.
Named events (`batch_ready`, `loss`, `optimizer_step`) go to hooks: the fault-injection seam is one of them.
"""

from __future__ import annotations

import contextlib
import fcntl
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from spo.dtypes import stochastic_round_bf16
from spo.errors import SpoInputError
from spo.train import checkpoint
from spo.train.config import RunConfig, fingerprint, for_processes, to_dict

CHECKPOINT_DIR = "checkpoints"
LOG_DIR = "logs"


class TrainingDiverged(SpoInputError):
    """A non-finite loss or weight: training stops, the last good checkpoint stays."""


@dataclass
class Progress:
    epoch: int = 0
    batch: int = 0  # batch index within the epoch
    step: int = 0  # optimizer steps
    iteration: int = 0  # batches done in all
    pending: int = 0  # train batches whose gradients wait for the next optimizer step (accumulation)
    seconds: float = 0.0  # training wall seconds up to the checkpoint, over every run a resume continued


class Method:
    """What a recipe supplies to the engine (override what differs)."""

    name = "train"  # progress bar, tracker and summary label
    unit = "batch"
    weights = "trained"  # what the trained weights are, in messages ("LoRA", "UNet", "SPM")
    # False: a batch is one train batch (the engine runs its step). True: the method splits each batch into train
    # batches itself and calls `run.train_step` for each (SPO: one sampling round, many optimizer steps).
    steps_inside = False

    def epochs(self) -> int:
        return 1

    def batches_per_epoch(self) -> int:
        raise NotImplementedError

    def train_batch(self, run: "Run", sync_now: bool) -> dict:
        """Forward and backward of batch `run.progress.batch` of epoch `run.progress.epoch`; stats with "loss"."""
        raise NotImplementedError

    def checkpoint_name(self, p: Progress) -> str:
        return f"checkpoint-{p.epoch:04d}-{p.batch:05d}"

    def checkpoint_due(self, run: "Run") -> bool:
        """After a batch that ended an optimizer step: checkpoint now?"""
        return False

    def on_start(self, run: "Run") -> None:
        """Before the first batch of a fresh run (main process), e.g. the epoch-0 validation grid."""

    def on_epoch_end(self, run: "Run") -> bool:
        """Outputs of an ended epoch (every process calls it); True: checkpoint after them."""
        return False

    def postfix(self, stats: dict) -> dict:
        return {"loss": f"{stats['loss']:.4f}"}


def learning_rate_factor(step: int, warmup: int, total: int = 0, schedule: str = "constant") -> float:
    """Linear warm-up to the full learning rate over `warmup` optimizer steps, then constant, or cosine or linear
    decay to 0 at the last step (`total`).

    Written here rather than taken from diffusers.optimization: its warm-up starts at 0 (a wasted first step)
    and the shipped toy SPMs were trained with this one; the decays count steps the same way.
    """
    if warmup > 0 and step + 1 < warmup:
        return (step + 1) / warmup
    if schedule in ("cosine", "linear") and total > warmup:
        progress = min(1.0, (step + 1 - warmup) / (total - warmup))
        return 0.5 * (1.0 + math.cos(math.pi * progress)) if schedule == "cosine" else 1.0 - progress
    return 1.0


@dataclass
class Run:
    cfg: RunConfig
    accelerator: object
    out: Path
    name: str
    module: torch.nn.Module | None = None  # as prepared by accelerate (DDP-wrapped when distributed)
    model: torch.nn.Module | None = None  # the unwrapped model
    params: list = field(default_factory=list)
    optimizer: object = None
    lr_sched: object = None
    progress: Progress = field(default_factory=Progress)
    history: list = field(default_factory=list)
    started: float = field(default_factory=time.time)
    total_steps: int = 0  # optimizer steps the learning-rate schedule spans
    seconds_before: float = 0.0  # what the runs this one resumes had trained (a resumed run's summary counts them)
    hooks: list[Callable[[str, "Run", dict], None]] = field(default_factory=list)
    log: Callable[[str], None] = print
    _lock: int | None = None

    @property
    def device(self):
        return self.accelerator.device

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def fire(self, event: str, **ctx) -> None:
        for hook in self.hooks:
            hook(event, self, ctx)

    def no_sync(self, last: bool, sync_now: bool):
        """Gradients all-reduce only on the last micro-batch of the batch that ends an optimizer step."""
        return contextlib.nullcontext() if (last and sync_now) else self.accelerator.no_sync(self.module)

    def create_output_dir(self) -> Path:
        """Create the output folder (only once the inputs have loaded) and lock it against a second run."""
        from spo.io import ensure_writable_dir

        ensure_writable_dir(self.out)
        if self.is_main and self._lock is None:
            self._lock = lock_folder(self.out)
        return self.out

    def attach(self, model: torch.nn.Module, params: list, total_steps: int) -> None:
        """Optimizer, schedule and accelerate for `model`; resume when asked.

        The schedule is not handed to accelerate: it would step once per process, and it counts optimizer steps.
        """
        cfg = self.cfg
        self.params, self.total_steps = params, total_steps
        self.optimizer = make_optimizer(cfg, params)
        self.lr_sched = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: learning_rate_factor(s, cfg.lr_warmup_steps, total_steps, cfg.lr_schedule))
        self.module, self.optimizer = self.accelerator.prepare(model, self.optimizer)
        self.model = self.accelerator.unwrap_model(self.module)
        if getattr(cfg, "fused_backward_pass", False):
            rounding = (lambda: (cfg.seed, self.progress.step)) if getattr(cfg, "full_bf16", False) else None
            fuse_optimizer_step(getattr(self.optimizer, "optimizer", self.optimizer), params, cfg.max_grad_norm,
                                rounding)
        self.resume()
        if cfg.report_to != "none":
            self.accelerator.init_trackers(self.name, config={k: str(v) for k, v in to_dict(cfg).items()})

    def resume(self) -> None:
        ckpt_dir = self.out / CHECKPOINT_DIR
        done = checkpoint.complete_checkpoints(ckpt_dir)
        if not self.cfg.resume:
            return
        if not done:
            self.log(f"nothing to resume in {ckpt_dir}; starting fresh")
            return
        state = checkpoint.read_progress(done[-1])
        mine = fingerprint(self.cfg)
        # A setting newer than the checkpoint's spo ran as its default then: absent counts as the default.
        theirs = {**fingerprint(type(self.cfg)()), **state.get("fingerprint", {})}
        differ = [k for k in sorted(set(mine) | set(theirs)) if mine.get(k) != theirs.get(k)]
        if differ:
            raise SpoInputError(f"cannot resume from {done[-1]}: the run's settings differ ({', '.join(differ)})")
        # --epochs and --max-train-steps may change on resume (a run is extended), but a decaying rate would then
        # decay over another horizon than the part already trained: neither the old run nor the new one
        horizon = state.get("total_steps", self.total_steps)  # absent: written before the horizon was kept
        if self.cfg.lr_schedule != "constant" and horizon != self.total_steps:
            raise SpoInputError(f"cannot resume from {done[-1]}: its {self.cfg.lr_schedule} learning rate decays over "
                                f"{horizon} optimizer steps, this run's over {self.total_steps} (changed --epochs or "
                                "--max-train-steps); only a constant schedule can be extended")
        checkpoint.load_state(done[-1], self.model, self.optimizer, self.lr_sched)
        # A checkpoint written before `pending` existed was always taken between optimizer steps (pending 0).
        self.progress = Progress(**{k: state.get(k, v) for k, v in asdict(Progress()).items()})
        self.history = list(state.get("history", []))
        self.seconds_before = self.progress.seconds
        self.log(f"resumed from {done[-1]} (epoch {self.progress.epoch}, batch {self.progress.batch}, "
              f"step {self.progress.step})")

    def save_checkpoint(self, name: str) -> None:
        self.accelerator.wait_for_everyone()
        if self.is_main:
            ckpt_dir = self.out / CHECKPOINT_DIR
            self.progress.seconds = round(self.elapsed(), 1)
            state = {**asdict(self.progress), "fingerprint": fingerprint(self.cfg), "total_steps": self.total_steps,
                     "history": self.history}
            checkpoint.save_state(ckpt_dir / name, self.model, self.optimizer, self.lr_sched, state)
            checkpoint.prune(ckpt_dir, self.cfg.keep_checkpoints)
        self.accelerator.wait_for_everyone()

    def optimizer_step(self) -> None:
        if not getattr(self.cfg, "fused_backward_pass", False):  # fused: every weight was stepped in the backward
            if self.cfg.max_grad_norm > 0:
                self.accelerator.clip_grad_norm_(self.params, self.cfg.max_grad_norm)
            self.optimizer.step()
        self.lr_sched.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.progress.step += 1

    def train_step(self, backward: Callable[[bool], dict], weights: str = "trained", flush: bool = False) -> dict:
        """One train batch: `backward(sync)` (gradients all-reduced iff `sync`), then an optimizer step once every
        `gradient_accumulation_steps` train batches, or now when `flush` (the end of an epoch, as the official SPO
        loop's end of data does). Returns backward's stats.
        """
        p = self.progress
        sync = flush or p.pending + 1 == self.cfg.gradient_accumulation_steps
        stats = backward(sync)
        self.fire("loss", stats=stats)
        check_finite(stats["loss"], [])
        p.pending = 0 if sync else p.pending + 1
        if sync:
            self.optimizer_step()
            self.fire("optimizer_step")
            check_finite(stats["loss"], self.params, weights)
        return stats

    def elapsed(self) -> float:
        """Training wall seconds of the whole run, resumed parts included (an epoch's cost stays comparable)."""
        return self.seconds_before + time.time() - self.started

    def summary(self) -> dict:
        return {"epochs": self.progress.epoch, "steps": self.progress.step, "seconds": round(self.elapsed(), 1),
                "seconds_this_run": round(time.time() - self.started, 1), "threads": torch.get_num_threads(),
                "config": to_dict(self.cfg)}

    def close(self) -> None:
        self.accelerator.wait_for_everyone()
        self.accelerator.end_training()
        self.release()

    def release(self) -> None:
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None

    def __enter__(self) -> "Run":
        return self

    def __exit__(self, *exc) -> None:
        self.release()  # also when the run fails or is interrupted: the folder is free for --resume


def open_run(cfg: RunConfig, name: str, log: Callable[[str], None] = print) -> Run:
    """The accelerator and the (not yet created) output folder of a run; fails fast on a folder it cannot use."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    from spo.faults import training_hook
    from spo.io import check_output_dir
    from spo.models.loading import check_model

    check_model(cfg.base)  # a missing base fails in a second, before any data is read
    out = check_output_dir(cfg.output_dir)
    # An existing folder is locked at once (so a second run hears why before anything else); a new one on creation.
    lock = lock_folder(out) if out.is_dir() and int(os.environ.get("RANK", "0")) == 0 else None
    torch.set_flush_denormal(True)  # tiny LoRA/toy weights produce denormals; on CPU they slow steps 5-10x
    problem = None
    if not cfg.resume and checkpoint.complete_checkpoints(out / CHECKPOINT_DIR):
        problem = (f"{out} holds checkpoints of an earlier run: pass --resume to continue it, "
                   "or choose another output folder")
    elif cfg.mixed_precision == "fp16" and (cfg.cpu or not torch.cuda.is_available()):
        problem = "fp16 mixed precision needs a GPU; use --mixed-precision no (or bf16) on CPU"
    else:
        processes = int(os.environ.get("WORLD_SIZE", "1"))  # what accelerate will count, before it starts
        problem = fused_problem(for_processes(cfg, processes), processes)
    if problem:
        if lock is not None:
            os.close(lock)
        raise SpoInputError(problem)
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision, cpu=cfg.cpu,
                              log_with=None if cfg.report_to == "none" else cfg.report_to,
                              project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / LOG_DIR)))
    return Run(cfg=cfg, accelerator=accelerator, out=out, name=name, hooks=[training_hook], log=log,
               _lock=lock)


def lock_folder(folder: Path) -> int:
    """An exclusive lock on the folder for this process's life (released by the OS even on SIGKILL)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise SpoInputError(f"{folder}: another training run is writing to this folder; wait for it to end or "
                            "choose another output folder") from None
    return fd


def make_optimizer(cfg: RunConfig, params):
    if cfg.optimizer == "adafactor":
        from transformers.optimization import Adafactor

        # Diffusion-DPO's SDXL settings: the lr (and our warm-up) as given, not Adafactor's own relative steps
        return Adafactor(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay, clip_threshold=1.0,
                         scale_parameter=False, relative_step=False, warmup_init=False)
    kwargs = dict(lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps,
                  weight_decay=cfg.weight_decay)
    if cfg.use_8bit_adam:
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise SpoInputError("use_8bit_adam needs bitsandbytes (pip install bitsandbytes)") from None
        return bnb.optim.AdamW8bit(params, **kwargs)
    return torch.optim.AdamW(params, **kwargs)


def fuse_optimizer_step(optimizer, params: list, max_grad_norm: float, rounding=None) -> None:
    """Kohya's fused backward pass, on torch's post-accumulate-grad hooks: each weight takes its optimizer step as
    soon as its gradient is complete, and the gradient is freed at once, so a model's gradients never all exist
    (4 bytes per trained parameter saved). Clipping is then per tensor, as in kohya's sd-scripts.

    `optimizer.step()` steps only the parameters holding a gradient, which inside the hook is this one (the others'
    were freed by their own hooks or not computed yet): one optimizer, so its state, schedule and checkpoints are
    the unfused run's.

    `rounding` (a callable giving (seed, optimizer step)) keeps bf16 weights as master weights: each is stepped on
    an fp32 copy of itself and its gradient (so the optimizer's state is fp32 too) and written back with stochastic
    rounding, seeded by (seed, step, parameter index) so that a resumed run rounds as an uninterrupted one.
    """
    def step(param: torch.Tensor, index: int) -> None:
        if max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(param, max_grad_norm)
        if rounding is None or param.dtype != torch.bfloat16:
            optimizer.step()
        else:
            low = param.data
            param.data, param.grad = low.float(), param.grad.float()
            optimizer.step()
            generator = torch.Generator(param.device).manual_seed(hash((*rounding(), index)) & (2**63 - 1))
            low.copy_(stochastic_round_bf16(param.data, generator))
            param.data = low
        param.grad = None

    for index, param in enumerate(params):
        param.register_post_accumulate_grad_hook(lambda p, i=index: step(p, i))


def fused_problem(cfg: RunConfig, processes: int) -> str | None:
    """Why a fused backward pass cannot run this (resolved) config, or None."""
    if not getattr(cfg, "fused_backward_pass", False):
        return None
    if processes > 1:
        return ("fused_backward_pass runs on one process (each weight would step before its gradient is all-reduced); "
                "drop it or train on one process")
    if cfg.gradient_accumulation_steps > 1:
        return (f"fused_backward_pass steps each weight in the backward, so it cannot accumulate gradients (this run "
                f"accumulates {cfg.gradient_accumulation_steps} train batches): set --global-batch-size to the train "
                "batch size, or drop --fused-backward-pass")
    return None


def check_finite(loss: float, params, weights: str = "trained") -> None:
    """Stop before a non-finite loss reaches the weights, or as soon as a weight is non-finite."""
    bad_weight = any(not torch.isfinite(p).all() for p in params)
    if not math.isfinite(loss) or bad_weight:
        what = f"a non-finite {weights} weight" if bad_weight else f"loss {loss}"
        raise TrainingDiverged(f"training diverged ({what}); stopped before saving it. The last good checkpoint "
                               "is kept: lower the learning rate and resume with --resume")


# ---------------------------------------------------------------------------------------------- the loop
def fit(run: Run, method: Method) -> None:
    """Train `method` from `run.progress` to the end of its last epoch."""
    from tqdm.auto import tqdm

    p, per_epoch = run.progress, method.batches_per_epoch()
    bar = tqdm(total=method.epochs() * per_epoch, initial=p.epoch * per_epoch + p.batch, desc=method.name,
               unit=method.unit, dynamic_ncols=True,
               disable=not (run.accelerator.is_local_main_process and getattr(run.cfg, "progress", True)))
    if p.iteration == 0 and run.is_main:
        method.on_start(run)
    while p.epoch < method.epochs():
        while p.batch < per_epoch:
            stats = _one_batch(run, method)
            bar.set_postfix(method.postfix(stats))
            bar.update(1)
            _log(run, stats)
            if p.pending == 0 and method.checkpoint_due(run):  # only between optimizer steps
                run.save_checkpoint(method.checkpoint_name(p))
        p.epoch += 1
        p.batch = 0
        if method.on_epoch_end(run):
            run.save_checkpoint(method.checkpoint_name(p))
    bar.close()


def _one_batch(run: Run, method: Method) -> dict:
    p = run.progress
    if method.steps_inside:
        stats = method.train_batch(run, sync_now=False)
    else:
        stats = run.train_step(lambda sync: method.train_batch(run, sync), method.weights)
    p.iteration += 1
    p.batch += 1
    stats.update(epoch=p.epoch, step=p.step, lr=run.lr_sched.get_last_lr()[0])
    run.history.append(stats)
    return stats


def _log(run: Run, stats: dict) -> None:
    every = getattr(run.cfg, "log_every", 1)
    if run.cfg.report_to != "none" and run.progress.iteration % every == 0:
        run.accelerator.log({f"train/{k}": v for k, v in stats.items() if isinstance(v, (int, float))},
                            step=run.progress.iteration)
