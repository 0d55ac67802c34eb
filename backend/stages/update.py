"""Feed generated frames back into the memory M (DESIGN.md section 1 step 6).

After a segment is generated, its frames are lifted to 3D and merged into M, so that the next
segment renders from the updated memory (AnyRecon re-runs its point-map model on captured plus
generated views; without this, segments drift apart). Here, with no learned weights:

- pixels that hold a memory point's projection (a footprint-free render) are lifted at its depth:
  the geometry stays M's, the colour is the frame's (merged by confidence); pixels covered only by
  a splat footprint are not lifted, so that surfaces do not creep outwards update after update;
- pixels the generator filled get depth by plane-sweep stereo (``backend.estimators.mvs``) of the
  frame against nearby captures and neighbouring frames, kept only where the depth agrees with
  another frame (geometric consistency);
- new points get source -1 and confidence = generator confidence x stereo confidence x weight;
- everything is merged and voxel-downsampled so that M stays bounded.

``UpdateConfig.enabled = False`` (job setting ``update_memory``) returns the memory unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from ..estimators.mvs import MVSConfig, fuse_depths, match_candidates, plane_sweep, select_neighbors, to_gray
from ..types import Cameras, GeometryMemory, Renders, Views, backproject, project_points
from .memory import QUANTILE_SAMPLES, auto_voxel_size, cap_points, check_views, voxel_downsample
from .render import RenderConfig, render_memory

GENERATED_SOURCE = -1  # source id of points lifted from generated frames (DESIGN.md section 3)
CAPTURE_PIXELS_MAX = 2.0  # the automatic voxel's pixel term at most this many times the captures' own
DEPTH_SAMPLES = 65536  # memory points whose depth in the captures gives theirs (a [C, N] of 2M points was GBs)


def _default_stereo() -> MVSConfig:
    # Smaller, fewer planes and neighbours than the initial MVS: the range is already tight (from M)
    # and filled pixels are the generator's guesses (low confidence) anyway.
    return MVSConfig(max_side=320, num_planes=48, num_neighbors=3, match_candidates=6, min_consistent=1)


@dataclass(frozen=True)
class UpdateConfig:
    """Attributes:
    enabled: off = the memory is returned unchanged (measures the update's effect).
    voxel_size: voxel edge (world units) of the merge; 0 = automatic: the larger of
        ``voxel_fraction`` x scene diagonal and ``voxel_px`` frame pixels at the median depth.
    voxel_fraction: automatic voxel size as a fraction of the memory's diagonal (1/640: about
        one pixel of a 640-pixel view framing the whole scene).
    voxel_px: automatic voxel size in frame pixels at the median rendered depth (>= 1 keeps
        re-lifted points in the voxels they came from, so M stays bounded).
    max_points: cap on M after the merge (most confident points kept).
    rendered_weight: confidence scale of points lifted at rendered depth (geometry from M).
    stereo_weight: confidence scale of points placed by stereo in filled pixels.
    min_confidence: lifted points below this confidence are dropped.
    lift_rendered: also lift the pixels holding a projection of M (merges generated colour).
    stereo: plane-sweep settings for filled pixels (max_side is the stereo resolution).
    depth_percentiles: band of the frame's rendered depths that sets the stereo range...
    depth_margin: ...widened by this factor on each side (near / m, far * m).
    stereo_stride: stereo runs on every this-many-th frame of the segment (neighbouring frames
        see nearly the same holes; 4 keeps 10 of AnyRecon's 40).
    consistency_frames: a filled depth is checked against the stereo frames up to this many
        places before and after it.
    """

    enabled: bool = True
    voxel_size: float = 0.0
    voxel_fraction: float = 1.0 / 640.0
    voxel_px: float = 1.0
    max_points: int = 2_000_000
    rendered_weight: float = 1.0
    stereo_weight: float = 0.5
    min_confidence: float = 0.05
    lift_rendered: bool = True
    stereo: MVSConfig = field(default_factory=_default_stereo)
    depth_percentiles: tuple[float, float] = (0.02, 0.98)
    depth_margin: float = 1.5
    stereo_stride: int = 4
    consistency_frames: int = 2

    def check(self) -> None:
        if self.voxel_size < 0:
            raise ValueError(f"UpdateConfig.voxel_size must be >= 0; got {self.voxel_size}")
        if self.max_points < 1:
            raise ValueError(f"UpdateConfig.max_points must be >= 1; got {self.max_points}")
        if self.stereo_stride < 1:
            raise ValueError(f"UpdateConfig.stereo_stride must be >= 1; got {self.stereo_stride}")
        if self.consistency_frames < 1:
            raise ValueError(f"UpdateConfig.consistency_frames must be >= 1; got {self.consistency_frames}")
        if self.depth_margin <= 1:
            raise ValueError(f"UpdateConfig.depth_margin must be > 1; got {self.depth_margin}")
        self.stereo.check()


def _resize(images: Tensor, cams: Cameras, width: int, height: int) -> tuple[Tensor, Cameras]:
    """Images [C, H, W, 3] and cameras at another size (antialiased area-like resize)."""
    if (cams.width, cams.height) == (width, height):
        return images, cams
    out = F.interpolate(
        images.permute(0, 3, 1, 2), size=(height, width), mode="bilinear", antialias=True, align_corners=False
    ).permute(0, 2, 3, 1)
    return out.clamp(0, 1).contiguous(), cams.resized(width, height)


def _frame_range(
    depth: Tensor, mask: Tensor, memory: GeometryMemory, cam: Cameras, cfg: UpdateConfig
) -> tuple[float, float] | None:
    """Stereo depth range of one frame: from its rendered depths, else from M's points in view."""
    z = depth[mask]
    if z.numel() == 0 and len(memory):
        uv, zz = project_points(memory.xyz, cam)
        inside = (
            (zz[0] > 0)
            & (uv[0, :, 0] >= 0)
            & (uv[0, :, 0] < cam.width)
            & (uv[0, :, 1] >= 0)
            & (uv[0, :, 1] < cam.height)
        )
        z = zz[0][inside]
    if z.numel() == 0:
        return None
    stride = -(-z.numel() // QUANTILE_SAMPLES)  # torch.quantile takes at most 2^24 values
    lo, hi = torch.quantile(z.float()[::stride], torch.tensor(cfg.depth_percentiles, device=z.device)).tolist()
    if not lo > 0:
        return None
    return lo / cfg.depth_margin, max(hi, lo) * cfg.depth_margin


def lift_rendered(memory: GeometryMemory, frames: Views, confidence: Tensor, weight: float) -> GeometryMemory:
    """Points at the depth of the memory points projecting into each pixel, coloured by the frames.

    A footprint-free render (radius 0) picks the nearest point per pixel; those pixels are lifted at
    its depth with source -1 and confidence ``confidence * weight``.
    """
    centres = render_memory(memory, frames.cams, RenderConfig(radius_px=0))
    world = backproject(centres.depth, frames.cams)  # [F, H, W, 3]
    m = centres.mask
    return GeometryMemory(
        xyz=world[m],
        rgb=frames.images[m],
        confidence=confidence[m] * weight,
        source=torch.full((int(m.sum()),), GENERATED_SOURCE, dtype=torch.int32, device=world.device),
    )


def lift_filled(
    memory: GeometryMemory, frames: Views, renders: Renders, confidence: Tensor, captures: Views, cfg: UpdateConfig
) -> GeometryMemory:
    """Points for the pixels the generator filled, by plane sweep against captures and other frames.

    Stereo runs at ``cfg.stereo.max_side`` on every ``cfg.stereo_stride``-th frame (and the last, where that
    picks one frame alone); a filled depth is kept where another of those frames' depth (rendered or stereo)
    agrees with it.
    """
    Fn, H, W = renders.depth.shape
    s = cfg.stereo
    scale = min(1.0, s.max_side / max(H, W)) if s.max_side > 0 else 1.0
    w, h = max(1, round(W * scale)), max(1, round(H * scale))
    f_imgs, f_cams = _resize(frames.images, frames.cams, w, h)
    # nearest-exact: the source pixel holding each target pixel's centre, aligned with f_imgs and conf
    r_depth = F.interpolate(renders.depth[:, None], size=(h, w), mode="nearest-exact")[:, 0]
    r_mask = r_depth > 0
    conf = F.interpolate(confidence[:, None].float(), size=(h, w), mode="bilinear", align_corners=False)[:, 0]
    if len(captures):
        c_imgs, c_cams = _resize(captures.images, captures.cams, w, h)
        all_imgs, all_cams = torch.cat([f_imgs, c_imgs]), Cameras.cat([f_cams, c_cams])
    else:
        all_imgs, all_cams = f_imgs, f_cams
    gray = to_gray(all_imgs)
    candidates = match_candidates(all_cams, s)
    chosen = list(range(0, Fn, cfg.stereo_stride))
    if len(chosen) == 1 and Fn > 1:  # a short segment: a second frame for the consistency check to hold against
        chosen.append(Fn - 1)
    stereo_depth = torch.zeros(len(chosen), h, w, device=gray.device)
    stereo_conf = torch.zeros(len(chosen), h, w, device=gray.device)
    for n, f in enumerate(chosen):
        if bool(r_mask[f].all()):
            continue
        rng = _frame_range(r_depth[f], r_mask[f], memory, f_cams[f], cfg)
        if rng is None:
            continue
        nb = select_neighbors(all_cams, f, candidates[f], math.sqrt(rng[0] * rng[1]), s)
        if not nb:
            continue
        res = plane_sweep(gray[f], all_cams[f], gray[nb], all_cams[nb], rng[0], rng[1], s)
        filled = ~r_mask[f]
        stereo_depth[n] = torch.where(filled, res.depth, torch.zeros_like(res.depth))
        stereo_conf[n] = torch.where(filled, res.confidence * conf[f], torch.zeros_like(res.confidence))
    if not bool((stereo_depth > 0).any()):
        return GeometryMemory.empty(gray.device)
    check = torch.where(r_mask[chosen], r_depth[chosen], stereo_depth)
    k, m = cfg.consistency_frames, len(chosen)
    neighbors = [[g for g in range(max(0, n - k), min(m, n + k + 1)) if g != n] for n in range(m)]
    views = Views(f_imgs[chosen], f_cams[chosen], [GENERATED_SOURCE] * m)
    pts = fuse_depths(stereo_depth, stereo_conf * cfg.stereo_weight, views, neighbors, s, check_depths=check)
    return pts


def update_voxel_size(
    memory: GeometryMemory, cams: Cameras, renders: Renders, cfg: UpdateConfig, captures: Cameras | None = None
) -> float:
    """Automatic merge voxel: max(voxel_fraction x diagonal, voxel_px pixels at the median depth), the pixel term
    at most :data:`CAPTURE_PIXELS_MAX` times the captures' (``voxel_px`` of their pixels at the memory's median
    depth in them): frames 150 times as far as the scene made a voxel that merged the whole temple memory into a
    handful of points (5 of 13,789 in tests/backend/stages/test_update.py), where a trajectory among the captures has
    a pixel term like theirs and is never capped."""
    size = auto_voxel_size(memory, cfg.voxel_fraction)
    z = renders.depth[renders.mask]
    if z.numel():
        pixel = cfg.voxel_px * float(z.median()) / float(cams.K[:, 0, 0].median())
        if captures is not None and len(captures) and len(memory):
            xyz = memory.xyz[:: -(-len(memory) // DEPTH_SAMPLES)]  # [<= DEPTH_SAMPLES, 3], evenly strided
            at = project_points(xyz, captures)[1]  # [C, n]
            seen = at[at > 0]
            if seen.numel():
                own = cfg.voxel_px * float(seen.median()) / float(captures.K[:, 0, 0].median())
                pixel = min(pixel, CAPTURE_PIXELS_MAX * own)
        size = max(size, pixel)
    return size


def update_memory(
    memory: GeometryMemory,
    frames: Views,
    renders: Renders,
    confidence: Tensor,
    captures: Views,
    cfg: UpdateConfig = UpdateConfig(),
) -> GeometryMemory:
    """Merge a segment's generated frames into M.

    Args:
        memory: M before the segment (N points).
        frames: generated frames: images in [0, 1] [F, H, W, 3], their cameras, ids (-1).
        renders: M rendered at the frames' cameras: depth [F, H, W], mask [F, H, W], ...
        confidence: the generator's per-pixel confidence in [0, 1]. [F, H, W]
        captures: the captures (images [Q, h, w, 3], cameras, ids) used as stereo partners.
        cfg: switch, weights, stereo settings, voxel size and cap.
    Returns:
        the updated memory (``memory`` itself when ``cfg.enabled`` is False).

    Example::

        >>> memory = update_memory(memory, Views(frames.images, seg_cams, [-1] * F), renders,
        ...                        frames.confidence, captures, UpdateConfig())
    """
    cfg.check()
    if not cfg.enabled:
        return memory
    check_views(frames, "update_memory: frames")
    Fn, H, W = frames.images.shape[:3]
    for name, t in (("renders.depth", renders.depth), ("renders.mask", renders.mask), ("confidence", confidence)):
        if tuple(t.shape) != (Fn, H, W):
            raise ValueError(f"update_memory: {name} must be [F, H, W] = {(Fn, H, W)}; got {tuple(t.shape)}")
    if len(captures):
        check_views(captures, "update_memory: captures")
    parts = [lift_filled(memory, frames, renders, confidence, captures, cfg)]
    if cfg.lift_rendered and len(memory):
        parts.append(lift_rendered(memory, frames, confidence, cfg.rendered_weight))
    new = GeometryMemory.cat(parts)
    new = new.select(new.confidence >= cfg.min_confidence)
    merged = GeometryMemory.cat([memory, new.to(memory.device)])
    voxel = cfg.voxel_size or update_voxel_size(
        memory if len(memory) > 1 else merged, frames.cams, renders, cfg, captures.cams if len(captures) else None
    )
    if voxel > 0:
        merged = voxel_downsample(merged, voxel)
    return cap_points(merged, cfg.max_points)
