"""Step 1b of the loop (ours): the guide, Gaussians fitted on the captures alone.

The point memory is thin where the captures are far apart; Gaussians fitted on the captures give
the generator dense colour and expected depth there. Wherever the guide is opaque its render
replaces the memory's; elsewhere the memory's render stays. The memory's own render still feeds
retrieval, the memory update and overview.png.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ..types import Cameras, GeometryMemory, Renders, Views
from .fit import FitConfig, FitViews, Gaussians, fit_gaussians, render_gaussians_geometry


@dataclass(frozen=True)
class GuideConfig:
    """The guide's settings.

    Attributes:
        enabled: fit the guide (job setting ``guide``); off: the point render alone, as AnyRecon.
        alpha: Gaussian opacity from which a guide pixel counts as covered.
    """

    enabled: bool = True
    alpha: float = 0.5

    def __post_init__(self) -> None:
        if not 0.0 < self.alpha <= 1.0:
            raise ValueError(f"GuideConfig.alpha must be in (0, 1]; got {self.alpha}")


def fit_guide(
    captures: Views,
    memory: GeometryMemory,
    fit_cfg: FitConfig,
    *,
    device: torch.device | str,
    progress: Callable[[int, float], None] | None = None,
) -> Gaussians:
    """Gaussians fitted on the captures alone (confidence 1), starting from the memory M."""
    return fit_gaussians(FitViews.from_views(captures), memory, fit_cfg, device=device, progress=progress)


def render_guide(guide: Gaussians, cams: Cameras, fit_cfg: FitConfig, cfg: GuideConfig) -> tuple[Tensor, Tensor]:
    """The guide's colour [C, H, W, 3] and expected depth [C, H, W], the depth 0 where it is not
    opaque (alpha below ``cfg.alpha``)."""
    rgb, depth, alpha = render_gaussians_geometry(guide, cams, fit_cfg)
    return rgb, torch.where(alpha >= cfg.alpha, depth.clamp_min(0.0), torch.zeros_like(depth))


def guided_renders(
    renders: Renders, guide: Gaussians, targets: Cameras, fit_cfg: FitConfig, cfg: GuideConfig
) -> Renders:
    """The memory's renders with the guide's colour and expected depth where it is opaque
    (:func:`render_guide`); those pixels have source -1 (no capture id). Shapes as
    :class:`Renders` [C, H, W(, 3)]."""
    rgb, depth = render_guide(guide, targets, fit_cfg, cfg)
    opaque = depth > 0
    return Renders(
        rgb=torch.where(opaque[..., None], rgb, renders.rgb),
        depth=torch.where(opaque, depth, renders.depth),
        mask=renders.mask | opaque,
        source=torch.where(opaque, torch.full_like(renders.source, -1), renders.source),
    )
