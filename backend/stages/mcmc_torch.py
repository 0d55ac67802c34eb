"""gsplat's MCMC densification off CUDA: its two CUDA kernels in torch.

gsplat's ``MCMCStrategy`` (3DGS as MCMC, Kheradmand et al. 2024) is plain torch but for two kernels that
its ops (``gsplat.strategy.ops``) call: the relocation of Eq. 9 of the paper, which gives N copies of a
Gaussian the opacity and scale that render like the one they replace, and the 3D covariances that shape
the noise on the centres. :func:`install` puts a torch version of each beside gsplat's (tensors on CUDA
still go to gsplat's kernels), so that the same strategy, with the same schedule and random draws, runs on
the CPU rasterizer (``FitConfig.strategy`` ``mcmc`` there).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import Tensor

from ..rasterizers.torch_cpu import covariances


def relocation(opacities: Tensor, scales: Tensor, ratios: Tensor, binoms: Tensor) -> tuple[Tensor, Tensor]:
    """Opacity and scale of each of n copies that together render like one Gaussian (the paper's Eq. 9).

    With o the Gaussian's opacity and n its copies (``ratios``, clamped to 1..n_max):
    o' = 1 - (1 - o)^(1/n) and s' = o s / D, D = sum_{i=1..n} sum_{k=0..i-1} C(i-1, k) (-1)^k o'^(k+1) / sqrt(k+1).
    The inner sums over i collapse into C(n, k+1) (the hockey-stick identity), the row sums of the binomial
    table up to n - 1. D is summed in float64, on the CPU (Apple's ``mps`` has no float64): its terms alternate
    in sign.

    Args:
        opacities: in [0, 1). [N]
        scales: axis scales (activated). [N, 3]
        ratios: copies per Gaussian, itself included. int [N]
        binoms: binomial table, ``binoms[n, k]`` = C(n, k) and 0 for k > n. [n_max, n_max]
    Returns:
        (new opacities [N], new scales [N, 3]), in the inputs' dtype.
    """
    n_max = binoms.shape[0]
    n = ratios.cpu().clamp(1, n_max).long()  # [N]
    o = opacities.detach().cpu().double()
    new_o = 1.0 - (1.0 - o) ** (1.0 / n.double())  # [N]
    weights = torch.cumsum(binoms.cpu().double(), dim=0)[n - 1]  # sum_{j < n} C(j, k) = C(n, k + 1). [N, n_max]
    k = torch.arange(n_max, dtype=torch.float64)
    signs = 1.0 - 2.0 * (k % 2)
    terms = weights * signs / torch.sqrt(k + 1.0) * new_o[:, None] ** (k + 1.0)  # [N, n_max]
    coeff = o / terms.sum(dim=1)  # [N]
    new_scales = coeff[:, None] * scales.detach().cpu().double()
    return new_o.to(opacities), new_scales.to(scales)


def covariance(
    quats: Tensor, scales: Tensor, compute_covar: bool = True, compute_preci: bool = True, triu: bool = False
) -> tuple[Tensor | None, Tensor | None]:
    """``gsplat.quat_scale_to_covar_preci`` in torch, for the covariances MCMC's noise needs: [N, 3, 3]
    (upper triangles [N, 6] with ``triu``), and the precisions when asked."""
    covars = covariances(quats, scales)
    precis = torch.linalg.inv(covars) if compute_preci else None
    if triu:
        rows, cols = torch.triu_indices(3, 3, device=quats.device)
        return (covars[:, rows, cols] if compute_covar else None), (precis[:, rows, cols] if compute_preci else None)
    return (covars if compute_covar else None), precis


def _by_device(cuda_fn: Callable, torch_fn: Callable) -> Callable:
    """``cuda_fn`` for tensors on CUDA, ``torch_fn`` elsewhere (by the first tensor argument's device,
    positional or named: gsplat's ops name them)."""

    @functools.wraps(cuda_fn)
    def call(*args, **kwargs):
        first = next(a for a in (*args, *kwargs.values()) if isinstance(a, Tensor))
        return (cuda_fn if first.device.type == "cuda" else torch_fn)(*args, **kwargs)

    call.__wrapped_by_reconloop__ = True
    return call


def install() -> None:
    """Route gsplat's MCMC ops to :func:`relocation` and :func:`covariance` for tensors off CUDA (once;
    tensors on CUDA keep gsplat's kernels)."""
    from gsplat.strategy import ops

    if not getattr(ops.compute_relocation, "__wrapped_by_reconloop__", False):
        ops.compute_relocation = _by_device(ops.compute_relocation, relocation)
    if not getattr(ops.quat_scale_to_covar_preci, "__wrapped_by_reconloop__", False):
        ops.quat_scale_to_covar_preci = _by_device(ops.quat_scale_to_covar_preci, covariance)
