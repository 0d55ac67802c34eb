"""Plane-sweep multi-view stereo in torch: posed captures -> coloured points (estimator ``mvs``).

No learned weights (DESIGN.md section 1 step 1). For each reference capture:

1. **Neighbours.** Candidates are the nearest captures by centre distance whose viewing direction
   differs by at most ``max_view_angle_deg``; the ``num_neighbors`` kept are those whose
   triangulation angle at the reference's scene point is closest to ``preferred_tri_angle_deg``.
2. **Depth range** from sparse triangulation: SIFT matches (OpenCV) with the candidates, ratio test,
   epipolar check against the known cameras, linear triangulation, reprojection check; the range is
   a percentile band of the reference depths, widened in inverse depth. Too few points: a range
   around the depth where the optical axes of reference and neighbours pass closest.
3. **Plane sweep.** ``num_planes`` fronto-parallel planes uniform in inverse depth. For each plane the
   neighbours are warped into the reference (``grid_sample``), and ZNCC over (2r+1)^2 windows is
   computed with box filters for a chunk of planes at once. Per pixel the best ``top_views``
   neighbour scores are averaged (robust to occlusion).
4. **Winner-take-all** over planes with a parabola fit for sub-plane depth; confidence from the
   winning score and the ratio of the best to the second-best cost (cost = 1 - ZNCC).
5. **Geometric consistency.** Each depth is reprojected into the other depth maps and back; pixels
   that agree with at least ``min_consistent`` views are fused (their 3D positions averaged).

Everything runs on the device of the input images (GPU when present); only the sparse SIFT step uses
OpenCV on the CPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..progress import WorkProgress, no_work_progress
from ..types import PIXEL_CENTER, Cameras, GeometryMemory, Views, backproject, pixel_rays
from . import ESTIMATORS, GeometryError

LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601 weights for the grey image that stereo matches on
EPS = 1e-6
GREY_OFFSET = 0.5  # subtracted before box filtering (ZNCC ignores offsets)
ZNCC_WORST = -1.0  # score of a plane where the source view sees nothing


@dataclass(frozen=True)
class MVSConfig:
    """Plane-sweep stereo settings (window and neighbour numbers follow COLMAP's PatchMatch defaults
    scaled to the smaller images used here).

    Attributes:
        max_side: images are downsized (area) so that max(H, W) <= this before matching; 0 = as given.
        num_neighbors: source views per reference (COLMAP keeps up to 20, with 5 typical for sparse rings).
        match_candidates: nearest captures (centre distance) matched with SIFT for each reference.
        max_view_angle_deg: neighbours whose optical axis turns more than this are not used.
        preferred_tri_angle_deg: neighbours whose triangulation angle at the scene is nearest this win.
        min_tri_angle_deg: neighbours below this triangulation angle are not used (no depth signal).
        num_planes: depth planes, uniform in inverse depth.
        plane_chunk: planes processed at once (bounds memory: about 12 floats per pixel and plane).
        window_radius: ZNCC window half-size, (2 r + 1)^2 pixels (COLMAP: 5 at full size).
        top_views: per pixel, the mean of the best this many neighbour scores is kept.
        min_texture_std: reference windows with grey std below this (0..1 scale) get no depth.
        min_score: winning aggregated ZNCC must reach this.
        max_cost_ratio: best cost / second-best cost (cost = 1 - ZNCC) must stay below this.
        peak_exclusion: planes either side of the winner skipped when finding the second-best.
        sift_features: SIFT keypoints per image for the sparse depth range.
        match_ratio: Lowe's ratio test threshold (Lowe 2004: 0.8).
        epipolar_px: matches farther than this from their epipolar line are dropped; also the largest
            reprojection error of a triangulated point.
        min_sparse_points: fewer triangulated points than this: depth range from camera geometry.
        depth_percentiles: percentile band (0..1) of sparse depths that sets the range.
        depth_margin: the band is widened by this fraction of its width in inverse depth, each side.
        fallback_depth_factor: geometric fallback range is [d / f, d * f] around the axes' meeting depth.
        consistency_px: a reprojected depth agrees when it lands within this many pixels...
        consistency_rel_depth: ...and its depth differs by at most this fraction.
        min_consistent: other views that must agree for a pixel to become a point.
    """

    max_side: int = 640
    num_neighbors: int = 4
    match_candidates: int = 6
    max_view_angle_deg: float = 75.0
    preferred_tri_angle_deg: float = 15.0
    min_tri_angle_deg: float = 1.0
    num_planes: int = 128
    plane_chunk: int = 16
    window_radius: int = 3
    top_views: int = 2
    min_texture_std: float = 0.015
    min_score: float = 0.5
    max_cost_ratio: float = 0.9
    peak_exclusion: int = 2
    sift_features: int = 4000
    match_ratio: float = 0.8
    epipolar_px: float = 2.0
    min_sparse_points: int = 20
    depth_percentiles: tuple[float, float] = (0.02, 0.98)
    depth_margin: float = 0.15
    fallback_depth_factor: float = 3.0
    consistency_px: float = 1.0
    consistency_rel_depth: float = 0.01
    min_consistent: int = 1

    def check(self) -> None:
        for name in ("num_neighbors", "match_candidates", "num_planes", "plane_chunk", "top_views"):
            if getattr(self, name) < 1:
                raise ValueError(f"MVSConfig.{name} must be >= 1; got {getattr(self, name)}")
        if self.num_planes < 3:
            raise ValueError(f"MVSConfig.num_planes must be >= 3; got {self.num_planes}")
        if self.window_radius < 1:
            raise ValueError(f"MVSConfig.window_radius must be >= 1; got {self.window_radius}")
        lo, hi = self.depth_percentiles
        if not 0.0 <= lo < hi <= 1.0:
            raise ValueError(
                f"MVSConfig.depth_percentiles must satisfy 0 <= lo < hi <= 1; got {self.depth_percentiles}"
            )
        if self.min_consistent < 0:
            raise ValueError(f"MVSConfig.min_consistent must be >= 0; got {self.min_consistent}")
        if self.fallback_depth_factor <= 1.0:
            raise ValueError(f"MVSConfig.fallback_depth_factor must be > 1; got {self.fallback_depth_factor}")


@dataclass
class SweepResult:
    """One reference view's plane-sweep result.

    Attributes:
        depth: camera z, 0 where no reliable depth. float32 [H, W]
        score: winning aggregated ZNCC in [-1, 1]. float32 [H, W]
        confidence: in [0, 1], 0 where invalid. float32 [H, W]
    """

    depth: Tensor
    score: Tensor
    confidence: Tensor


# ----------------------------------------------------------------------------------------------
# Small geometry helpers


def to_gray(images: Tensor) -> Tensor:
    """Grey images. images: [..., H, W, 3] in [0, 1] -> [..., H, W]"""
    w = torch.tensor(LUMA, dtype=images.dtype, device=images.device)
    return images @ w


def resize_views(views: Views, max_side: int) -> Views:
    """Views downsized (antialiased) so that max(H, W) <= max_side; unchanged if already small."""
    H, W = views.images.shape[1:3]
    if max_side <= 0 or max(H, W) <= max_side:
        return views
    scale = max_side / max(H, W)
    h, w = max(1, round(H * scale)), max(1, round(W * scale))
    imgs = (
        F.interpolate(
            views.images.permute(0, 3, 1, 2), size=(h, w), mode="bilinear", antialias=True, align_corners=False
        )
        .permute(0, 2, 3, 1)
        .clamp(0, 1)
    )
    return Views(imgs.contiguous(), views.cams.resized(w, h), list(views.ids))


def _relative(src: Cameras, ref_w2c: Tensor) -> tuple[Tensor, Tensor]:
    """Rotation [S, 3, 3] and translation [S, 3] taking reference camera points to source cameras."""
    rel = src.w2c @ torch.linalg.inv(ref_w2c)[None]
    return rel[:, :3, :3], rel[:, :3, 3]


def _box_sum(x: Tensor, r: int) -> Tensor:
    """Sums over (2r+1)^2 windows with zeros outside, by running sums (O(1) per pixel). [B, 1, H, W]"""
    k = 2 * r + 1
    c = F.pad(x, (r + 1, r, r + 1, r)).cumsum(-1)
    c = c[..., k:] - c[..., :-k]
    c = c.cumsum(-2)
    return c[..., k:, :] - c[..., :-k, :]


def _box(x: Tensor, r: int, count: Tensor) -> Tensor:
    """Mean over (2r+1)^2 windows, edges averaging the pixels inside; ``count`` = _box_sum(ones)."""
    return _box_sum(x, r) / count


# ----------------------------------------------------------------------------------------------
# Plane sweep


def plane_depths(depth_min: float, depth_max: float, num_planes: int, device: torch.device) -> Tensor:
    """Plane depths uniform in inverse depth, near to far. [D]"""
    inv = torch.linspace(1.0 / depth_min, 1.0 / depth_max, num_planes, device=device)
    return 1.0 / inv


def plane_sweep(
    ref_gray: Tensor,
    ref_cam: Cameras,
    src_gray: Tensor,
    src_cams: Cameras,
    depth_min: float,
    depth_max: float,
    cfg: MVSConfig,
) -> SweepResult:
    """Fronto-parallel plane sweep with ZNCC, winner-take-all and sub-plane refinement.

    Args:
        ref_gray: reference grey image in [0, 1]. [H, W]
        ref_cam: the reference camera (one camera, size W x H).
        src_gray: source grey images, same size as the reference. [S, H, W]
        src_cams: S source cameras of that size.
        depth_min, depth_max: depth range (camera z, world units) swept, 0 < min < max.
        cfg: plane count, window, thresholds.
    Returns:
        SweepResult with depth, score and confidence, each [H, W].
    """
    if not 0 < depth_min < depth_max:
        raise ValueError(f"plane_sweep: need 0 < depth_min < depth_max; got {depth_min}, {depth_max}")
    H, W = ref_gray.shape
    if src_gray.shape[1:] != (H, W) or len(src_cams) != src_gray.shape[0] or len(src_cams) == 0:
        raise ValueError(
            f"plane_sweep: src_gray must be [S>=1, {H}, {W}] matching src_cams; "
            f"got {tuple(src_gray.shape)} with {len(src_cams)} cameras"
        )
    dev = ref_gray.device
    r = cfg.window_radius
    S, D = len(src_cams), cfg.num_planes
    depths = plane_depths(depth_min, depth_max, D, dev)  # [D]

    # Grey levels centred on 0 keep the running sums of the box filters precise in float32.
    x = ref_gray[None, None] - GREY_OFFSET  # [1, 1, H, W]
    count = _box_sum(torch.ones_like(x), r)
    mx = _box(x, r, count)
    std_x = (_box(x * x, r, count) - mx * mx).clamp_min(0).sqrt()
    textured = std_x[0, 0] >= cfg.min_texture_std  # [H, W]
    inv_std_x = 1.0 / std_x.clamp_min(EPS)

    rays = pixel_rays(ref_cam)[0].reshape(-1, 3)  # [HW, 3]
    R, t = _relative(src_cams, ref_cam.w2c[0])
    A = torch.einsum("sij,sjk,nk->sni", src_cams.K, R, rays)  # [S, HW, 3]: uvw = d * A + b
    b = torch.einsum("sij,sj->si", src_cams.K, t)  # [S, 3]
    src = src_gray[:, None] - GREY_OFFSET  # [S, 1, H, W]
    scale = torch.tensor([2.0 / W, 2.0 / H], device=dev)
    k_views = min(cfg.top_views, S)

    volume = torch.empty(D, H, W, device=dev)
    for d0 in range(0, D, cfg.plane_chunk):
        d = depths[d0 : d0 + cfg.plane_chunk]  # [Dc]
        Dc = d.shape[0]
        scores = torch.empty(S, Dc, H, W, device=dev)
        for s in range(S):
            uvw = torch.addcmul(b[s], d[:, None, None], A[s][None])  # [Dc, HW, 3]
            z = uvw[..., 2]
            uv = uvw[..., :2] / z.clamp_min(EPS)[..., None]
            inside = (z > EPS) & (uv >= 0).all(-1) & (uv[..., 0] <= W) & (uv[..., 1] <= H)
            grid = (uv * scale - 1.0).reshape(Dc, H, W, 2)
            y = F.grid_sample(
                src[s : s + 1].expand(Dc, -1, -1, -1), grid, mode="bilinear", padding_mode="border", align_corners=False
            )  # [Dc, 1, H, W]
            my, myy, mxy = _box(torch.cat([y, y * y, x * y]), r, count).split(Dc)
            var_y = (myy - my * my).clamp_min_(EPS)
            ncc = (mxy - mx * my) * inv_std_x * var_y.rsqrt_()
            scores[s] = ncc[:, 0].masked_fill_(~inside.reshape(Dc, H, W), ZNCC_WORST)
        if S > k_views:
            scores = scores.topk(k_views, dim=0).values
        volume[d0 : d0 + Dc] = scores.mean(0)

    return _winner_take_all(volume, depths, textured, cfg)


def _winner_take_all(volume: Tensor, depths: Tensor, textured: Tensor, cfg: MVSConfig) -> SweepResult:
    """Best plane per pixel, parabola refinement in inverse depth, confidence, validity. [D, H, W] in."""
    D = volume.shape[0]
    best, k = volume.max(0)  # [H, W]
    km, kp = (k - 1).clamp_min(0), (k + 1).clamp_max(D - 1)
    s_m = volume.gather(0, km[None])[0]
    s_p = volume.gather(0, kp[None])[0]
    curv = s_m - 2 * best + s_p
    offset = torch.where(curv < -EPS, 0.5 * (s_m - s_p) / curv.clamp_max(-EPS), torch.zeros_like(best))
    offset = offset.clamp(-0.5, 0.5)
    inv = 1.0 / depths
    step = inv[1] - inv[0]
    depth = 1.0 / (inv[k] + offset * step)

    # Second-best peak outside the winner's neighbourhood.
    planes = torch.arange(D, device=volume.device)[:, None, None]
    near_winner = (planes - k[None]).abs() <= cfg.peak_exclusion
    second = volume.masked_fill(near_winner, ZNCC_WORST).max(0).values
    cost_best, cost_second = 1.0 - best, (1.0 - second).clamp_min(EPS)
    ratio = (cost_best / cost_second).clamp(0, 1)

    interior = (k > 0) & (k < D - 1)  # a winner on the range border is a truncated peak
    valid = textured & interior & (best >= cfg.min_score) & (ratio <= cfg.max_cost_ratio) & torch.isfinite(depth)
    confidence = torch.where(valid, best.clamp(0, 1) * (1.0 - ratio), torch.zeros_like(best))
    depth = torch.where(valid, depth, torch.zeros_like(depth))
    return SweepResult(depth=depth, score=best, confidence=confidence)


# ----------------------------------------------------------------------------------------------
# Neighbours and depth range


def _axes(cams: Cameras) -> Tensor:
    """Viewing directions (camera +z) in world coordinates. [C, 3] (the camera bookkeeping runs on the CPU)"""
    return cams.w2c[:, 2, :3]


def _angle_deg(a: Tensor, b: Tensor) -> Tensor:
    cos = (F.normalize(a, dim=-1) * F.normalize(b, dim=-1)).sum(-1).clamp(-1, 1)
    return torch.rad2deg(torch.acos(cos))


def match_candidates(cams: Cameras, cfg: MVSConfig) -> list[list[int]]:
    """For each camera, up to ``match_candidates`` others by centre distance within the view angle."""
    centers, axes = cams.centers.cpu().double(), _axes(cams).cpu().double()
    dist = torch.cdist(centers, centers)
    view_angle = _angle_deg(axes[:, None], axes[None, :])
    out = []
    for i in range(len(cams)):
        order = torch.argsort(dist[i]).tolist()
        ok = [j for j in order if j != i and float(view_angle[i, j]) <= cfg.max_view_angle_deg]
        out.append(ok[: cfg.match_candidates])
    return out


def _sift(gray_u8: np.ndarray, cfg: MVSConfig) -> tuple[np.ndarray, np.ndarray | None]:
    sift = cv2.SIFT_create(nfeatures=cfg.sift_features)
    kps, desc = sift.detectAndCompute(gray_u8, None)
    # OpenCV keypoints put pixel centres at integers; ours are at i + 0.5.
    pts = np.array([kp.pt for kp in kps], dtype=np.float64).reshape(-1, 2) + PIXEL_CENTER
    return pts, desc


def _fundamental(cam_a: Cameras, cam_b: Cameras) -> np.ndarray:
    """F with x_b^T F x_a = 0 for pixel coordinates of a and b. float64 [3, 3]"""
    rel = (cam_b.w2c[0].cpu().double() @ torch.linalg.inv(cam_a.w2c[0].cpu().double())).numpy()
    R, t = rel[:3, :3], rel[:3, 3]
    tx = np.array([[0, -t[2], t[1]], [t[2], 0, -t[0]], [-t[1], t[0], 0]])
    Ka, Kb = cam_a.K[0].cpu().double().numpy(), cam_b.K[0].cpu().double().numpy()
    return np.linalg.inv(Kb).T @ tx @ R @ np.linalg.inv(Ka)


def sparse_points(
    gray: Tensor,
    cams: Cameras,
    pairs: list[tuple[int, int]],
    cfg: MVSConfig,
    progress: WorkProgress = no_work_progress,
) -> list[np.ndarray]:
    """Triangulate SIFT matches of the given view pairs with the known cameras.

    Args:
        gray: grey images in [0, 1]. [C, H, W]
        cams: their C cameras.
        pairs: (a, b) view pairs to match, a != b.
        cfg: SIFT, ratio, epipolar thresholds.
        progress: ``(fraction, message)`` per view's features and per pair (fraction of this work).
    Returns:
        per view, the world points triangulated from its pairs. C arrays of float64 [n_i, 3]
    """
    gray_u8 = (gray.clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    feats = []
    for i, g in enumerate(gray_u8):
        progress(0.5 * i / len(gray_u8), f"plane sweep: SIFT features of capture {i + 1} of {len(gray_u8)}")
        feats.append(_sift(g, cfg))
    P = (cams.K.cpu().double() @ cams.w2c[:, :3, :].cpu().double()).numpy()  # [C, 3, 4]
    matcher = cv2.BFMatcher(cv2.NORM_L2)
    found: list[list[np.ndarray]] = [[] for _ in range(len(cams))]
    for n, (a, b) in enumerate(pairs):
        progress(0.5 + 0.5 * n / len(pairs), f"plane sweep: matching capture pair {n + 1} of {len(pairs)}")
        (pa, da), (pb, db) = feats[a], feats[b]
        if da is None or db is None or len(da) < 2 or len(db) < 2:
            continue
        knn = matcher.knnMatch(da, db, k=2)
        good = [m[0] for m in knn if len(m) == 2 and m[0].distance < cfg.match_ratio * m[1].distance]
        if not good:
            continue
        xa = pa[[m.queryIdx for m in good]]
        xb = pb[[m.trainIdx for m in good]]
        Fab = _fundamental(cams[a], cams[b])
        ha = np.c_[xa, np.ones(len(xa))]
        hb = np.c_[xb, np.ones(len(xb))]
        lines = ha @ Fab.T  # epipolar lines in b
        dist = np.abs((hb * lines).sum(1)) / np.maximum(np.hypot(lines[:, 0], lines[:, 1]), EPS)
        keep = dist < cfg.epipolar_px
        if not keep.any():
            continue
        X = cv2.triangulatePoints(P[a], P[b], xa[keep].T, xb[keep].T)
        X = (X[:3] / np.where(np.abs(X[3]) < EPS, EPS, X[3])).T  # [m, 3]
        ok = np.ones(len(X), dtype=bool)
        for view, x in ((a, xa[keep]), (b, xb[keep])):
            proj = np.c_[X, np.ones(len(X))] @ P[view].T
            ok &= proj[:, 2] > 0
            err = np.linalg.norm(proj[:, :2] / np.maximum(proj[:, 2:3], EPS) - x, axis=1)
            ok &= err < cfg.epipolar_px
        found[a].append(X[ok])
        found[b].append(X[ok])
    return [np.concatenate(f) if f else np.zeros((0, 3)) for f in found]


def _axes_meeting_depth(cams: Cameras, i: int, others: list[int]) -> float | None:
    """Median depth along camera i's axis of its closest approach to the others' axes."""
    c, a = cams.centers.cpu().double(), _axes(cams).cpu().double()
    depths = []
    for j in others:
        w = c[i] - c[j]
        b = float(a[i] @ a[j])
        denom = 1.0 - b * b
        if denom < EPS:
            continue
        s = (b * float(a[j] @ w) - float(a[i] @ w)) / denom
        if s > 0:
            depths.append(s)
    return float(np.median(depths)) if depths else None


def depth_range(cams: Cameras, i: int, points: np.ndarray, others: list[int], cfg: MVSConfig) -> tuple[float, float]:
    """Depth range of view i: sparse-point percentiles, else around the axes' meeting depth."""
    w2c = cams.w2c[i].cpu().double().numpy()
    z = points @ w2c[2, :3] + w2c[2, 3] if len(points) else np.zeros(0)
    z = z[z > 0]
    if len(z) >= cfg.min_sparse_points:
        lo, hi = np.quantile(z, cfg.depth_percentiles)
        inv_near, inv_far = 1.0 / lo, 1.0 / hi
        pad = cfg.depth_margin * (inv_near - inv_far)
        inv_far = max(inv_far - pad, inv_far * cfg.depth_margin)
        return 1.0 / (inv_near + pad), 1.0 / inv_far
    d = _axes_meeting_depth(cams, i, others)
    if d is None:
        centers = cams.centers.cpu().double()
        base = [float((centers[i] - centers[j]).norm()) for j in others]
        if not base or max(base) <= 0:
            raise GeometryError(
                f"mvs: capture {i} has no neighbour within {cfg.max_view_angle_deg:g} degrees of viewing direction "
                "(no neighbour with a baseline); cannot set a depth range"
            )
        d = float(np.median(base)) / math.tan(math.radians(cfg.preferred_tri_angle_deg))
    return d / cfg.fallback_depth_factor, d * cfg.fallback_depth_factor


