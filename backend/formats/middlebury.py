"""Middlebury multi-view ``*_par.txt``: per image ``name k11..k33 r11..r33 t1 t2 t3``, P = K [R t].

The first line is the number of images. The pose is world-to-camera with x right, y down (image
origin top-left), so it is ours as written; K is taken as given.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from backend.formats.base import IMPORTERS, ImportedScene, make_camera, resolve_in, w2c_from_rt
from backend.scene import Capture, SceneError, image_size

PAR_SUFFIX = "_par.txt"
PAR_FIELDS = 22  # name + 9 (K) + 9 (R) + 3 (t)
K_VALUES, R_VALUES = slice(0, 9), slice(9, 18)  # of the 21 numbers after the name; t is the rest


def read_middlebury(src: Path, *, cameras: str | None = None, images: str | None = None) -> ImportedScene:
    """Read a Middlebury multi-view folder.

    Args:
        src: folder holding ``*_par.txt`` and the images.
        cameras: the ``*_par.txt`` file, relative to ``src``; the only one in ``src`` when None.
        images: the image folder, relative to ``src`` (default ``src``).
    """
    src = Path(src)
    if cameras is None:
        found = sorted(src.glob(f"*{PAR_SUFFIX}"))
        if len(found) != 1:
            raise SceneError(f"cameras: expected one *{PAR_SUFFIX} in {src}; found {[p.name for p in found]}")
        par = found[0]
    else:
        par = resolve_in(src, cameras)
    if not par.is_file():
        raise SceneError(f"cameras: {par} not found")
    image_dir = resolve_in(src, images) if images else src
    lines = [line.split() for line in par.read_text().splitlines() if line.strip()]
    if not lines or len(lines[0]) != 1 or not lines[0][0].isdigit():
        raise SceneError(f"{par.name}: first line must be the number of images")
    count, rows = int(lines[0][0]), lines[1:]
    if len(rows) != count:
        raise SceneError(f"{par.name}: says {count} images; has {len(rows)} lines")
    captures = []
    for i, row in enumerate(rows):
        where = f"{par.name} line {i + 2}"
        if len(row) != PAR_FIELDS:
            raise SceneError(f"{where}: must hold a name and 21 numbers; got {len(row)} fields")
        try:
            numbers = np.array(row[1:], dtype=np.float64)
        except ValueError as err:
            raise SceneError(f"{where}: {err}") from None
        K, R, t = numbers[K_VALUES].reshape(3, 3), numbers[R_VALUES].reshape(3, 3), numbers[R_VALUES.stop :]
        path = (image_dir / row[0]).resolve()
        if not path.is_file():
            raise SceneError(f"{where}: image file not found: {path}")
        width, height = image_size(path)
        camera = make_camera(w2c_from_rt(R, t), K, width, height, where)
        captures.append(Capture(name=path.stem, image=path, camera=camera))
    return ImportedScene(captures=captures)


IMPORTERS.register("middlebury")(read_middlebury)
