"""numba for the CPU kernels (the rasterizer's compositing, the fit's SSIM): whether it loads, its compiler
with an on-disk cache, the threads a call takes, and the lock launches take turns on."""

from __future__ import annotations

import threading

import torch

try:  # numba is a dependency; the torch paths stand in where it cannot load
    import numba
    from numba import njit

    AVAILABLE = True
except ImportError:  # pragma: no cover - exercised only without numba
    AVAILABLE = False

# numba's workqueue threading layer (where neither OpenMP nor TBB loads) aborts on parallel kernels launched
# from two threads at once; the service's worker thread and a caller's could, so launches take turns.
LAUNCH = threading.Lock()


def compiled(**options):
    """numba's ``njit`` with its on-disk cache (beside the kernel's file, else the user's cache folder), or
    without it where no folder is writable (a read-only install and home: numba refuses such a function at
    import), so that every process compiles again (seconds) instead of the CPU path failing."""

    def decorate(fn):
        try:
            return njit(cache=True, **options)(fn)
        except RuntimeError:  # "cannot cache function ...: no locator available for file ..."
            return njit(**options)(fn)

    return decorate


def threads() -> int:
    """numba's threads for a call: torch's setting (what the fit's budget probe chose), within numba's pool."""
    n = max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))
    numba.set_num_threads(n)
    return n
