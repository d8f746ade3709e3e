"""Fault injection: a test seam, inert unless the SPO_FAULT environment variable is set.

The reliability tests (tests/test_reliability_kill.py) need to crash a real `spo` process at exact points, e.g.
inside a checkpoint write after one file is on disk but before the folder is renamed. Code calls
`maybe_fail("point")` there; SPO_FAULT="point:N[:action]" makes the N-th call of that point in this process act:

    kill    (default)  SIGKILL this process, as a power cut or the OOM killer would
    nan     (default for nan_* points)  maybe_fail returns True: the caller poisons its value with NaN
    enospc  raise OSError(ENOSPC), as a full disk would

Several faults may be given, comma-separated: SPO_FAULT="checkpoint_mid:2,write:5:enospc".
Points: sampled, optimizer_step, checkpoint_mid, checkpoint_done, lora_save (SPO trainer and checkpoint
writer), spm_step (SPM trainer), write (every spo.io atomic write), nan_loss, nan_weight (every trainer).
The training loop reaches them through `training_hook`, one of the engine's hooks (spo.train.engine).
"""

from __future__ import annotations

import errno
import os
import signal

_counts: dict[str, int] = {}


def _armed(point: str) -> str | None:
    """The action of a fault armed for this call of `point`, else None (and nothing counted when unset)."""
    spec = os.environ.get("SPO_FAULT")
    if not spec:
        return None
    _counts[point] = _counts.get(point, 0) + 1
    for item in spec.split(","):
        name, _, rest = item.strip().partition(":")
        count, _, action = rest.partition(":")
        if name == point and count.isdigit() and int(count) == _counts[point]:
            return action or ("nan" if point.startswith("nan_") else "kill")
    return None


def maybe_fail(point: str) -> bool:
    """Act on a fault armed for this call of `point` (see the module docstring); True means "poison with NaN"."""
    action = _armed(point)
    if action is None:
        return False
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if action == "enospc":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return action == "nan"


def training_hook(event: str, run, ctx: dict) -> None:
    """The training engine's events mapped to the fault points above (inert unless SPO_FAULT is set)."""
    if not os.environ.get("SPO_FAULT"):
        return
    if event == "batch_ready":
        maybe_fail("sampled")  # killed between sampling and the optimizer step
    elif event == "loss" and maybe_fail("nan_loss"):
        ctx["stats"]["loss"] = float("nan")
    elif event == "optimizer_step":
        if maybe_fail("nan_weight"):
            run.params[0].data.view(-1)[0] = float("nan")
        maybe_fail("spm_step" if run.name == "spm" else "optimizer_step")  # killed after a step, before its checkpoint