def select_neighbors(cams: Cameras, i: int, candidates: list[int], scene_depth: float, cfg: MVSConfig) -> list[int]:
    """Up to ``num_neighbors`` candidates whose triangulation angle is nearest the preferred one."""
    c = cams.centers.cpu().double()
    p = c[i] + _axes(cams).cpu().double()[i] * scene_depth
    scored = []
    for j in candidates:
        tri = float(_angle_deg(c[i] - p, c[j] - p))
        if tri < cfg.min_tri_angle_deg:
            continue
        scored.append((abs(math.log(tri / cfg.preferred_tri_angle_deg)), j))
    return [j for _, j in sorted(scored)[: cfg.num_neighbors]]


# ----------------------------------------------------------------------------------------------
# Consistency and fusion


def _sample_nearest(maps: Tensor, uv: Tensor, W: int, H: int) -> tuple[Tensor, Tensor]:
    """Values of one map at pixels containing uv. maps [H, W]; uv [N, 2] -> values [N], inside [N]"""
    x, y = torch.floor(uv[:, 0]).long(), torch.floor(uv[:, 1]).long()
    inside = (x >= 0) & (x < W) & (y >= 0) & (y < H)
    vals = maps[y.clamp(0, H - 1), x.clamp(0, W - 1)]
    return torch.where(inside, vals, torch.zeros_like(vals)), inside


