"""Visual hull by space carving: masked, posed captures -> coloured surface points (estimator ``hull``).

No learned weights and no stereo matching, so it holds at wide baselines (3 views 120 degrees apart)
where plane sweep finds no neighbour. It needs masks (``Views.masks``: True on the object).

1. **Box.** The point nearest all optical axes is the centre; the half-size is the median over views
   of (distance to the centre) x tan(half the wider field of view), a box every view frames.
2. **Carve** a voxel grid of ``resolution`` cells along the box's longest side: a voxel stays when it
   projects in front of at least ``min_views`` cameras, inside their images, and every camera that
   sees it sees it inside its mask (:func:`inside_masks`). A second pass carves a grid over the box of
   the voxels kept by the first (plus one coarse voxel each side), at the same resolution.
3. **Surface and colour.** Voxels with an empty 6-neighbour are the surface. Each view z-buffers the
   surface voxels; a voxel within ``visibility_voxels`` voxels of a view's front surface is visible
   there. Its colour is the mean over the views that see it, its source the nearest such view, its
   confidence ``confidence``; voxels no view sees are left out.

The hull contains the object (concavities no silhouette shows stay filled), so its points are a
bound, not a measurement: they get a lower confidence than stereo points.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..progress import WorkProgress, no_work_progress
from ..types import Cameras, GeometryMemory, Views, project_points
from . import ESTIMATORS, GeometryError

COND_MAX = 1e6  # the axes are treated as parallel when their normal equations are this ill-conditioned
CARVE_CHUNK = 1 << 20  # voxels projected at once


@dataclass(frozen=True)
class HullConfig:
    """Space-carving settings.

    Attributes:
        resolution: voxels along the longest side of the box (each pass).
        min_views: a voxel must project into at least this many captures (capped at their count).
        visibility_voxels: a surface voxel is visible in a view when its depth is within this many
            voxel sizes of the view's nearest surface voxel at that pixel.
        confidence: confidence of every hull point.
        box_scale: the automatic box's half-size is multiplied by this.
    """

    resolution: int = 128
    min_views: int = 2
    visibility_voxels: float = 2.0
    confidence: float = 0.5
    box_scale: float = 1.0

    def check(self) -> None:
        if self.resolution < 4:
            raise ValueError(f"HullConfig.resolution must be >= 4; got {self.resolution}")
        if self.min_views < 1:
            raise ValueError(f"HullConfig.min_views must be >= 1; got {self.min_views}")
        if not 0.0 <= self.confidence <= 1.0:
            raise ValueError(f"HullConfig.confidence must be in [0, 1]; got {self.confidence}")
        if self.visibility_voxels <= 0 or self.box_scale <= 0:
            raise ValueError(
                f"HullConfig.visibility_voxels and box_scale must be > 0; got {self.visibility_voxels}, {self.box_scale}"
            )


def axes_center(cams: Cameras) -> Tensor | None:
    """The point nearest all optical axes (least squares), or None when they are near parallel; solved in float64 on
    the CPU (Apple's ``mps`` has no float64), returned on the cameras' device. [3]"""
    c = cams.centers.cpu().double()
    d = cams.c2w[:, :3, 2].cpu().double()
    P = torch.eye(3, dtype=torch.float64) - d[:, :, None] * d[:, None, :]  # [C, 3, 3]
    A, b = P.sum(0), (P @ c[:, :, None]).sum(0)[:, 0]
    if float(torch.linalg.cond(A)) > COND_MAX:
        return None
    return torch.linalg.solve(A, b).to(cams.centers)


def auto_box(cams: Cameras, box_scale: float = 1.0) -> tuple[Tensor, Tensor]:
    """A box every camera frames: (min corner [3], max corner [3]), world units."""
    center = axes_center(cams)
    if center is None:
        raise GeometryError(
            "hull: the captures' optical axes are near parallel; a visual hull needs views around the object"
        )
    dist = (cams.centers - center).norm(dim=1)  # [C]
    half_fov = torch.atan(torch.maximum(cams.width / (2 * cams.K[:, 0, 0]), cams.height / (2 * cams.K[:, 1, 1])))
    half = float((dist * torch.tan(half_fov)).median()) * box_scale
    return center - half, center + half


def inside_masks(xyz: Tensor, cams: Cameras, masks: Tensor, min_views: int = 1) -> Tensor:
    """Which points every camera that sees them sees inside its mask, seen by at least ``min_views``.

    Args:
        xyz: world points. float32 [N, 3]
        cams: C cameras at the masks' size.
        masks: True on the object. bool [C, H, W]
        min_views: cameras a point must project into (in front, inside the image).
    Returns:
        bool [N]
    """
    H, W = masks.shape[1:]
    keep = []
    for start in range(0, len(xyz), CARVE_CHUNK):
        uv, z = project_points(xyz[start : start + CARVE_CHUNK], cams)  # [C, n, 2], [C, n]
        u, v = torch.floor(uv[..., 0]).long(), torch.floor(uv[..., 1]).long()
        seen = (z > 0) & (u >= 0) & (u < W) & (v >= 0) & (v < H)  # [C, n]
        cam_idx = torch.arange(len(cams), device=xyz.device)[:, None].expand_as(u)
        on = masks[cam_idx, v.clamp(0, H - 1), u.clamp(0, W - 1)]
        keep.append((seen.sum(0) >= min_views) & ~(seen & ~on).any(0))
    return torch.cat(keep) if keep else torch.zeros(0, dtype=torch.bool, device=xyz.device)


def _grid(lo: Tensor, hi: Tensor, resolution: int) -> tuple[Tensor, float, tuple[int, int, int]]:
    """Voxel centres of a box, (x fastest last) [X*Y*Z, 3], the voxel size and the grid dims."""
    size = float((hi - lo).max()) / resolution
    dims = tuple(max(1, math.ceil(float(e) / size)) for e in (hi - lo))
    axes = [lo[k] + (torch.arange(dims[k], device=lo.device, dtype=torch.float32) + 0.5) * size for k in range(3)]
    centres = torch.stack(torch.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)
    return centres, size, dims  # type: ignore[return-value]


def carve(views: Views, cfg: HullConfig) -> tuple[Tensor, float, tuple[int, int, int], Tensor]:
    """Two carving passes. Returns (voxel centres [V, 3], voxel size, dims, occupancy bool [V])."""
    cams, masks = views.cams, views.masks
    min_views = min(cfg.min_views, len(cams))
    lo, hi = auto_box(cams, cfg.box_scale)
    centres, size, dims = _grid(lo, hi, cfg.resolution)
    occ = inside_masks(centres, cams, masks, min_views)
    if occ.any():
        kept = centres[occ]
        lo, hi = kept.min(0).values - size, kept.max(0).values + size
        centres, size, dims = _grid(lo, hi, cfg.resolution)
        occ = inside_masks(centres, cams, masks, min_views)
    return centres, size, dims, occ


def surface(occ: Tensor, dims: tuple[int, int, int]) -> Tensor:
    """Occupied voxels with at least one empty 6-neighbour (the grid's outside counts as empty). bool [V]"""
    grid = occ.view(1, 1, *dims).float()
    # a voxel is interior when the minimum over its 6-neighbourhood (as -maxpool of -x) is 1
    padded = F.pad(grid, (1, 1, 1, 1, 1, 1))
    inner = torch.ones_like(grid, dtype=torch.bool)
    X, Y, Z = dims
    for dx, dy, dz in ((0, 1, 1), (2, 1, 1), (1, 0, 1), (1, 2, 1), (1, 1, 0), (1, 1, 2)):
        inner &= padded[..., dx : dx + X, dy : dy + Y, dz : dz + Z] > 0
    return (occ.view(dims) & ~inner.view(dims)).reshape(-1)


def colour_points(xyz: Tensor, views: Views, voxel: float, cfg: HullConfig) -> GeometryMemory:
    """Colour surface points from the views that see them (z-buffer per view; module docstring)."""
    cams = views.cams
    H, W = views.images.shape[1:3]
    uv, z = project_points(xyz, cams)  # [C, N, 2], [C, N]
    u, v = torch.floor(uv[..., 0]).long(), torch.floor(uv[..., 1]).long()
    inside = (z > 0) & (u >= 0) & (u < W) & (v >= 0) & (v < H)
    rgb_sum = torch.zeros(len(xyz), 3, device=xyz.device)
    count = torch.zeros(len(xyz), device=xyz.device)
    best_z = torch.full((len(xyz),), float("inf"), device=xyz.device)
    source = torch.full((len(xyz),), -1, dtype=torch.int32, device=xyz.device)
    for c in range(len(cams)):
        pix = (v[c].clamp(0, H - 1) * W + u[c].clamp(0, W - 1))[inside[c]]
        zc = z[c][inside[c]]
        front = torch.full((H * W,), float("inf"), device=xyz.device).scatter_reduce(0, pix, zc, "amin")
        visible = torch.zeros(len(xyz), dtype=torch.bool, device=xyz.device)
        visible[inside[c]] = zc <= front[pix] + cfg.visibility_voxels * voxel
        colours = views.images[c].reshape(-1, 3)[(v[c].clamp(0, H - 1) * W + u[c].clamp(0, W - 1))]
        rgb_sum += torch.where(visible[:, None], colours, torch.zeros_like(colours))
        count += visible
        nearer = visible & (z[c] < best_z)
        best_z = torch.where(nearer, z[c], best_z)
        source = torch.where(nearer, torch.full_like(source, int(views.ids[c])), source)
    seen = count > 0
    return GeometryMemory(
        xyz=xyz[seen],
        rgb=(rgb_sum[seen] / count[seen, None]).clamp(0, 1),
        confidence=torch.full((int(seen.sum()),), cfg.confidence, device=xyz.device),
        source=source[seen],
    )


@ESTIMATORS.register("hull")
class VisualHull:
    """Space carving from the captures' masks (see the module docstring).

    Example::

        >>> est = VisualHull(HullConfig(resolution=64))
        >>> memory = est.estimate(views)   # views: posed captures with masks [C, H, W]
    """

    def __init__(self, cfg: HullConfig = HullConfig()) -> None:
        cfg.check()
        self.cfg = cfg

    def estimate(self, views: Views, progress: WorkProgress = no_work_progress) -> GeometryMemory:
        """Captures (images [C, H, W, 3], cameras, ids, masks [C, H, W]) -> surface points of the hull (carved in
        one pass over all captures at once: ``progress`` hears its start)."""
        if views.masks is None:
            raise GeometryError("hull: the captures have no masks; a visual hull needs each capture's object mask")
        if tuple(views.masks.shape) != tuple(views.images.shape[:3]):
            raise ValueError(
                f"hull: views.masks must be {tuple(views.images.shape[:3])} (one per image); got {tuple(views.masks.shape)}"
            )
        progress(0.0, f"visual hull: carving {self.cfg.resolution} voxels a side with {len(views)} masks")
        centres, size, dims, occ = carve(views, self.cfg)
        if not occ.any():
            return GeometryMemory.empty(views.images.device)
        return colour_points(centres[surface(occ, dims)], views, size, self.cfg)
