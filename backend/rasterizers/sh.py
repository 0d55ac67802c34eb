"""Real spherical harmonics up to degree 3, in the 3DGS / gsplat basis and sign convention.

Gaussians carry ``sh`` [N, K, 3] (K = (d+1)^2; ``sh[:, 0]`` is the .ply's ``f_dc``). The colour seen
from a camera is ``max(0, 0.5 + sum_k Y_k(dir) * sh[:, k])`` with ``dir`` the unit vector from the
camera centre to the Gaussian, as in ``gsplat.rasterization(..., sh_degree=d)``. The constants are
the real-SH normalisations, written in the Cartesian form of each basis function.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from protocol.ply import MAX_SH_DEGREE, SH_C0

SH_C1 = math.sqrt(3.0 / (4.0 * math.pi))  # 0.4886025119029199
SH_C2 = (
    math.sqrt(15.0 / math.pi) / 2.0,  # xy
    -math.sqrt(15.0 / math.pi) / 2.0,  # yz
    math.sqrt(5.0 / math.pi) / 4.0,  # 2z^2 - x^2 - y^2
    -math.sqrt(15.0 / math.pi) / 2.0,  # xz
    math.sqrt(15.0 / math.pi) / 4.0,  # x^2 - y^2
)
SH_C3 = (
    -math.sqrt(35.0 / (2.0 * math.pi)) / 4.0,  # y (3x^2 - y^2)
    math.sqrt(105.0 / math.pi) / 2.0,  # xyz
    -math.sqrt(21.0 / (2.0 * math.pi)) / 4.0,  # y (4z^2 - x^2 - y^2)
    math.sqrt(7.0 / math.pi) / 4.0,  # z (2z^2 - 3x^2 - 3y^2)
    -math.sqrt(21.0 / (2.0 * math.pi)) / 4.0,  # x (4z^2 - x^2 - y^2)
    math.sqrt(105.0 / math.pi) / 4.0,  # z (x^2 - y^2)
    -math.sqrt(35.0 / (2.0 * math.pi)) / 4.0,  # x (x^2 - 3y^2)
)
COLOR_OFFSET = 0.5  # colour = 0.5 + SH value (3DGS)


def num_sh_bases(degree: int) -> int:
    """K = (degree + 1)^2."""
    return (degree + 1) ** 2


def sh_basis(degree: int, dirs: Tensor) -> Tensor:
    """The real SH basis functions at unit directions.

    Args:
        degree: 0..3.
        dirs: unit directions. [..., 3]

    Returns:
        Y_k(dirs) for k < (degree+1)^2. [..., K]
    """
    if not 0 <= degree <= MAX_SH_DEGREE:
        raise ValueError(f"sh degree must be in 0..{MAX_SH_DEGREE}; got {degree}")
    x, y, z = dirs.unbind(-1)
    out = [torch.full_like(x, SH_C0)]
    if degree >= 1:
        out += [-SH_C1 * y, SH_C1 * z, -SH_C1 * x]
    if degree >= 2:
        xx, yy, zz = x * x, y * y, z * z
        out += [
            SH_C2[0] * x * y,
            SH_C2[1] * y * z,
            SH_C2[2] * (2.0 * zz - xx - yy),
            SH_C2[3] * x * z,
            SH_C2[4] * (xx - yy),
        ]
    if degree >= 3:
        out += [
            SH_C3[0] * y * (3.0 * xx - yy),
            SH_C3[1] * x * y * z,
            SH_C3[2] * y * (4.0 * zz - xx - yy),
            SH_C3[3] * z * (2.0 * zz - 3.0 * xx - 3.0 * yy),
            SH_C3[4] * x * (4.0 * zz - xx - yy),
            SH_C3[5] * z * (xx - yy),
            SH_C3[6] * x * (xx - 3.0 * yy),
        ]
    return torch.stack(out, dim=-1)


def eval_sh(degree: int, dirs: Tensor, coeffs: Tensor) -> Tensor:
    """Evaluate SH colours (without the 0.5 offset) using the first (degree+1)^2 coefficients.

    Args:
        degree: SH degree to use, 0..3; ``coeffs`` may hold more bands (they are ignored).
        dirs: view directions, any length (normalised here). [..., 3]
        coeffs: SH coefficients. [..., K, 3] with K >= (degree+1)^2

    Returns:
        sum_k Y_k(dir) coeffs[k]. [..., 3]
    """
    k = num_sh_bases(degree)
    if coeffs.shape[-2] < k:
        raise ValueError(f"coeffs must hold at least {k} SH coefficients for degree {degree}; got {coeffs.shape[-2]}")
    basis = sh_basis(degree, torch.nn.functional.normalize(dirs, dim=-1))  # [..., K]
    return (basis.unsqueeze(-1) * coeffs[..., :k, :]).sum(dim=-2)


def sh_to_colors(degree: int, means: Tensor, sh: Tensor, viewmats: Tensor) -> Tensor:
    """View-dependent colours of Gaussians seen from each camera (gsplat's ``sh_degree`` path).

    Args:
        degree: SH degree to use, 0..3.
        means: Gaussian centres, world. [N, 3]
        sh: SH coefficients. [N, K, 3] or per camera [C, N, K, 3]
        viewmats: world-to-camera, OpenCV. [C, 4, 4]

    Returns:
        colours max(0, 0.5 + SH(dir)), dir from the camera centre to the Gaussian. [C, N, 3]
    """
    R, t = viewmats[:, :3, :3], viewmats[:, :3, 3]
    centers = -(R.transpose(1, 2) @ t.unsqueeze(-1)).squeeze(-1)  # [C, 3]
    dirs = means[None, :, :] - centers[:, None, :]  # [C, N, 3]
    coeffs = sh if sh.ndim == 4 else sh[None].expand(viewmats.shape[0], *sh.shape)
    return torch.clamp_min(eval_sh(degree, dirs, coeffs) + COLOR_OFFSET, 0.0)


def rgb_to_sh(rgb: Tensor) -> Tensor:
    """The f_dc coefficient that gives colour ``rgb`` (inverse of 0.5 + SH_C0 * f_dc). [..., 3]"""
    return (rgb - COLOR_OFFSET) / SH_C0


def sh_to_rgb(sh_dc: Tensor) -> Tensor:
    """The base colour 0.5 + SH_C0 * f_dc. [..., 3]"""
    return sh_dc * SH_C0 + COLOR_OFFSET
