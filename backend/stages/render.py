"""Render the geometry memory M into a batch of cameras (DESIGN.md section 1 step 4).

z-buffered point splatting in plain torch: every point covers a small square footprint around its
projection; at each pixel the nearest point wins. The z-test packs each candidate's depth (float32
bits, monotonic for positive floats) above its point index into one int64 key and takes
``scatter_reduce(..., "amin")``, so one pass gives both the winning depth and the winning point.
Works on whatever device the memory and cameras are on.

Cameras follow DESIGN.md section 3: OpenCV world-to-camera, K in pixels, pixel i spans [i, i+1], so
a point projecting to continuous coordinate u lands in pixel floor(u).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..types import Cameras, GeometryMemory, Renders, project_points

INDEX_BITS = 32  # low bits of the packed z-buffer key hold the point index
EMPTY_SOURCE = -1  # source id where nothing was rendered (DESIGN.md section 3: -1 = generated/none)
MAX_FOOTPRINT_RADIUS = 64  # largest allowed max_radius_px
OFF_IMAGE = -(MAX_FOOTPRINT_RADIUS + 1.0)  # a pixel coordinate whose footprint misses the image


@dataclass(frozen=True)
class RenderConfig:
    """Point splatting settings.

    Attributes:
        radius_px: footprint half-size in pixels when ``point_size`` is 0: each point covers a
            (2 r + 1)^2 square. 1 closes the gaps of an MVS cloud fused at about its own resolution.
        point_size: world-space point diameter; when > 0 the footprint radius is
            ``f * point_size / (2 z)`` pixels, clamped to [0, max_radius_px] (near points cover more).
        max_radius_px: largest footprint half-size in pixels (bounds the work per point).
        near: points closer than this camera z (world units) are dropped.
        max_candidates: splat candidates (cameras x points x footprint) processed at once; bounds
            memory (each costs about 32 bytes).
    """

    radius_px: int = 1
    point_size: float = 0.0
    max_radius_px: int = 4
    near: float = 1e-4
    max_candidates: int = 1 << 26

    def check(self) -> None:
        if self.radius_px < 0:
            raise ValueError(f"RenderConfig.radius_px must be >= 0; got {self.radius_px}")
        if not 0 <= self.max_radius_px <= MAX_FOOTPRINT_RADIUS:
            raise ValueError(
                f"RenderConfig.max_radius_px must be in [0, {MAX_FOOTPRINT_RADIUS}]; got {self.max_radius_px}"
            )
        if self.point_size < 0:
            raise ValueError(f"RenderConfig.point_size must be >= 0; got {self.point_size}")
        if self.near <= 0:
            raise ValueError(f"RenderConfig.near must be > 0; got {self.near}")
        if self.max_candidates < 1:
            raise ValueError(f"RenderConfig.max_candidates must be >= 1; got {self.max_candidates}")


def _footprint_radius(z: Tensor, fx: Tensor, cfg: RenderConfig) -> Tensor:
    """Per-candidate footprint half-size in pixels for ``cfg.point_size`` > 0. int64, shape of ``z``."""
    radius = fx * cfg.point_size / (2.0 * z.clamp_min(cfg.near))
    return radius.round().clamp(0, cfg.max_radius_px).to(torch.int64)


def render_memory(memory: GeometryMemory, cams: Cameras, cfg: RenderConfig = RenderConfig()) -> Renders:
    """Splat the memory into C cameras with a z-buffer.

    Args:
        memory: N points: xyz [N, 3], rgb [N, 3] in [0, 1], confidence [N], source ids [N].
        cams: C cameras of one image size (OpenCV w2c [C, 4, 4], K [C, 3, 3]).
        cfg: footprint and memory settings.
    Returns:
        Renders with rgb [C, H, W, 3] (0 where empty), depth [C, H, W] (camera z of the winning
        point, 0 where empty), mask [C, H, W] (bool) and source [C, H, W] (int32, -1 where empty).

    Example::

        >>> mem = GeometryMemory(torch.rand(100, 3) + torch.tensor([0., 0., 2.]), torch.rand(100, 3),
        ...                      torch.ones(100), torch.zeros(100, dtype=torch.int32))
        >>> K = torch.tensor([[[32., 0, 16], [0, 32., 16], [0, 0, 1]]])
        >>> out = render_memory(mem, Cameras(torch.eye(4)[None], K, 32, 32))
        >>> out.rgb.shape, out.depth.shape
        (torch.Size([1, 32, 32, 3]), torch.Size([1, 32, 32]))
    """
    cfg.check()
    device = memory.xyz.device
    C, H, W = len(cams), cams.height, cams.width
    n = len(memory)
    if cams.device != device:
        raise ValueError(f"render_memory: cams are on {cams.device} but memory is on {device}; move one with .to()")
    if n >= 1 << INDEX_BITS:
        raise ValueError(f"render_memory: at most {1 << INDEX_BITS} points; got {n}")
    empty_key = torch.iinfo(torch.int64).max
    keys = torch.full((C * H * W + 1,), empty_key, dtype=torch.int64, device=device)  # + 1 spare slot
    if n:
        max_r = cfg.max_radius_px if cfg.point_size > 0 else min(cfg.radius_px, cfg.max_radius_px)
        side = 2 * max_r + 1
        per_cam = n * side * side
        cams_per_chunk = max(1, cfg.max_candidates // max(per_cam, 1))
        point_ids = torch.arange(n, device=device, dtype=torch.int64)
        for c0 in range(0, C, cams_per_chunk):
            chunk = cams[list(range(c0, min(C, c0 + cams_per_chunk)))]
            _splat_chunk(memory.xyz, point_ids, chunk, c0, max_r, cfg, keys)
    keys = keys[:-1]
    has_point = keys != empty_key
    index = torch.where(has_point, keys & ((1 << INDEX_BITS) - 1), torch.zeros_like(keys))
    depth_bits = (keys >> INDEX_BITS).to(torch.int32)
    depth = torch.where(has_point, depth_bits.view(torch.float32), torch.zeros((), device=device))
    if n:
        rgb = memory.rgb[index] * has_point[:, None]
        source = torch.where(
            has_point,
            memory.source[index].to(torch.int32),
            torch.full((), EMPTY_SOURCE, dtype=torch.int32, device=device),
        )
    else:
        rgb = torch.zeros(C * H * W, 3, device=device)
        source = torch.full((C * H * W,), EMPTY_SOURCE, dtype=torch.int32, device=device)
    return Renders(
        rgb=rgb.reshape(C, H, W, 3),
        depth=depth.reshape(C, H, W),
        mask=has_point.reshape(C, H, W),
        source=source.reshape(C, H, W),
    )


def _splat_chunk(
    xyz: Tensor, point_ids: Tensor, cams: Cameras, c0: int, max_r: int, cfg: RenderConfig, keys: Tensor
) -> None:
    """Scatter-min packed (depth, index) keys of a camera chunk into ``keys`` [C_all * H * W + 1].

    Candidates that miss the image (or lie behind the camera) go to the spare last slot, so every
    offset is one dense scatter with no compaction.
    """
    H, W = cams.height, cams.width
    uv, z = project_points(xyz, cams)  # [c, N, 2], [c, N]
    in_front = z > cfg.near
    # Off-image coordinates only need to stay off-image: clamping keeps them inside int32.
    uv = torch.where(in_front[..., None], uv, torch.full_like(uv, OFF_IMAGE)).clamp(OFF_IMAGE, max(W, H) - OFF_IMAGE)
    px = torch.floor(uv).to(torch.int64)  # [c, N, 2]
    radius = _footprint_radius(z, cams.K[:, None, 0, 0], cfg) if cfg.point_size > 0 else None  # [c, N]
    depth_key = z.contiguous().view(torch.int32).to(torch.int64) << INDEX_BITS  # positive floats sort as ints
    key = (depth_key | point_ids[None, :]).reshape(-1)
    base = ((torch.arange(len(cams), device=xyz.device) + c0) * (H * W))[:, None]  # [c, 1]
    spare = torch.full((), keys.numel() - 1, dtype=torch.int64, device=xyz.device)
    px32 = px.to(torch.int32)
    centre = base + px[..., 1] * W + px[..., 0]  # [c, N] flat pixel of the projection
    offsets = range(-max_r, max_r + 1)
    ok_x = {d: in_front & (px32[..., 0] >= -d) & (px32[..., 0] < W - d) for d in offsets}  # x + d inside
    ok_y = {d: (px32[..., 1] >= -d) & (px32[..., 1] < H - d) for d in offsets}
    for dy in offsets:
        for dx in offsets:
            ok = ok_x[dx] & ok_y[dy]
            if cfg.point_size > 0 and max_r:
                ok &= radius >= max(abs(dx), abs(dy))
            flat = torch.where(ok, centre + (dy * W + dx), spare)
            keys.scatter_reduce_(0, flat.reshape(-1), key, reduce="amin")