def _project(xyz: Tensor, cam: Cameras) -> tuple[Tensor, Tensor]:
    """xyz [N, 3] -> uv [N, 2], z [N] in one camera."""
    cpt = xyz @ cam.w2c[0, :3, :3].T + cam.w2c[0, :3, 3]
    z = cpt[:, 2]
    uvw = cpt @ cam.K[0].T
    return uvw[:, :2] / uvw[:, 2:3].clamp_min(EPS), z


def fuse_depths(
    depths: Tensor,
    conf: Tensor,
    views: Views,
    neighbors: list[list[int]],
    cfg: MVSConfig,
    *,
    check_depths: Tensor | None = None,
) -> GeometryMemory:
    """Keep depths that agree with >= min_consistent other views and fuse them into points.

    Args:
        depths: per view camera z of the pixels to fuse, 0 where none. [C, H, W]
        conf: per view confidence in [0, 1]. [C, H, W]
        views: the images and cameras the depths belong to.
        neighbors: per view, the views checked for agreement.
        cfg: tolerances and the agreement count.
        check_depths: the other views' depths looked up for agreement (default ``depths``). [C, H, W]
    Returns:
        points with xyz (mean of the agreeing views' 3D positions), rgb, confidence, source id.
    """
    C, H, W = depths.shape
    cams = views.cams
    check_depths = depths if check_depths is None else check_depths
    world = backproject(depths, cams)  # [C, H, W, 3]
    parts = []
    for i in range(C):
        valid = depths[i] > 0
        if not valid.any():
            continue
        X = world[i][valid]  # [n, 3]
        uv_i = torch.nonzero(valid).flip(1).float() + PIXEL_CENTER  # [n, 2] as (u, v)
        z_i = depths[i][valid]
        agree = torch.zeros(len(X), device=X.device)
        X_sum = X.clone()
        for j in neighbors[i]:
            uv_j, _ = _project(X, cams[j])
            d_j, inside = _sample_nearest(check_depths[j], uv_j, W, H)
            has = inside & (d_j > 0)
            ray_j = torch.cat([uv_j, torch.ones_like(uv_j[:, :1])], 1) @ torch.linalg.inv(cams.K[j]).T
            Xj = (ray_j * d_j[:, None] - cams.w2c[j, :3, 3]) @ cams.w2c[j, :3, :3]  # back to world
            uv_back, z_back = _project(Xj, cams[i])
            ok = has & ((uv_back - uv_i).norm(dim=1) < cfg.consistency_px)
            ok &= (z_back - z_i).abs() < cfg.consistency_rel_depth * z_i
            agree += ok
            X_sum += torch.where(ok[:, None], Xj, torch.zeros_like(Xj))
        keep = agree >= cfg.min_consistent
        if not keep.any():
            continue
        xyz = X_sum[keep] / (1.0 + agree[keep, None])
        parts.append(
            GeometryMemory(
                xyz=xyz,
                rgb=views.images[i][valid][keep],
                confidence=conf[i][valid][keep],
                source=torch.full((int(keep.sum()),), int(views.ids[i]), dtype=torch.int32, device=X.device),
            )
        )
    return GeometryMemory.cat(parts) if parts else GeometryMemory.empty(depths.device)


