"""Small .ply files for the Blender tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from protocol.ply import PointArrays, write_points_ply


def write_blank_points(path: Path, n: int) -> Path:
    """A points .ply of ``n`` black points at the origin (what an import needs, not a picture)."""
    write_points_ply(
        path,
        PointArrays(
            xyz=np.zeros((n, 3), np.float32),
            rgb=np.zeros((n, 3), np.uint8),
            confidence=np.ones(n, np.float32),
            source=np.zeros(n, np.int32),
        ),
    )
    return path
