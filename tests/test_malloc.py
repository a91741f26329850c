"""agecls.utils.malloc: freed buffers are reused instead of being page-faulted back in each step."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

# Training steps in miniature: 10 times, four activation-sized tensors (the first convolution's
# output of a 64-image batch at 128 px, 33.5 MB) made and freed; report the minor page faults the
# loop cost and what keep_freed_memory returned.
PROBE = """
import json, resource, sys
import torch
from agecls.utils.malloc import keep_freed_memory
tuned = keep_freed_memory(sys.argv[1] == "on")
x = torch.randn(64, 32, 64, 64)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    bufs = [x * 2 for _ in range(4)]
    del bufs
print(json.dumps({"tuned": tuned, "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before}))
"""


def probe(mode: str, **env: str) -> dict:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    out = subprocess.run([sys.executable, "-c", PROBE, mode], env={**clean, **env}, check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.skipif(not GLIBC, reason="mallopt tuning applies to glibc only")
def test_tuned_malloc_reuses_freed_buffers_instead_of_faulting_them_in_again() -> None:
    off, on = probe("off"), probe("on")
    assert not off["tuned"] and on["tuned"]
    pages = 64 * 32 * 64 * 64 * 4 // os.sysconf("SC_PAGE_SIZE")  # one tensor's pages
    assert off["faults"] > 20 * pages  # (measured 80 of 80 at 20 steps) most tensors map fresh pages
    assert on["faults"] < 16 * pages  # (measured 9) the first steps do; later ones reuse them


@pytest.mark.skipif(not GLIBC, reason="mallopt tuning applies to glibc only")
def test_the_environments_malloc_settings_win() -> None:
    assert probe("on", MALLOC_TRIM_THRESHOLD_="131072")["tuned"] is False
