"""Small readers of the shared real scenes for the geometry-stage tests.

Uses ``backend.formats`` importers when they exist; until then parses the two formats directly
(Middlebury ``_par.txt``: ``name k11..k33 r11..r33 t1 t2 t3``, P = K [R t]; COLMAP text model).
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import torch

from backend.scene import Camera, Distortion
from backend.stages.types import Cameras, Views

TEMPLE_BOX = (np.array([-0.073568, 0.021728, -0.012445]), np.array([0.028855, 0.181892, 0.062736]))


def read_middlebury(folder: Path) -> list[tuple[Path, Camera]]:
    par = next(folder.glob("*_par.txt"))
    lines = par.read_text().split("\n")
    out = []
    for line in lines[1:]:
        parts = line.split()
        if len(parts) != 22:
            continue
        vals = np.array([float(v) for v in parts[1:]])
        K = vals[:9].reshape(3, 3).copy()
        # Middlebury pixel coordinates put pixel centres at integers; ours at i + 0.5.
        K[0, 2] += 0.5
        K[1, 2] += 0.5
        w2c = np.eye(4)
        w2c[:3, :3] = vals[9:18].reshape(3, 3)
        w2c[:3, 3] = vals[18:21]
        img = folder / parts[0]
        h, w = cv2.imread(str(img)).shape[:2]
        out.append((img, Camera(w2c=w2c, K=K, width=w, height=h)))
    return out


def _qvec_to_R(q: np.ndarray) -> np.ndarray:
    w, x, y, z = q
    return np.array([
        [1 - 2 * y * y - 2 * z * z, 2 * x * y - 2 * w * z, 2 * x * z + 2 * w * y],
        [2 * x * y + 2 * w * z, 1 - 2 * x * x - 2 * z * z, 2 * y * z - 2 * w * x],
        [2 * x * z - 2 * w * y, 2 * y * z + 2 * w * x, 1 - 2 * x * x - 2 * y * y],
    ])


def read_colmap_text(folder: Path) -> tuple[dict[str, Camera], np.ndarray, list[set[str]]]:
    """COLMAP text model -> ({image name: Camera}, points xyz [N, 3], per point the images seeing it)."""
    cams = {}
    for line in (folder / "cameras.txt").read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        p = line.split()
        cid, model, w, h = int(p[0]), p[1], int(p[2]), int(p[3])
        params = [float(v) for v in p[4:]]
        if model != "SIMPLE_RADIAL":
            raise ValueError(f"test helper reads SIMPLE_RADIAL only; got {model}")
        f, cx, cy, k = params
        cams[cid] = (w, h, np.array([[f, 0, cx], [0, f, cy], [0, 0, 1.0]]), Distortion("SIMPLE_RADIAL", (k,)))
    images = {}
    names = {}
    lines = [l for l in (folder / "images.txt").read_text().splitlines() if not l.startswith("#")]
    for line in lines[0::2]:
        p = line.split()
        if len(p) < 10:
            continue
        R = _qvec_to_R(np.array([float(v) for v in p[1:5]]))
        w2c = np.eye(4)
        w2c[:3, :3] = R
        w2c[:3, 3] = [float(v) for v in p[5:8]]
        w, h, K, dist = cams[int(p[8])]
        names[int(p[0])] = p[9]
        images[p[9]] = Camera(w2c=w2c, K=K, width=w, height=h, distortion=dist)
    pts, seen = [], []
    for line in (folder / "points3D.txt").read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        p = line.split()
        pts.append([float(v) for v in p[1:4]])
        seen.append({names[int(i)] for i in p[8::2]})
    return images, np.array(pts), seen


def load_views(items: list[tuple[Path, Camera]], ids: list[int], max_side: int) -> Views:
    """Read, undistort (when the camera has distortion) and downsize images into Views."""
    imgs, cams = [], []
    for path, cam in items:
        bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
        rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
        if cam.distortion is not None and not cam.distortion.is_identity:
            # COLMAP's K has pixel centres at i + 0.5 like ours; OpenCV's at i: shift around the call.
            K_cv = cam.K.copy()
            K_cv[:2, 2] -= 0.5
            rgb = cv2.undistort(rgb, K_cv, cam.distortion.to_opencv())
            cam = Camera(w2c=cam.w2c, K=cam.K, width=cam.width, height=cam.height)
        scale = max_side / max(cam.width, cam.height)
        w, h = round(cam.width * scale), round(cam.height * scale)
        rgb = cv2.resize(rgb, (w, h), interpolation=cv2.INTER_AREA)
        imgs.append(torch.from_numpy(rgb).float() / 255.0)
        cams.append(cam)
    w, h = imgs[0].shape[1], imgs[0].shape[0]
    return Views(torch.stack(imgs), Cameras.from_scene(cams, w, h), list(ids))
