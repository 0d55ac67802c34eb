"""Cameras for captures that have none: incremental structure from motion with pycolmap.

``estimate_cameras`` runs COLMAP's pipeline (SIFT extraction, exhaustive matching, incremental
mapping) in a work folder and returns one scene :class:`~backend.scene.Camera` per image (None for
images that did not register). When the intrinsics are known (for example a focal length given by
the user), the camera model is PINHOLE with those values held fixed during bundle adjustment;
otherwise COLMAP's SIMPLE_RADIAL is estimated and its distortion is returned with the camera.

The cameras come back in COLMAP's own (arbitrary) world frame and scale, in our convention (DESIGN.md
section 3: OpenCV w2c; COLMAP's pixel centres are at i + 0.5 like ours, so K needs no shift).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from ..progress import WorkProgress, no_work_progress, run_reporting
from ..scene import DISTORTION_PARAMS, Camera, Distortion, image_size
from ..signals import keeps_sigterm

# COLMAP model name -> (indices of fx, fy, cx, cy in params, distortion model or None, its param slice)
_MODELS = {
    "SIMPLE_PINHOLE": ((0, 0, 1, 2), None, slice(0, 0)),
    "PINHOLE": ((0, 1, 2, 3), None, slice(0, 0)),
    "SIMPLE_RADIAL": ((0, 0, 1, 2), "SIMPLE_RADIAL", slice(3, 4)),
    "RADIAL": ((0, 0, 1, 2), "RADIAL", slice(3, 5)),
    "OPENCV": ((0, 1, 2, 3), "OPENCV", slice(4, 8)),
    "FULL_OPENCV": ((0, 1, 2, 3), "FULL_OPENCV", slice(4, 12)),
}


# COLMAP logs through glog: its lines go to a file in the work folder, then into our log at these levels.
COLMAP_LOG_PREFIX = "colmap."
GLOG_LEVELS = {"I": logging.DEBUG, "W": logging.INFO, "E": logging.WARNING, "F": logging.ERROR}
GLOG_FATAL = 3  # glog severity numbers: INFO 0, WARNING 1, ERROR 2, FATAL 3

log = logging.getLogger(__name__)
colmap_log = logging.getLogger(__name__ + ".colmap")


class SfMError(ValueError):
    """Structure from motion could not give cameras for enough images (plain-language message)."""


CAMERA_GROUPINGS = ("auto", "one", "each")
# EXIF tags that tell one physical camera from another: Make, Model (IFD0), FocalLength (Exif IFD)
EXIF_MAKE, EXIF_MODEL, EXIF_IFD, EXIF_FOCAL = 0x010F, 0x0110, 0x8769, 0x920A


def camera_groups(paths: Sequence[Path], grouping: str = "auto") -> list[int]:
    """Which photos share intrinsics: a group index per photo (``SfMConfig.camera_grouping``).

    ``auto`` groups photos of one size whose EXIF make, model and focal length agree (photos without
    EXIF group by size alone); ``one`` puts every photo of one size together; ``each`` none.
    """
    from PIL import Image

    keys: list[tuple] = []
    for i, p in enumerate(paths):
        with Image.open(p) as im:
            key: tuple = (im.size,)
            if grouping == "each":
                key += (i,)
            elif grouping == "auto":
                exif = im.getexif()
                focal = exif.get_ifd(EXIF_IFD).get(EXIF_FOCAL)
                key += (exif.get(EXIF_MAKE), exif.get(EXIF_MODEL), None if focal is None else float(focal))
        keys.append(key)
    first = {k: n for n, k in enumerate(dict.fromkeys(keys))}
    return [first[k] for k in keys]


@dataclass(frozen=True)
class SfMConfig:
    """Attributes:
    max_image_size: images are read at most this large for SIFT (COLMAP default 3200).
    max_num_features: SIFT features per image (COLMAP default 8192).
    min_registered: fewer registered images than this is an error.
    unknown_camera_model: COLMAP model estimated when intrinsics are not known.
    num_threads: worker threads (-1 = all cores).
    seed: random seed of the mapper (repeatable runs).
    camera_grouping: which photos share one set of intrinsics when they are estimated: ``auto``
        (photos of one size with the same EXIF make, model and focal length: one physical camera),
        ``one`` (all photos) or ``each`` (every photo its own).
    """

    max_image_size: int = 1600
    max_num_features: int = 8192
    min_registered: int = 2
    unknown_camera_model: str = "SIMPLE_RADIAL"
    num_threads: int = -1
    seed: int = 0
    camera_grouping: str = "auto"

    def check(self) -> None:
        if self.camera_grouping not in CAMERA_GROUPINGS:
            raise ValueError(
                f"SfMConfig.camera_grouping must be one of {', '.join(CAMERA_GROUPINGS)}; got {self.camera_grouping!r}"
            )
        if self.min_registered < 2:
            raise ValueError(f"SfMConfig.min_registered must be >= 2; got {self.min_registered}")
        if self.unknown_camera_model not in _MODELS:
            raise ValueError(
                f"SfMConfig.unknown_camera_model must be one of {', '.join(_MODELS)}; got {self.unknown_camera_model!r}"
            )


def _camera_from_colmap(image, camera) -> Camera:
    """A scene Camera (OpenCV w2c float64 [4, 4], K [3, 3]) from a registered pycolmap image."""
    model = camera.model_name
    if model not in _MODELS:
        raise SfMError(f"sfm: camera model {model} is not supported; use one of {', '.join(_MODELS)}")
    (ifx, ify, icx, icy), dist_model, dist_slice = _MODELS[model]
    p = np.asarray(camera.params, dtype=np.float64)
    K = np.array([[p[ifx], 0.0, p[icx]], [0.0, p[ify], p[icy]], [0.0, 0.0, 1.0]])
    w2c = np.eye(4)
    w2c[:3, :4] = np.asarray(image.cam_from_world().matrix(), dtype=np.float64)
    distortion = None
    if dist_model is not None:
        params = tuple(float(v) for v in p[dist_slice])
        if len(params) != DISTORTION_PARAMS[dist_model]:
            raise SfMError(f"sfm: {model} gave {len(params)} distortion parameters")
        distortion = Distortion(dist_model, params)
    return Camera(w2c=w2c, K=K, width=int(camera.width), height=int(camera.height), distortion=distortion)


def import_pycolmap() -> ModuleType:
    """pycolmap, imported without taking over SIGTERM (``backend.signals``): it installs glog's failure signal
    handler on import, which prints a C++ stack trace on SIGTERM, the normal way to stop the service."""
    with keeps_sigterm():
        import pycolmap  # heavy; only jobs with captures lacking cameras need it
    return pycolmap


def colmap_cancellation(pycolmap: ModuleType) -> tuple[dict[str, Any], Callable[[], None] | None]:
    """What stops a long pycolmap call from another thread: the keyword arguments to pass it
    (``cancellation_token``) and the function that asks it to stop; ``({}, None)`` where pycolmap has no
    ``CancellationToken`` (before 3.13: the call runs to its end)."""
    if not hasattr(pycolmap, "CancellationToken"):
        return {}, None
    token = pycolmap.CancellationToken()
    return {"cancellation_token": token}, token.cancel


@contextlib.contextmanager
def colmap_logging(pycolmap: ModuleType, work_dir: Path) -> Iterator[None]:
    """Send COLMAP's glog output to ``work_dir/colmap.*`` instead of the console, then into our log
    (``backend.estimators.sfm.colmap``: glog INFO as debug, WARNING as info, ERROR as warning)."""
    glog = pycolmap.logging
    glog.logtostderr = False
    glog.alsologtostderr = False
    glog.stderrthreshold = GLOG_FATAL
    prefix = str(work_dir / COLMAP_LOG_PREFIX)
    glog.set_log_destination(glog.Level.INFO, prefix)
    for level in (glog.Level.WARNING, glog.Level.ERROR):
        glog.set_log_destination(level, "")  # each line is in the INFO file already
    try:
        yield
    finally:
        glog.set_log_destination(glog.Level.INFO, "")  # closes (flushes) the file
        for path in sorted(work_dir.glob(COLMAP_LOG_PREFIX + "*")):
            forward_glog_lines(path.read_text(errors="replace").splitlines())


def forward_glog_lines(lines: Sequence[str]) -> int:
    """Log glog lines (``I20261201 23:28:20.169 tid file:line] msg``) at their level; the file's
    header lines are skipped. Returns the number of lines logged."""
    count = 0
    for line in lines:
        level = GLOG_LEVELS.get(line[:1])
        if level is None or not line[1:2].isdigit() or "] " not in line:
            continue
        colmap_log.log(level, "%s", line.split("] ", 1)[1])
        count += 1
    return count


def estimate_cameras(
    image_paths: Sequence[str | os.PathLike],
    *,
    known_K: np.ndarray | None = None,
    work_dir: str | os.PathLike,
    cfg: SfMConfig = SfMConfig(),
    photo_names: Sequence[str] | None = None,
    progress: WorkProgress = no_work_progress,
) -> list[Camera | None]:
    """Estimate the cameras of photos by incremental SfM.

    Args:
        image_paths: the photos (PNG or JPEG). I paths
        known_K: intrinsics in pixels of all photos (same size), held fixed; None = estimate them.
            float [3, 3]
        work_dir: folder for COLMAP's database, image links and model (created; old content replaced).
        cfg: feature, threshold and seed settings.
        photo_names: what the user calls each photo, for messages (the captures' names: a service's
            job store keeps the photos under its own file names); None: the photos' file names.
        progress: ``(fraction, message)`` at the start of each of COLMAP's steps and every
            ``PROGRESS_INTERVAL_S`` during it (each a single call into COLMAP, run on a thread of its own,
            ``run_reporting``); when it raises (``Cancelled``), COLMAP is asked to stop (pycolmap's
            ``CancellationToken``, where it has one) and the error is raised within seconds.
    Returns:
        per photo, its Camera (OpenCV w2c, K, size, distortion when estimated) or None if it did not
        register. All cameras share COLMAP's world frame and scale.
    Raises:
        SfMError: fewer than ``cfg.min_registered`` photos registered.

    Example::

        >>> cams = estimate_cameras(["a.jpg", "b.jpg", "c.jpg"], known_K=K, work_dir="/tmp/sfm")
    """
    pycolmap = import_pycolmap()
    cfg.check()
    paths = [Path(p).resolve() for p in image_paths]
    labels = list(photo_names) if photo_names is not None else [p.name for p in paths]
    if len(labels) != len(paths):
        raise ValueError(f"estimate_cameras: {len(labels)} photo_names for {len(paths)} photos")
    if len(paths) < cfg.min_registered:
        raise SfMError(f"sfm: needs at least {cfg.min_registered} photos to estimate cameras; got {len(paths)}")
    for p, label in zip(paths, labels):
        if not p.is_file():
            raise SfMError(f"sfm: photo not found: {p if label == p.name else f'{label} ({p})'}")
    sizes = [image_size(p) for p in paths]
    work = Path(work_dir)
    if work.exists():
        shutil.rmtree(work)
    image_dir, model_dir = work / "images", work / "sparse"
    image_dir.mkdir(parents=True)
    model_dir.mkdir()
    # one folder per group of photos that share intrinsics (COLMAP's PER_FOLDER camera mode)
    groups = [0] * len(paths) if known_K is not None else camera_groups(paths, cfg.camera_grouping)
    names = [f"g{g:03d}/{i:05d}{p.suffix.lower()}" for i, (g, p) in enumerate(zip(groups, paths, strict=True))]
    for name, p in zip(names, paths, strict=True):
        (image_dir / name).parent.mkdir(exist_ok=True)
        (image_dir / name).symlink_to(p)
    database = work / "database.db"

    reader = pycolmap.ImageReaderOptions()
    options = pycolmap.IncrementalPipelineOptions()
    if known_K is not None:
        K = np.asarray(known_K, dtype=np.float64)
        if K.shape != (3, 3):
            raise ValueError(f"estimate_cameras: known_K must be [3, 3]; got {K.shape}")
        if len(set(sizes)) != 1:
            raise ValueError(f"estimate_cameras: known_K needs photos of one size; got {sorted(set(sizes))}")
        reader.camera_model = "PINHOLE"
        reader.camera_params = f"{K[0, 0]},{K[1, 1]},{K[0, 2]},{K[1, 2]}"
        camera_mode = pycolmap.CameraMode.SINGLE
        options.ba_refine_focal_length = False
        options.ba_refine_principal_point = False
        options.ba_refine_extra_params = False
    else:
        reader.camera_model = cfg.unknown_camera_model
        camera_mode = pycolmap.CameraMode.PER_FOLDER
        log.info("sfm: %d photos, %d cameras (intrinsics shared per camera)", len(paths), len(set(groups)))
    extraction = pycolmap.FeatureExtractionOptions()
    extraction.max_image_size = cfg.max_image_size
    extraction.sift.max_num_features = cfg.max_num_features
    extraction.num_threads = cfg.num_threads
    options.num_threads = cfg.num_threads
    options.random_seed = cfg.seed
    stop, cancel = colmap_cancellation(pycolmap)
    placed = 0  # photos COLMAP has registered so far (its callbacks run on its thread, with the GIL)

    def initial_pair() -> None:
        nonlocal placed
        placed += 2

    def next_image() -> None:
        nonlocal placed
        placed += 1

    def steps(work: Callable[[], Any], fraction: float, what: str | Callable[[], str]) -> Any:
        return run_reporting(work, progress, fraction, what, cancel=cancel)

    n = len(paths)
    with colmap_logging(pycolmap, work):
        steps(
            lambda: pycolmap.extract_features(
                database,
                image_dir,
                image_names=names,
                camera_mode=camera_mode,
                reader_options=reader,
                extraction_options=extraction,
                device=pycolmap.Device.cpu,
                **stop,
            ),
            0.0,
            f"SfM: finding features in {n} photos",
        )
        steps(lambda: pycolmap.match_exhaustive(database, **stop), 0.4, f"SfM: matching {n * (n - 1) // 2} photo pairs")
        recs = steps(
            lambda: pycolmap.incremental_mapping(
                database,
                image_dir,
                model_dir,
                options,
                initial_image_pair_callback=initial_pair,
                next_image_callback=next_image,
                **stop,
            ),
            0.7,
            lambda: f"SfM: placing the photos, {min(placed, n)} of {n} placed",
        )
    rec = max(recs.values(), key=lambda r: r.num_reg_images(), default=None)
    log.info("sfm: %d of %d photos placed", 0 if rec is None else rec.num_reg_images(), len(paths))

    out: list[Camera | None] = [None] * len(paths)
    if rec is not None:
        for i, name in enumerate(names):
            image = rec.find_image_with_name(name)
            if image is not None and image.has_pose:
                out[i] = _camera_from_colmap(image, rec.cameras[image.camera_id])
    registered = sum(c is not None for c in out)
    if registered < cfg.min_registered:
        missing = [labels[i] for i, c in enumerate(out) if c is None]
        raise SfMError(
            f"sfm: only {registered} of {len(paths)} photos could be placed (need {cfg.min_registered}); "
            f"not placed: {', '.join(missing)}. Photos need overlapping, textured content; "
            "add photos between them or give their cameras"
        )
    return out
