"""Freed CPU tensors go back to the operating system in every `spo` command (spo/host_memory.py).

Each case runs in a fresh interpreter (malloc settings are per process): it frees one 24 MiB tensor (which, with
glibc's dynamic threshold, moves the mmap threshold to 24 MiB), makes 400 MiB of 4 MiB tensors, keeps a 512 KiB
tensor allocated after them, frees the 4 MiB ones and reads its RSS. The control without the fix must retain the
memory, or the scenario proves nothing on this C library.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from spo.host_memory import _glibc

pytestmark = pytest.mark.skipif(_glibc() is None, reason="glibc's malloc only")

SCENARIO = """
import sys, torch
from spo.host_memory import resident_bytes
{setup}
big = torch.ones(6 * 2**20); del big
before = resident_bytes()
tensors = [torch.ones(2**20) for _ in range(100)]
pin = torch.ones(2**17)  # 512 KiB: no freed chunk below is that large, so it comes from the heap's top, above them
peak = resident_bytes()
del tensors
print((peak - before) / 2**20, (resident_bytes() - before) / 2**20)
"""

THROUGH_THE_CLI = """
from spo.cli.main import main
assert main(["data", "inspect", "/nonexistent/pairs.parquet"]) == 2  # fails on its input, after the setup ran
"""


def retained_mib(setup: str, env: dict | None = None) -> tuple[float, float]:
    out = subprocess.run([sys.executable, "-c", SCENARIO.format(setup=setup)], capture_output=True, text=True,
                         check=True, env=env)
    grown, retained = map(float, out.stdout.split()[-2:])
    return grown, retained


def test_without_the_fix_glibc_keeps_the_freed_tensors():
    grown, retained = retained_mib("")
    assert grown > 350 and retained > 350, (grown, retained)


def test_fixed_threshold_returns_them():
    grown, retained = retained_mib("from spo.host_memory import fix_mmap_threshold; assert fix_mmap_threshold()")
    assert grown > 350 and retained < 40, (grown, retained)


def test_every_spo_command_applies_it():
    grown, retained = retained_mib(THROUGH_THE_CLI)
    assert grown > 350 and retained < 40, (grown, retained)


def test_a_users_own_malloc_setting_is_left_alone():
    import os

    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(16 * 2**20))  # a user who wants these in the heap
    grown, retained = retained_mib(THROUGH_THE_CLI, env)
    assert grown > 350 and retained > 350, (grown, retained)
