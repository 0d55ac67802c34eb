"""NeRF / nerfstudio ``transforms.json`` in and out.

Each frame has ``file_path`` (relative to the json's folder; NeRF's synthetic scenes leave out the
suffix) and ``transform_matrix``, a camera-to-world in OpenGL axes (x right, y up, z backward);
``c2w_cv = c2w_gl @ diag(1, -1, -1, 1)``. Intrinsics sit at the top level or per frame (per frame
wins): ``fl_x``/``fl_y``/``cx``/``cy``/``w``/``h`` (nerfstudio) or ``camera_angle_x``/``camera_angle_y``
(NeRF: fx = w / 2 / tan(angle_x / 2)); ``cx``/``cy`` default to the image centre and ``w``/``h`` to the
image's size. Distortion ``k1 k2 p1 p2`` (and ``k3``) is nerfstudio's OPENCV camera model. Held-out
views are frames named in ``test_filenames`` or ``val_filenames`` (nerfstudio), or the frames of
``transforms_test.json`` beside ``transforms_train.json`` (NeRF).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from backend.fileio import write_atomic
from backend.formats.base import (
    EXPORTERS,
    IMPORTERS,
    ImportedScene,
    capture_name,
    intrinsics,
    make_camera,
    resolve_in,
    w2c_from_c2w,
)
from backend.scene import IMAGE_SUFFIXES, Camera, Capture, Distortion, Scene, SceneError, image_size, relative_posix

TRANSFORMS_FILES = ("transforms.json", "transforms_train.json")
TEST_FILE = "transforms_test.json"
HELDOUT_KEYS = ("test_filenames", "val_filenames")
GL_TO_CV = np.diag([1.0, -1.0, -1.0, 1.0])  # flips y and z: OpenGL camera axes <-> OpenCV
PERSPECTIVE_MODELS = ("OPENCV", "PINHOLE", "SIMPLE_PINHOLE", "SIMPLE_RADIAL", "RADIAL")
DIST_KEYS = ("k1", "k2", "p1", "p2", "k3", "k4")
INTRINSIC_KEYS = ("fl_x", "fl_y", "cx", "cy", "w", "h", "camera_angle_x", "camera_angle_y", *DIST_KEYS)
FOCAL_KEYS = (("fl_x", "camera_angle_x"), ("fl_y", "camera_angle_y"))  # each axis's focal, in pixels or as an angle


def _number(d: dict, key: str, where: str) -> float:
    v = d[key]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise SceneError(f"{where}.{key}: must be a finite number; got {v!r}")
    return float(v)


def _field_of_view(intr: dict, key: str, where: str) -> float:
    """A field of view in radians, strictly between 0 and pi (a pinhole camera sees less than half the sphere)."""
    angle = _number(intr, key, where)
    if not 0.0 < angle < math.pi:
        raise SceneError(f"{where}.{key}: must be between 0 and pi radians; got {angle!r}")
    return angle


def _image_path(folder: Path, file_path: Any, where: str) -> Path:
    if not isinstance(file_path, str) or not file_path:
        raise SceneError(f"{where}.file_path: missing or not a string")
    path = (folder / file_path).resolve()
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        for suffix in IMAGE_SUFFIXES:
            if path.with_name(path.name + suffix).is_file():
                return path.with_name(path.name + suffix)
    if not path.is_file():
        raise SceneError(f"{where}.file_path: image file not found: {path}")
    return path


def _distortion(intr: dict, where: str) -> Distortion | None:
    k = {key: _number(intr, key, where) if key in intr else 0.0 for key in DIST_KEYS}
    if k["k4"] != 0.0:
        raise SceneError(f"{where}.k4: only k1 k2 k3 p1 p2 are supported; got k4 = {k['k4']:g}")
    if k["k3"] != 0.0:
        return Distortion("FULL_OPENCV", (k["k1"], k["k2"], k["p1"], k["p2"], k["k3"], 0.0, 0.0, 0.0))
    if any(k[key] != 0.0 for key in ("k1", "k2", "p1", "p2")):
        return Distortion("OPENCV", (k["k1"], k["k2"], k["p1"], k["p2"]))
    return None


def _frame_camera(frame: dict, top: dict, image: Path, where: str) -> Camera:
    intr = {key: top[key] for key in INTRINSIC_KEYS if key in top}
    for keys in FOCAL_KEYS:  # a frame's focal replaces the top level's, given either way
        if any(key in frame for key in keys):
            for key in keys:
                intr.pop(key, None)
    intr.update({key: frame[key] for key in INTRINSIC_KEYS if key in frame})
    model = frame.get("camera_model", top.get("camera_model", "OPENCV"))
    if model not in PERSPECTIVE_MODELS:
        raise SceneError(
            f"{where}.camera_model: {model!r} is not supported; supported: {', '.join(PERSPECTIVE_MODELS)}"
        )
    if "w" in intr and "h" in intr:
        width, height = int(_number(intr, "w", where)), int(_number(intr, "h", where))
    else:
        width, height = image_size(image)
    if "fl_x" in intr:
        fx = _number(intr, "fl_x", where)
    elif "camera_angle_x" in intr:
        fx = 0.5 * width / math.tan(0.5 * _field_of_view(intr, "camera_angle_x", where))
    else:
        raise SceneError(f"{where}: needs fl_x or camera_angle_x, at the top level or in the frame")
    if "fl_y" in intr:
        fy = _number(intr, "fl_y", where)
    elif "camera_angle_y" in intr:
        fy = 0.5 * height / math.tan(0.5 * _field_of_view(intr, "camera_angle_y", where))
    else:
        fy = fx
    cx = _number(intr, "cx", where) if "cx" in intr else width / 2
    cy = _number(intr, "cy", where) if "cy" in intr else height / 2
    if frame.get("transform_matrix") is None:
        raise SceneError(f"{where}.transform_matrix: missing")
    try:
        c2w_gl = np.asarray(frame["transform_matrix"], dtype=np.float64)
    except (TypeError, ValueError):
        raise SceneError(f"{where}.transform_matrix: must be a 4x4 or 3x4 matrix of numbers") from None
    if c2w_gl.shape == (3, 4):
        c2w_gl = np.vstack([c2w_gl, [0.0, 0.0, 0.0, 1.0]])
    if c2w_gl.shape != (4, 4):
        raise SceneError(f"{where}.transform_matrix: must be a 4x4 or 3x4 matrix; got shape {c2w_gl.shape}")
    if not np.all(np.isfinite(c2w_gl)):
        raise SceneError(f"{where}.transform_matrix: must be finite; it holds NaN or infinity")
    w2c = w2c_from_c2w(c2w_gl @ GL_TO_CV)
    return make_camera(w2c, intrinsics(fx, fy, cx, cy), width, height, where, _distortion(intr, where))


def _read_frames(json_path: Path) -> tuple[dict, list[tuple[str, Capture]]]:
    try:
        top = json.loads(json_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise SceneError(f"{json_path.name}: not valid JSON: {err}") from None
    frames = top.get("frames") if isinstance(top, dict) else None
    if not isinstance(frames, list) or not frames:
        raise SceneError(f"{json_path.name}.frames: must be a non-empty list")
    out = []
    for i, frame in enumerate(frames):
        where = f"{json_path.name}.frames[{i}]"
        if not isinstance(frame, dict):
            raise SceneError(f"{where}: must be an object")
        image = _image_path(json_path.parent, frame.get("file_path"), where)
        camera = _frame_camera(frame, top, image, where)
        out.append((frame["file_path"], Capture(name=image.stem, image=image, camera=camera)))
    stems = [c.name for _, c in out]
    if len(set(stems)) != len(stems):  # same file name in several folders: name by the path as written
        out = [(p, replace(c, name=capture_name(os.path.normpath(p)))) for p, c in out]
    return top, out


def read_nerf(src: Path, *, cameras: str | None = None) -> ImportedScene:
    """Read ``transforms.json`` (nerfstudio) or ``transforms_train.json`` plus ``transforms_test.json`` (NeRF).

    Args:
        src: the json file or its folder.
        cameras: the json file, relative to ``src``, when ``src`` is a folder.
    """
    src = Path(src)
    if cameras is not None:
        json_path = resolve_in(src, cameras)
    elif src.is_file():
        json_path = src
    else:
        json_path = next((src / n for n in TRANSFORMS_FILES if (src / n).is_file()), src / TRANSFORMS_FILES[0])
    if not json_path.is_file():
        raise SceneError(f"cameras: {json_path} not found")
    top, frames = _read_frames(json_path)
    for key in HELDOUT_KEYS:
        names = top.get(key, [])
        if not isinstance(names, list) or not all(isinstance(p, str) for p in names):
            raise SceneError(f"{json_path.name}.{key}: must be a list of file paths (strings)")
    held_paths = {os.path.normpath(p) for key in HELDOUT_KEYS for p in top.get(key, [])}
    captures = [c for p, c in frames if os.path.normpath(p) not in held_paths]
    heldout = [c for p, c in frames if os.path.normpath(p) in held_paths]
    test_path = json_path.parent / TEST_FILE
    if json_path.name == TRANSFORMS_FILES[1] and test_path.is_file():
        heldout += [c for _, c in _read_frames(test_path)[1]]
    return ImportedScene(captures=captures, heldout=heldout)


def _intrinsics_json(cam: Camera, where: str) -> dict[str, Any]:
    K = cam.K
    if K[0, 1] != 0.0:
        raise ValueError(f"{where}.K: transforms.json has no skew; got K[0,1] = {K[0, 1]:g}")
    out: dict[str, Any] = {
        "fl_x": K[0, 0],
        "fl_y": K[1, 1],
        "cx": K[0, 2],
        "cy": K[1, 2],
        "w": cam.width,
        "h": cam.height,
    }
    dist = cam.distortion
    if dist is not None and not dist.is_identity:
        k = dist.to_opencv()
        if np.any(k[5:] != 0.0):
            raise ValueError(
                f"{where}.distortion: transforms.json holds k1 k2 k3 p1 p2; got {dist.model} {dist.params}"
            )
        out.update(k1=k[0], k2=k[1], p1=k[2], p2=k[3])
        if len(k) > 4:
            out["k3"] = k[4]
    return {key: float(v) if isinstance(v, (float, np.floating)) else v for key, v in out.items()}


def export_nerf(scene: Scene, dst: Path) -> Path:
    """Write a nerfstudio ``transforms.json`` for the captures and held-out views.

    Intrinsics go to the top level when every view shares them, else into each frame. Held-out views
    are listed in ``test_filenames``. ``file_path`` is relative to the json's folder.

    Args:
        scene: captures (all with cameras) and held-out views.
        dst: the json file (``*.json``) or the folder to write ``transforms.json`` into.
    Returns:
        Path of the json written.
    """
    dst = Path(dst)
    path = dst if dst.suffix == ".json" else dst / TRANSFORMS_FILES[0]
    views = [(f"captures[{i}]", c) for i, c in enumerate(scene.captures)]
    views += [(f"heldout[{i}]", c) for i, c in enumerate(scene.heldout)]
    frames, intr = [], []
    for where, cap in views:
        if cap.camera is None:
            raise ValueError(f"{where}.camera: missing; transforms.json needs every camera")
        c2w_gl = cap.camera.c2w @ GL_TO_CV
        rel = relative_posix(cap.image, path.parent.resolve())
        frames.append({"file_path": rel, "transform_matrix": c2w_gl.tolist()})
        intr.append(_intrinsics_json(cap.camera, f"{where}.camera"))
    data: dict[str, Any] = {"camera_model": "OPENCV"}
    if all(i == intr[0] for i in intr):
        data.update(intr[0])
    else:
        for frame, i in zip(frames, intr):
            frame.update(i)
    data["frames"] = frames
    if scene.heldout:
        data["test_filenames"] = [f["file_path"] for f in frames[len(scene.captures) :]]
    write_atomic(path, json.dumps(data, indent=1).encode())
    return path


IMPORTERS.register("nerf")(read_nerf)
EXPORTERS.register("nerf")(export_nerf)
