"""What every scene importer and exporter shares: the registries, the reader result, small helpers.

An importer is a function ``read_<format>(src, *, cameras=None, images=None, ...) -> ImportedScene``
registered in :data:`IMPORTERS`; ``cameras`` names the camera file or model folder inside ``src``
and ``images`` the image folder, each found by itself when left out. An exporter is a function
``export_<format>(scene, dst) -> Path`` registered in :data:`EXPORTERS`. Every camera an importer
returns is in our convention (DESIGN.md section 3): OpenCV world-to-camera, K in pixels with pixel
i spanning [i, i+1].
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from backend.registry import Registry
from backend.scene import IMAGE_SUFFIXES, Camera, Capture, Distortion, SceneError, check_camera_arrays


@dataclass(frozen=True)
class ImportedScene:
    """What a reader found in a source folder, before holdout, undistortion and saving.

    Attributes:
        captures: photos with their cameras, in the format's order.
        heldout: views the format itself marks for testing (a NeRF ``test`` split), else empty.
        bounds: near and far scene depth per capture name (LLFF), else empty.
        masks: masks a reader made (not files of the source) per capture name, bool [H, W]; the
            import writes them as ``DST/masks/<name>.png`` and sets each capture's ``mask``.
    """

    captures: list[Capture]
    heldout: list[Capture] = field(default_factory=list)
    bounds: dict[str, tuple[float, float]] = field(default_factory=dict)
    masks: dict[str, np.ndarray] = field(default_factory=dict)


Importer = Callable[..., ImportedScene]
Exporter = Callable[..., Path]

IMPORTERS: Registry[Any] = Registry("scene import format")
EXPORTERS: Registry[Any] = Registry("scene export format")


def w2c_from_rt(R: np.ndarray, t: np.ndarray) -> np.ndarray:
    """World-to-camera 4x4 from a rotation and a translation (x_cam = R x_world + t).

    Args:
        R: rotation, world to camera. [3, 3]
        t: translation. [3]
    Returns:
        w2c: float64 [4, 4]
    """
    w2c = np.eye(4)
    w2c[:3, :3] = R
    w2c[:3, 3] = np.asarray(t, dtype=np.float64).reshape(3)
    return w2c


def w2c_from_c2w(c2w: np.ndarray) -> np.ndarray:
    """World-to-camera 4x4 of a rigid camera-to-world 4x4, by its rotation's transpose: no matrix
    inverse, so a degenerate pose reaches :func:`make_camera`'s check (which names the entry) instead
    of raising numpy's LinAlgError. A bottom row other than [0, 0, 0, 1] is carried into the result,
    where that check refuses it. float64 [4, 4]"""
    R, t = c2w[:3, :3], c2w[:3, 3]
    w2c = w2c_from_rt(R.T, -R.T @ t)
    w2c[3] = c2w[3]
    return w2c


def intrinsics(fx: float, fy: float, cx: float, cy: float) -> np.ndarray:
    """K in pixels, no skew. float64 [3, 3]"""
    return np.array([[fx, 0.0, cx], [0.0, fy, cy], [0.0, 0.0, 1.0]])


def make_camera(
    w2c: np.ndarray, K: np.ndarray, width: int, height: int, where: str, distortion: Distortion | None = None
) -> Camera:
    """A checked Camera; a bad one raises SceneError naming ``where`` (the source file and entry).

    Args:
        w2c: world-to-camera, OpenCV. [4, 4]
        K: intrinsics in pixels, pixel i spans [i, i+1]. [3, 3]
        width, height: image size in pixels.
        where: what to name in an error, e.g. ``"poses_bounds.npy[3]"``.
        distortion: lens distortion, or None.
    """
    w2c = np.asarray(w2c, dtype=np.float64)
    K = np.asarray(K, dtype=np.float64)
    check_camera_arrays(w2c, K, int(width), int(height), where)
    return Camera(w2c=w2c, K=K, width=int(width), height=int(height), distortion=distortion)


CENTRE_SHARE = 0.1  # how far a principal point may sit from the photo's centre, as a share of its side
SKEW_MAX_PX = 0.01  # a decomposed projection's skew that moves no pixel further than this is none


def check_principal_point(K: np.ndarray, width: int, height: int, where: str, photo: str, measured_at: str) -> None:
    """SceneError naming ``where`` when K's principal point sits far from the centre of the ``width`` x ``height``
    photo: the photos were resized or cropped since the intrinsics (measured at ``measured_at``) were."""
    if abs(K[0, 2] / width - 0.5) > CENTRE_SHARE or abs(K[1, 2] / height - 0.5) > CENTRE_SHARE:
        raise SceneError(
            f"{where}: the principal point ({K[0, 2]:g}, {K[1, 2]:g}) is far from the centre of {photo} "
            f"({width}x{height}): the photos were resized or cropped since their intrinsics were measured "
            f"({measured_at}); use the original photos"
        )


def without_negligible_skew(K: np.ndarray, height: int) -> np.ndarray:
    """K with its skew set to 0 where it moves no pixel of a ``height``-pixel photo by more than SKEW_MAX_PX (a
    calibrated projection decomposes with a trace of one; the exporters' formats have no skew)."""
    if abs(K[0, 1]) * height / (2 * K[1, 1]) <= SKEW_MAX_PX:
        K = K.copy()
        K[0, 1] = 0.0
    return K


def list_images(folder: Path) -> list[Path]:
    """PNG and JPEG files of a folder, sorted by name (the order LLFF and IDR rely on)."""
    if not folder.is_dir():
        raise SceneError(f"images: folder not found: {folder}")
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def resolve_in(src: Path, name: str | os.PathLike) -> Path:
    """``name`` relative to ``src`` unless absolute."""
    path = Path(name)
    return path if path.is_absolute() else src / path


def find_first(src: Path, candidates: tuple[str, ...], what: str, *, is_dir: bool) -> Path:
    """The first of ``candidates`` (relative to ``src``) that exists; else SceneError listing them."""
    for name in candidates:
        path = src / name
        if path.is_dir() if is_dir else path.is_file():
            return path
    raise SceneError(f"{what}: none of {', '.join(candidates)} found in {src}")


def capture_name(image_name: str) -> str:
    """A capture's name from an image's name inside its folder: the relative path without suffix."""
    return Path(image_name).with_suffix("").as_posix()
