"""Datasets into Blender and out again, through the same readers and writers as ``reconloop import``.

Reading goes through ``backend.formats`` (COLMAP text/binary, LLFF, NeRF transforms.json, DTU/IDR,
Middlebury) and ``backend.scene`` (scene.json); both are numpy-only and travel in the extension's
protocol wheel (scripts/build_extension.py), so nothing here imports torch. Each capture becomes a
camera object whose lens, sensor and shift reproduce its K at the photo's size, with the photo as its
background image; lens distortion, which a Blender camera cannot hold, is kept on the object
(``reconloop_distortion``) and written back on export. A capture's mask (DTU/IDR ``mask/``, scene.json's
``mask``) is kept on the object as its file's absolute path (``reconloop_mask``): a job sends it beside the
photo, and the export writes it back to scene.json.

Example (Blender's Python console)::

    from bl_ext.user_default.reconloop import datasets
    coll = datasets.import_dataset(bpy.context.scene, "/data/llff_fern")
    datasets.export_dataset(bpy.context.scene, coll, "/tmp/fern_out", "colmap")
"""

from __future__ import annotations

import json
from pathlib import Path

import bpy
import numpy as np

from . import cameras as cam_math
from .errors import ReconLoopError
from .scene_read import (
    PROP_MASK,
    apply_camera_params,
    background_image,
    image_file,
    read_captures,
    sample_trajectory,
)

FORMAT_AUTO = "auto"
FORMAT_SCENE = "scene"
IMPORT_FORMATS = (FORMAT_AUTO, FORMAT_SCENE, "colmap", "llff", "nerf", "dtu", "middlebury")
EXPORT_FORMATS = (FORMAT_SCENE, "colmap", "nerf")
CAPTURES_COLLECTION = "Captures"
HELDOUT_COLLECTION = "Held-out views"
PROP_DISTORTION = "reconloop_distortion"  # JSON {"model": ..., "params": [...]} (COLMAP's names)


def read_dataset(path: str, fmt: str = FORMAT_AUTO):
    """Captures, held-out views and trajectory of a dataset folder or file, by backend's readers.

    Args:
        path: a scene folder or its scene.json; a dataset folder; a NeRF ``transforms*.json``.
        fmt: one of IMPORT_FORMATS; "auto" picks scene.json when there is one, else what
            ``backend.formats.detect_format`` finds.
    Returns:
        (captures, heldout, trajectory): lists of ``backend.scene.Capture`` (with cameras) and
        ``backend.scene.TrajectoryFrame``.
    """
    try:
        from backend.formats import IMPORTERS, detect_format
        from backend.scene import SCENE_FILE, SceneError, load_scene
    except ImportError as err:  # pragma: no cover - an extension built without its protocol wheel
        raise ReconLoopError(f"the dataset readers are missing ({err}): reinstall the ReconLoop extension") from None
    p = Path(bpy.path.abspath(path)) if path.startswith("//") else Path(path)
    if not p.exists():
        raise ReconLoopError(f"not found: {p}")
    try:
        is_scene = p.name == SCENE_FILE or (p.is_dir() and (p / SCENE_FILE).is_file())
        if fmt == FORMAT_SCENE or (fmt == FORMAT_AUTO and is_scene):
            scene = load_scene(p)
            missing = [c.name for c in scene.captures if c.camera is None]
            if missing:
                raise ReconLoopError(f"captures {missing[:5]} have no camera in {p}: nothing to place in Blender")
            return scene.captures, scene.heldout, scene.trajectory
        if fmt == FORMAT_AUTO:
            fmt = "nerf" if p.is_file() and p.suffix == ".json" else detect_format(p)
        found = IMPORTERS.get(fmt)(p)
    except (SceneError, KeyError, ValueError, OSError) as err:
        raise ReconLoopError(f"cannot import {p} as {fmt}: {err}") from None
    return found.captures, found.heldout, []


def add_capture_camera(scene: bpy.types.Scene, capture, coll: bpy.types.Collection, *, set_render: bool):
    """A camera object for one ``backend.scene.Capture``: its K and pose, its photo as background, its mask
    file's path (if any) as ``reconloop_mask``."""
    cam = capture.camera
    params = cam_math.blender_from_opencv(cam.w2c, cam.K, cam.width, cam.height)
    obj = bpy.data.objects.new(capture.name, bpy.data.cameras.new(capture.name))
    coll.objects.link(obj)
    apply_camera_params(obj, scene, params, set_render=set_render)
    bg = obj.data.background_images.new()
    bg.image = bpy.data.images.load(str(capture.image), check_existing=True)
    bg.frame_method = "STRETCH"  # the photo fills the camera frame, as K maps it (also when fx != fy)
    obj.data.show_background_images = True
    if cam.distortion is not None and not cam.distortion.is_identity:
        obj[PROP_DISTORTION] = json.dumps({"model": cam.distortion.model, "params": list(cam.distortion.params)})
    if capture.mask is not None:
        obj[PROP_MASK] = str(Path(capture.mask).resolve())
    return obj


