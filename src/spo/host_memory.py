"""Host (CPU) memory: give freed tensor memory back to the operating system.

PyTorch has no caching allocator on the CPU: a CPU tensor's storage is a plain `posix_memalign` from the C
library and goes back with `free`. On glibc, a block at or above the mmap threshold is its own mapping and
returns to the OS when freed, but the threshold is *dynamic*: each time such a block is freed, glibc raises the
threshold to the block's size (up to 32 MiB on 64-bit). After the first few large frees of a training step, every
later activation and gradient of a few MiB is carved from the heap instead, and a heap freed in the middle is
never returned while anything lives above it. Measured on the SD1.5 stand-in (CLIP-H SPM step, 2-core CPU): peak
RSS grew 8.9 -> 9.8 -> 10.0 GB over three identical steps with the default, and stayed at 6.4 GB every step with
a fixed threshold. Setting the threshold explicitly (`mallopt(M_MMAP_THRESHOLD, ...)`, the same as the
`MALLOC_MMAP_THRESHOLD_` environment variable) switches the dynamic raise off.

Fixing the threshold also freezes glibc's trim threshold at its 128 KiB default, so the heap top is given back and
taken again on every step: that alone cost the toy `spo train` 23 % wall time (sys time 1.3 -> 6.9 s). A 256 MiB
trim threshold with a 64 MiB top pad keeps the small-block heap as the dynamic default would (toy wall time ratio
1.00, median of 4 runs: 11.4 s against 11.7 s, same LoRA bit for bit) while the large blocks still go back to the OS.

What this still keeps: glibc serves even a large request from the heap's top chunk when the chunk has room, so
up to about TOP_PAD + TRIM_THRESHOLD (320 MiB) of large blocks can land in the heap between small live ones and
stay there (measured: 60-126 MiB retained of 400 MiB freed when every 4 MiB tensor had a 4-64 KiB one beside it);
without the fix the same pattern kept all 400 MiB.

There is no library call for this in torch or accelerate; `ctypes` on the C library is the documented interface.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

# glibc's <malloc.h>
M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_THRESHOLD = -3
DEFAULT_THRESHOLD = 1 << 20  # blocks of 1 MiB and more: every tensor whose retention matters at full size
TRIM_THRESHOLD = 256 << 20
TOP_PAD = 64 << 20

# A user who tunes glibc themselves keeps their settings.
USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "GLIBC_TUNABLES")


def _glibc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # only glibc has it (musl does not)
        libc.mallopt
    except (OSError, AttributeError):
        return None
    return libc


def fix_mmap_threshold(threshold: int = DEFAULT_THRESHOLD) -> bool:
    """Give blocks of `threshold` bytes and more their own mapping for the life of the process, so that freed
    tensors return to the OS. Returns whether it was applied (False: not glibc, or the user set glibc's malloc
    through its environment variables)."""
    if any(name in os.environ for name in USER_SETTINGS):
        return False
    libc = _glibc()
    if libc is None:
        return False
    settings = ((M_TRIM_THRESHOLD, TRIM_THRESHOLD), (M_TOP_PAD, TOP_PAD), (M_MMAP_THRESHOLD, threshold))
    return all([libc.mallopt(ctypes.c_int(option), ctypes.c_int(value)) for option, value in settings])


def resident_bytes() -> int:
    """This process's resident set size now (Linux; 0 where /proc is absent)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0
