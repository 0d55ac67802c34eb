"""COLMAP PatchMatch stereo on the GPU with our known cameras (estimator ``patchmatch``).

Dense geometry through pycolmap's CUDA build (``pycolmap-cuda12`` on PyPI; the CPU wheel has no
PatchMatch). No learned weights. Steps:

1. **Workspace** (:func:`write_workspace`), the layout COLMAP's image undistorter writes: ``images/``
   (the captures at the processing size, PNG), ``sparse/`` (a COLMAP text model of our cameras: one
   PINHOLE camera per capture, poses as given, no points), ``stereo/`` with empty ``depth_maps``,
   ``normal_maps``, ``consistency_graphs`` and the ``patch-match.cfg`` / ``fusion.cfg`` lists. Each
   reference's source images are the plane sweep's candidates (nearest captures whose optical axes
   turn by at most ``MVSConfig.max_view_angle_deg``), and the depth range is the plane sweep's
   (sparse SIFT triangulation), since a model without points gives COLMAP none.
2. **PatchMatch** (``pycolmap.patch_match_stereo``, photometric then geometric consistency).
3. **Read back** the geometric depth maps (:func:`read_colmap_array`, COLMAP's ``.bin`` layout).
4. **Coverage guard** (:func:`check_coverage`): plane sweep's depth maps of the same views (about
   a second on a GPU); when PatchMatch gives depth to less than ``min_coverage_share`` of the pixels
   plane sweep does, the estimator raises a GeometryError naming both shares, and the memory falls
   back to plane sweep with that line in the job's notes. (Measured on the fern's 3 LLFF views with
   COLMAP's default 3-degree triangulation filter: PatchMatch covered 25 % of the pixels, plane sweep
   54 %, and the loop's Gaussians lost 5 dB; docs/benchmarks.md.)
5. **Fuse** with the plane sweep's consistency check (:func:`backend.estimators.mvs.fuse_depths`).

Only step 2 needs CUDA; :func:`has_cuda_patchmatch` says whether this machine can run it.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from ..progress import Cancelled, WorkProgress, no_work_progress, run_reporting
from ..types import GeometryMemory, Views
from . import ESTIMATORS, GeometryError
from .mvs import (
    DepthMaps,
    MVSConfig,
    depth_range,
    estimate_depths,
    fuse_depths,
    match_candidates,
    resize_views,
    sparse_points,
    to_gray,
)
from .sfm import colmap_cancellation, colmap_logging, import_pycolmap

U8_MAX = 255.0
STEREO_DIR = "stereo"
DEPTH_SUFFIX = ".geometric.bin"  # PatchMatch's depth maps after geometric consistency


@dataclass(frozen=True)
class PatchMatchConfig:
    """PatchMatch settings (COLMAP's defaults unless noted).

    Attributes:
        max_side: images are downsized so that max(H, W) <= this before matching; 0 = as given.
        window_radius: matching window half-size (COLMAP: 5).
        num_iterations: propagation iterations (COLMAP: 5).
        geom_consistency: COLMAP's geometric consistency pass (its depth maps are the ones read).
        filter_min_num_consistent: COLMAP keeps a depth seen consistently by at least this many sources.
        min_triangulation_angle_deg: COLMAP drops depths whose rays from the sources meet at less than
            this angle (its ``filter_min_triangulation_angle``). COLMAP's 3 degrees left 25 % of the
            fern's pixels (3 forward-facing views) with a depth, 1 degree 56 % (plane sweep: 54 %).
        min_coverage_share: PatchMatch must cover at least this share of the pixels plane sweep
            covers on the same views, else it gives way to plane sweep (module docstring, step 4);
            0 turns the check off.
        min_consistent: our fusion's agreement count (``MVSConfig.min_consistent``).
        gpu_index: CUDA device(s) for COLMAP, ``-1`` all.
        work_dir: folder for the workspace (default a temporary folder, removed afterwards).
    """

    max_side: int = 1024
    window_radius: int = 5
    num_iterations: int = 5
    geom_consistency: bool = True
    filter_min_num_consistent: int = 2
    min_triangulation_angle_deg: float = 1.0
    min_coverage_share: float = 0.8
    min_consistent: int = 1
    gpu_index: str = "-1"
    work_dir: str | None = None

    def check(self) -> None:
        if self.window_radius < 1 or self.num_iterations < 1:
            raise ValueError(
                f"PatchMatchConfig.window_radius and num_iterations must be >= 1; got {self.window_radius}, {self.num_iterations}"
            )
        if self.min_triangulation_angle_deg < 0 or self.min_coverage_share < 0:
            raise ValueError(
                "PatchMatchConfig.min_triangulation_angle_deg and min_coverage_share must be >= 0; "
                f"got {self.min_triangulation_angle_deg}, {self.min_coverage_share}"
            )
        if self.min_consistent < 0:
            raise ValueError(f"PatchMatchConfig.min_consistent must be >= 0; got {self.min_consistent}")


def has_cuda_patchmatch() -> bool:
    """pycolmap is installed with CUDA (its PatchMatch can run)."""
    try:
        pycolmap = import_pycolmap()
    except ImportError:
        return False
    return bool(getattr(pycolmap, "has_cuda", False))


# ----------------------------------------------------------------------------------------------
# COLMAP's dense arrays (src/colmap/mvs/mat.h): a text header "width&height&channels&", then the
# float32 values with x fastest, then y, then the channel (COLMAP's read_write_dense.py reads them as
# a (width, height, channels) array in Fortran order).


def read_colmap_array(path: Path) -> np.ndarray:
    """A COLMAP depth or normal map. float32 [H, W] (one channel) or [H, W, D]"""
    data = Path(path).read_bytes()
    header_end = 0
    for _ in range(3):
        header_end = data.index(b"&", header_end) + 1
    width, height, channels = (int(v) for v in data[: header_end - 1].split(b"&"))
    values = np.frombuffer(data[header_end:], dtype=np.float32)
    if values.size != width * height * channels:
        raise ValueError(f"{Path(path).name}: header says {width}x{height}x{channels}; holds {values.size} values")
    array = values.reshape((width, height, channels), order="F").transpose(1, 0, 2)
    return array[..., 0] if channels == 1 else array


def write_colmap_array(array: np.ndarray, path: Path) -> Path:
    """Write a [H, W] or [H, W, D] float32 array in COLMAP's layout (the inverse of read_colmap_array)."""
    a = np.asarray(array, dtype=np.float32)
    if a.ndim == 2:
        a = a[..., None]
    height, width, channels = a.shape
    Path(path).write_bytes(
        f"{width}&{height}&{channels}&".encode() + np.asfortranarray(a.transpose(1, 0, 2)).tobytes(order="F")
    )
    return Path(path)


# ----------------------------------------------------------------------------------------------
# Workspace


def image_names(views: Views) -> list[str]:
    """The workspace's image file names, one per capture."""
    return [f"{i:05d}_{int(cid)}.png" for i, cid in enumerate(views.ids)]


def write_workspace(views: Views, work: Path, sources: list[list[int]]) -> list[str]:
    """Write COLMAP's dense workspace for ``views`` (module docstring, step 1).

    Args:
        views: captures at the processing size: images [C, H, W, 3] in [0, 1], cameras, ids.
        work: the workspace folder (created; must be empty or absent).
        sources: per capture, the indices of its source captures.
    Returns:
        the image names, in capture order.
    """
    from ..formats.colmap import export_colmap
    from ..scene import Capture, Scene, Settings

    names = image_names(views)
    (work / "images").mkdir(parents=True, exist_ok=True)
    for name, img in zip(names, views.images):
        Image.fromarray((img.clamp(0, 1) * U8_MAX).round().byte().cpu().numpy()).save(work / "images" / name)
    captures = [
        Capture(name=Path(n).stem, image=(work / "images" / n).resolve(), camera=c)
        for n, c in zip(names, views.cams.to_scene())
    ]
    export_colmap(
        Scene(root=work.resolve(), captures=captures, heldout=[], settings=Settings()),
        work / "sparse",
        image_root=(work / "images").resolve(),
    )
    stereo = work / STEREO_DIR
    for sub in ("depth_maps", "normal_maps", "consistency_graphs"):
        (stereo / sub).mkdir(parents=True, exist_ok=True)
    lines = []
    for name, src in zip(names, sources):
        lines += [name, ", ".join(names[j] for j in src)]
    (stereo / "patch-match.cfg").write_text("\n".join(lines) + "\n")
    (stereo / "fusion.cfg").write_text("\n".join(names) + "\n")
    return names


def read_depth_maps(work: Path, names: list[str], height: int, width: int, device: torch.device) -> Tensor:
    """The geometric depth maps PatchMatch wrote, resized (nearest) to height x width; 0 where missing
    or invalid. float32 [C, H, W]"""
    out = torch.zeros(len(names), height, width, device=device)
    for i, name in enumerate(names):
        path = work / STEREO_DIR / "depth_maps" / f"{name}{DEPTH_SUFFIX}"
        if not path.is_file():
            continue
        d = torch.from_numpy(read_colmap_array(path).copy()).to(device)
        if tuple(d.shape) != (height, width):
            d = torch.nn.functional.interpolate(d[None, None], size=(height, width), mode="nearest-exact")[0, 0]
        out[i] = torch.where(torch.isfinite(d) & (d > 0), d, torch.zeros_like(d))
    return out


def run_patchmatch(
    work: Path, depth_range: tuple[float, float], cfg: PatchMatchConfig, progress: WorkProgress = no_work_progress
) -> None:
    """Step 2: COLMAP's PatchMatch stereo on the workspace (CUDA); COLMAP's log lines go to our log
    (``backend.estimators.sfm.colmap``), not the console. One call into COLMAP on its own thread: ``progress`` hears
    it every ``PROGRESS_INTERVAL_S``, and a cancel stops it (pycolmap's ``CancellationToken``, where it has one;
    else the job stops once it ends)."""
    pycolmap = import_pycolmap()
    options = pycolmap.PatchMatchOptions()
    options.max_image_size = -1  # the workspace's images are already at the processing size
    options.window_radius = cfg.window_radius
    options.num_iterations = cfg.num_iterations
    options.geom_consistency = cfg.geom_consistency
    options.filter_min_num_consistent = cfg.filter_min_num_consistent
    options.filter_min_triangulation_angle = cfg.min_triangulation_angle_deg
    options.depth_min, options.depth_max = depth_range
    options.gpu_index = cfg.gpu_index
    stop, cancel = colmap_cancellation(pycolmap)
    with colmap_logging(pycolmap, work):
        run_reporting(
            lambda: pycolmap.patch_match_stereo(work, workspace_format="COLMAP", options=options, **stop),
            progress,
            0.0,
            "PatchMatch stereo",
            cancel=cancel,
        )


@ESTIMATORS.register("patchmatch")
class PatchMatchMVS:
    """COLMAP PatchMatch stereo with the captures' known cameras (module docstring). Needs pycolmap
    with CUDA; :func:`has_cuda_patchmatch` tells.

    Example::

        >>> est = PatchMatchMVS(PatchMatchConfig(max_side=640))   # doctest: +SKIP
        >>> memory = est.estimate(views)   # views: Views of >= 2 posed captures
    """

    def __init__(self, cfg: PatchMatchConfig = PatchMatchConfig()) -> None:
        cfg.check()
        self.cfg = cfg

    def estimate(self, views: Views, progress: WorkProgress = no_work_progress) -> GeometryMemory:
        """Captures (images [C, H, W, 3] in [0, 1], cameras, ids) -> fused points with source ids."""
        maps = patchmatch_depths(views, self.cfg, lambda f, message: progress(0.5 * f, message))
        if self.cfg.min_coverage_share > 0:
            sweep = estimate_depths(views, fusion_config(self.cfg), lambda f, message: progress(0.5 + 0.4 * f, message))
            check_coverage(maps.depth, sweep.depth, self.cfg.min_coverage_share)
        progress(0.9, f"PatchMatch: fusing {len(maps.depth)} depth maps")
        return fuse_depths(maps.depth, maps.confidence, maps.views, maps.neighbors, fusion_config(self.cfg))


def check_coverage(depth: Tensor, sweep_depth: Tensor, share: float) -> None:
    """Raise a GeometryError when PatchMatch's depth maps cover less than ``share`` of the pixels
    plane sweep's cover (module docstring, step 4). depth, sweep_depth: [C, h, w], 0 where none"""
    covered, sweep = float((depth > 0).float().mean()), float((sweep_depth > 0).float().mean())
    if covered < share * sweep:
        raise GeometryError(
            f"patchmatch: depth on {covered:.0%} of the pixels, plane sweep on {sweep:.0%} "
            f"(less than {share:g} of it: too few views agree within COLMAP's filters)"
        )


def fusion_config(cfg: PatchMatchConfig) -> MVSConfig:
    """The plane sweep's settings PatchMatch shares: neighbour choice, depth range and fusion."""
    return replace(MVSConfig(), max_side=cfg.max_side, min_consistent=cfg.min_consistent)


def patchmatch_depths(
    views: Views, cfg: PatchMatchConfig = PatchMatchConfig(), progress: WorkProgress = no_work_progress
) -> DepthMaps:
    """Every capture's geometric depth map by COLMAP PatchMatch (module docstring, steps 1 and 2).

    Args:
        views: >= 2 posed captures, images [C, H, W, 3] in [0, 1].
        cfg: PatchMatch settings.
        progress: ``(fraction, message)``: the sparse points to 0.3, COLMAP's PatchMatch to 1.
    Returns:
        the depth maps at the processing size (``views`` downsized to ``cfg.max_side``): depth [C, h, w]
        (camera z, 0 where PatchMatch kept none), confidence 1 where there is a depth, the source views
        and the depth range given to COLMAP.
    Raises:
        GeometryError: no CUDA pycolmap, fewer than 2 captures, or COLMAP failed (its message quoted).
    """
    if not has_cuda_patchmatch():
        raise GeometryError("patchmatch: pycolmap has no CUDA here (install pycolmap-cuda12 on a CUDA machine)")
    if len(views) < 2:
        raise GeometryError(f"patchmatch: needs at least 2 captures with cameras; got {len(views)}")
    mvs_cfg = fusion_config(cfg)
    small = resize_views(views, cfg.max_side)
    cams = small.cams
    sources = match_candidates(cams, mvs_cfg)
    if not any(sources):
        raise GeometryError(
            f"patchmatch: no capture has a neighbour within {mvs_cfg.max_view_angle_deg:g} degrees of view angle"
        )
    pairs = sorted({(min(i, j), max(i, j)) for i in range(len(cams)) for j in sources[i]})
    sparse = sparse_points(to_gray(small.images), cams, pairs, mvs_cfg, lambda f, message: progress(0.3 * f, message))
    ranges = [depth_range(cams, i, sparse[i], sources[i], mvs_cfg) for i in range(len(cams))]
    near, far = min(r[0] for r in ranges), max(r[1] for r in ranges)
    work = Path(cfg.work_dir) if cfg.work_dir else Path(tempfile.mkdtemp(prefix="reconloop-pm-"))
    try:
        names = write_workspace(small, work, sources)
        try:
            run_patchmatch(work, (near, far), cfg, lambda f, message: progress(0.3 + 0.7 * f, message))
        except Cancelled:  # a client's cancel, not COLMAP's failure: no fallback to plane sweep
            raise
        except Exception as err:  # pycolmap raises RuntimeError variants (CUDA, workspace)
            raise GeometryError(f"patchmatch: COLMAP failed: {type(err).__name__}: {err}") from err
        depth = read_depth_maps(work, names, cams.height, cams.width, small.images.device)
    finally:
        if cfg.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    return DepthMaps(
        views=small, depth=depth, confidence=(depth > 0).float(), neighbors=sources, ranges=[(near, far)] * len(cams)
    )
