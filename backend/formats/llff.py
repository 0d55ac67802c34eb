"""LLFF ``poses_bounds.npy``: per image a 3x5 matrix [R | t | hwf] and the near/far scene depths.

Each row of the file holds 17 numbers: the camera-to-world 3x4 and the column (H, W, focal) as one
3x5 matrix flattened row by row, then near and far. The rotation's columns are the camera's axes in
LLFF order (down, right, back); OpenCV's are (right, down, forward), so c2w_cv's columns are
(col 1, col 0, -col 2). The world frame is the COLMAP one the poses came from. H, W and the focal are
at full resolution (4032x3024 for the LLFF captures); the principal point is the image centre. K is
scaled to the image folder chosen (``images_8`` holds the images at 1/8).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from backend.formats.base import (
    IMPORTERS,
    ImportedScene,
    find_first,
    intrinsics,
    list_images,
    make_camera,
    resolve_in,
    w2c_from_c2w,
)
from backend.scene import Capture, SceneError, image_size, same_shape

POSES_FILE = "poses_bounds.npy"
POSE_SHAPE = (3, 5)  # [R | t | hwf], flattened row by row into the first 15 numbers of a row
NEAR, FAR = 15, 16  # then the near and far depth
POSE_COLUMNS = 17
# Image folders tried in order when none is named: the NeRF protocol works on images_8 for LLFF.
IMAGE_CANDIDATES = ("images_8", "images_4", "images")
LLFF_TO_OPENCV_COLUMNS = [1, 0, 2]  # (down, right, back) -> (right, down, back) ...
LLFF_TO_OPENCV_SIGNS = np.array([1.0, 1.0, -1.0])  # ... -> (right, down, forward)


def read_llff(src: Path, *, cameras: str | None = None, images: str | None = None) -> ImportedScene:
    """Read an LLFF scene folder.

    Args:
        src: folder holding ``poses_bounds.npy`` and the image folders.
        cameras: the poses file, relative to ``src`` (default ``poses_bounds.npy``).
        images: the image folder, relative to ``src`` (default: first of images_8, images_4, images).
    Returns:
        captures in file order (image files sorted by name) and near/far bounds per capture.
    """
    src = Path(src)
    poses_path = resolve_in(src, cameras or POSES_FILE)
    if not poses_path.is_file():
        raise SceneError(f"cameras: {poses_path} not found")
    try:
        data = np.load(poses_path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:  # EOFError: an empty file
        raise SceneError(f"cameras: {poses_path} is not a numpy array file: {err}") from None
    if data.ndim != 2 or data.shape[1] != POSE_COLUMNS:
        raise SceneError(f"{poses_path.name}: must be [N, {POSE_COLUMNS}]; got shape {data.shape}")
    if not (np.issubdtype(data.dtype, np.integer) or np.issubdtype(data.dtype, np.floating)):
        raise SceneError(f"{poses_path.name}: must hold real numbers; got dtype {data.dtype}")
    if len(data) == 0:
        raise SceneError(f"{poses_path.name}: holds no poses")
    image_dir = resolve_in(src, images) if images else find_first(src, IMAGE_CANDIDATES, "images", is_dir=True)
    files = list_images(image_dir)
    if len(files) != len(data):
        raise SceneError(f"images: {image_dir} holds {len(files)} images; {poses_path.name} has {len(data)} poses")
    width, height = image_size(files[0])
    captures, bounds = [], {}
    for i, (row, path) in enumerate(zip(data.astype(np.float64), files)):
        where = f"{poses_path.name}[{i}]"
        pose = row[:NEAR].reshape(POSE_SHAPE)
        full_h, full_w, focal = pose[:, 4]
        c2w = np.eye(4)
        c2w[:3, :3] = pose[:, LLFF_TO_OPENCV_COLUMNS] * LLFF_TO_OPENCV_SIGNS
        c2w[:3, 3] = pose[:, 3]
        if not np.all(np.isfinite(pose)):
            raise SceneError(f"{where}: the pose must be finite; it holds NaN or infinity")
        if full_w <= 0 or full_h <= 0:
            raise SceneError(f"{where}: the image size must be positive; got hwf {pose[:, 4].tolist()}")
        if not same_shape(width, height, full_w, full_h):  # K would stretch one axis against the other
            raise SceneError(
                f"{where}: hwf says {full_w:g}x{full_h:g} photos, another shape than the images' {width}x{height}: "
                "the photos were rotated or cropped since the poses were made; use the photos the poses were made for"
            )
        K_full = intrinsics(focal, focal, full_w / 2, full_h / 2)
        K = K_full * np.array([[width / full_w], [height / full_h], [1.0]])
        if image_size(path) != (width, height):
            raise SceneError(f"images: {path.name} is {image_size(path)}, the first image {width}x{height}")
        camera = make_camera(w2c_from_c2w(c2w), K, width, height, where)
        near, far = float(row[NEAR]), float(row[FAR])
        if not 0.0 < near < far < math.inf:
            raise SceneError(f"{where}: bounds must be finite with 0 < near < far; got near {near!r}, far {far!r}")
        captures.append(Capture(name=path.stem, image=path.resolve(), camera=camera))
        bounds[path.stem] = (near, far)
    return ImportedScene(captures=captures, bounds=bounds)


IMPORTERS.register("llff")(read_llff)