# ----------------------------------------------------------------------------------------------
# The estimator


@dataclass
class DepthMaps:
    """Per-capture results of :func:`estimate_depths` at the processing size.

    Attributes:
        views: the captures at the processing size.
        depth: camera z, 0 where invalid. float32 [C, H, W]
        confidence: in [0, 1]. float32 [C, H, W]
        neighbors: per view, the source views used.
        ranges: per view, the (near, far) depth range swept.
    """

    views: Views
    depth: Tensor
    confidence: Tensor
    neighbors: list[list[int]]
    ranges: list[tuple[float, float]]


def estimate_depths(views: Views, cfg: MVSConfig, progress: WorkProgress = no_work_progress) -> DepthMaps:
    """Depth maps of every capture by plane sweep against its neighbours (steps 1 to 4); ``progress`` hears each
    capture's features, pair and sweep (fractions: the sparse points to 0.3, the sweeps to 1)."""
    cfg.check()
    if len(views) < 2:
        raise GeometryError(f"mvs: needs at least 2 captures with cameras; got {len(views)}")
    views = resize_views(views, cfg.max_side)
    cams = views.cams
    gray = to_gray(views.images)  # [C, H, W]
    C, H, W = gray.shape
    candidates = match_candidates(cams, cfg)
    pairs = sorted({(min(i, j), max(i, j)) for i in range(C) for j in candidates[i]})
    sparse = sparse_points(gray, cams, pairs, cfg, lambda f, message: progress(0.3 * f, message))

    depth = torch.zeros(C, H, W, device=gray.device)
    conf = torch.zeros(C, H, W, device=gray.device)
    neighbors, ranges = [], []
    for i in range(C):
        progress(0.3 + 0.7 * i / C, f"plane sweep: depth of capture {i + 1} of {C}")
        near, far = depth_range(cams, i, sparse[i], candidates[i], cfg)
        nb = select_neighbors(cams, i, candidates[i], math.sqrt(near * far), cfg)
        neighbors.append(nb)
        ranges.append((near, far))
        if not nb:
            continue
        res = plane_sweep(gray[i], cams[i], gray[nb], cams[nb], near, far, cfg)
        depth[i], conf[i] = res.depth, res.confidence
    return DepthMaps(views=views, depth=depth, confidence=conf, neighbors=neighbors, ranges=ranges)


@ESTIMATORS.register("mvs")
class PlaneSweepMVS:
    """Dense plane-sweep multi-view stereo over posed captures (see the module docstring).

    Example::

        >>> est = PlaneSweepMVS(MVSConfig(max_side=320, num_planes=64))
        >>> memory = est.estimate(views)   # views: Views of >= 2 posed captures
    """

    def __init__(self, cfg: MVSConfig = MVSConfig()) -> None:
        cfg.check()
        self.cfg = cfg

    def estimate(self, views: Views, progress: WorkProgress = no_work_progress) -> GeometryMemory:
        """Captures (images [C, H, W, 3] in [0, 1], cameras, ids) -> fused points with source ids."""
        maps = estimate_depths(views, self.cfg, lambda f, message: progress(0.9 * f, message))
        progress(0.9, f"plane sweep: fusing {len(maps.depth)} depth maps")
        return fuse_depths(maps.depth, maps.confidence, maps.views, maps.neighbors, self.cfg)
