"""DTU as prepared by IDR/NeuS: ``cameras.npz`` (or ``cameras_sphere.npz``) beside an image folder.

For image i the file holds ``world_mat_i``, the 3x4 projection P = s K [R | t] (in a 4x4), and
``scale_mat_i``, which maps the unit sphere around the object to the world. With ``use_scale_mat``
(default, as IDR and NeuS do) the cameras are those of P @ scale_mat, so the object sits in the unit
sphere; else the world frame of P. P is split by an RQ decomposition (numpy); the sign of P
is chosen so that det P[:, :3] > 0 and K's diagonal is made positive (K D, D R with D = diag(+-1)),
which leaves R a proper rotation. IDR and NeuS cast the ray of pixel (row, column) through the
integer point (column, row), so their K puts pixel centres at integer coordinates; ours spans pixel i
over [i, i+1], so the principal point moves by half a pixel (:data:`PIXEL_CENTRE_SHIFT`).

NeuS's ``cameras_sphere.npz`` also holds ``world_mat_inv_i``, ``scale_mat_inv_i`` and ``camera_mat_i``
(and their inverses) per image; only ``world_mat_i`` and ``scale_mat_i`` are read, and the cameras
are counted by the keys that match ``world_mat_<digits>`` exactly. The object masks of a ``mask/``
folder beside the images (IDR, NeuS: one PNG per image, in the same order, white on the object) become
the captures' masks.
"""

from __future__ import annotations

import re
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from backend.formats.base import (
    IMPORTERS,
    ImportedScene,
    check_principal_point,
    find_first,
    list_images,
    make_camera,
    resolve_in,
    w2c_from_rt,
    without_negligible_skew,
)
from backend.formats.undistort import HALF_PIXEL
from backend.scene import Capture, SceneError, image_size

CAMERA_FILES = ("cameras.npz", "cameras_sphere.npz", "cameras_large.npz")
IMAGE_CANDIDATES = ("image", "images")
MASK_CANDIDATES = ("mask", "masks")
WORLD_MAT_KEY = re.compile(r"world_mat_(\d+)")
CAMERA_KEY = re.compile(r"(world|scale)_mat_\d+")  # the entries read: others (NeuS's inverses, a tool's notes) are not
WORLD_MAT = "world_mat_{}"
SCALE_MAT = "scale_mat_{}"
PIXEL_CENTRE_SHIFT = HALF_PIXEL  # IDR's pixel centres at integers, ours at i + 0.5


def _entry(npz: Any, key: str, name: str) -> np.ndarray:
    """One array of an .npz: an entry numpy cannot read without pickle (an object array) is named."""
    try:
        return npz[key]
    except ValueError as err:
        raise SceneError(f"{name}[{key}]: cannot be read: {err}") from None


