"""Build the geometry memory M from posed captures (DESIGN.md section 1 step 1).

``build_memory`` runs a registered :class:`~backend.estimators.GeometryEstimator` (default ``mvs``,
plane-sweep stereo without learned weights), drops weak points, voxel-downsamples and caps the
count so that M stays bounded. When the estimator cannot work on the views (a
:class:`~backend.estimators.GeometryError`: wide baselines, one view) or gives fewer than
``min_points`` points, the memory falls back, never failing the job: from ``patchmatch`` (COLMAP on
CUDA) to plane sweep, then to the visual hull of the captures' masks (estimator ``hull``) when they
have masks (from ``hull`` asked for on captures without masks, to plane sweep), else to bounded
depth (every capture's pixels at the depth where the optical axes meet;
a coarse start the Gaussian fit refines). The fallback and its reason go to the job's notes. With
masks, points outside them are dropped. ``memory_to_ply_arrays`` gives the arrays of the point-cloud
.ply (DESIGN.md section 3: ``x y z`` float32, ``red green blue`` uchar, ``confidence`` float32,
``source`` int32).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from ..estimators import ESTIMATORS, GeometryError
from ..estimators.hull import HullConfig, axes_center, inside_masks
from ..estimators.mvs import MVSConfig
from ..estimators.patchmatch import PatchMatchConfig
from ..progress import WorkProgress, no_work_progress
from ..types import GeometryMemory, Views, backproject

log = logging.getLogger(__name__)

CONFIDENCE_FLOOR = 1e-6  # weight of a zero-confidence point in voxel averages
EXTENT_PERCENTILES = (0.01, 0.99)  # robust bounding box used for the automatic voxel size
MAX_PACKED_CELLS = 1 << 62  # voxel grids with more cells than this are keyed by rows, not one int64
COLOR_LEVELS = 255  # uchar colours in the .ply
QUANTILE_SAMPLES = 1 << 20  # points used to estimate the scene's extent
FALLBACK_TRI_ANGLE_DEG = 15.0  # bounded depth without meeting axes: the depth at which the baseline subtends this
SAME_POSITION_TOL = 1e-6  # captures closer than this (relative to the centres' distance from the origin) share one


@dataclass(frozen=True)
class MemoryConfig:
    """Settings of the initial memory.

    Attributes:
        mvs: settings of the ``mvs`` estimator.
        min_confidence: points below this confidence are dropped.
        voxel_size: voxel edge (world units) for downsampling; 0 = ``voxel_fraction`` times the
            diagonal of the points' robust bounding box.
        voxel_fraction: automatic voxel size as a fraction of the scene diagonal (1/640: about one
            pixel of a 640-pixel view framing the whole scene).
        max_points: hard cap; the most confident points are kept (bounds render and fit cost).
        hull, patchmatch: settings of the ``hull`` and ``patchmatch`` estimators.
        min_points: an estimator giving fewer points than this is replaced by the fallback.
        has_mask_points: with masks, drop points that a capture sees outside its mask.
        fallback_points: about this many points from bounded depth (all captures together).
        fallback_confidence: their confidence.
    """

    mvs: MVSConfig = field(default_factory=MVSConfig)
    hull: HullConfig = field(default_factory=HullConfig)
    patchmatch: PatchMatchConfig = field(default_factory=PatchMatchConfig)
    min_points: int = 100
    has_mask_points: bool = True
    fallback_points: int = 20_000
    fallback_confidence: float = 0.1
    min_confidence: float = 0.0
    voxel_size: float = 0.0
    voxel_fraction: float = 1.0 / 640.0
    max_points: int = 2_000_000

    def check(self) -> None:
        if self.voxel_size < 0:
            raise ValueError(f"MemoryConfig.voxel_size must be >= 0; got {self.voxel_size}")
        if not 0 < self.voxel_fraction < 1:
            raise ValueError(f"MemoryConfig.voxel_fraction must be in (0, 1); got {self.voxel_fraction}")
        if self.max_points < 1:
            raise ValueError(f"MemoryConfig.max_points must be >= 1; got {self.max_points}")
        if self.min_points < 0 or self.fallback_points < 1:
            raise ValueError(
                f"MemoryConfig.min_points must be >= 0 and fallback_points >= 1; got {self.min_points}, {self.fallback_points}"
            )
        if not 0.0 < self.fallback_confidence <= 1.0:
            raise ValueError(f"MemoryConfig.fallback_confidence must be in (0, 1]; got {self.fallback_confidence}")


def check_views(views: Views, where: str) -> None:
    """Raise ValueError unless images, cameras and ids agree ([C, H, W, 3] float images)."""
    imgs = views.images
    if imgs.ndim != 4 or imgs.shape[-1] != 3 or not imgs.is_floating_point():
        raise ValueError(f"{where}: views.images must be float [C, H, W, 3]; got {imgs.dtype} {tuple(imgs.shape)}")
    C, H, W = imgs.shape[:3]
    if len(views.cams) != C or len(views.ids) != C:
        raise ValueError(
            f"{where}: views need one camera and id per image; got {C} images, "
            f"{len(views.cams)} cameras, {len(views.ids)} ids"
        )
    if (views.cams.width, views.cams.height) != (W, H):
        raise ValueError(f"{where}: views.cams are {views.cams.width}x{views.cams.height} but images are {W}x{H}")
    if views.masks is not None and (views.masks.dtype != torch.bool or tuple(views.masks.shape) != (C, H, W)):
        raise ValueError(
            f"{where}: views.masks must be bool [{C}, {H}, {W}]; got {views.masks.dtype} {tuple(views.masks.shape)}"
        )


def build_memory(
    views: Views,
    cfg: MemoryConfig = MemoryConfig(),
    *,
    estimator: str = "mvs",
    notes: list[str] | None = None,
    progress: WorkProgress = no_work_progress,
) -> GeometryMemory:
    """The initial memory M from posed captures.

    Args:
        views: captures: images in [0, 1] [C, H, W, 3], their cameras (OpenCV w2c, K), capture ids,
            optional masks [C, H, W].
        cfg: estimator settings, confidence floor, voxel size, point cap.
        estimator: registered geometry estimator name (``mvs``, ``hull``, ``patchmatch``).
        notes: the job's notes; a line saying which fallback was used and why is appended.
        progress: ``(fraction, message)`` from the estimator (and each fallback) as it goes; it may raise
            ``Cancelled``.
    Returns:
        GeometryMemory with xyz [N, 3], rgb [N, 3], confidence [N], source [N] (capture ids), on
        the device of ``views.images``.

    Example::

        >>> memory = build_memory(views, MemoryConfig(mvs=MVSConfig(max_side=320)))
        >>> xyz, rgb, conf, src = memory_to_ply_arrays(memory)
    """
    cfg.check()
    check_views(views, "build_memory")
    memory = estimate_with_fallback(views, cfg, estimator, notes if notes is not None else [], progress)
    if cfg.has_mask_points and views.masks is not None and len(memory):
        memory = memory.select(inside_masks(memory.xyz, views.cams, views.masks))
    if cfg.min_confidence > 0:
        memory = memory.select(memory.confidence >= cfg.min_confidence)
    voxel = cfg.voxel_size or auto_voxel_size(memory, cfg.voxel_fraction)
    if voxel > 0:
        memory = voxel_downsample(memory, voxel)
    return cap_points(memory, cfg.max_points)


# what the memory tries after each estimator, before bounded depth (the hull only with masks; plane
# sweep after a hull asked for on captures without masks); an estimator not named: plane sweep, the hull
FALLBACKS = {"patchmatch": ("mvs", "hull"), "mvs": ("hull",), "hull": ("mvs",)}
USED = {"mvs": "plane sweep", "hull": "the visual hull of the captures' masks"}


def estimate_with_fallback(
    views: Views, cfg: MemoryConfig, estimator: str, notes: list[str], progress: WorkProgress = no_work_progress
) -> GeometryMemory:
    """The named estimator's points; on a GeometryError or fewer than ``cfg.min_points`` points, the
    next of :data:`FALLBACKS` (plane sweep after PatchMatch, the visual hull where there are masks),
    at last bounded depth, with a line in ``notes`` (module docstring)."""
    est_cfgs = {"mvs": cfg.mvs, "hull": cfg.hull, "patchmatch": cfg.patchmatch}
    fallbacks = FALLBACKS.get(estimator, ("mvs", "hull"))
    chain = [estimator, *(e for e in fallbacks if e != "hull" or views.masks is not None)]
    why = ""
    for name in chain:
        try:
            est = ESTIMATORS.make(name, est_cfgs[name]) if name in est_cfgs else ESTIMATORS.make(name)
            memory = est.estimate(views, progress)
        except GeometryError as err:
            why += f"; {err}" if why else str(err)
            continue
        if len(memory) >= cfg.min_points:
            if name != estimator:
                _note(notes, f"geometry: {why}; used {USED[name]} ({len(memory)} points)")
            return memory
        gave = f"{name if name == estimator else USED[name]} gave {len(memory)} points"
        why += f"; {gave}" if why else f"{gave} (fewer than {cfg.min_points})"
    memory, depth_note = bounded_depth_points(views, cfg)
    _note(
        notes,
        f"geometry: {why}; used bounded depth ({depth_note}, {len(memory)} points, confidence {cfg.fallback_confidence:g})",
    )
    return memory


def _note(notes: list[str], line: str) -> None:
    log.warning(line)
    notes.append(line)


def bounded_depth_points(views: Views, cfg: MemoryConfig) -> tuple[GeometryMemory, str]:
    """Every capture's pixels (a regular subsample, masked pixels only when there are masks) at one
    depth per capture: where its optical axis passes nearest the others' (the axes' meeting point),
    else where the captures' median baseline subtends FALLBACK_TRI_ANGLE_DEG. Returns the points and
    a phrase naming the depth used."""
    cams = views.cams
    C, H, W = views.images.shape[:3]
    c = cams.centers
    base = (c[:, None] - c[None]).norm(dim=-1)
    # a baseline of rounding noise (captures turned on a tripod) is none: relative to the centres' scale
    apart = base > SAME_POSITION_TOL * max(1.0, float(c.norm(dim=-1).max()))
    if not bool(apart.any()):  # nothing measures a depth (the axes' meeting point is the shared centre itself)
        guess = 1.0 / math.tan(math.radians(FALLBACK_TRI_ANGLE_DEG))  # a unit baseline's depth, as before
        z = torch.full((C,), guess, device=c.device)
        what = (
            f"depth {guess:.2f} in the scene's units, a guess: the captures share one position (or there is one), "
            "so no baseline measures it"
        )
    else:
        center = axes_center(cams)
        if center is not None:
            z = cams.w2c[:, 2, :3] @ center + cams.w2c[:, 2, 3]  # [C] the centre's depth in each camera
        if center is None or bool((z <= 0).any()):
            median = float(base[apart].median())
            z = torch.full((C,), median / math.tan(math.radians(FALLBACK_TRI_ANGLE_DEG)), device=c.device)
            what = "depth from the captures' baseline"
        else:
            what = "depth of the point the optical axes meet"
    stride = max(1, round(math.sqrt(C * H * W / max(cfg.fallback_points, 1))))
    depth = torch.zeros(C, H, W, device=views.images.device)
    depth[:, stride // 2 :: stride, stride // 2 :: stride] = z[:, None, None]
    if views.masks is not None:
        depth = torch.where(views.masks, depth, torch.zeros_like(depth))
    valid = depth > 0
    world = backproject(depth, cams)  # [C, H, W, 3]
    source = torch.tensor(views.ids, dtype=torch.int32, device=depth.device)[:, None, None].expand(C, H, W)
    memory = GeometryMemory(
        xyz=world[valid],
        rgb=views.images[valid],
        confidence=torch.full((int(valid.sum()),), cfg.fallback_confidence, device=depth.device),
        source=source[valid].contiguous(),
    )
    return memory, what


def auto_voxel_size(memory: GeometryMemory, fraction: float) -> float:
    """``fraction`` of the diagonal of the points' robust bounding box; 0 for fewer than 2 points."""
    if len(memory) < 2:
        return 0.0
    xyz = memory.xyz.float()
    stride = -(-len(xyz) // QUANTILE_SAMPLES)  # torch.quantile takes at most 2^24 values: subsample evenly
    lo, hi = torch.quantile(xyz[::stride], torch.tensor(EXTENT_PERCENTILES, device=memory.device), dim=0)
    return float((hi - lo).norm()) * fraction


def cap_points(memory: GeometryMemory, max_points: int) -> GeometryMemory:
    """The ``max_points`` most confident points (all of them if fewer)."""
    if len(memory) <= max_points:
        return memory
    keep = torch.topk(memory.confidence, max_points).indices
    return memory.select(keep.sort().values)


def voxel_keys(xyz: Tensor, voxel_size: float) -> Tensor:
    """Group index per point for a voxel grid of edge ``voxel_size``: int64 [N] in [0, G)."""
    q = torch.floor(xyz / voxel_size).to(torch.int64)
    q = q - q.min(0).values
    dims = q.max(0).values + 1
    if float(dims.cpu().double().prod()) < MAX_PACKED_CELLS:
        key = (q[:, 0] * dims[1] + q[:, 1]) * dims[2] + q[:, 2]
        return torch.unique(key, return_inverse=True)[1]
    return torch.unique(q, dim=0, return_inverse=True)[1]


def voxel_downsample(memory: GeometryMemory, voxel_size: float) -> GeometryMemory:
    """Merge the points of each voxel into one.

    Position and colour are confidence-weighted means, confidence is the voxel's maximum, and the
    source id is that of the most confident point a capture measured (source >= 0), where the voxel holds
    one, else of its most confident point (ties: the largest id): a generated frame's point that lands on a
    measured one does not make it generated.

    Args:
        memory: N points.
        voxel_size: voxel edge in world units, > 0.
    Returns:
        GeometryMemory with one point per occupied voxel (G <= N).
    """
    if not voxel_size > 0:
        raise ValueError(f"voxel_downsample: voxel_size must be > 0; got {voxel_size}")
    if len(memory) == 0:
        return memory
    inv = voxel_keys(memory.xyz, voxel_size)  # [N]
    G = int(inv.max()) + 1
    dev = memory.device
    w = memory.confidence.clamp_min(CONFIDENCE_FLOOR)
    wsum = torch.zeros(G, device=dev).index_add_(0, inv, w)
    xyz = torch.zeros(G, 3, device=dev).index_add_(0, inv, memory.xyz * w[:, None]) / wsum[:, None]
    rgb = torch.zeros(G, 3, device=dev).index_add_(0, inv, memory.rgb * w[:, None]) / wsum[:, None]
    conf = torch.full((G,), -1.0, device=dev).scatter_reduce(0, inv, memory.confidence, "amax")
    # the source's rank: measured points above every generated one, then by confidence
    rank = memory.confidence + (memory.source >= 0).to(memory.confidence) * (float(conf.max()) + 2.0)
    best = torch.full((G,), -math.inf, device=dev).scatter_reduce(0, inv, rank, "amax")
    is_best = rank >= best[inv]
    lowest = torch.iinfo(torch.int32).min
    source = torch.full((G,), lowest, dtype=torch.int32, device=dev).scatter_reduce(
        0, inv[is_best], memory.source[is_best].to(torch.int32), "amax"
    )
    return GeometryMemory(xyz=xyz, rgb=rgb.clamp(0, 1), confidence=conf, source=source)


def memory_to_ply_arrays(memory: GeometryMemory) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Arrays for the point-cloud .ply (DESIGN.md section 3).

    Returns:
        xyz: float32 [N, 3]; rgb: uint8 [N, 3]; confidence: float32 [N]; source: int32 [N].
    """
    xyz = memory.xyz.detach().float().cpu().numpy()
    rgb = (memory.rgb.detach().clamp(0, 1) * COLOR_LEVELS).round().to(torch.uint8).cpu().numpy()
    conf = memory.confidence.detach().float().cpu().numpy()
    source = memory.source.detach().to(torch.int32).cpu().numpy()
    return xyz, rgb, conf, source
