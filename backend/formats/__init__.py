"""Camera and scene formats in and out of our scene folder (``scene.json``, see backend/scene.py).

Importers, by name: ``colmap`` (text or binary sparse model), ``llff`` (``poses_bounds.npy``),
``middlebury`` (``*_par.txt``), ``nerf`` (``transforms.json``), ``dtu`` (IDR/NeuS ``cameras*.npz``).
Exporters: ``colmap`` (text model), ``nerf`` (``transforms.json``).

Images stay where they lie: scene.json refers to them by paths relative to the scene folder. Only
``undistort=True`` writes images, undistorted copies under ``DST/undistorted/`` (held-out views'
``DST/undistorted_heldout/``; mask files, undistorted alike, under ``DST/undistorted_masks/`` and
``DST/undistorted_heldout_masks/``).

Example::

    scene = import_scene("llff", Path("../shared/data/llff_fern"), Path("/tmp/fern"), holdout_every=8)
    export_scene("colmap", scene, Path("/tmp/fern/sparse"))
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import logging
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from backend.camera_paths import repeats_a_pose
from backend.fileio import write_atomic
from backend.formats import colmap, dtu, llff, middlebury, nerf  # noqa: F401  (fill the registries)
from backend.formats.base import EXPORTERS, IMPORTERS, ImportedScene
from backend.formats.colmap import ColmapPoints, read_colmap_points
from backend.formats.undistort import UNDISTORTED_HELDOUT_DIR, undistort_capture
from backend.masks import write_mask
from backend.scene import Capture, Scene, SceneError, Settings, save_scene, scene_from_json, scene_to_json

MASKS_DIR = "masks"  # masks a reader made (silhouettes) are written here, one PNG per capture
BOUNDS_FILE = "bounds.json"  # near/far depth per capture name, when the format has them (LLFF)
LLFF_HOLDOUT_EVERY = 8  # the LLFF protocol holds out every 8th image (NeRF, AnyRecon, ReconX)

logger = logging.getLogger(__name__)

__all__ = [
    "BOUNDS_FILE",
    "EXPORTERS",
    "IMPORTERS",
    "ColmapPoints",
    "ImportedScene",
    "add_import_arguments",
    "export_scene",
    "import_scene",
    "read_bounds",
    "read_colmap_points",
    "run_import",
    "split_holdout",
]


def split_holdout(
    captures: list[Capture], *, holdout_every: int = 0, train_ids: Sequence[int] | None = None
) -> tuple[list[Capture], list[Capture]]:
    """Split captures into (kept, held out).

    Args:
        captures: all captures, in the format's order.
        holdout_every: hold out captures 0, n, 2n, ... (the LLFF protocol uses 8); 0 keeps all.
        train_ids: keep exactly these indices and hold out the rest (the sparse-view protocols).

    A view that would be held out at the pose of a kept one (a photo taken again from the same place: the
    Middlebury temple's templeSR0001 and templeSR0011, 41.5 dB apart) is neither: its score would be
    memorisation. The log names it.
    """
    if holdout_every and train_ids is not None:
        raise ValueError("holdout_every and train_ids: give one or the other, not both")
    n = len(captures)
    if train_ids is not None:
        ids = list(train_ids)
        bad = [i for i in ids if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < n]
        if bad or not ids or len(set(ids)) != len(ids):
            raise ValueError(f"train_ids: must be distinct indices in [0, {n - 1}], at least one; got {ids}")
        keep = set(ids)
    elif holdout_every:
        if isinstance(holdout_every, bool) or not isinstance(holdout_every, int) or holdout_every < 2:
            raise ValueError(f"holdout_every: must be an integer >= 2 (or 0 for none); got {holdout_every!r}")
        keep = {i for i in range(n) if i % holdout_every}
    else:
        return list(captures), []
    kept = [c for i, c in enumerate(captures) if i in keep]
    held = [c for i, c in enumerate(captures) if i not in keep]
    posed = [c.camera for c in kept if c.camera is not None]
    held_posed = [h for h in held if h.camera is not None]
    repeats = {h.name for h, r in zip(held_posed, repeats_a_pose(posed, [h.camera for h in held_posed])) if r}
    if repeats:
        logger.warning("not held out, at the pose of a kept capture: %s", ", ".join(sorted(repeats)))
    return kept, [h for h in held if h.name not in repeats]


def import_scene(
    fmt: str,
    src: Path,
    dst: Path,
    *,
    undistort: bool = False,
    holdout_every: int = 0,
    train_ids: Sequence[int] | None = None,
    settings: Settings | None = None,
    **options: Any,
) -> Scene:
    """Read ``src`` in format ``fmt`` and write the scene folder ``dst`` (``dst/scene.json``).

    Args:
        fmt: importer name (``colmap``, ``llff``, ``middlebury``, ``nerf``, ``dtu``).
        src: the source folder (or file, for ``nerf``).
        dst: the scene folder to write; created if missing; an existing scene.json is replaced.
        undistort: write undistorted images into ``dst/undistorted`` (held-out views' into
            ``dst/undistorted_heldout``; mask files, undistorted with them, into ``<folder>_masks``) and drop
            the distortion.
        holdout_every, train_ids: move captures to ``heldout`` (see :func:`split_holdout`); added to
            any test views the format itself names.
        settings: job settings to store (default: defaults).
        options: passed to the reader: ``cameras`` (camera file or model folder inside ``src``),
            ``images`` (image folder inside ``src``), ``use_scale_mat`` (dtu), ``silhouettes``
            (middlebury: masks by the dataset's recipe, written under ``dst/masks``).
    Returns:
        The scene as loaded back from ``dst`` (image paths absolute).
    """
    reader = IMPORTERS.get(fmt)
    accepted = [p for p in inspect.signature(reader).parameters if p != "src"]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(f"import {fmt}: unknown option {unknown[0]!r}; {fmt} takes {', '.join(accepted)}")
    src, dst = Path(src), Path(dst)
    if not src.exists():
        raise SceneError(f"src: {src} not found")
    before = _entries(dst)
    try:
        return _import_into(reader(src, **options), dst, undistort, holdout_every, train_ids, settings)
    except BaseException:  # a refused import leaves the folder as it found it: none of the masks or images it wrote
        for path in sorted(_entries(dst) - before, reverse=True):  # a folder's files before the folder
            if path.is_dir() and not path.is_symlink():
                with contextlib.suppress(OSError):
                    path.rmdir()
            else:
                path.unlink(missing_ok=True)
        raise


def _entries(folder: Path) -> set[Path]:
    """Every file and folder below ``folder`` (and itself, when it is there)."""
    return {folder, *folder.rglob("*")} if folder.is_dir() else set()


def _import_into(
    found: ImportedScene,
    dst: Path,
    undistort: bool,
    holdout_every: int,
    train_ids: Sequence[int] | None,
    settings: Settings | None,
) -> Scene:
    """:func:`import_scene`'s writing: masks, undistorted images, scene.json and bounds.json into ``dst``."""
    if found.masks:
        found = replace(found, captures=_with_masks(found.captures, found.masks, dst))
    captures, heldout = split_holdout(found.captures, holdout_every=holdout_every, train_ids=train_ids)
    heldout = heldout + found.heldout
    if undistort:
        captures = [undistort_capture(c, dst) for c in captures]
        heldout = [undistort_capture(c, dst, UNDISTORTED_HELDOUT_DIR) for c in heldout]
    scene = Scene(root=dst.resolve(), captures=captures, heldout=heldout, settings=settings or Settings())
    # checked as load_scene reads it back before anything replaces the folder's scene.json (a refused import
    # leaves the one it had, or none)
    loaded = scene_from_json(json.loads(json.dumps(scene_to_json(scene, dst))), dst)
    save_scene(scene, dst)
    if found.bounds:  # beside the scene.json it belongs to, never beside a refused one's predecessor
        write_atomic(dst / BOUNDS_FILE, json.dumps(found.bounds, indent=1).encode())
    else:  # an earlier import's (another format's) bounds do not describe this scene
        (dst / BOUNDS_FILE).unlink(missing_ok=True)
    return loaded


def _with_masks(captures: list[Capture], masks: dict[str, np.ndarray], dst: Path) -> list[Capture]:
    """Captures with the reader's masks written to ``dst/masks/<name>.png`` and referenced."""
    out = []
    for c in captures:
        if c.name in masks:
            c = replace(c, mask=write_mask(masks[c.name], dst / MASKS_DIR / f"{c.name}.png").resolve())
        out.append(c)
    return out


def detect_format(src: Path) -> str:
    """The importer that reads the dataset folder ``src``, from the files each one looks for:
    ``middlebury`` (a ``*_par.txt``), ``llff`` (``poses_bounds.npy``), ``nerf`` (``transforms*.json``),
    ``dtu`` (``cameras*.npz``), ``colmap`` (a model :func:`find_colmap_model` finds).

    Raises:
        SceneError: ``src`` is not a folder, or none of those files is there (the message lists them).
    """
    from .colmap import find_colmap_model

    src = Path(src)
    if not src.is_dir():
        raise SceneError(f"scene: {src} is not a folder")
    for fmt, pattern in (
        ("middlebury", "*_par.txt"),
        ("llff", "poses_bounds.npy"),
        ("nerf", "transforms*.json"),
        ("dtu", "cameras*.npz"),
    ):
        if any(src.glob(pattern)):
            return fmt
    try:
        find_colmap_model(src)
    except SceneError:
        pass
    else:
        return "colmap"
    raise SceneError(
        f"scene: {src} holds no scene.json and no dataset this can import (a *_par.txt, "
        f"poses_bounds.npy, transforms.json, cameras.npz or a COLMAP model); see `reconloop import`"
    )


def read_bounds(folder: Path) -> dict[str, tuple[float, float]]:
    """Near/far depth per capture name written by :func:`import_scene` (LLFF); empty when none."""
    path = Path(folder) / BOUNDS_FILE
    if not path.is_file():
        return {}
    return {name: (float(b[0]), float(b[1])) for name, b in json.loads(path.read_text()).items()}


def export_scene(fmt: str, scene: Scene, dst: Path, **options: Any) -> Path:
    """Write ``scene``'s cameras in format ``fmt`` (``colmap``: a text model folder; ``nerf``: a
    transforms.json) to ``dst``. Returns the path written."""
    return EXPORTERS.get(fmt)(scene, Path(dst), **options)


# ----------------------------------------------------------------------------------------------
# Command line: `reconloop import FORMAT SRC DST ...` (the parser itself lives in backend/cli.py)


def _id_list(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be comma-separated integers like 0,5,10; got {text!r}") from None


def add_import_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the arguments of ``reconloop import`` to a (sub)parser."""
    parser.add_argument("format", choices=IMPORTERS.names(), help="source format")
    parser.add_argument("src", type=Path, help="source folder (or transforms.json for nerf)")
    parser.add_argument("dst", type=Path, help="scene folder to write (scene.json)")
    parser.add_argument("--cameras", help="camera file or COLMAP model folder, relative to SRC (found when left out)")
    parser.add_argument("--images", help="image folder relative to SRC (llff default: images_8)")
    parser.add_argument("--undistort", action="store_true", help="write undistorted images into DST, drop distortion")
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--holdout-every",
        type=int,
        default=0,
        metavar="N",
        help=f"hold out captures 0, N, 2N, ... for evaluation (LLFF protocol: {LLFF_HOLDOUT_EVERY})",
    )
    group.add_argument("--train-ids", type=_id_list, metavar="I,J,...", help="keep these captures, hold out the rest")
    parser.add_argument("--no-scale-mat", action="store_true", help="dtu: cameras in P's world, not the unit sphere")
    parser.add_argument(
        "--silhouettes",
        action="store_true",
        help="middlebury: write object masks by the dataset's recipe (threshold 0.19, dilate 10, erode 7)",
    )


def run_import(args: argparse.Namespace) -> int:
    """Run ``reconloop import`` from parsed arguments; prints a one-line summary, returns 0.

    Raises SceneError or ValueError (plain-language, naming the field) for bad input.
    """
    options: dict[str, Any] = {}
    for key in ("cameras", "images"):
        if getattr(args, key, None) is not None:
            options[key] = getattr(args, key)
    if getattr(args, "no_scale_mat", False):
        options["use_scale_mat"] = False
    if getattr(args, "silhouettes", False):
        options["silhouettes"] = True
    scene = import_scene(
        args.format,
        args.src,
        args.dst,
        undistort=args.undistort,
        holdout_every=args.holdout_every,
        train_ids=args.train_ids,
        **options,
    )
    print(
        f"imported {len(scene.captures)} captures ({len(scene.heldout)} held out) from {args.format} "
        f"{args.src} into {Path(args.dst) / 'scene.json'}"
    )
    return 0