def decompose_projection(P: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Split a projection matrix P = s K [R | t] (any non-zero scale s, either sign).

    Args:
        P: projection, world to homogeneous pixels. [3, 4]
    Returns:
        (K, R, t): K upper triangular with positive focals and K[2,2] = 1 [3, 3]; R a rotation
        (det +1), world to camera, OpenCV axes [3, 3]; t [3].
    """
    P = np.asarray(P, dtype=np.float64)
    if np.linalg.det(P[:, :3]) < 0:
        P = -P
    M = P[:, :3]
    # RQ decomposition M = K R from numpy's QR of the row-reversed transpose (numpy only: runs in Blender).
    flip = np.eye(3)[::-1]
    Q, U = np.linalg.qr((flip @ M).T)
    K, R = flip @ U.T @ flip, flip @ Q.T
    D = np.diag(np.sign(np.diag(K)))
    K, R = K @ D, D @ R
    K = np.triu(K / K[2, 2])
    center = -np.linalg.solve(M, P[:, 3])
    return K, R, -R @ center


def read_dtu(
    src: Path,
    *,
    cameras: str | None = None,
    images: str | None = None,
    masks: str | None = None,
    use_scale_mat: bool = True,
) -> ImportedScene:
    """Read an IDR/NeuS DTU scene folder.

    Args:
        src: folder holding the camera file and the image folder.
        cameras: the camera file, relative to ``src`` (default: first of cameras.npz, cameras_sphere.npz,
            cameras_large.npz).
        images: the image folder, relative to ``src`` (default ``image`` or ``images``); image i is the
            i-th file by name.
        masks: the mask folder, relative to ``src`` (default ``mask`` or ``masks`` when present); mask
            i is the i-th file by name.
        use_scale_mat: cameras in the normalised frame (P @ scale_mat_i) instead of P's world.
    """
    src = Path(src)
    npz_path = resolve_in(src, cameras) if cameras else find_first(src, CAMERA_FILES, "cameras", is_dir=False)
    if not npz_path.is_file():
        raise SceneError(f"cameras: {npz_path} not found")
    image_dir = resolve_in(src, images) if images else find_first(src, IMAGE_CANDIDATES, "images", is_dir=True)
    files = list_images(image_dir)
    try:
        with np.load(npz_path, allow_pickle=False) as npz:
            wanted = CAMERA_KEY if use_scale_mat else WORLD_MAT_KEY
            mats = {key: _entry(npz, key, npz_path.name) for key in npz.files if wanted.fullmatch(key)}
    except SceneError:
        raise
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as err:  # empty, cut short, or not an .npz
        raise SceneError(f"cameras: {npz_path} is not a numpy .npz file: {err}") from None
    count = sum(1 for key in mats if WORLD_MAT_KEY.fullmatch(key))
    if count != len(files):
        raise SceneError(f"images: {image_dir} holds {len(files)} images; {npz_path.name} has {count} cameras")
    mask_files = _mask_files(src, masks, len(files))
    captures = []
    for i, path in enumerate(files):
        where = f"{npz_path.name}[{WORLD_MAT.format(i)}]"
        if WORLD_MAT.format(i) not in mats:
            raise SceneError(f"{where}: missing")
        P = _matrix(mats[WORLD_MAT.format(i)], where, ((4, 4), (3, 4)))
        if use_scale_mat:
            if SCALE_MAT.format(i) not in mats:
                raise SceneError(f"{npz_path.name}[{SCALE_MAT.format(i)}]: missing (or read with use_scale_mat=False)")
            P = P @ _matrix(mats[SCALE_MAT.format(i)], f"{npz_path.name}[{SCALE_MAT.format(i)}]", ((4, 4),))
        if np.linalg.matrix_rank(P[:3, :3]) < 3:
            raise SceneError(f"{where}: the projection's left 3x3 block is singular; no camera has it")
        K, R, t = decompose_projection(P[:3, :4])
        K[:2, 2] += PIXEL_CENTRE_SHIFT
        width, height = image_size(path)
        K = without_negligible_skew(K, height)
        check_principal_point(K, width, height, where, path.name, "DTU's are 1600x1200")
        camera = make_camera(w2c_from_rt(R, t), K, width, height, where)
        mask = mask_files[i].resolve() if mask_files else None
        if mask is not None and image_size(mask) != (width, height):
            w, h = image_size(mask)
            raise SceneError(f"masks: {mask.name} is {w}x{h}; its image {path.name} is {width}x{height}")
        captures.append(Capture(name=path.stem, image=path.resolve(), camera=camera, mask=mask))
    return ImportedScene(captures=captures)


def _matrix(value: np.ndarray, where: str, shapes: tuple[tuple[int, int], ...]) -> np.ndarray:
    """A finite float64 matrix of one of ``shapes``; else SceneError naming ``where``."""
    try:
        m = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise SceneError(f"{where}: must be a matrix of numbers; got dtype {np.asarray(value).dtype}") from None
    if m.shape not in shapes or not np.all(np.isfinite(m)):
        want = " or ".join(f"{r}x{c}" for r, c in shapes)
        raise SceneError(f"{where}: must be a finite {want} matrix; got shape {m.shape}")
    return m


def _mask_files(src: Path, masks: str | None, count: int) -> list[Path]:
    """The mask files, one per image in name order; empty when the scene has no mask folder."""
    if masks:
        folder = resolve_in(src, masks)
    else:
        found = [src / name for name in MASK_CANDIDATES if (src / name).is_dir()]
        if not found:
            return []
        folder = found[0]
    files = list_images(folder)
    if len(files) != count:
        raise SceneError(f"masks: {folder} holds {len(files)} masks for {count} images")
    return files


IMPORTERS.register("dtu")(read_dtu)
