"""The CPU kernel of ``torch_cpu``'s compositing: rows of pixels drawn in parallel, compiled by numba.

:mod:`backend.rasterizers.torch_cpu` projects the Gaussians with torch (autograd carries the gradients
to means, rotations, scales and colours); this module does what dominates a CPU fitting step, listing
the (Gaussian, pixel) pairs and compositing them, forward and backward, the way gsplat's CUDA kernels
do per tile but per row of pixels:

- **rows**: each Gaussian's box (the pixels its alpha can reach, from ``torch_cpu``) is entered in the
  list of every row it spans, in depth order (the Gaussians arrive sorted nearest first);
- **forward**, one row per thread: each Gaussian of the row, nearest first, is drawn into the pixels of
  its box; alpha = min(0.999, o exp(-sigma)) from 1/255 up; a pixel stops before its transmittance would
  fall below 1e-4 (3DGS and gsplat's rules, as ``torch_cpu``'s torch path). Per pixel the final
  transmittance and the row position of its last drawn Gaussian are kept for the backward;
- **backward**, 3DGS's: per pixel back to front from its last drawn Gaussian, T_i recovered from the
  final T, S_i = sum_{k>i} alpha_k T_k q_k and dL/dalpha_i = T_i q_i - S_i / (1 - alpha_i). The rows are
  split between threads by rows, and each thread sums its gradients in its own buffer, so no two threads
  write one Gaussian's gradient.

No pair is stored, so memory is the image's and the Gaussians' only, and nothing is sorted per pair.
A pixel's sums run in float64 whatever the input's dtype; the gradients are summed per thread in the
input's dtype (as the torch kernel's ``index_add_`` and gsplat's atomics sum them). ``torch_cpu`` uses
this kernel for CPU tensors when numba imports, its torch path otherwise (Apple ``mps``, or
``kernel="torch"``); ``tests/backend/test_rasterizers.py`` holds the two to each other, images and
gradients. Tried and not kept (docs/benchmarks.md): each box row trimmed to the ellipse's span, with the
forward's rows dealt to threads interleaved (the bench 3-10 % slower, a fit level).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from ..numba_jit import AVAILABLE, LAUNCH, compiled, threads
from . import ALPHA_MAX, ALPHA_MIN, TRANSMITTANCE_MIN

if AVAILABLE:
    from numba import prange

    @compiled()
    def _row_lists(boxes: np.ndarray, height: int) -> tuple[np.ndarray, np.ndarray]:
        """Per row, the Gaussians whose box spans it, nearest first. boxes int64 [M, 4] (x0, x1, y0, y1,
        inclusive) -> offsets int64 [H + 1] and Gaussian indices int32 [sum of the boxes' heights]."""
        counts = np.zeros(height + 1, np.int64)
        for g in range(boxes.shape[0]):
            if boxes[g, 1] >= boxes[g, 0] and boxes[g, 3] >= boxes[g, 2]:
                for y in range(boxes[g, 2], boxes[g, 3] + 1):
                    counts[y + 1] += 1
        offsets = np.cumsum(counts)
        fill = offsets[:-1].copy()
        ids = np.empty(offsets[-1], np.int32)
        for g in range(boxes.shape[0]):
            if boxes[g, 1] >= boxes[g, 0] and boxes[g, 3] >= boxes[g, 2]:
                for y in range(boxes[g, 2], boxes[g, 3] + 1):
                    ids[fill[y]] = g
                    fill[y] += 1
        return offsets, ids

    @compiled(parallel=True)
    def _forward(packed, boxes, offsets, ids, width, height, image, alphas, t_final, n_drawn):
        """Fills image [H W, D], alphas [H W], t_final (float64 [H W]) and n_drawn (int32 [H W]: the row
        position + 1 of each pixel's last drawn Gaussian, 0 where none)."""
        n_feats = packed.shape[1] - 6
        for y in prange(height):
            trans = np.ones(width)
            done = np.zeros(width, np.bool_)
            acc = np.zeros((width, n_feats))
            wsum = np.zeros(width)
            last = np.zeros(width, np.int32)
            dy0 = y + 0.5
            for k in range(offsets[y], offsets[y + 1]):
                g = ids[k]
                mx, my = float(packed[g, 0]), float(packed[g, 1])
                ca, cb, cc, opacity = float(packed[g, 2]), float(packed[g, 3]), float(packed[g, 4]), float(packed[g, 5])
                dy = dy0 - my
                for x in range(boxes[g, 0], boxes[g, 1] + 1):
                    if done[x]:
                        continue
                    dx = x + 0.5 - mx
                    sigma = 0.5 * (ca * dx * dx + cc * dy * dy) + cb * dx * dy
                    if sigma < 0.0:
                        continue
                    alpha = min(opacity * math.exp(-sigma), ALPHA_MAX)
                    if alpha < ALPHA_MIN:
                        continue
                    after = trans[x] * (1.0 - alpha)
                    if after <= TRANSMITTANCE_MIN:
                        done[x] = True
                        continue
                    w = alpha * trans[x]
                    for d in range(n_feats):
                        acc[x, d] += w * packed[g, 6 + d]
                    wsum[x] += w
                    trans[x] = after
                    last[x] = k - offsets[y] + 1
            row = y * width
            for x in range(width):
                for d in range(n_feats):
                    image[row + x, d] = acc[x, d]
                alphas[row + x] = wsum[x]
                t_final[row + x] = trans[x]
                n_drawn[row + x] = last[x]

    @compiled(parallel=True)
    def _backward(packed, boxes, offsets, ids, width, height, t_final, n_drawn, grad_image, grad_alpha, grads):
        """Adds dL/dpacked into grads ([chunks, M, 6 + D], packed's dtype): chunk c takes rows c, c + chunks, ..."""
        n_feats = packed.shape[1] - 6
        n_chunks = grads.shape[0]
        for c in prange(n_chunks):
            buf = grads[c]
            for y in range(c, height, n_chunks):
                row = y * width
                trans = t_final[row : row + width].copy()
                behind = np.zeros(width)  # S: what the pixel draws behind the pair being visited
                dy0 = y + 0.5
                for k in range(offsets[y + 1] - 1, offsets[y] - 1, -1):
                    position = k - offsets[y] + 1
                    g = ids[k]
                    mx, my = float(packed[g, 0]), float(packed[g, 1])
                    ca, cb, cc = float(packed[g, 2]), float(packed[g, 3]), float(packed[g, 4])
                    opacity = float(packed[g, 5])
                    dy = dy0 - my
                    for x in range(boxes[g, 0], boxes[g, 1] + 1):
                        if position > n_drawn[row + x]:
                            continue
                        dx = x + 0.5 - mx
                        sigma = 0.5 * (ca * dx * dx + cc * dy * dy) + cb * dx * dy
                        if sigma < 0.0:
                            continue
                        falloff = math.exp(-sigma)
                        alpha_raw = opacity * falloff
                        alpha = min(alpha_raw, ALPHA_MAX)
                        if alpha < ALPHA_MIN:
                            continue
                        t_before = trans[x] / (1.0 - alpha)
                        w = alpha * t_before
                        q = float(grad_alpha[row + x])
                        for d in range(n_feats):
                            gi = float(grad_image[row + x, d])
                            q += float(packed[g, 6 + d]) * gi
                            buf[g, 6 + d] += w * gi
                        grad_a = t_before * q - behind[x] / (1.0 - alpha)
                        behind[x] += w * q
                        trans[x] = t_before
                        if alpha_raw > ALPHA_MAX:
                            continue
                        gs = -alpha_raw * grad_a  # dL/dsigma, alpha_raw = o exp(-sigma)
                        buf[g, 0] -= (ca * dx + cb * dy) * gs
                        buf[g, 1] -= (cb * dx + cc * dy) * gs
                        buf[g, 2] += 0.5 * dx * dx * gs
                        buf[g, 3] += dx * dy * gs
                        buf[g, 4] += 0.5 * dy * dy * gs
                        buf[g, 5] += falloff * grad_a


class RowComposite(torch.autograd.Function):
    """Pairs listed and composited by rows in numba (module docstring), differentiable in ``packed``.

    ``apply(packed, boxes, width, height)``: packed [M, 6 + D] (centre 2, conic 3, opacity 1, features
    D; nearest first), boxes int64 [M, 4] (first and last column, first and last row, clipped to the
    image; empty where last < first) -> colour [H W, D] and alpha [H W] in packed's dtype.
    """

    @staticmethod
    def forward(ctx, packed: Tensor, boxes: Tensor, width: int, height: int):
        p = packed.detach().contiguous().numpy()
        b = boxes.contiguous().numpy()
        offsets, ids = _row_lists(b, height)
        n_pixels = width * height
        image = np.empty((n_pixels, p.shape[1] - 6), p.dtype)
        alphas = np.empty(n_pixels, p.dtype)
        t_final = np.empty(n_pixels)
        n_drawn = np.empty(n_pixels, np.int32)
        with LAUNCH:
            threads()
            _forward(p, b, offsets, ids, width, height, image, alphas, t_final, n_drawn)
        ctx.arrays = (p, b, offsets, ids, t_final, n_drawn)
        ctx.size = (width, height)
        return torch.from_numpy(image), torch.from_numpy(alphas)

    @staticmethod
    def backward(ctx, grad_image: Tensor, grad_alpha: Tensor):
        p, b, offsets, ids, t_final, n_drawn = ctx.arrays
        width, height = ctx.size
        grad_image, grad_alpha = grad_image.contiguous().numpy(), grad_alpha.contiguous().numpy()
        with LAUNCH:
            grads = np.zeros((min(threads(), height), *p.shape), p.dtype)
            _backward(p, b, offsets, ids, width, height, t_final, n_drawn, grad_image, grad_alpha, grads)
        return torch.from_numpy(grads.sum(0)), None, None, None
