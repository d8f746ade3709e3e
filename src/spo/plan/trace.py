"""Memory and FLOPs of a piece of model code, without the memory: run it on meta tensors and count.

Meta tensors carry shapes and dtypes but no data, so a full-size SDXL training step runs in seconds on a CPU.
`measure(fn)` runs `fn` under three modes:

- `LiveBytes`, a dispatch mode that keeps the bytes of every storage an operator creates while the storage is
  alive (autograd's saved tensors included) and records the peak: the activation memory of the call. torch's own
  MemTracker (torch.distributed._tools) does this per module, but it is a private API that not every torch this
  package admits has; a live-storage count is all a plan needs.
- torch.utils.flop_counter.FlopCounterMode for matmuls and convolutions.
- `FlashAttention`, which runs scaled_dot_product_attention as the fused (flash) kernel CUDA
  uses for fp16/bf16: on meta the op would otherwise decompose into the math path and materialise the
  attention matrix, which no GPU run does. It counts that kernel's FLOPs, which FlopCounterMode does not see.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode


class LiveBytes(TorchDispatchMode):
    """Peak bytes of the storages operators create inside the mode while they are alive (a view shares its base's
    storage; storages made before the mode, such as the weights, are never counted)."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.now = 0
        self.peak = 0

    def _collect(self) -> None:
        for key in [key for key, (ref, _) in self.live.items() if ref.expired()]:
            self.now -= self.live.pop(key)[1]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # An output on an input's storage is a view or an in-place result (of a weight, say): nothing new.
        inputs = {t.untyped_storage()._cdata for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        grew = False
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                ref = StorageWeakRef(storage)
                if ref.cdata not in self.live and ref.cdata not in inputs:
                    self.live[ref.cdata] = (ref, storage.nbytes())
                    self.now += storage.nbytes()
                    grew = True
        if grew and self.now > self.peak:
            self._collect()  # only a new high needs the exact live set
            self.peak = max(self.peak, self.now)
        return out


class FlashAttention:
    """scaled_dot_product_attention as the fused kernel (saves out + logsumexp, never the attention matrix).

    A context that swaps torch.nn.functional.scaled_dot_product_attention (diffusers and transformers look it up
    at call time) rather than a TorchFunctionMode: gradient checkpointing recomputes its forward inside the
    backward pass, where function modes are not active, and the recomputation must take the same path.
    """

    def __init__(self):
        self.flops = 0
        self._original = None

    def __enter__(self):
        self._original = F.scaled_dot_product_attention
        F.scaled_dot_product_attention = self._attention
        return self

    def __exit__(self, *exc):
        F.scaled_dot_product_attention = self._original

    def _attention(self, q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kwargs):
        if attn_mask is not None or kwargs:
            return self._original(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                                  scale=scale, **kwargs)
        forward = 4 * q.shape[:-1].numel() * k.shape[-2] * q.shape[-1]  # QK^T and PV, 2 FLOPs per multiply-add
        self.flops += forward * (3 if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad) else 1)
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, dropout_p, is_causal,
                                                                          scale=scale)[0]


@dataclass
class Measure:
    peak_bytes: int  # activation peak of the call: storages it created, alive at once
    flops: int  # forward and (if it runs one) backward

    def __add__(self, other: "Measure") -> "Measure":
        return Measure(max(self.peak_bytes, other.peak_bytes), self.flops + other.flops)


def measure(fn: Callable[[], object]) -> Measure:
    """Run `fn` (on meta tensors) and count its peak live bytes and its FLOPs."""
    flash, live = FlashAttention(), LiveBytes()
    with FlopCounterMode(display=False) as counter, flash, live:
        fn()
    return Measure(live.peak, int(counter.get_total_flops()) + flash.flops)
