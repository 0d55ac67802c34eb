"""SSIM's windowed statistics in kernels: the fit's loss, forward and backward, in Triton on CUDA and numba on the CPU.

:func:`backend.metrics.windowed_ssim_conv` blurs five images (x, y, x², y², xy) with an 11-tap separable
Gaussian through ten depthwise convolutions and differentiates them with autograd. At the guide's batch (9
frames of 896x512) that forward and backward took 6.6 ms on an H100, more than half of a lockstep step's GPU
time; on the 2-core CPU, at 3 frames of 160x120, a fifth of a fitting step (docs/benchmarks.md, "The fit's
SSIM in kernels"). Here the five statistics are blurred along rows, then along columns, where the SSIM map and
its derivatives by the three statistics that depend on x are formed too; the backward pass blurs the upstream
gradient times those derivatives back (the transposed filter, columns then rows). The maps are those of the
convolutions to float rounding; x gets a gradient, y none (the fit's target carries none).

- **triton** (CUDA, compute capability 7.0 on): four kernels, each program a block of one row's columns;
  Triton compiles them on first use (seconds, cached on disk). With ``TRITON_INTERPRET=1`` set before
  Triton is imported they run on CPU tensors (the tests' path; slow, for tiny sizes).
- **numba** (CPU float32): one forward and one backward kernel in :mod:`backend.ssim_numba`, imported at a CPU
  fit's first SSIM.

Each kernel set is checked against the convolutions (map and gradient, two small planes) at its first use in
a process and on a device (:func:`kernels_for`); where it fails to compile or to agree, the fit runs on the
convolutions and the log says why.

Planes are single-channel images, ``[P, H + 10, W + 10]`` for the 11-tap window, padded by the caller
(``"valid"`` windows); :func:`ssim_planes` returns ``[P, H, W]``.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import logging
from typing import Any

import torch
from torch import Tensor

BLOCK = 256  # output columns per program

log = logging.getLogger(__name__)


def kernels_for(x: Tensor) -> str | None:
    """The kernels :func:`ssim_planes` runs on ``x``: ``"triton"`` for float32 on a CUDA GPU that Triton
    compiles for (compute capability 7.0 or later) with Triton importable, ``"numba"`` for float32 on
    the CPU with numba, else None (the convolutions: Apple's ``mps``, float64). Either only once
    :func:`_checked` has passed them on ``x``'s device in this process."""
    if x.dtype != torch.float32:
        return None
    if x.is_cuda:
        index = x.device.index  # a CUDA tensor's device always has one
        return "triton" if _triton_on(index) and _checked("triton", f"cuda:{index}") else None
    return "numba" if x.device.type == "cpu" and _numba_on() and _checked("numba", "cpu") else None


@functools.cache
def _triton_on(device_index: int) -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.get_device_capability(device_index) >= (7, 0)


@functools.cache
def _numba_on() -> bool:
    return importlib.util.find_spec("numba") is not None  # without importing it (backend.ssim_numba does)


@functools.cache
def _checked(kernels: str, device: str) -> bool:
    """Whether ``kernels`` compile on ``device`` and agree with the convolutions there, map and gradient, on
    two small planes: checked at their first use in a process, so that a GPU, driver or Triton release the
    tests never met costs the fit the kernels' speed (a warning in the log) rather than the job."""
    from .metrics import SSIM_C1, SSIM_C2, gaussian_window, windowed_ssim_conv

    try:
        gen = torch.Generator().manual_seed(0)
        x, y = (torch.rand(1, 2, 26, 300, generator=gen).to(device) for _ in range(2))
        up = torch.rand(1, 2, 16, 290, generator=gen).to(device)
        xr, xk = x.clone().requires_grad_(), x.clone().requires_grad_()
        ref = windowed_ssim_conv(xr, y)
        (ref * up).sum().backward()
        g = gaussian_window(device=device)
        got = ssim_planes(xk[0], y[0], g, SSIM_C1, SSIM_C2, kernels)
        (got * up[0]).sum().backward()
        err = max(
            float((got.detach() - ref[0].detach()).abs().max()),
            float((xk.grad - xr.grad).abs().max() / xr.grad.abs().max()),
        )
        if not err <= 1e-4:
            raise ValueError(f"they differ from the convolutions by {err:.2e}")
    except Exception as err:  # a compiler's or a driver's error, or a wrong result: the convolutions stand in
        log.warning(f"the fit's SSIM kernels ({kernels}) fail their check on {device} ({err}); using the convolutions")
        return False
    return True


@functools.cache
def _kernels() -> dict[str, Any]:
    """The four kernels, defined (and ``triton.jit``-wrapped) at first use, so that importing this module
    needs no Triton and ``TRITON_INTERPRET`` is read when they are made."""
    import triton
    import triton.language as tl

    @triton.jit
    def rows_fwd(x_ptr, y_ptr, g_ptr, h_ptr, rows, wp, w, BLOCK: tl.constexpr, TAPS: tl.constexpr):
        # h[q, row, j] = sum_k g[k] * s_q[row, j + k] for the statistics s = (x, y, x², y², xy)
        row = tl.program_id(0)
        j = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        m = j < w
        src = row.to(tl.int64) * wp + j
        ax = tl.zeros([BLOCK], tl.float32)
        ay = tl.zeros([BLOCK], tl.float32)
        axx = tl.zeros([BLOCK], tl.float32)
        ayy = tl.zeros([BLOCK], tl.float32)
        axy = tl.zeros([BLOCK], tl.float32)
        for k in tl.static_range(TAPS):
            gk = tl.load(g_ptr + k)
            xv = tl.load(x_ptr + src + k, mask=m, other=0.0)
            yv = tl.load(y_ptr + src + k, mask=m, other=0.0)
            ax += gk * xv
            ay += gk * yv
            axx += gk * xv * xv
            ayy += gk * yv * yv
            axy += gk * xv * yv
        dst = row.to(tl.int64) * w + j
        plane = rows.to(tl.int64) * w
        tl.store(h_ptr + dst, ax, mask=m)
        tl.store(h_ptr + plane + dst, ay, mask=m)
        tl.store(h_ptr + 2 * plane + dst, axx, mask=m)
        tl.store(h_ptr + 3 * plane + dst, ayy, mask=m)
        tl.store(h_ptr + 4 * plane + dst, axy, mask=m)

    @triton.jit
    def cols_fwd(
        h_ptr, g_ptr, s_ptr, d_ptr, rows, hp, h, w, c1, c2, BLOCK: tl.constexpr, TAPS: tl.constexpr, GRAD: tl.constexpr
    ):
        # the column pass at output row (p, i), then SSIM and, for the backward pass, dS/d(mu_x, E[x²], E[xy])
        out = tl.program_id(0)
        p = out // h
        i = out % h
        j = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        m = j < w
        plane = rows.to(tl.int64) * w
        mx = tl.zeros([BLOCK], tl.float32)
        my = tl.zeros([BLOCK], tl.float32)
        sxx = tl.zeros([BLOCK], tl.float32)
        syy = tl.zeros([BLOCK], tl.float32)
        sxy = tl.zeros([BLOCK], tl.float32)
        for k in tl.static_range(TAPS):
            gk = tl.load(g_ptr + k)
            src = (p.to(tl.int64) * hp + i + k) * w + j
            mx += gk * tl.load(h_ptr + src, mask=m, other=0.0)
            my += gk * tl.load(h_ptr + plane + src, mask=m, other=0.0)
            sxx += gk * tl.load(h_ptr + 2 * plane + src, mask=m, other=0.0)
            syy += gk * tl.load(h_ptr + 3 * plane + src, mask=m, other=0.0)
            sxy += gk * tl.load(h_ptr + 4 * plane + src, mask=m, other=0.0)
        a1 = 2.0 * mx * my + c1
        a2 = 2.0 * (sxy - mx * my) + c2
        b1 = mx * mx + my * my + c1
        b2 = (sxx - mx * mx) + (syy - my * my) + c2
        s = (a1 * a2) / (b1 * b2)
        dst = out.to(tl.int64) * w + j
        tl.store(s_ptr + dst, s, mask=m)
        if GRAD:
            n = tl.num_programs(0).to(tl.int64) * w
            # dS/dmu_x, dS/dE[x²], dS/dE[xy] with mu_y, E[y²] held (S = a1 a2 / (b1 b2))
            d_mx = (2.0 * my * a2 - 2.0 * my * a1) / (b1 * b2) - s * (2.0 * mx / b1 - 2.0 * mx / b2)
            tl.store(d_ptr + dst, d_mx, mask=m)
            tl.store(d_ptr + n + dst, -s / b2, mask=m)
            tl.store(d_ptr + 2 * n + dst, 2.0 * a1 / (b1 * b2), mask=m)

    @triton.jit
    def cols_bwd(gs_ptr, d_ptr, g_ptr, v_ptr, hp, h, w, BLOCK: tl.constexpr, TAPS: tl.constexpr):
        # v[q, (p, r), j] = sum_k g[k] * (gs * d_q)[(p, r - k), j] over 0 <= r - k < h: the column pass's transpose
        row = tl.program_id(0)
        p = row // hp
        r = row % hp
        j = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        m = j < w
        n = tl.num_programs(0).to(tl.int64) * w  # a map of [P, hp, w]
        nd = (tl.num_programs(0) // hp).to(tl.int64) * h * w  # a map of [P, h, w]
        va = tl.zeros([BLOCK], tl.float32)
        vb = tl.zeros([BLOCK], tl.float32)
        vc = tl.zeros([BLOCK], tl.float32)
        for k in tl.static_range(TAPS):
            i = r - k + tl.zeros([BLOCK], tl.int32)  # the row, as a block (the mask's shape)
            mk = m & (i >= 0) & (i < h)
            gk = tl.load(g_ptr + k)
            src = (p.to(tl.int64) * h + i) * w + j
            up = tl.load(gs_ptr + src, mask=mk, other=0.0)
            va += gk * up * tl.load(d_ptr + src, mask=mk, other=0.0)
            vb += gk * up * tl.load(d_ptr + nd + src, mask=mk, other=0.0)
            vc += gk * up * tl.load(d_ptr + 2 * nd + src, mask=mk, other=0.0)
        dst = row.to(tl.int64) * w + j
        tl.store(v_ptr + dst, va, mask=m)
        tl.store(v_ptr + n + dst, vb, mask=m)
        tl.store(v_ptr + 2 * n + dst, vc, mask=m)

    @triton.jit
    def rows_bwd(v_ptr, x_ptr, y_ptr, g_ptr, gx_ptr, rows, wp, w, BLOCK: tl.constexpr, TAPS: tl.constexpr):
        # the row pass's transpose, then dx = A + 2 x B + y C (the statistics x, x², xy)
        row = tl.program_id(0)
        s = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        m = s < wp
        plane = rows.to(tl.int64) * w
        a = tl.zeros([BLOCK], tl.float32)
        b = tl.zeros([BLOCK], tl.float32)
        c = tl.zeros([BLOCK], tl.float32)
        for k in tl.static_range(TAPS):
            j = s - k
            mk = m & (j >= 0) & (j < w)
            gk = tl.load(g_ptr + k)
            src = row.to(tl.int64) * w + j
            a += gk * tl.load(v_ptr + src, mask=mk, other=0.0)
            b += gk * tl.load(v_ptr + plane + src, mask=mk, other=0.0)
            c += gk * tl.load(v_ptr + 2 * plane + src, mask=mk, other=0.0)
        at = row.to(tl.int64) * wp + s
        xv = tl.load(x_ptr + at, mask=m, other=0.0)
        yv = tl.load(y_ptr + at, mask=m, other=0.0)
        tl.store(gx_ptr + at, a + 2.0 * xv * b + yv * c, mask=m)

    return {"rows_fwd": rows_fwd, "cols_fwd": cols_fwd, "cols_bwd": cols_bwd, "rows_bwd": rows_bwd, "cdiv": triton.cdiv}


def _on_device(x: Tensor) -> contextlib.AbstractContextManager:
    """x's CUDA device made current: Triton launches on the current device, which may not be x's (a CPU
    tensor: Triton's interpreter, nothing to make current)."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def _triton_forward(x: Tensor, y: Tensor, g: Tensor, c1: float, c2: float, grad: bool) -> tuple[Tensor, Tensor]:
    k = _kernels()
    n_planes, hp, wp = x.shape
    taps = len(g)
    h, w = hp - taps + 1, wp - taps + 1
    rows = n_planes * hp
    hbuf = x.new_empty(5, rows, w)
    s = x.new_empty(n_planes, h, w)
    d = x.new_empty(3, n_planes, h, w) if grad else s  # unused when not GRAD
    with _on_device(x):
        k["rows_fwd"][(rows, k["cdiv"](w, BLOCK))](x, y, g, hbuf, rows, wp, w, BLOCK=BLOCK, TAPS=taps)
        k["cols_fwd"][(n_planes * h, k["cdiv"](w, BLOCK))](
            hbuf, g, s, d, rows, hp, h, w, c1, c2, BLOCK=BLOCK, TAPS=taps, GRAD=grad
        )
    return s, d


def _triton_backward(grad_s: Tensor, d: Tensor, x: Tensor, y: Tensor, g: Tensor) -> Tensor:
    k = _kernels()
    n_planes, hp, wp = x.shape
    taps = len(g)
    h, w = hp - taps + 1, wp - taps + 1
    rows = n_planes * hp
    v = x.new_empty(3, rows, w)
    gx = torch.empty_like(x)
    with _on_device(x):
        k["cols_bwd"][(rows, k["cdiv"](w, BLOCK))](grad_s, d, g, v, hp, h, w, BLOCK=BLOCK, TAPS=taps)
        k["rows_bwd"][(rows, k["cdiv"](wp, BLOCK))](v, x, y, g, gx, rows, wp, w, BLOCK=BLOCK, TAPS=taps)
    return gx


def _numba_forward(x: Tensor, y: Tensor, g: Tensor, c1: float, c2: float, grad: bool) -> tuple[Tensor, Tensor]:
    from . import ssim_numba  # numba imported at a CPU fit's first SSIM, not with the metrics

    return ssim_numba.forward(x, y, g, c1, c2, grad)


def _numba_backward(grad_s: Tensor, d: Tensor, x: Tensor, y: Tensor, g: Tensor) -> Tensor:
    from . import ssim_numba

    return ssim_numba.backward(grad_s, d, x, y, g)


_FORWARD = {"triton": _triton_forward, "numba": _numba_forward}
_BACKWARD = {"triton": _triton_backward, "numba": _numba_backward}


class _SsimPlanes(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, y: Tensor, g: Tensor, c1: float, c2: float, kernels: str) -> Tensor:
        grad = ctx.needs_input_grad[0]
        s, d = _FORWARD[kernels](x, y, g, c1, c2, grad)
        if grad:
            ctx.save_for_backward(x, y, g, d)
            ctx.kernels = kernels
        return s

    @staticmethod
    def backward(ctx: Any, grad_s: Tensor) -> tuple[Tensor | None, ...]:
        x, y, g, d = ctx.saved_tensors
        return _BACKWARD[ctx.kernels](grad_s.contiguous(), d, x, y, g), None, None, None, None, None


def ssim_planes(x: Tensor, y: Tensor, window: Tensor, c1: float, c2: float, kernels: str) -> Tensor:
    """SSIM over valid K x K Gaussian windows, per plane and pixel; differentiable in ``x`` only.

    Args:
        x, y: padded single-channel planes (e.g. images' channels), float32. [P, H + K - 1, W + K - 1]
        window: the normalised 1D Gaussian, float32, on their device. [K]
        c1, c2: SSIM's stabilising constants.
        kernels: ``"triton"`` or ``"numba"`` (what :func:`kernels_for` gives ``x``).

    Returns:
        the SSIM map. [P, H, W]
    """
    if x.shape != y.shape or x.dim() != 3 or min(x.shape[1:]) < len(window):
        raise ValueError(
            f"ssim_planes: x and y must be one shape [P, H + {len(window) - 1}, W + {len(window) - 1}]; "
            f"got {tuple(x.shape)}, {tuple(y.shape)}"
        )
    if y.requires_grad:
        raise ValueError("ssim_planes differentiates x only; y must not require a gradient")
    if kernels not in _FORWARD:
        raise ValueError(f"ssim_planes: no kernels {kernels!r} for {x.dtype} on {x.device} (triton, numba)")
    args = (t.contiguous() for t in (x, y, window))
    return _SsimPlanes.apply(*args, float(c1), float(c2), kernels)
