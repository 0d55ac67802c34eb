"""COLMAP sparse models (text or binary) in, COLMAP text out.

COLMAP's cameras are ours already: world-to-camera (``cam_from_world``), x right, y down, z forward,
and the centre of the top-left pixel at (0.5, 0.5), i.e. pixel i spans [i, i+1]. Only the camera
model's parameter list needs mapping to K plus a :class:`~backend.scene.Distortion`.
Models are read with pycolmap (``pycolmap.Reconstruction`` reads text and binary alike).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

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
    w2c_from_rt,
)
from backend.scene import DISTORTION_PARAMS, Camera, Capture, Distortion, Scene, SceneError, relative_posix

# COLMAP camera model -> (index of fx, fy, cx, cy in its params; our distortion model or None).
# The distortion parameters follow the intrinsics in COLMAP's order, which is OpenCV's order.
COLMAP_CAMERA_MODELS: dict[str, tuple[tuple[int, int, int, int], str | None]] = {
    "SIMPLE_PINHOLE": ((0, 0, 1, 2), None),  # f cx cy
    "PINHOLE": ((0, 1, 2, 3), None),  # fx fy cx cy
    "SIMPLE_RADIAL": ((0, 0, 1, 2), "SIMPLE_RADIAL"),  # f cx cy k
    "RADIAL": ((0, 0, 1, 2), "RADIAL"),  # f cx cy k1 k2
    "OPENCV": ((0, 1, 2, 3), "OPENCV"),  # fx fy cx cy k1 k2 p1 p2
    "FULL_OPENCV": ((0, 1, 2, 3), "FULL_OPENCV"),  # fx fy cx cy k1 k2 p1 p2 k3 k4 k5 k6
}
MODEL_FILES = ("cameras.txt", "cameras.bin")
# Where a COLMAP project keeps its model and its images, relative to the folder given.
MODEL_CANDIDATES = (".", "sparse/0", "sparse")
IMAGE_CANDIDATES = ("images", "../images", "../../images")
SKEW_TOL = 1e-9  # relative to fx: COLMAP cameras have no skew
FLOAT_FORMAT = "{:.17g}"  # enough digits to read back the same float64


# ----------------------------------------------------------------------------------------------
# Cameras


def camera_from_colmap(model: str, width: int, height: int, params: np.ndarray, where: str) -> Camera:
    """Our camera intrinsics (identity pose) from a COLMAP camera model and its parameters.

    Args:
        model: COLMAP model name, one of COLMAP_CAMERA_MODELS.
        width, height: image size in pixels.
        params: COLMAP parameter list. [P]
        where: what to name in errors.
    Returns:
        Camera with w2c = identity, K and distortion set.
    """
    count = _colmap_param_count(model, where)
    (ifx, ify, icx, icy), dist_model = COLMAP_CAMERA_MODELS[model]
    params = np.asarray(params, dtype=np.float64)
    if params.shape != (count,):
        raise SceneError(f"{where}: {model} takes {count} parameters; got {params.tolist()}")
    K = intrinsics(params[ifx], params[ify], params[icx], params[icy])
    n_intr = max(ifx, ify, icx, icy) + 1
    distortion = Distortion(dist_model, tuple(float(v) for v in params[n_intr:])) if dist_model else None
    return make_camera(np.eye(4), K, width, height, where, distortion)


def colmap_camera_params(camera: Camera, where: str) -> tuple[str, list[float]]:
    """The COLMAP model name and parameter list that reproduce ``camera``'s K and distortion.

    One focal length picks SIMPLE_* models; two pick PINHOLE/OPENCV. Raises ValueError for skew,
    which no COLMAP model holds.
    """
    K = camera.K
    fx, fy, cx, cy, skew = K[0, 0], K[1, 1], K[0, 2], K[1, 2], K[0, 1]
    if abs(skew) > SKEW_TOL * fx:
        raise ValueError(f"{where}.K: COLMAP cameras have no skew; got K[0,1] = {skew:g}")
    dist = camera.distortion
    model = dist.model if dist is not None else "NONE"
    params = list(dist.params) if dist is not None else []
    one_focal = fx == fy
    if model == "NONE":
        return ("SIMPLE_PINHOLE", [fx, cx, cy]) if one_focal else ("PINHOLE", [fx, fy, cx, cy])
    if model in ("SIMPLE_RADIAL", "RADIAL") and one_focal:
        return model, [fx, cx, cy, *params]
    if model in ("SIMPLE_RADIAL", "RADIAL", "OPENCV"):
        return "OPENCV", [fx, fy, cx, cy, *[float(v) for v in dist.to_opencv()]]
    return "FULL_OPENCV", [fx, fy, cx, cy, *params]


# ----------------------------------------------------------------------------------------------
# Reading


def find_colmap_model(src: Path, cameras: str | None = None) -> Path:
    """The folder holding cameras/images/points3D (.txt or .bin): ``src/cameras`` if given, else
    ``src``, ``src/sparse/0``, ``src/sparse`` or the one sub-folder of ``src`` that holds a model."""

    def has_model(folder: Path) -> bool:
        return any((folder / f).is_file() for f in MODEL_FILES)

    if cameras is not None:
        folder = resolve_in(src, cameras)
        if not has_model(folder):
            raise SceneError(f"cameras: {folder} holds no COLMAP model ({' or '.join(MODEL_FILES)})")
        return folder
    for name in MODEL_CANDIDATES:
        if has_model(src / name):
            return (src / name).resolve()
    subs = sorted(p for p in src.iterdir() if p.is_dir() and has_model(p)) if src.is_dir() else []
    if len(subs) == 1:
        return subs[0]
    if subs:
        raise SceneError(f"cameras: several COLMAP models in {src} ({', '.join(p.name for p in subs)}); name one")
    raise SceneError(f"cameras: no COLMAP model ({' or '.join(MODEL_FILES)}) in {src} or its sub-folders")


def _rotation_matrix(rotation) -> np.ndarray:
    """Rotation matrix of a pycolmap Rotation3d after normalising its quaternion (text models store
    quaternions rounded to 6 digits, which pycolmap keeps as they are). float64 [3, 3]"""
    from backend.estimators.sfm import import_pycolmap  # the package imports torch; --help must not

    pycolmap = import_pycolmap()

    quat_xyzw = np.asarray(rotation.quat, dtype=np.float64)
    return np.asarray(pycolmap.Rotation3d(quat_xyzw / np.linalg.norm(quat_xyzw)).matrix())


def _colmap_param_count(model: str, where: str) -> int:
    """How many parameters a COLMAP camera model takes; SceneError naming ``where`` for one we do not read."""
    if model not in COLMAP_CAMERA_MODELS:
        raise SceneError(
            f"{where}: camera model {model} is not supported; supported: {', '.join(COLMAP_CAMERA_MODELS)}"
        )
    indices, dist_model = COLMAP_CAMERA_MODELS[model]
    return max(indices) + 1 + (DISTORTION_PARAMS[dist_model] if dist_model else 0)


def _check_text_model(model_dir: Path) -> None:
    """A text model's cameras.txt and images.txt checked line by line before pycolmap reads them (its errors
    name a line of its C++ source, not of the file): SceneError naming the file, the line and the field.
    A binary model (read first by pycolmap where both are there) is left to pycolmap."""
    cameras_txt, images_txt = model_dir / "cameras.txt", model_dir / "images.txt"
    if (model_dir / "cameras.bin").is_file() or not cameras_txt.is_file():
        return
    camera_ids = set()
    for n, line in enumerate(cameras_txt.read_text(errors="replace").splitlines(), start=1):
        fields, where = line.split(), f"cameras.txt line {n}"
        if not fields or fields[0].startswith("#"):
            continue
        if len(fields) < 4:
            raise SceneError(f"{where}: must be CAMERA_ID MODEL WIDTH HEIGHT PARAMS[]; got {len(fields)} fields")
        cam_id, model, width, height = fields[:4]
        if not (cam_id.isdigit() and width.isdigit() and height.isdigit()):
            raise SceneError(
                f"{where}: CAMERA_ID, WIDTH and HEIGHT must be whole numbers; got {cam_id} {width} {height}"
            )
        count = _colmap_param_count(model, where)
        if len(fields) - 4 != count:
            raise SceneError(f"{where}: {model} takes {count} parameters; got {len(fields) - 4}")
        _check_numbers(fields[4:], f"{where}: PARAMS")
        camera_ids.add(int(cam_id))
    if not images_txt.is_file():
        return
    # as COLMAP reads it: blank and comment lines skipped before an image's line; the line after it is its 2D points
    # (possibly empty)
    lines = images_txt.read_text(errors="replace").splitlines()
    k = 0
    while k < len(lines):
        line = lines[k].strip()
        if not line or line.startswith("#"):
            k += 1
            continue
        fields, where = line.split(), f"images.txt line {k + 1}"
        k += 2
        if len(fields) < 10:
            raise SceneError(
                f"{where}: must be IMAGE_ID QW QX QY QZ TX TY TZ CAMERA_ID NAME; got {len(fields)} fields "
                "(each image takes two lines, the second its 2D points, possibly empty)"
            )
        if not fields[0].isdigit() or not fields[8].isdigit():
            raise SceneError(f"{where}: IMAGE_ID and CAMERA_ID must be whole numbers; got {fields[0]} and {fields[8]}")
        _check_numbers(fields[1:8], f"{where}: QW QX QY QZ TX TY TZ")
        if int(fields[8]) not in camera_ids:
            raise SceneError(f"{where}: CAMERA_ID {fields[8]} is not in cameras.txt")


def _check_numbers(fields: list[str], where: str) -> None:
    try:
        values = [float(f) for f in fields]
    except ValueError:
        raise SceneError(f"{where} must be numbers; got {' '.join(fields)}") from None
    if not all(np.isfinite(values)):
        raise SceneError(f"{where} must be finite; got {' '.join(fields)}")


def _read_reconstruction(model_dir: Path):
    from backend.estimators.sfm import import_pycolmap  # the package imports torch; --help must not

    _check_text_model(model_dir)
    pycolmap = import_pycolmap()

    try:
        return pycolmap.Reconstruction(str(model_dir))
    except Exception as err:  # pycolmap raises RuntimeError/ValueError variants for broken files
        raise SceneError(f"cameras: cannot read the COLMAP model in {model_dir}: {err}") from None


def read_colmap(src: Path, *, cameras: str | None = None, images: str | None = None) -> ImportedScene:
    """Read a COLMAP sparse model (text or binary); captures sorted by image name.

    Args:
        src: the model folder or a project folder holding one (``sparse/0`` and the like).
        cameras: the model folder, relative to ``src``; found by itself when None.
        images: the image folder, relative to ``src``; default ``images`` beside the model.
    """
    model_dir = find_colmap_model(Path(src), cameras)
    if images is not None:
        image_dir = resolve_in(Path(src), images)
    else:
        found = [model_dir / c for c in IMAGE_CANDIDATES if (model_dir / c).is_dir()]
        if not found:
            raise SceneError(f"images: no images folder beside {model_dir}; name one")
        image_dir = found[0]
    rec = _read_reconstruction(model_dir)
    intr = {}
    for cam_id, cam in rec.cameras.items():
        intr[cam_id] = camera_from_colmap(
            cam.model.name, cam.width, cam.height, np.asarray(cam.params), f"cameras[{cam_id}]"
        )
    captures = []
    for image in sorted(rec.images.values(), key=lambda im: im.name):
        where = f"images[{image.image_id}] {image.name}"
        if not image.has_pose:
            continue
        path = (image_dir / image.name).resolve()
        if not path.is_file():
            raise SceneError(f"{where}: image file not found: {path}")
        pose = image.cam_from_world()
        cam = intr[image.camera_id]
        camera = make_camera(
            w2c_from_rt(_rotation_matrix(pose.rotation), pose.translation),
            cam.K,
            cam.width,
            cam.height,
            where,
            cam.distortion,
        )
        captures.append(Capture(name=capture_name(image.name), image=path, camera=camera))
    if not captures:
        raise SceneError(f"images: the COLMAP model in {model_dir} has no posed images")
    return ImportedScene(captures=captures)


@dataclass(frozen=True)
class ColmapPoints:
    """A COLMAP model's 3D points and where each image sees them.

    Attributes:
        ids: COLMAP point3D ids. int64 [N]
        xyz: positions, world frame of the model. float64 [N, 3]
        rgb: colours, sRGB. uint8 [N, 3]
        error: mean reprojection error in pixels. float64 [N]
        observations: per capture name (image name without suffix): (index into the N points int64 [M],
            pixel coordinates, pixel i spans [i, i+1], float64 [M, 2]).
    """

    ids: np.ndarray
    xyz: np.ndarray
    rgb: np.ndarray
    error: np.ndarray
    observations: dict[str, tuple[np.ndarray, np.ndarray]]


def read_colmap_points(src: Path, *, cameras: str | None = None) -> ColmapPoints:
    """The 3D points of the COLMAP model in ``src`` (found as :func:`read_colmap` finds it)."""
    rec = _read_reconstruction(find_colmap_model(Path(src), cameras))
    ids = np.array(sorted(rec.points3D.keys()), dtype=np.int64)
    points = [rec.points3D[int(i)] for i in ids]
    xyz = np.array([p.xyz for p in points], dtype=np.float64).reshape(-1, 3)
    rgb = np.array([p.color for p in points], dtype=np.uint8).reshape(-1, 3)
    error = np.array([p.error for p in points], dtype=np.float64)
    index_of = {int(pid): k for k, pid in enumerate(ids)}
    observations = {}
    for image in rec.images.values():
        seen = [(index_of[p.point3D_id], p.xy) for p in image.points2D if p.has_point3D()]
        idx = np.array([s[0] for s in seen], dtype=np.int64)
        uv = np.array([s[1] for s in seen], dtype=np.float64).reshape(-1, 2)
        observations[capture_name(image.name)] = (idx, uv)
    return ColmapPoints(ids=ids, xyz=xyz, rgb=rgb, error=error, observations=observations)


# ----------------------------------------------------------------------------------------------
# Writing


def _line(values) -> str:
    return " ".join(FLOAT_FORMAT.format(v) if isinstance(v, float) else str(v) for v in values)


def export_colmap(
    scene: Scene, dst: Path, *, points: ColmapPoints | None = None, image_root: Path | None = None
) -> Path:
    """Write ``cameras.txt``, ``images.txt`` and ``points3D.txt`` into the folder ``dst``.

    Captures come first, then held-out views; image ids count from 1 in that order. Identical
    intrinsics share one COLMAP camera. Image names are paths relative to ``image_root`` (default:
    the deepest folder holding every image); pass that folder as ``images`` when reading back.

    Args:
        scene: captures (all with cameras) and held-out views; COLMAP's model has no notion of held out, so both
            are written as images alike and come back as captures (the NeRF exporter keeps the split).
        dst: output folder.
        points: 3D points to write with their observations (by capture name), or None for none.
        image_root: folder the image names are relative to.
    Returns:
        The folder written.
    """
    dst = Path(dst)
    views = [(f"captures[{i}]", c) for i, c in enumerate(scene.captures)]
    views += [(f"heldout[{i}]", c) for i, c in enumerate(scene.heldout)]
    for where, cap in views:
        if cap.camera is None:
            raise ValueError(f"{where}.camera: missing; COLMAP export needs every camera")
    if image_root is None:
        image_root = Path(os.path.commonpath([str(c.image.parent) for _, c in views]))
    cam_ids: dict[tuple, int] = {}
    cam_lines, image_lines, tracks = [], [], {}
    for image_id, (where, cap) in enumerate(views, start=1):
        cam = cap.camera
        model, params = colmap_camera_params(cam, f"{where}.camera")
        key = (model, cam.width, cam.height, tuple(params))
        if key not in cam_ids:
            cam_ids[key] = len(cam_ids) + 1
            cam_lines.append(_line([cam_ids[key], model, cam.width, cam.height, *map(float, params)]))
        q = _quaternion_wxyz(cam.w2c[:3, :3])
        name = relative_posix(cap.image, image_root)
        image_lines.append(_line([image_id, *map(float, q), *map(float, cam.w2c[:3, 3]), cam_ids[key], name]))
        obs = []
        if points is not None and cap.name in points.observations:
            idx, uv = points.observations[cap.name]
            for k, (i, (u, v)) in enumerate(zip(idx, uv)):
                obs += [float(u), float(v), int(points.ids[i])]
                tracks.setdefault(int(i), []).extend([image_id, k])
        image_lines.append(_line(obs))
    point_lines = []
    if points is not None:
        for i in range(len(points.ids)):
            row = [int(points.ids[i]), *map(float, points.xyz[i]), *map(int, points.rgb[i]), float(points.error[i])]
            point_lines.append(_line(row + tracks.get(i, [])))
    header = "# written by reconloop\n"
    write_atomic(dst / "cameras.txt", (header + "\n".join(cam_lines) + "\n").encode())
    write_atomic(dst / "images.txt", (header + "\n".join(image_lines) + "\n").encode())
    write_atomic(dst / "points3D.txt", (header + "".join(line + "\n" for line in point_lines)).encode())
    return dst


def _quaternion_wxyz(R: np.ndarray) -> np.ndarray:
    """Unit quaternion (w, x, y, z) with w >= 0 of a rotation matrix (Shepperd's method). float64 [4]"""
    trace = np.trace(R)
    k = int(np.argmax([trace, R[0, 0], R[1, 1], R[2, 2]]))
    if k == 0:
        s = 2.0 * np.sqrt(1.0 + trace)
        q = [0.25 * s, (R[2, 1] - R[1, 2]) / s, (R[0, 2] - R[2, 0]) / s, (R[1, 0] - R[0, 1]) / s]
    elif k == 1:
        s = 2.0 * np.sqrt(1.0 + R[0, 0] - R[1, 1] - R[2, 2])
        q = [(R[2, 1] - R[1, 2]) / s, 0.25 * s, (R[0, 1] + R[1, 0]) / s, (R[0, 2] + R[2, 0]) / s]
    elif k == 2:
        s = 2.0 * np.sqrt(1.0 + R[1, 1] - R[0, 0] - R[2, 2])
        q = [(R[0, 2] - R[2, 0]) / s, (R[0, 1] + R[1, 0]) / s, 0.25 * s, (R[1, 2] + R[2, 1]) / s]
    else:
        s = 2.0 * np.sqrt(1.0 + R[2, 2] - R[0, 0] - R[1, 1])
        q = [(R[1, 0] - R[0, 1]) / s, (R[0, 2] + R[2, 0]) / s, (R[1, 2] + R[2, 1]) / s, 0.25 * s]
    q = np.array(q)
    q /= np.linalg.norm(q)
    return q if q[0] >= 0 else -q


IMPORTERS.register("colmap")(read_colmap)
EXPORTERS.register("colmap")(export_colmap)
