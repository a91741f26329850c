"""Keep freed memory inside the process (glibc's malloc), so CPU training stops paying page faults.

A training step on the CPU allocates and frees the same large activation buffers every batch.
glibc serves each buffer over its (dynamic) mmap threshold with a fresh `mmap` and returns it with
`munmap`, and trims the heap's top whenever 128 KiB or more is free: the next step touches new
pages and the kernel zero-fills them again. On the 2-core machine this showed as 150,000 minor page
faults a second and 15-25 % system time during an EfficientNet-Lite0 epoch. Raising the mmap and
trim thresholds lets freed buffers be reused from the heap: `python -m agecls.bench
backbone=efficientnet_lite0 "modes=[train_fast]" tune_malloc=false|true` measured 54.6 against
67.6 images/s, system time 22.8 against 6.0 s, minor faults 7.0M against 0.86M (benchmarks/README.md).

The cost is memory: the process keeps its peak heap instead of returning it (measured +164 MiB of
peak RSS at batch 64, 128 px: 3,426 against 3,262 MiB). `tune_malloc=false` turns it off; so does setting any of glibc's own
`MALLOC_*_` tunables in the environment (the user's choice wins), and it does nothing where the C
library is not glibc (macOS, musl) or under another allocator preloaded (jemalloc, tcmalloc).
DataLoader workers forked afterwards inherit the setting.
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform

log = logging.getLogger(__name__)

# mallopt(3) parameters and the values set
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
SETTINGS = {
    M_MMAP_THRESHOLD: 1 << 30,  # buffers under 1 GiB come from the heap (reused), not mmap/munmap
    M_TRIM_THRESHOLD: (1 << 31) - 1,  # never give the heap's free top back to the kernel between steps
    M_TOP_PAD: 64 << 20,  # grow the heap 64 MiB at a time (fewer brk calls)
}
_ENV_TUNABLES = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "GLIBC_TUNABLES")
_done = False


def keep_freed_memory(enabled: bool = True) -> bool:
    """Set glibc's malloc to reuse freed buffers (see the module's docstring); True when set."""
    global _done
    if not enabled or _done:
        return _done and enabled
    if any(os.environ.get(name) for name in _ENV_TUNABLES):
        log.debug("malloc left as the environment's MALLOC_* / GLIBC_TUNABLES set it")
        return False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _done = all(mallopt(param, value) == 1 for param, value in SETTINGS.items())
    if _done:
        log.debug("glibc malloc: freed buffers kept for reuse (agecls.utils.malloc)")
    return _done


def malloc_tuned() -> bool:
    """Whether this process's malloc was set by keep_freed_memory (recorded beside benchmark rows)."""
    return _done
