"""Geometry-aware retrieval of captures for a segment (DESIGN.md section 1 step 3).

Render M into the segment's cameras (with each point's source id), lift the visible pixels back to
3D, and find which captures see each of those surface points (projection inside the capture and a
depth test against M rendered from the capture). Then a greedy set cover: pick the capture that
covers the most not-yet-covered pixels, repeat up to k times, stop when nothing is gained. Where M
shows (almost) nothing of the segment, fall back to the captures whose cameras are nearest.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from ..types import Cameras, GeometryMemory, backproject, project_points
from .render import RenderConfig, render_memory


@dataclass(frozen=True)
class RetrievalConfig:
    """Attributes:
    k: most captures returned (AnyRecon keeps up to 10 per chunk; 3 already gain 0.8 dB, Table 3).
    max_side: coverage is computed on renders downsized so that max(H, W) <= this.
    depth_tol_rel: a surface point counts as seen by a capture when its depth there is at most
        (1 + this) times the capture's z-buffer depth.
    min_coverage: if M covers less than this fraction of the segment's pixels, use the fallback.
    angle_weight: fallback score = centre distance / capture spacing + this * (1 - cos angle).
    render: point footprint used for the coverage renders.
    """

    k: int = 10
    max_side: int = 128
    depth_tol_rel: float = 0.05
    min_coverage: float = 0.01
    angle_weight: float = 1.0
    render: RenderConfig = field(default_factory=RenderConfig)

    def check(self) -> None:
        if self.k < 0:
            raise ValueError(f"RetrievalConfig.k must be >= 0; got {self.k}")
        if self.max_side < 1:
            raise ValueError(f"RetrievalConfig.max_side must be >= 1; got {self.max_side}")
        if self.depth_tol_rel < 0:
            raise ValueError(f"RetrievalConfig.depth_tol_rel must be >= 0; got {self.depth_tol_rel}")
        if not 0 <= self.min_coverage <= 1:
            raise ValueError(f"RetrievalConfig.min_coverage must be in [0, 1]; got {self.min_coverage}")


def _downsized(cams: Cameras, max_side: int) -> Cameras:
    W, H = cams.width, cams.height
    if max(W, H) <= max_side:
        return cams
    s = max_side / max(W, H)
    return cams.resized(max(1, round(W * s)), max(1, round(H * s)))


def coverage_matrix(
    memory: GeometryMemory, targets: Cameras, capture_cams: Cameras, capture_ids: Sequence[int], cfg: RetrievalConfig
) -> tuple[Tensor, float]:
    """Which capture sees which visible target pixel.

    Args:
        memory: M (N points).
        targets: the segment's cameras (T of them).
        capture_cams: the captures' cameras (Q of them).
        capture_ids: the source id of each capture, as stored in ``memory.source``. Q ints
        cfg: render size, depth tolerance.
    Returns:
        covers: bool [Q, P] over the P pixels where M is visible in the targets (after downsizing);
        fraction: P / all target pixels.
    """
    small_t = _downsized(targets, cfg.max_side)
    rend = render_memory(memory, small_t, cfg.render)
    total = rend.mask.numel()
    pts = backproject(rend.depth, small_t)[rend.mask]  # [P, 3]
    src = rend.source[rend.mask]  # [P]
    small_c = _downsized(capture_cams, cfg.max_side)
    cap_depth = render_memory(memory, small_c, cfg.render).depth  # [Q, h, w]
    uv, z = project_points(pts, small_c)  # [Q, P, 2], [Q, P]
    h, w = small_c.height, small_c.width
    x, y = torch.floor(uv[..., 0]).long(), torch.floor(uv[..., 1]).long()
    inside = (z > cfg.render.near) & (x >= 0) & (x < w) & (y >= 0) & (y < h)
    q = torch.arange(len(small_c), device=pts.device)[:, None]
    zbuf = cap_depth[q, y.clamp(0, h - 1), x.clamp(0, w - 1)]  # [Q, P]
    seen = inside & ((zbuf == 0) | (z <= zbuf * (1.0 + cfg.depth_tol_rel)))
    ids = torch.as_tensor(list(capture_ids), device=pts.device, dtype=src.dtype)
    seen |= src[None, :] == ids[:, None]  # the capture a pixel's point came from sees it
    return seen, pts.shape[0] / max(total, 1)


def greedy_set_cover(covers: Tensor, k: int) -> list[int]:
    """Up to k rows of ``covers`` (bool [Q, P]) chosen greedily by new coverage; stops at zero gain."""
    picked: list[int] = []
    covered = torch.zeros(covers.shape[1], dtype=torch.bool, device=covers.device)
    for _ in range(min(k, covers.shape[0])):
        gains = (covers & ~covered).sum(1)
        best = int(gains.argmax())
        if int(gains[best]) == 0:
            break
        picked.append(best)
        covered |= covers[best]
    return picked


def nearest_captures(targets: Cameras, capture_cams: Cameras, k: int, angle_weight: float) -> list[int]:
    """The k captures nearest any target: centre distance (in units of capture spacing) plus angle."""
    if len(capture_cams) == 0 or k == 0:
        return []
    ct, cc = targets.centers, capture_cams.centers  # [T, 3], [Q, 3]
    dist = torch.cdist(cc, ct)  # [Q, T]
    if len(capture_cams) > 1:
        spacing = torch.cdist(cc, cc)
        spacing = spacing[spacing > 0].median() if (spacing > 0).any() else torch.ones((), device=cc.device)
    else:
        spacing = dist.median().clamp_min(torch.finfo(dist.dtype).tiny)
    cos = F.normalize(capture_cams.w2c[:, 2, :3], dim=-1) @ F.normalize(targets.w2c[:, 2, :3], dim=-1).T
    score = (dist / spacing + angle_weight * (1.0 - cos)).min(1).values  # [Q]
    return torch.argsort(score)[:k].tolist()


def retrieve_views(
    memory: GeometryMemory,
    targets: Cameras,
    capture_cams: Cameras,
    cfg: RetrievalConfig = RetrievalConfig(),
    *,
    capture_ids: Sequence[int] | None = None,
) -> list[int]:
    """Captures that matter for a segment, most useful first.

    Args:
        memory: M; ``memory.source`` holds capture ids.
        targets: the segment's trajectory cameras (F of them).
        capture_cams: all captures' cameras (Q of them, any one size).
        cfg: k, render size, depth tolerance, fallback settings.
        capture_ids: the id of each capture in ``memory.source`` (default 0..Q-1).
    Returns:
        indices into ``capture_cams`` (at most k, no repeats).

    Example::

        >>> picked = retrieve_views(memory, traj_cams[0:40], capture_views.cams, RetrievalConfig(k=3))
    """
    cfg.check()
    ids = list(range(len(capture_cams))) if capture_ids is None else list(capture_ids)
    if len(ids) != len(capture_cams):
        raise ValueError(f"retrieve_views: capture_ids needs one id per capture ({len(capture_cams)}); got {len(ids)}")
    if cfg.k == 0 or len(capture_cams) == 0:
        return []
    if len(memory) > 0:
        covers, fraction = coverage_matrix(memory, targets, capture_cams, ids, cfg)
        if fraction >= cfg.min_coverage and covers.shape[1] > 0:
            picked = greedy_set_cover(covers, cfg.k)
            if picked:
                return picked
    return nearest_captures(targets, capture_cams, cfg.k, cfg.angle_weight)
