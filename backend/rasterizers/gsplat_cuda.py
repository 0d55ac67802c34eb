"""``gsplat``: ``gsplat.rasterization`` (CUDA) behind the :class:`~backend.rasterizers.Rasterizer` interface.

gsplat is imported when the first image is rendered, not when this module loads, so that naming
the rasterizer costs nothing on machines without it. Its CUDA kernels compile on first use (about
a minute on 16 cores with ``TORCH_CUDA_ARCH_LIST`` set to the GPU's architecture) and take CUDA
tensors only. Rendering is not packed (``meta["means2d"]`` is [C, N, 2]) and in classic mode: the
layout gsplat's ``DefaultStrategy`` and our ``torch_cpu`` rasterizer share.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from . import RASTERIZERS
from .torch_cpu import EPS2D, FAR_PLANE, NEAR_PLANE, TILE_SIZE


@RASTERIZERS.register("gsplat")
class GsplatRasterizer:
    """gsplat's CUDA rasterizer.

    Args:
        near_plane, far_plane: depth range drawn, camera units.
        eps2d: blur added to the 2D covariances, px^2.
        tile_size: gsplat's tile size in pixels.
        absgrad: also accumulate absolute 2D gradients (``meta["means2d"].absgrad``; AbsGS).
    """

    def __init__(
        self,
        *,
        near_plane: float = NEAR_PLANE,
        far_plane: float = FAR_PLANE,
        eps2d: float = EPS2D,
        tile_size: int = TILE_SIZE,
        absgrad: bool = False,
    ) -> None:
        self.near_plane = near_plane
        self.far_plane = far_plane
        self.eps2d = eps2d
        self.tile_size = tile_size
        self.absgrad = absgrad

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
        """Render; arguments and returns as :meth:`backend.rasterizers.Rasterizer.render`."""
        if means.device.type != "cuda":
            raise ValueError(
                f"the gsplat rasterizer needs CUDA tensors; got means on {means.device} "
                "(use the torch_cpu rasterizer on this device)"
            )
        try:
            from gsplat import rasterization
        except ImportError as err:
            raise ImportError(
                f"the gsplat rasterizer needs the gsplat package ({err}); "
                "pip install gsplat (a dependency of reconloop), or use the torch_cpu rasterizer"
            ) from err
        return rasterization(
            means,
            quats,
            scales,
            opacities,
            colors,
            viewmats,
            Ks,
            width,
            height,
            near_plane=self.near_plane,
            far_plane=self.far_plane,
            eps2d=self.eps2d,
            sh_degree=sh_degree,
            packed=False,
            tile_size=self.tile_size,
            backgrounds=backgrounds,
            absgrad=self.absgrad,
            rasterize_mode="classic",
        )