def _new_collection(scene: bpy.types.Scene, name: str) -> bpy.types.Collection:
    coll = bpy.data.collections.new(name)
    scene.collection.children.link(coll)
    return coll


def import_dataset(
    scene: bpy.types.Scene, path: str, fmt: str = FORMAT_AUTO, *, heldout: bool = False
) -> bpy.types.Collection:
    """Cameras with photos for every capture of a dataset, in a new *Captures* collection that the
    sidebar then uses; the render size and pixel aspect become the first capture's. With ``heldout``,
    the held-out views go into their own collection (not sent as captures). Returns the captures'
    collection. Captures whose image size or fx/fy differ from the first one's are refused (a scene
    has one render size and pixel aspect), before anything is added."""
    captures, held, _trajectory = read_dataset(path, fmt)
    every = captures + (held if heldout else [])
    problem = cam_math.render_conflicts((c.name, c.camera.K, c.camera.width, c.camera.height) for c in every)
    if problem:
        raise ReconLoopError(f"cannot import {path}: {problem}")
    coll = _new_collection(scene, CAPTURES_COLLECTION)
    for i, cap in enumerate(captures):
        add_capture_camera(scene, cap, coll, set_render=(i == 0))
    if heldout and held:
        hcoll = _new_collection(scene, HELDOUT_COLLECTION)
        for cap in held:
            add_capture_camera(scene, cap, hcoll, set_render=False)
    st = getattr(scene, "reconloop", None)
    if st is not None:
        st.capture_source = "COLLECTION"
        st.captures = coll
    return coll


def photo_file(obj: bpy.types.Object) -> Path:
    """The file on disk of a camera's photo (the background image that ``read_captures`` reads)."""
    bg = background_image(obj)
    image = bg.image if bg is not None else None
    path = image_file(image) if image is not None else None
    if path is None:
        shown = image.filepath if image is not None and image.filepath else "none"
        raise ReconLoopError(
            f"camera {obj.name!r}: photo is packed or not on disk; unpack it before exporting (file: {shown})"
        )
    return Path(path).resolve()


def scene_from_blender(scene: bpy.types.Scene, coll: bpy.types.Collection, root: Path, trajectory_camera=None):
    """A ``backend.scene.Scene`` of the cameras in ``coll`` (and the sampled trajectory camera)."""
    from backend.scene import Camera, Capture, Distortion, Scene, TrajectoryFrame

    out = []
    for c in read_captures(coll, scene):
        obj = bpy.data.objects[c.name]
        image = photo_file(obj)
        distortion = None
        if PROP_DISTORTION in obj:
            d = json.loads(obj[PROP_DISTORTION])
            distortion = Distortion(d["model"], tuple(float(v) for v in d["params"]))
        cam = Camera(
            w2c=np.asarray(c.camera.w2c, np.float64),
            K=np.asarray(c.camera.K, np.float64),
            width=c.camera.width,
            height=c.camera.height,
            distortion=distortion,
        )
        mask = Path(c.mask).resolve() if c.mask is not None else None
        if mask is not None and not mask.is_file():
            raise ReconLoopError(f"camera {obj.name!r}: mask file not found: {mask} ({PROP_MASK})")
        out.append(Capture(name=c.name, image=image, camera=cam, mask=mask))
    frames = []
    if trajectory_camera is not None:
        for f, cam in sample_trajectory(trajectory_camera, scene, scene.frame_start, scene.frame_end, 1):
            frames.append(
                TrajectoryFrame(
                    frame=int(f),
                    camera=Camera(
                        np.asarray(cam.w2c, np.float64), np.asarray(cam.K, np.float64), cam.width, cam.height
                    ),
                )
            )
    return Scene(root=root.resolve(), captures=out, trajectory=frames)


def export_dataset(
    scene: bpy.types.Scene, coll: bpy.types.Collection, dst: str, fmt: str = FORMAT_SCENE, trajectory_camera=None
) -> Path:
    """Write the captures of ``coll`` (and the trajectory, for scene.json) to ``dst`` as ``fmt``:
    "scene" (``dst/scene.json``), "colmap" (a text model in ``dst``) or "nerf" (``dst/transforms.json``).
    Images stay where they are; the files refer to them. Returns the path written."""
    from backend.formats import export_scene
    from backend.scene import SceneError, save_scene

    if fmt not in EXPORT_FORMATS:
        raise ReconLoopError(f"export format must be one of {', '.join(EXPORT_FORMATS)}; got {fmt!r}")
    root = Path(dst)
    root.mkdir(parents=True, exist_ok=True)
    data = scene_from_blender(scene, coll, root, trajectory_camera if fmt == FORMAT_SCENE else None)
    try:
        return save_scene(data, root) if fmt == FORMAT_SCENE else export_scene(fmt, data, root)
    except (SceneError, ValueError, OSError) as err:
        raise ReconLoopError(f"cannot export as {fmt}: {err}") from None
