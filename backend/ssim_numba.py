"""The numba kernels of :mod:`backend.ssim_kernels` (the fit's SSIM on the CPU), in a module of their own so
that numba is imported when a CPU fit first takes them, not with :mod:`backend.metrics`.

One forward and one backward kernel, the planes split between threads, each plane's row pass kept in the
thread's own buffer; compiled on first use, cached beside this file (:func:`backend.numba_jit.compiled`).
Shapes as :func:`backend.ssim_kernels.ssim_planes`.
"""

from __future__ import annotations

import numpy as np
import torch
from numba import prange
from torch import Tensor

from .numba_jit import LAUNCH, compiled, threads


@compiled(parallel=True)
def _fwd(x, y, g, c1, c2, s, d, grad):  # pragma: no cover - compiled; run by the tests
    # per plane: the row pass into the thread's buffer, then the column pass, SSIM and its derivatives
    n_planes, hp, wp = x.shape
    taps = g.shape[0]
    h, w = hp - taps + 1, wp - taps + 1
    for p in prange(n_planes):
        rows = np.zeros((5, hp, w), np.float32)
        for r in range(hp):
            for k in range(taps):
                gk = g[k]
                for j in range(w):
                    xv, yv = x[p, r, j + k], y[p, r, j + k]
                    rows[0, r, j] += gk * xv
                    rows[1, r, j] += gk * yv
                    rows[2, r, j] += gk * xv * xv
                    rows[3, r, j] += gk * yv * yv
                    rows[4, r, j] += gk * xv * yv
        acc = np.empty((5, w), np.float32)
        for i in range(h):
            acc[:] = 0.0
            for k in range(taps):
                for q in range(5):
                    for j in range(w):
                        acc[q, j] += g[k] * rows[q, i + k, j]
            for j in range(w):
                mx, my = acc[0, j], acc[1, j]
                a1 = 2.0 * mx * my + c1
                a2 = 2.0 * (acc[4, j] - mx * my) + c2
                b1 = mx * mx + my * my + c1
                b2 = (acc[2, j] - mx * mx) + (acc[3, j] - my * my) + c2
                sv = (a1 * a2) / (b1 * b2)
                s[p, i, j] = sv
                if grad:  # dS/dmu_x, dS/dE[x²], dS/dE[xy] with mu_y, E[y²] held
                    d[0, p, i, j] = (2.0 * my * a2 - 2.0 * my * a1) / (b1 * b2) - sv * (2.0 * mx / b1 - 2.0 * mx / b2)
                    d[1, p, i, j] = -sv / b2
                    d[2, p, i, j] = 2.0 * a1 / (b1 * b2)


@compiled(parallel=True)
def _bwd(grad_s, d, x, y, g, gx):  # pragma: no cover - compiled; run by the tests
    # per plane: the column pass's transpose into the thread's buffer, then the row pass's and dx
    n_planes, hp, wp = x.shape
    taps = g.shape[0]
    h, w = hp - taps + 1, wp - taps + 1
    for p in prange(n_planes):
        cols = np.zeros((3, hp, w), np.float32)
        for i in range(h):
            for k in range(taps):
                for q in range(3):
                    for j in range(w):
                        cols[q, i + k, j] += g[k] * grad_s[p, i, j] * d[q, p, i, j]
        acc = np.empty((3, wp), np.float32)
        for r in range(hp):
            acc[:] = 0.0
            for k in range(taps):
                for q in range(3):
                    for j in range(w):
                        acc[q, j + k] += g[k] * cols[q, r, j]
            for t in range(wp):
                gx[p, r, t] = acc[0, t] + 2.0 * x[p, r, t] * acc[1, t] + y[p, r, t] * acc[2, t]


def forward(x: Tensor, y: Tensor, g: Tensor, c1: float, c2: float, grad: bool) -> tuple[Tensor, Tensor]:
    n_planes, hp, wp = x.shape
    h, w = hp - len(g) + 1, wp - len(g) + 1
    s = np.empty((n_planes, h, w), np.float32)
    d = np.empty((3, n_planes, h, w) if grad else (3, 0, 0, 0), np.float32)
    with LAUNCH:
        threads()
        _fwd(x.detach().numpy(), y.detach().numpy(), g.numpy(), np.float32(c1), np.float32(c2), s, d, grad)
    return torch.from_numpy(s), torch.from_numpy(d)


def backward(grad_s: Tensor, d: Tensor, x: Tensor, y: Tensor, g: Tensor) -> Tensor:
    gx = np.empty(tuple(x.shape), np.float32)
    with LAUNCH:
        threads()
        _bwd(grad_s.numpy(), d.numpy(), x.detach().numpy(), y.numpy(), g.numpy(), gx)
    return torch.from_numpy(gx)
