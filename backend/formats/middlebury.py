"""Middlebury multi-view ``*_par.txt``: per image ``name k11..k33 r11..r33 t1 t2 t3``, P = K [R t].

The first line is the number of images. The pose is world-to-camera with x right, y down (image
origin top-left), so it is ours as written; K is taken as given.

With ``silhouettes`` the reader also makes a mask per image by the recipe of the datasets' README
(objects on a black backdrop: threshold at 0.19, dilate by 10 pixels, erode by 7).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from backend.formats.base import IMPORTERS, ImportedScene, check_principal_point, make_camera, resolve_in, w2c_from_rt
from backend.masks import threshold_silhouette
from backend.scene import Capture, SceneError, image_size

PAR_SUFFIX = "_par.txt"
# The Middlebury README's silhouette recipe (dinoSparseRing, templeSparseRing).
SILHOUETTE_THRESHOLD = 0.19
SILHOUETTE_DILATE_PX = 10
SILHOUETTE_ERODE_PX = 7
PAR_FIELDS = 22  # name + 9 (K) + 9 (R) + 3 (t)
K_VALUES, R_VALUES = slice(0, 9), slice(9, 18)  # of the 21 numbers after the name; t is the rest


def read_middlebury(
    src: Path, *, cameras: str | None = None, images: str | None = None, silhouettes: bool = False
) -> ImportedScene:
    """Read a Middlebury multi-view folder.

    Args:
        src: folder holding ``*_par.txt`` and the images.
        cameras: the ``*_par.txt`` file, relative to ``src``; the only one in ``src`` when None.
        images: the image folder, relative to ``src`` (default ``src``).
        silhouettes: also make each image's object mask (module docstring).
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
    try:
        text = par.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise SceneError(f"{par.name}: not a text file ({err.reason} at byte {err.start})") from None
    lines = [line.split() for line in text.splitlines() if line.strip()]
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
        # the par file's K holds for the photos as taken: one size for all, the principal point inside it
        if captures and (width, height) != (captures[0].camera.width, captures[0].camera.height):
            first = captures[0]
            raise SceneError(
                f"{where}: {row[0]} is {width}x{height}, {first.image.name} is "
                f"{first.camera.width}x{first.camera.height}: {par.name}'s intrinsics hold for the photos as taken, "
                "one size; use the original photos"
            )
        check_principal_point(K, width, height, where, row[0], "Middlebury's are 640x480; the sets' sit within 0.03")
        camera = make_camera(w2c_from_rt(R, t), K, width, height, where)
        captures.append(Capture(name=path.stem, image=path, camera=camera))
    masks = {c.name: silhouette(c.image) for c in captures} if silhouettes else {}
    return ImportedScene(captures=captures, masks=masks)


def silhouette(path: Path) -> np.ndarray:
    """The object's mask in one photo by the README's recipe. bool [H, W]"""
    from PIL import Image  # only for silhouettes; the add-on imports this module without PIL

    from backend.masks import eight_bit

    with Image.open(path) as im:
        rgb = np.asarray(eight_bit(im).convert("RGB"))
    return threshold_silhouette(
        rgb, threshold=SILHOUETTE_THRESHOLD, dilate_px=SILHOUETTE_DILATE_PX, erode_px=SILHOUETTE_ERODE_PX
    )


IMPORTERS.register("middlebury")(read_middlebury)
