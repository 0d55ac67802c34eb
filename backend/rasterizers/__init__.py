"""Gaussian rasterizers: draw 3D Gaussians into a batch of cameras, differentiably.

A rasterizer is any object with ``render(...)`` mirroring ``gsplat.rasterization`` (activated
parameters in, ``(colors, alphas, meta)`` out). Two are registered by name:

- ``gsplat``: ``gsplat.rasterization`` (CUDA kernels, compiled on first use; CUDA tensors only);
- ``torch_cpu``: a small EWA splatting rasterizer, projection in torch and compositing in numba on the
  CPU (torch on other devices: Apple ``mps``), for machines without CUDA, tests and CI. Same
  conventions, same ``meta`` keys that gsplat's densification strategies read.

Conventions (gsplat's, DESIGN.md section 3): ``viewmats`` world-to-camera OpenCV (x right, y down,
z forward), ``Ks`` in pixels with pixel i spanning [i, i+1] (its centre at i + 0.5), quaternions
w x y z, colours either per Gaussian [N, D] / [C, N, D] or SH coefficients [N, K, 3] with
``sh_degree`` set (colour = max(0, 0.5 + SH(dir))).
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from torch import Tensor

from ..registry import Registry

# Compositing rules of 3DGS and gsplat, shared by torch_cpu's two kernels (torch's pairs, numba's rows).
ALPHA_MIN = 1.0 / 255.0  # a Gaussian contributes to a pixel only from this alpha up
ALPHA_MAX = 0.999  # alpha is clamped below 1 so that transmittance stays positive
TRANSMITTANCE_MIN = 1e-4  # a pixel is done once its transmittance would drop below this


@runtime_checkable
class Rasterizer(Protocol):
    def render(
        self,
        means: Tensor,  # [N, 3]
        quats: Tensor,  # [N, 4]
        scales: Tensor,  # [N, 3]
        opacities: Tensor,  # [N]
        colors: Tensor,  # [(C,) N, D] or [(C,) N, K, 3]
        viewmats: Tensor,  # [C, 4, 4]
        Ks: Tensor,  # [C, 3, 3]
        width: int,
        height: int,
        *,
        sh_degree: int | None = None,
        backgrounds: Tensor | None = None,  # [C, D]
    ) -> tuple[Tensor, Tensor, dict[str, Any]]:
        """Render Gaussians (activated parameters) into C cameras.

        Args:
            means: centres, world. [N, 3]
            quats: rotations w x y z, normalised inside. [N, 4]
            scales: axis scales (activated, not logs). [N, 3]
            opacities: in [0, 1] (activated, not logits). [N]
            colors: per-Gaussian features [(C,) N, D], or SH coefficients [(C,) N, K, 3] when
                ``sh_degree`` is set.
            viewmats: world-to-camera, OpenCV. [C, 4, 4]
            Ks: intrinsics, pixels. [C, 3, 3]
            width, height: image size in pixels.
            sh_degree: SH degree to evaluate (0..3), or None for plain features.
            backgrounds: colour behind the Gaussians per camera. [C, D]

        Every argument may carry the same leading batch dimensions (``means`` [..., N, 3],
        ``viewmats`` [..., C, 4, 4], ``backgrounds`` [..., C, D]): one Gaussian set and its cameras
        per element, as ``gsplat.rasterization`` takes them; the returns then carry them too.

        Returns:
            colors [C, H, W, D], alphas [C, H, W, 1] and ``meta`` with at least ``means2d``
            [C, N, 2] (gradients retainable), ``radii`` [C, N, 2] int (0: not drawn), ``depths``
            [C, N], ``width``, ``height``, ``n_cameras`` and ``gaussian_ids`` (None: not packed).
        """
        ...


# Each implementation registers itself when its module is imported, so gsplat loads only where it is used.
RASTERIZERS: Registry[Any] = Registry(
    "rasterizer", {"gsplat": "backend.rasterizers.gsplat_cuda", "torch_cpu": "backend.rasterizers.torch_cpu"}
)
