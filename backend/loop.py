"""The reconstruction loop, end to end (DESIGN.md section 1), in one readable function: ``run_loop``.

Captures (photos with cameras) and a camera trajectory go in; a job folder comes out (see
``backend/outputs.py`` for its files). The numbered comments in ``run_loop`` follow DESIGN.md:

    1 memory    build the point memory M from the posed captures (plane-sweep MVS)
    2 segments  cut the trajectory into segments
    per segment:
      3 retrieval  pick the captures that cover the segment
      4 render     splat M into the segment's cameras (colour, depth, mask)
      5 generate   fill what M misses (generator by name: ``reproject`` by default)
      6 update     lift the generated frames into M (the closed loop; a switch turns it off)
    7 fit       fit 3D Gaussians on captures (confidence 1) and generated frames (their confidence)

Between steps ``progress`` gets a ProgressEvent naming every finished artifact; a callback that
raises ``Cancelled`` stops the job there (the exception propagates to the caller).

Example::

    >>> from backend.scene import load_scene
    >>> result = run_loop(load_scene("demo_scene"), Path("out"), device="cpu")   # doctest: +SKIP
    >>> result.gaussians_path
    PosixPath('out/gaussians.ply')
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from protocol.ply import PointArrays

from . import outputs
from .formats.undistort import undistort_image
from .generators import Generator, generator_class
from .progress import ProgressEvent, ProgressFn, no_progress
from .scene import Camera, Scene, Settings
from .stages.fit import (
    FitConfig,
    FitViews,
    Gaussians,
    default_rasterizer,
    fit_gaussians,
    gaussians_to_arrays,
    render_gaussians,
    render_gaussians_geometry,
)
from .stages.memory import MemoryConfig, build_memory, memory_to_ply_arrays
from .stages.render import RenderConfig, render_memory
from .stages.retrieval import RetrievalConfig, retrieve_views
from .stages.segments import SegmentConfig, split_segments
from .stages.types import Cameras, ConditionVideo, Frames, GeometryMemory, Renders, Views
from .stages.update import UpdateConfig, update_memory

log = logging.getLogger(__name__)

U8_MAX = 255.0

# Share of the job's progress bar per stage (rough CPU proportions; only the order matters).
PROGRESS_SHARES = {"cameras": 0.03, "memory": 0.1, "guide": 0.2, "segments": 0.3, "fit": 0.32, "outputs": 0.05}


# ----------------------------------------------------------------------------------------------
# Configuration and result


@dataclass(frozen=True)
class LoopConfig:
    """Everything the loop needs besides the scene; one frozen config per stage.

    Attributes:
        width, height: working resolution of renders, generated frames and Gaussian fitting. When
            the trajectory's aspect differs, the trajectory's aspect wins at about the same pixel count.
        estimator: geometry estimator name for step 1 (``mvs``).
        generator: generator name for step 5 (``reproject``, ``anyrecon``).
        num_steps, seed, prompt: passed to the generator.
        default_frames: frames of the path made through the captures when the scene has none.
        overview_rows: rows of overview.png.
        has_fit: step 7 on; off (Settings.gaussian_iterations = 0) writes no gaussians.ply.
        capture_share: about this fraction of the fit's steps draw a capture (captures are repeated
            in the fit's frame list): a few captures beside many generated frames would otherwise
            be seen rarely, and they are the only views known to be right.
        fit_init: the memory the Gaussians start from: ``initial`` (the captures' stereo points) or
            ``final`` (after the updates, with points lifted from generated frames). The updates still
            steer later segments either way; starting the fit from the captures' points scored higher
            at held-out views of the temple and the fern on the H200 (docs/benchmarks.md).
        guide: first fit Gaussians on the captures alone (the ``fit`` settings) and give the
            generator their render wherever they are opaque (``guide_alpha``): colour, and their
            expected depth in place of the memory's, which is dense where the stereo memory is thin
            (wide baselines). The point render still feeds retrieval, the memory update's lifting
            where the guide is transparent, and overview.png. On the temple's 43-degree split the
            loop's held-out PSNR went from 0.23 dB below captures-only to 0.17 dB above with the
            guide (mean of 3 seeds, docs/benchmarks.md). Off: the point render alone (AnyRecon).
        guide_alpha: Gaussian opacity from which a guide pixel counts as covered.
        occlusion_test: the retrieved captures go to the generator with a depth map (the guide's
            where it is opaque, else the memory rendered into them), so that a capture does not
            lend its colour to points hidden behind its own surface.
    """

    width: int = Settings.width
    height: int = Settings.height
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    segments: SegmentConfig = field(default_factory=SegmentConfig)
    retrieval: RetrievalConfig = field(default_factory=RetrievalConfig)
    render: RenderConfig = field(default_factory=RenderConfig)
    update: UpdateConfig = field(default_factory=UpdateConfig)
    fit: FitConfig = field(default_factory=FitConfig)
    estimator: str = "mvs"
    generator: str = Settings.generator
    num_steps: int = Settings.num_steps
    seed: int = Settings.seed
    prompt: str = ""
    default_frames: int = 24
    overview_rows: int = 4
    has_fit: bool = True
    capture_share: float = 0.5
    fit_init: str = "initial"
    guide: bool = True
    guide_alpha: float = 0.5
    occlusion_test: bool = True

    def __post_init__(self) -> None:
        if not 0.0 < self.guide_alpha <= 1.0:
            raise ValueError(f"LoopConfig.guide_alpha must be in (0, 1]; got {self.guide_alpha}")
        if not 0.0 <= self.capture_share < 1.0:
            raise ValueError(f"LoopConfig.capture_share must be in [0, 1); got {self.capture_share}")
        if self.fit_init not in ("final", "initial"):
            raise ValueError(f"LoopConfig.fit_init must be 'final' or 'initial'; got {self.fit_init!r}")

    @classmethod
    def from_settings(cls, settings: Settings, *, device: torch.device | str = "cpu", **overrides: Any) -> LoopConfig:
        """The loop's config for a job's Settings (scene.json, Blender sidebar, CLI) on ``device``
        (which picks the Gaussian rasterizer: gsplat on CUDA, the torch stand-in elsewhere)."""
        base = cls()
        cfg = replace(
            base,
            width=settings.width,
            height=settings.height,
            segments=replace(base.segments, length=settings.segment_length, overlap=settings.segment_overlap),
            retrieval=replace(base.retrieval, k=settings.retrieval_k),
            update=replace(base.update, enabled=settings.update_memory),
            fit=replace(
                base.fit,
                iterations=max(settings.gaussian_iterations, 1),
                seed=settings.seed,
                rasterizer=default_rasterizer(device),
            ),
            has_fit=settings.gaussian_iterations > 0,
            guide=settings.guide,
            generator=settings.generator,
            num_steps=settings.num_steps,
            seed=settings.seed,
            prompt=settings.prompt,
        )
        return replace(cfg, **overrides)


@dataclass
class LoopResult:
    """What a finished run leaves behind (files under ``out_dir``) plus the in-memory results.

    Attributes:
        out_dir: the job folder.
        artifacts: every file written, relative to out_dir, in the order announced.
        memory_initial, memory_final: M before and after the loop.
        frames: generated frames of the whole trajectory: images [F, H, W, 3], confidence [F, H, W].
        trajectory: the cameras the frames were generated at (working size).
        frame_numbers: their trajectory frame numbers.
        captures: the captures as used: images at working size, cameras, ids.
        gaussians: the fitted Gaussians (backend.stages.fit.Gaussians), None when fitting is off.
        metrics: what metrics.json holds.
    """

    out_dir: Path
    artifacts: list[str]
    memory_initial: GeometryMemory
    memory_final: GeometryMemory
    frames: Frames
    trajectory: Cameras
    frame_numbers: list[int]
    captures: Views
    gaussians: Any
    metrics: dict[str, Any]

    @property
    def gaussians_path(self) -> Path:
        return self.out_dir / outputs.GAUSSIANS_FILE


# ----------------------------------------------------------------------------------------------
# Captures, cameras and the working size


def load_image(path: Path, width: int | None = None, height: int | None = None) -> np.ndarray:
    """An 8-bit sRGB image as stored (no colour management), optionally resized. uint8 [H, W, 3]"""
    with Image.open(path) as im:
        im = im.convert("RGB")
        if width is not None and height is not None and im.size != (width, height):
            im = im.resize((width, height), Image.BILINEAR)
        return np.asarray(im).copy()


def to_tensor(images: Sequence[np.ndarray], device: torch.device) -> Tensor:
    """uint8 images to floats in [0, 1]. [F, H, W, 3]"""
    return torch.from_numpy(np.stack(images)).to(device=device, dtype=torch.float32) / U8_MAX


def working_size(cfg: LoopConfig, trajectory: Sequence[Camera]) -> tuple[int, int, str]:
    """(width, height, note): the configured size, or the trajectory's aspect at about its pixel count."""
    if not trajectory:
        return cfg.width, cfg.height, ""
    tw, th = trajectory[0].width, trajectory[0].height
    if abs(tw / th - cfg.width / cfg.height) < 1e-3:
        return cfg.width, cfg.height, ""
    scale = math.sqrt(cfg.width * cfg.height / (tw * th))
    w, h = max(1, round(tw * scale)), max(1, round(th * scale))
    note = (
        f"working size {cfg.width}x{cfg.height} has another aspect than the trajectory ({tw}x{th}); "
        f"using {w}x{h}, the trajectory's aspect at about the same pixel count"
    )
    return w, h, note


def capture_cameras(scene: Scene, notes: list[str]) -> tuple[list[Camera | None], list[bool]]:
    """Each capture's camera; when some are missing, all are estimated with SfM (pycolmap).

    With 3 or more given cameras, the SfM frame is aligned to them (similarity on camera centres)
    and the given cameras are kept; otherwise the SfM cameras are used for all captures. A capture
    SfM could not register gets None. Returns (cameras, is_estimated).
    """
    given = [c.camera for c in scene.captures]
    if all(c is not None for c in given):
        return given, [False] * len(given)
    import tempfile

    from .estimators.sfm import estimate_cameras

    known = [c for c in given if c is not None]
    sizes = {(c.width, c.height) for c in known}
    known_K = (
        known[0].K
        if known and len(sizes) == 1 and all(image_size_of(c.image) == sizes.copy().pop() for c in scene.captures)
        else None
    )
    with tempfile.TemporaryDirectory(prefix="reconloop-sfm-") as work:
        estimated = estimate_cameras([c.image for c in scene.captures], known_K=known_K, work_dir=work)
    pairs = [(g, e) for g, e in zip(given, estimated) if g is not None and e is not None]
    if len(pairs) >= SIM_MIN_CAMERAS:
        s, R, t = similarity([e.center for _, e in pairs], [g.center for g, _ in pairs])
        estimated = [None if e is None else transform_camera(e, s, R, t) for e in estimated]
        cams = [g if g is not None else e for g, e in zip(given, estimated)]
        notes.append(f"estimated {sum(g is None for g in given)} cameras with SfM, aligned to {len(pairs)} given ones")
        return cams, [g is None for g in given]
    if known:
        notes.append(
            f"only {len(known)} captures had cameras (fewer than {SIM_MIN_CAMERAS} to align to): "
            "SfM cameras used for all"
        )
    return list(estimated), [True] * len(given)


SIM_MIN_CAMERAS = 3  # camera centres needed to fix a similarity transform


def image_size_of(path: Path) -> tuple[int, int]:
    with Image.open(path) as im:
        return im.size


def similarity(src: Sequence[np.ndarray], dst: Sequence[np.ndarray]) -> tuple[float, np.ndarray, np.ndarray]:
    """Scale, rotation and translation with dst ~ s R src + t (Umeyama, least squares)."""
    a, b = np.asarray(src, dtype=np.float64), np.asarray(dst, dtype=np.float64)
    ma, mb = a.mean(0), b.mean(0)
    A, B = a - ma, b - mb
    U, S, Vt = np.linalg.svd(B.T @ A / len(a))
    D = np.eye(3)
    D[2, 2] = np.sign(np.linalg.det(U @ Vt)) or 1.0
    R = U @ D @ Vt
    var = (A**2).sum() / len(a)
    s = float(np.trace(np.diag(S) @ D) / var) if var > 0 else 1.0
    return s, R, mb - s * R @ ma


def transform_camera(cam: Camera, s: float, R: np.ndarray, t: np.ndarray) -> Camera:
    """The camera after the world moves by x' = s R x + t."""
    c2w = cam.c2w
    new = np.eye(4)
    new[:3, :3] = R @ c2w[:3, :3]
    new[:3, 3] = s * R @ c2w[:3, 3] + t
    return replace(cam, w2c=np.linalg.inv(new))


def undistorted(image: np.ndarray, camera: Camera) -> tuple[np.ndarray, Camera]:
    """The image as an ideal pinhole would see it, and its camera without distortion."""
    if camera.distortion is None or camera.distortion.is_identity:
        return image, replace(camera, distortion=None)
    return undistort_image(image, camera), replace(camera, distortion=None)


# ----------------------------------------------------------------------------------------------
# Default trajectory: a closed path through cameras


def _rotation_to_quat(R: np.ndarray) -> np.ndarray:
    """Unit quaternion (w, x, y, z) of a rotation matrix. [4]"""
    m = R
    tr = m[0, 0] + m[1, 1] + m[2, 2]
    if tr > 0:
        s = math.sqrt(tr + 1.0) * 2
        q = [0.25 * s, (m[2, 1] - m[1, 2]) / s, (m[0, 2] - m[2, 0]) / s, (m[1, 0] - m[0, 1]) / s]
    elif m[0, 0] > m[1, 1] and m[0, 0] > m[2, 2]:
        s = math.sqrt(1.0 + m[0, 0] - m[1, 1] - m[2, 2]) * 2
        q = [(m[2, 1] - m[1, 2]) / s, 0.25 * s, (m[0, 1] + m[1, 0]) / s, (m[0, 2] + m[2, 0]) / s]
    elif m[1, 1] > m[2, 2]:
        s = math.sqrt(1.0 + m[1, 1] - m[0, 0] - m[2, 2]) * 2
        q = [(m[0, 2] - m[2, 0]) / s, (m[0, 1] + m[1, 0]) / s, 0.25 * s, (m[1, 2] + m[2, 1]) / s]
    else:
        s = math.sqrt(1.0 + m[2, 2] - m[0, 0] - m[1, 1]) * 2
        q = [(m[1, 0] - m[0, 1]) / s, (m[0, 2] + m[2, 0]) / s, (m[1, 2] + m[2, 1]) / s, 0.25 * s]
    q = np.array(q)
    return q / np.linalg.norm(q)


def _quat_to_rotation(q: np.ndarray) -> np.ndarray:
    w, x, y, z = q / np.linalg.norm(q)
    return np.array(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
            [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
            [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
        ]
    )


def _slerp(a: np.ndarray, b: np.ndarray, t: float) -> np.ndarray:
    """Spherical interpolation of unit vectors (quaternions or directions)."""
    dot = float(np.clip(np.dot(a, b), -1.0, 1.0))
    if dot > 1.0 - 1e-9:
        v = a + t * (b - a)
        return v / np.linalg.norm(v)
    theta = math.acos(dot)
    return (math.sin((1 - t) * theta) * a + math.sin(t * theta) * b) / math.sin(theta)


def scene_center(cams: Sequence[Camera]) -> np.ndarray | None:
    """The point nearest to all optical axes (least squares), or None when the axes are near parallel."""
    A = np.zeros((3, 3))
    b = np.zeros(3)
    for c in cams:
        d = c.c2w[:3, 2]
        P = np.eye(3) - np.outer(d, d)
        A += P
        b += P @ c.center
    if np.linalg.cond(A) > 1e6:
        return None
    p = np.linalg.solve(A, b)
    in_front = all(float((p - c.center) @ c.c2w[:3, 2]) > 0 for c in cams)
    return p if in_front else None


# Optical axes must spread by at least this much for the path to orbit a centre (else: straight lines).
ORBIT_MIN_SPREAD_DEG = 20.0


def order_around(cams: Sequence[Camera]) -> list[int]:
    """Indices of cameras in order of angle around their centroid, in the best-fit plane of the centres.

    The plane's normal is the centres' direction of least spread (rings, forward-facing grids); with
    fewer than 3 cameras, the cameras' mean up vector.
    """
    centers = np.stack([c.center for c in cams])
    rel = centers - centers.mean(0)
    if len(cams) >= 3:
        normal = np.linalg.svd(rel, full_matrices=False)[2][-1]
    else:
        normal = -np.mean([c.c2w[:3, 1] for c in cams], axis=0)  # OpenCV y points down
    normal /= max(np.linalg.norm(normal), 1e-12)
    rel = rel - np.outer(rel @ normal, normal)
    e1 = rel[int(np.argmax(np.linalg.norm(rel, axis=1)))]
    if np.linalg.norm(e1) < 1e-12:
        return list(range(len(cams)))
    e1 = e1 / np.linalg.norm(e1)
    e2 = np.cross(normal, e1)
    angles = np.arctan2(rel @ e2, rel @ e1)
    return [int(i) for i in np.argsort(angles, kind="stable")]


def path_through(keys: Sequence[Camera], num_frames: int, *, closed: bool = True) -> list[Camera]:
    """A smooth camera path visiting ``keys`` in the given order, ``num_frames`` cameras in all.

    Rotations are slerped; positions orbit the axes' meeting point when the cameras look at a common
    centre from spread-out directions (ring captures), else move on straight lines (forward-facing).
    Keys are hit exactly when ``num_frames`` is a multiple of the number of legs.
    """
    if not keys:
        raise ValueError("path_through: needs at least one camera")
    if num_frames < 1:
        raise ValueError(f"path_through: num_frames must be >= 1; got {num_frames}")
    if len(keys) == 1:
        return [keys[0]] * num_frames
    axes = np.stack([c.c2w[:3, 2] for c in keys])
    spread = math.degrees(math.acos(float(np.clip(np.min(axes @ axes.mean(0) / np.linalg.norm(axes.mean(0))), -1, 1))))
    center = scene_center(keys) if spread >= ORBIT_MIN_SPREAD_DEG else None
    legs = len(keys) if closed else len(keys) - 1
    quats = [_rotation_to_quat(c.c2w[:3, :3]) for c in keys]
    out = []
    for k in range(num_frames):
        s = k * legs / num_frames if closed else k * legs / max(num_frames - 1, 1)
        i = min(int(math.floor(s)), legs - 1) if not closed else int(math.floor(s)) % legs
        t = s - math.floor(s) if closed or s < legs else 1.0
        a, b = keys[i], keys[(i + 1) % len(keys)]
        qa, qb = quats[i], quats[(i + 1) % len(keys)]
        if np.dot(qa, qb) < 0:
            qb = -qb
        R_c2w = _quat_to_rotation(_slerp(qa, qb, t))
        if center is not None:
            da, db = a.center - center, b.center - center
            ra, rb = np.linalg.norm(da), np.linalg.norm(db)
            pos = center + _slerp(da / ra, db / rb, t) * ((1 - t) * ra + t * rb)
        else:
            pos = (1 - t) * a.center + t * b.center
        w2c = np.eye(4)
        w2c[:3, :3] = R_c2w.T
        w2c[:3, 3] = -R_c2w.T @ pos
        K = (1 - t) * a.K + t * b.scaled(a.width, a.height).K
        out.append(Camera(w2c=w2c, K=K, width=a.width, height=a.height))
    return out


def default_trajectory(cams: Sequence[Camera], num_frames: int) -> list[Camera]:
    """A closed path through the captures, ordered around their centroid (all at the first's size)."""
    sized = [c.scaled(cams[0].width, cams[0].height) for c in cams]
    order = order_around(sized)
    return path_through([sized[i] for i in order], num_frames, closed=True)


# ----------------------------------------------------------------------------------------------
# Generators


# Where a learned generator's weights are: a local folder or hub id, and an optional LoRA file
# (docs/anyrecon.md). Hub downloads happen only when RECONLOOP_ALLOW_DOWNLOAD=1.
WEIGHTS_ENV = "RECONLOOP_{NAME}_WEIGHTS"
LORA_ENV = "RECONLOOP_{NAME}_LORA"
ALLOW_DOWNLOAD_ENV = "RECONLOOP_ALLOW_DOWNLOAD"

_LOADED_GENERATORS: dict[tuple[str, str, str, str], Generator] = {}


def make_generator(name: str, device: torch.device, settings: Settings | None = None) -> Generator:
    """The generator registered under ``name``: built from its defaults (or from the job's
    ``settings`` when it has ``from_settings``), or, for a learned one
    (it has ``from_pretrained``), loaded from ``RECONLOOP_<NAME>_WEIGHTS`` (a folder or hub id;
    default the class's hub id) with ``RECONLOOP_<NAME>_LORA``. A learned generator is loaded once
    per process and reused by later jobs (a 14B model takes minutes to load)."""
    cls = generator_class(name)
    if settings is not None and hasattr(cls, "from_settings"):
        return cls.from_settings(settings)
    if not hasattr(cls, "from_pretrained"):
        return cls()
    weights = os.environ.get(WEIGHTS_ENV.format(NAME=name.upper()), "")
    lora = os.environ.get(LORA_ENV.format(NAME=name.upper()), "")
    key = (name, weights, lora, str(device))
    if key not in _LOADED_GENERATORS:
        kwargs: dict[str, Any] = {"device": device, "local_files_only": os.environ.get(ALLOW_DOWNLOAD_ENV) != "1"}
        if weights:
            kwargs["path_or_hub_id"] = weights
        if lora:
            kwargs["lora_path"] = lora
        try:
            _LOADED_GENERATORS.clear()  # one learned model in memory at a time
            _LOADED_GENERATORS[key] = cls.from_pretrained(**kwargs)
        except (OSError, ValueError) as err:
            raise RuntimeError(
                f"generator {name!r}: cannot load its weights ({err}); set "
                f"{WEIGHTS_ENV.format(NAME=name.upper())} to a local folder (docs/anyrecon.md)"
            ) from err
    return _LOADED_GENERATORS[key]


# ----------------------------------------------------------------------------------------------
# The loop


def _points(memory: GeometryMemory) -> PointArrays:
    xyz, rgb, conf, source = memory_to_ply_arrays(memory)
    return PointArrays(xyz=xyz, rgb=rgb, confidence=conf, source=source)


def run_loop(
    scene: Scene,
    out_dir: Path,
    *,
    device: torch.device | str,
    progress: ProgressFn = no_progress,
    config: LoopConfig | None = None,
    generator: Generator | None = None,
    guide: Gaussians | None = None,
) -> LoopResult:
    """Run the whole loop on ``scene`` and write the job folder ``out_dir``.

    Args:
        scene: a loaded scene (captures, optional trajectory, settings).
        out_dir: the job folder (created).
        device: where the stages run (``cuda``, ``cpu``); picked once by the caller.
        progress: called between steps with every finished artifact; may raise Cancelled.
        config: the loop's config; default ``LoopConfig.from_settings(scene.settings)``.
        generator: a ready generator (e.g. a loaded diffusion model); default: built by
            ``config.generator``'s name.
        guide: ready guide Gaussians, fitted on these captures at the working size with
            ``config.fit`` (e.g. the captures-only fit an evaluation made already); default: fitted
            here when ``config.guide`` is on. Ignored when it is off.
    Returns:
        LoopResult (files written under out_dir, plus in-memory results).
    """
    device = torch.device(device)
    cfg = config or LoopConfig.from_settings(scene.settings, device=device)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    meter = outputs.StageMeter(device)
    artifacts: list[str] = []
    notes: list[str] = []
    done = 0.0

    def report(stage: str, share: float, message: str, names: Sequence[str] = ()) -> None:
        artifacts.extend(names)
        progress(ProgressEvent(stage=stage, fraction=min(done + share, 1.0), message=message, artifacts=tuple(names)))

    def fit_progress(stage: str, start: float, what: str) -> Callable[[int, float], None]:
        """A fit's progress callback: its steps fill ``PROGRESS_SHARES[stage]`` from ``start``."""

        def on_step(step: int, loss: float) -> None:
            fraction = start + PROGRESS_SHARES[stage] * step / max(cfg.fit.iterations, 1)
            progress(
                ProgressEvent(
                    stage=stage,
                    fraction=min(fraction, 1.0),
                    message=f"{what}: step {step}/{cfg.fit.iterations}, loss {loss:.4f}",
                )
            )

        return on_step

    # 0. Captures and cameras: photos as stored (sRGB untouched); SfM for captures without a camera.
    with meter.measure("cameras"):
        cams_found, is_estimated = capture_cameras(scene, notes)
        kept = [i for i, c in enumerate(cams_found) if c is not None]
        if len(kept) < len(cams_found):
            notes.append(f"SfM could not register {len(cams_found) - len(kept)} captures; they are left out")
        used = [scene.captures[i] for i in kept]
        cams_full = [cams_found[i] for i in kept]
        is_estimated = [is_estimated[i] for i in kept]
        pinholes = [undistorted(load_image(c.image), cam) for c, cam in zip(used, cams_full)]
        traj_scene = [t.camera for t in scene.trajectory]
        frame_numbers = [t.frame for t in scene.trajectory]
        if not traj_scene:
            traj_scene = default_trajectory([c for _, c in pinholes], cfg.default_frames)
            frame_numbers = list(range(1, len(traj_scene) + 1))
            notes.append(
                f"the scene has no trajectory: made a closed path of {len(traj_scene)} frames through the captures"
            )
        W, H, note = working_size(cfg, traj_scene)
        if note:
            notes.append(note)
            log.info(note)
        captures = Views(
            images=to_tensor([load_image_array(p, W, H) for p, _ in pinholes], device),
            cams=Cameras.from_scene([c for _, c in pinholes], W, H, device=device),
            ids=list(range(len(pinholes))),  # = memory.source ids: indices into the captures used
        )
        targets_all = Cameras.from_scene(traj_scene, W, H, device=device)
    capture_records = [
        outputs.CaptureCamera(name=c.name, image=os.path.relpath(c.image, scene.root), camera=cam, is_estimated=est)
        for c, cam, est in zip(used, cams_full, is_estimated)
    ]
    report(
        "cameras",
        PROGRESS_SHARES["cameras"],
        f"{len(captures)} captures at {W}x{H}; "
        f"{sum(is_estimated)} cameras estimated; {len(traj_scene)} trajectory frames",
    )
    done += PROGRESS_SHARES["cameras"]

    # 1. Geometry memory M from the posed captures.
    with meter.measure("memory"):
        memory = build_memory(captures, cfg.memory, estimator=cfg.estimator)
    memory_initial = memory
    outputs.write_points(out_dir / outputs.POINTS_FILE, _points(memory))
    cams_name = outputs.write_cameras(out_dir, capture_records, list(zip(frame_numbers, traj_scene)))
    report(
        "memory", PROGRESS_SHARES["memory"], f"initial memory: {len(memory)} points", [outputs.POINTS_FILE, cams_name]
    )
    done += PROGRESS_SHARES["memory"]

    # 1b. The guide: Gaussians on the captures alone, rendered for the generator.
    guide_depth = None  # the guide's depth in the captures where it is opaque, else 0 [N, H, W]
    if not (cfg.guide and cfg.has_fit):
        guide = None
    else:
        with meter.measure("guide"):
            if guide is None:
                guide = fit_gaussians(
                    FitViews.from_views(captures),
                    memory,
                    cfg.fit,
                    device=device,
                    progress=fit_progress("guide", done, "guide Gaussians on the captures"),
                )
            guide_depth = render_guide(guide, captures.cams, cfg)[1]
        report("guide", PROGRESS_SHARES["guide"], f"guide: {len(guide)} Gaussians on the captures alone")
    done += PROGRESS_SHARES["guide"]

    # 2. Segments of the trajectory.
    segments = split_segments(len(targets_all), cfg.segments)
    gen = generator or make_generator(cfg.generator, device, scene.settings)
    if hasattr(gen, "prepare"):  # a generator that learns from the captures first (``refine``)
        with meter.measure("prepare"):
            gen.prepare(
                captures,
                memory,
                cfg,
                device=device,
                progress=lambda f, msg: progress(ProgressEvent(stage="prepare", fraction=done, message=msg)),
            )
    F_all = len(targets_all)
    frame_images = torch.zeros(F_all, H, W, 3, device=device)
    frame_conf = torch.zeros(F_all, H, W, device=device)
    render_rgb = torch.zeros(F_all, H, W, 3, device=device)  # kept for overview.png
    traj_cams_scene = targets_all.to_scene()
    seg_share = PROGRESS_SHARES["segments"] / max(len(segments), 1)
    for k, seg in enumerate(segments):
        targets = targets_all[seg.indices]
        # 3. Retrieval: captures that cover this segment's views of M.
        with meter.measure("retrieval"):
            picked = retrieve_views(memory, targets, captures.cams, cfg.retrieval)
        # 4. Render M into the segment's cameras (and the retrieved captures, for occlusion tests).
        with meter.measure("render"):
            renders = render_memory(memory, targets, cfg.render)
            depth = None
            if cfg.occlusion_test and picked:
                depth = render_memory(memory, captures.cams[picked], cfg.render).depth
                if guide_depth is not None:
                    depth = torch.where(guide_depth[picked] > 0, guide_depth[picked], depth)
        retrieved = Views(captures.images[picked], captures.cams[picked], [captures.ids[i] for i in picked], depth)
        render_rgb[seg.indices] = renders.rgb
        if guide is not None:
            with meter.measure("render"):
                renders = guided_renders(renders, guide, targets, cfg)
        # 5. Generate the frames: [retrieved captures ; carried frames ; renders].
        carried_idx = list(seg.carried)
        carried = Views(frame_images[carried_idx], targets_all[carried_idx], [-1] * len(carried_idx))
        cond = ConditionVideo(targets=targets, renders=renders, memory=retrieved, carried=carried, prompt=cfg.prompt)
        with meter.measure("generate"):
            frames = gen.generate(cond, num_steps=cfg.num_steps, seed=cfg.seed + k)
        frame_images[seg.indices] = frames.images
        frame_conf[seg.indices] = frames.confidence
        names = outputs.write_frames(
            out_dir,
            [frame_numbers[i] for i in seg.indices],
            frames.images,
            frames.confidence,
            [traj_cams_scene[i] for i in seg.indices],
        )
        covered = float(renders.mask.float().mean())
        # 6. Update M with the generated frames (the closed loop).
        if cfg.update.enabled:
            with meter.measure("update"):
                memory = update_memory(
                    memory,
                    Views(frames.images, targets, [-1] * len(targets)),
                    renders,
                    frames.confidence,
                    captures,
                    cfg.update,
                )
        report(
            "generate",
            seg_share,
            f"segment {k + 1}/{len(segments)}: frames {seg.start + 1}-{seg.stop}, "
            f"{len(picked)} captures retrieved, {covered:.0%} of pixels rendered, memory {len(memory)} points",
            names,
        )
        done += seg_share
    outputs.write_points(out_dir / outputs.POINTS_FINAL_FILE, _points(memory))
    report("update", 0.0, f"final memory: {len(memory)} points", [outputs.POINTS_FINAL_FILE])

    # 7. Fit Gaussians on captures (confidence 1) and generated frames (their confidence), from M.
    gaussians = None
    if cfg.has_fit:
        generated = torch.ones(F_all, dtype=torch.bool)
        fit_views = fit_views_for(
            captures, FitViews(frame_images, targets_all, frame_conf, generated), cfg.capture_share
        )
        with meter.measure("fit"):
            start = memory if cfg.fit_init == "final" else memory_initial
            gaussians = fit_gaussians(
                fit_views, start, cfg.fit, device=device, progress=fit_progress("fit", done, "Gaussians")
            )
        outputs.write_gaussians(out_dir / outputs.GAUSSIANS_FILE, gaussians_to_arrays(gaussians))
        report(
            "fit",
            PROGRESS_SHARES["fit"],
            f"{len(gaussians)} Gaussians after {cfg.fit.iterations} steps",
            [outputs.GAUSSIANS_FILE],
        )
    done += PROGRESS_SHARES["fit"]

    # Outputs: overview.png and metrics.json.
    with meter.measure("outputs"):
        rows = overview_rows(captures, render_rgb, frame_images, gaussians, targets_all, cfg)
        overview_name = outputs.write_overview(out_dir, rows)
    metrics = {
        "scene": str(scene.root),
        "working_size": [W, H],
        "captures": len(captures),
        "frames": F_all,
        "segments": len(segments),
        "generator": cfg.generator,
        "update_memory": cfg.update.enabled,
        "points_initial": len(memory_initial),
        "points_final": len(memory),
        "gaussians": len(gaussians) if gaussians is not None else 0,
        "fit_iterations": cfg.fit.iterations if cfg.has_fit else 0,
        "mean_confidence": float(frame_conf.mean()),
        "notes": notes,
        "timing": meter.summary(),
    }
    metrics_name = outputs.write_metrics(out_dir, metrics)
    report("outputs", PROGRESS_SHARES["outputs"], "overview and metrics written", [overview_name, metrics_name])

    return LoopResult(
        out_dir=out_dir,
        artifacts=artifacts,
        memory_initial=memory_initial,
        memory_final=memory,
        frames=Frames(frame_images, frame_conf),
        trajectory=targets_all,
        frame_numbers=frame_numbers,
        captures=captures,
        gaussians=gaussians,
        metrics=metrics,
    )


def render_guide(guide: Gaussians, cams: Cameras, cfg: LoopConfig) -> tuple[Tensor, Tensor]:
    """The guide's colour [C, H, W, 3] and expected depth [C, H, W], the depth 0 where it is not
    opaque (alpha below ``cfg.guide_alpha``)."""
    rgb, depth, alpha = render_gaussians_geometry(guide, cams, cfg.fit)
    return rgb, torch.where(alpha >= cfg.guide_alpha, depth.clamp_min(0.0), torch.zeros_like(depth))


def guided_renders(renders: Renders, guide: Gaussians, targets: Cameras, cfg: LoopConfig) -> Renders:
    """The memory's renders with the guide Gaussians' colour and expected depth where they are
    opaque (:func:`render_guide`); those pixels have source -1 (no capture id). Shapes as
    :class:`Renders` [C, H, W(, 3)]."""
    rgb, depth = render_guide(guide, targets, cfg)
    opaque = depth > 0
    return Renders(
        rgb=torch.where(opaque[..., None], rgb, renders.rgb),
        depth=torch.where(opaque, depth, renders.depth),
        mask=renders.mask | opaque,
        source=torch.where(opaque, torch.full_like(renders.source, -1), renders.source),
    )


def load_image_array(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """Resize an 8-bit image (bilinear with antialiasing). uint8 [height, width, 3]"""
    if image.shape[:2] == (height, width):
        return image
    return np.asarray(Image.fromarray(image).resize((width, height), Image.BILINEAR))


def fit_views_for(captures: Views, frames: FitViews, capture_share: float) -> FitViews:
    """Captures (confidence 1), repeated so that about ``capture_share`` of the list are captures,
    followed by the generated frames."""
    C, F_ = len(captures), len(frames)
    repeats = max(1, math.ceil(capture_share / (1.0 - capture_share) * F_ / max(C, 1))) if capture_share > 0 else 1
    caps = FitViews.from_views(captures)
    return FitViews.cat([caps] * repeats + [frames])


def spread(n: int, count: int) -> list[int]:
    """``min(count, n)`` indices spread evenly over range(n), first and last included."""
    k = min(count, n)
    return sorted({round(i * (n - 1) / max(k - 1, 1)) for i in range(k)})


def overview_rows(
    captures: Views, renders: Tensor, frames: Tensor, gaussians: Any, targets: Cameras, cfg: LoopConfig
) -> list[list[np.ndarray]]:
    """Rows of [capture | render with holes | generated frame | Gaussian render] at evenly spread frames
    (no Gaussian column when ``gaussians`` is None)."""
    picks = spread(len(targets), cfg.overview_rows)
    splats = render_gaussians(gaussians, targets[picks], cfg.fit) if gaussians is not None else None
    rows = []
    for r, i in enumerate(picks):
        tiles = [captures.images[r % len(captures)], renders[i], frames[i]]
        if splats is not None:
            tiles.append(splats[r])
        rows.append([outputs.to_u8(t) for t in tiles])
    return rows
