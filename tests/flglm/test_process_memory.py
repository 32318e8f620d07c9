"""The allocator setting that keeps a training process's memory flat, and the memory readers themselves."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from flglm.process_memory import peak_resident_bytes, resident_bytes

# Frees 320 MiB of 4 MiB tensors, each followed by a small block still live (as a step's activations sit
# among what the step leaves allocated), after one 16 MiB tensor was freed (as the first step's largest one
# is): what is still resident afterwards, in MiB above the start.
FRAGMENTED_FREE = """
import json, sys, torch
from flglm.process_memory import resident_bytes, return_large_blocks_to_the_os
if sys.argv[1] == "on":
    assert return_large_blocks_to_the_os()
start = resident_bytes()
big = torch.ones(4 << 20); del big  # glibc's dynamic threshold now rises to 16 MiB
kept, pins = [], []
for _ in range(80):
    kept.append(torch.ones(1 << 20))  # 4 MiB each
    pins.append(torch.ones(256))  # a small block allocated after each, still live
del kept
print(json.dumps((resident_bytes() - start) / 2**20))
"""


def retained_mib(mode: str) -> float:
    done = subprocess.run(
        [sys.executable, "-c", FRAGMENTED_FREE, mode], capture_output=True, text=True, timeout=120, check=True
    )
    return float(json.loads(done.stdout.strip().splitlines()[-1]))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_tensors_leave_the_process_with_the_allocator_setting() -> None:
    without, with_setting = retained_mib("off"), retained_mib("on")
    assert without > 200, without  # glibc's default kept the freed 320 MiB resident
    assert with_setting < 40, with_setting


def test_resident_and_peak_bytes_read_this_process() -> None:
    now, peak = resident_bytes(), peak_resident_bytes()
    assert peak is not None and 10 * 2**20 < now <= peak
