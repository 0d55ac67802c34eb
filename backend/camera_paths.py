"""Camera paths and alignments: a smooth path through cameras, and the similarity that maps one
camera frame onto another.

Cameras follow DESIGN.md section 3 (OpenCV world-to-camera, K in pixels). Quaternions are w x y z.

Example::

    >>> import numpy as np
    >>> from backend.scene import Camera, look_at
    >>> K = np.array([[100.0, 0, 32], [0, 100.0, 24], [0, 0, 1]])
    >>> ring = [Camera(look_at([np.cos(a), 0.3, np.sin(a)]), K, 64, 48) for a in (0.0, 2.1, 4.2)]
    >>> len(default_trajectory(ring, 12))
    12
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace

import numpy as np

from .scene import Camera, look_at

# Two cameras whose centres are closer than this fraction of the cameras' mean distance to their centroid,
# with optical axes within SAME_POSE_DEG, are one pose (a photo taken again from the same place).
SAME_POSE_DIST = 0.01
SAME_POSE_DEG = 1.0


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


def _orbit_axis(keys: Sequence[Camera], center: np.ndarray) -> np.ndarray:
    """The direction an orbit of ``keys`` about ``center`` turns around (the legs' summed normals), else the keys'
    mean down axis: the down of every camera facing the centre before its own roll. [3]"""
    rel = [c.center - center for c in keys]
    axis = sum(np.cross(a, b) for a, b in zip(rel, rel[1:]))
    if np.linalg.norm(axis) < 1e-9 * max(float(np.linalg.norm(r)) for r in rel) ** 2:
        axis = np.mean([c.c2w[:3, 1] for c in keys], axis=0)
    return axis / max(np.linalg.norm(axis), 1e-12)


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

    Positions orbit the axes' meeting point when the cameras look at a common centre from spread-out directions
    (ring captures), and every camera faces it upright (down along the orbit's axis), turned by the keys' rolls and
    offsets from that, slerped; else positions move on straight lines (forward-facing) and rotations are slerped.
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
    if center is not None:  # each key's rotation as the one facing the centre upright, then its own roll and offset
        axis = _orbit_axis(keys, center)
        offsets = [_rotation_to_quat(look_at(c.center, center, axis)[:3, :3] @ c.c2w[:3, :3]) for c in keys]
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
            # facing the centre from pos upright, turned by the keys' rolls and offsets slerped (about the view: the
            # roll turns evenly): the keys' rotations slerped swung the view off the scene between keys rolled apart
            # (the Middlebury ring's: 69 of 120 frames of the temple's 3-view ring path saw nothing of it)
            oa, ob = offsets[i], offsets[(i + 1) % len(keys)]
            R_c2w = look_at(pos, center, axis)[:3, :3].T @ _quat_to_rotation(
                _slerp(oa, ob if np.dot(oa, ob) >= 0 else -ob, t)
            )
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


def _poses(cams: Sequence[Camera]) -> tuple[np.ndarray, np.ndarray]:
    """Centres [N, 3] and optical axes [N, 3] of ``cams``."""
    return np.stack([c.center for c in cams]), np.stack([c.c2w[:3, 2] for c in cams])


def _pose_scale(centers: np.ndarray) -> float:
    """The cameras' mean distance to their centroid: the unit of SAME_POSE_DIST (1 for one camera)."""
    return float(np.linalg.norm(centers - centers.mean(0), axis=1).mean()) or 1.0


def _same_pose(
    centers: np.ndarray, axes: np.ndarray, others: tuple[np.ndarray, np.ndarray], scale: float
) -> np.ndarray:
    """Whether camera i of (``centers``, ``axes``) and camera j of ``others`` share a pose: centres within
    SAME_POSE_DIST x ``scale``, optical axes within SAME_POSE_DEG. bool [N, M]"""
    o_centers, o_axes = others
    near = np.linalg.norm(centers[:, None] - o_centers[None], axis=-1) < SAME_POSE_DIST * scale
    return near & (axes @ o_axes.T > math.cos(math.radians(SAME_POSE_DEG)))


def distinct_poses(cams: Sequence[Camera]) -> list[int]:
    """Indices of the cameras to keep when photos repeat a pose: the first of each group of cameras
    whose centres lie within SAME_POSE_DIST (relative) and whose optical axes within SAME_POSE_DEG.

    (The Middlebury temple ring has one: templeSR0001 and templeSR0011 share a pose.)
    """
    centers, axes = _poses(cams)
    same = _same_pose(centers, axes, (centers, axes), _pose_scale(centers))
    keep: list[int] = []
    for i in range(len(cams)):
        if not same[i, keep].any():
            keep.append(i)
    return keep


def repeats_a_pose(cams: Sequence[Camera], others: Sequence[Camera]) -> list[bool]:
    """For each of ``others``, whether it stands at a pose of ``cams`` (distinct_poses' rule, at ``cams``' scale,
    so that a camera far from them does not widen it)."""
    if not cams or not others:
        return [False] * len(others)
    centers, axes = _poses(cams)
    return _same_pose(*_poses(others), (centers, axes), _pose_scale(centers)).any(axis=1).tolist()
