"""Real-scene inputs for the geometry-stage tests, read with the project's importers (backend.formats)."""

from __future__ import annotations

import functools
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from backend.estimators.mvs import MVSConfig
from backend.formats.colmap import ColmapPoints, read_colmap, read_colmap_points
from backend.formats.middlebury import read_middlebury
from backend.formats.undistort import undistort_image
from backend.scene import Capture
from backend.stages.memory import MemoryConfig, build_memory
from backend.types import Cameras, GeometryMemory, Views

# README.txt of templeSparseRing: the tight bounding box of the model.
TEMPLE_BOX = (np.array([-0.073568, 0.021728, -0.012445]), np.array([0.028855, 0.181892, 0.062736]))
LUMA = np.array([0.299, 0.587, 0.114])
# Dark background (black cloth) vs plaster temple; the dino README thresholds its silhouettes at 0.19.
SILHOUETTE_LUMA = 0.19


def temple_captures(folder: Path) -> list[Capture]:
    return read_middlebury(folder).captures


def door_scene(folder: Path) -> tuple[list[Capture], ColmapPoints]:
    return read_colmap(folder).captures, read_colmap_points(folder)


def load_views(captures: list[Capture], ids: list[int], max_side: int) -> Views:
    """Read, undistort (cameras with distortion) and downsize photos into Views at one size."""
    imgs, cams = [], []
    for cap in captures:
        cam = cap.camera
        rgb = cv2.cvtColor(cv2.imread(str(cap.image), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
        if cam.distortion is not None:
            rgb = undistort_image(rgb, cam)
        scale = max_side / max(cam.width, cam.height)
        w, h = round(cam.width * scale), round(cam.height * scale)
        imgs.append(torch.from_numpy(cv2.resize(rgb, (w, h), interpolation=cv2.INTER_AREA)).float() / 255.0)
        cams.append(cam)
    h, w = imgs[0].shape[:2]
    return Views(torch.stack(imgs), Cameras.from_scene(cams, w, h), list(ids))


def inside_box(xyz: np.ndarray, box: tuple[np.ndarray, np.ndarray], pad_fraction: float) -> np.ndarray:
    """bool [N]: points inside the box enlarged by pad_fraction of its size on each side."""
    lo, hi = box
    pad = pad_fraction * (hi - lo)
    return np.all((xyz >= lo - pad) & (xyz <= hi + pad), axis=1)


# Temple captures 7, 8, 9 (0-based 6, 7, 8) lie 23 degrees apart on the ring: a stereo-friendly triple.
TEMPLE_TRIPLE = [6, 7, 8]
TEST_SIDE = 240  # processing size of the tests (max image side)
TEST_PLANES = 48


@functools.lru_cache(maxsize=4)
def temple_memory(folder: str, ids: tuple[int, ...] = tuple(TEMPLE_TRIPLE)) -> tuple[Views, GeometryMemory]:
    """The temple captures ``ids`` at TEST_SIDE and their MVS memory (cached per test process)."""
    caps = temple_captures(Path(folder))
    views = load_views([caps[i] for i in ids], list(ids), TEST_SIDE)
    memory = build_memory(views, MemoryConfig(mvs=MVSConfig(max_side=TEST_SIDE, num_planes=TEST_PLANES)))
    return views, memory


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Run a test with one torch thread: under ``pytest -n 2`` on 2 cores, two workers with two
    OpenMP threads each oversubscribe the machine and spin (measured: 3x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
