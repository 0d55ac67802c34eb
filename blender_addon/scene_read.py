"""Read cameras and photos out of a Blender scene as plain values (bpy side of blender_addon.cameras).

Only reading and writing Blender data lives here; every formula is in ``cameras.py`` (pure).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator

import bpy
import numpy as np

from . import cameras as cam_math
from .errors import ReconLoopError
from .scene_io import CaptureInput, image_info

# The capture's mask file (absolute path) on its camera object, set by the dataset import (datasets.py);
# read_captures sends it beside the photo. A path starting with // is relative to the .blend file.
PROP_MASK = "reconloop_mask"


def camera_params(obj: bpy.types.Object, scene: bpy.types.Scene) -> cam_math.BlenderCameraParams:
    """The projection values of camera object ``obj`` at the scene's current frame."""
    if obj is None or obj.type != "CAMERA":
        raise ReconLoopError(f"{getattr(obj, 'name', obj)!r} is not a camera object")
    data = obj.data
    if data.type != "PERSP":
        raise ReconLoopError(f"camera {obj.name!r} is {data.type.lower()}; only perspective cameras are supported")
    render = scene.render
    return cam_math.BlenderCameraParams(
        matrix_world=np.array(obj.matrix_world, dtype=np.float64),
        lens_mm=float(data.lens),
        sensor_width_mm=float(data.sensor_width),
        sensor_height_mm=float(data.sensor_height),
        sensor_fit=data.sensor_fit,
        shift_x=float(data.shift_x),
        shift_y=float(data.shift_y),
        resolution_x=int(render.resolution_x),
        resolution_y=int(render.resolution_y),
        resolution_percentage=int(render.resolution_percentage),
        pixel_aspect_x=float(render.pixel_aspect_x),
        pixel_aspect_y=float(render.pixel_aspect_y),
    )


def sample_camera(obj: bpy.types.Object, scene: bpy.types.Scene) -> cam_math.OpenCVCamera:
    """The OpenCV camera of ``obj`` at the current frame, at the render size."""
    p = camera_params(obj, scene)
    with _named(obj):
        return cam_math.opencv_from_blender(p)


@contextlib.contextmanager
def _named(obj: bpy.types.Object) -> Iterator[None]:
    """A camera the formulas refuse (sheared, mirrored, scaled to nothing) named in the error the user sees."""
    try:
        yield
    except cam_math.CameraConversionError as err:
        raise ReconLoopError(f"camera {obj.name!r}: {err}") from err


def apply_camera_params(
    obj: bpy.types.Object, scene: bpy.types.Scene, p: cam_math.BlenderCameraParams, *, set_render: bool = True
) -> None:
    """Write projection values to a camera object (and, if ``set_render``, the scene's render size)."""
    from mathutils import Matrix

    data = obj.data
    data.type = "PERSP"
    data.lens_unit = "MILLIMETERS"
    data.sensor_fit = p.sensor_fit
    data.sensor_width = p.sensor_width_mm
    data.sensor_height = p.sensor_height_mm
    data.lens = p.lens_mm
    data.shift_x = p.shift_x
    data.shift_y = p.shift_y
    obj.matrix_world = Matrix(np.asarray(p.matrix_world).tolist())
    if set_render:
        r = scene.render
        r.resolution_x, r.resolution_y = p.resolution_x, p.resolution_y
        r.resolution_percentage = p.resolution_percentage
        r.pixel_aspect_x, r.pixel_aspect_y = p.pixel_aspect_x, p.pixel_aspect_y


def sample_trajectory(
    obj: bpy.types.Object, scene: bpy.types.Scene, frame_start: int, frame_end: int, frame_step: int
) -> list[tuple[int, cam_math.OpenCVCamera]]:
    """The animated camera ``obj`` sampled at frames start..end (inclusive) every ``frame_step``.

    Lens, shift and transform are read after ``scene.frame_set(f)``; the current frame (and subframe)
    is restored afterwards, also on error.
    """
    if frame_step < 1:
        raise ReconLoopError(f"trajectory frame step must be at least 1; got {frame_step}")
    if frame_end < frame_start:
        raise ReconLoopError(f"trajectory frame range is empty: start {frame_start} > end {frame_end}")
    return sample_frames(obj, scene, range(frame_start, frame_end + 1, frame_step))


def sample_frames(
    obj: bpy.types.Object, scene: bpy.types.Scene, frames: Iterable[int]
) -> list[tuple[int, cam_math.OpenCVCamera]]:
    """The camera ``obj`` at each of ``frames`` (``sample_trajectory``'s reading), the current frame restored."""
    saved_frame, saved_sub = scene.frame_current, scene.frame_subframe
    out = []
    try:
        for f in frames:
            scene.frame_set(f)
            try:
                out.append((f, sample_camera(obj, scene)))
            except ReconLoopError as err:
                raise ReconLoopError(f"{err} (at frame {f})") from err
    finally:
        scene.frame_set(saved_frame, subframe=saved_sub)
    return out


def image_file(image: bpy.types.Image) -> str | None:
    """The absolute path of an image datablock's file on disk, or None when it has none there (no file
    path, or no file at it). Packed data is not looked at."""
    path = bpy.path.abspath(image.filepath, library=image.library) if image.filepath else ""
    return path if path and os.path.isfile(path) else None


def image_bytes(image: bpy.types.Image) -> bytes:
    """The encoded file bytes of an image datablock (packed data or the file on disk), untouched."""
    if image.packed_file is not None:
        return bytes(image.packed_file.data)
    path = image_file(image)
    if path is None:
        raise ReconLoopError(f"photo {image.name!r}: file not found: {image.filepath or '(no file path)'}")
    with open(path, "rb") as f:
        return f.read()


def background_image(obj: bpy.types.Object):
    """The camera's photo: its first shown background of source Image that has an image, else its first hidden one
    (a photo hidden to look at the scene is still the photo), or None."""
    photos = [bg for bg in obj.data.background_images if bg.source == "IMAGE" and bg.image is not None]
    return next((bg for bg in photos if bg.show_background_image), photos[0] if photos else None)


def mask_path(obj: bpy.types.Object) -> str | None:
    """The absolute path of the camera's mask file (custom property ``reconloop_mask``), or None when it has
    none (no property, or an empty one). Whether the file is there is checked when it is read."""
    value = obj.get(PROP_MASK)
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise ReconLoopError(f"camera {obj.name!r}: {PROP_MASK} must be the mask file's path; got {value!r}")
    return bpy.path.abspath(value, library=obj.library)


def read_captures(collection: bpy.types.Collection, scene: bpy.types.Scene) -> list[CaptureInput]:
    """Captures from the camera objects of ``collection`` (sorted by name), each with its photo (and the
    path of its mask file, where the camera has one: ``reconloop_mask``).

    Each camera's first shown background image is its photo (:func:`background_image`); its K is the camera's K at
    the render size
    mapped onto the photo's pixels the way Blender draws it (frame method; offset, scale, rotation
    and flips must be at their defaults). A photo stretched into the frame must have the render's shape.
    """
    cams = sorted((o for o in collection.all_objects if o.type == "CAMERA"), key=lambda o: o.name)
    if not cams:
        raise ReconLoopError(f"collection {collection.name!r} holds no cameras")
    out = []
    for obj in cams:
        bg = background_image(obj)
        if bg is None:
            raise ReconLoopError(f"camera {obj.name!r} has no photo: add its photo as the camera's background image")
        if tuple(bg.offset) != (0.0, 0.0) or bg.rotation != 0.0 or bg.scale != 1.0 or bg.use_flip_x or bg.use_flip_y:
            raise ReconLoopError(
                f"camera {obj.name!r}: its background photo is moved, scaled, rotated or flipped; "
                "reset offset, rotation, scale and flips so the photo lines up with the camera frame"
            )
        data = image_bytes(bg.image)
        info = image_info(data, bg.image.name)
        p = camera_params(obj, scene)
        with _named(obj):
            K, W, H = cam_math.intrinsics_from_blender(p)
            w2c = cam_math.w2c_from_matrix_world(p.matrix_world)
        stretched = bg.frame_method == "STRETCH"
        if stretched and cam_math.stretch_mismatch_px(W, H, info.width, info.height) > cam_math.STRETCH_TOL_PX:
            raise ReconLoopError(
                f"camera {obj.name!r}: its photo is {info.width}x{info.height} pixels and the render {W}x{H}, "
                "another shape, so the background's frame method Stretch distorts the photo to fill the frame; "
                f"set the render resolution (Output properties) to {info.width}x{info.height} (or that shape), "
                "or the background's Frame Method to Fit or Crop if the camera frame is meant to differ from it"
            )
        K_img = cam_math.image_intrinsics(
            K,
            W,
            H,
            info.width,
            info.height,
            frame_method=bg.frame_method,
            pixel_aspect_x=p.pixel_aspect_x,
            pixel_aspect_y=p.pixel_aspect_y,
            image_aspect=tuple(bg.image.display_aspect),
        )
        camera = cam_math.OpenCVCamera(w2c=w2c, K=K_img, width=info.width, height=info.height)
        out.append(
            CaptureInput(name=obj.name, image=data, image_format=info.format, camera=camera, mask=mask_path(obj))
        )
    return out


def read_photo_folder(folder: str) -> list[CaptureInput]:
    """Captures without cameras (to be estimated) from the PNG/JPEG files of ``folder``, sorted by name."""
    path = bpy.path.abspath(folder)
    if not os.path.isdir(path):
        raise ReconLoopError(f"photo folder not found: {path}")
    from .scene_io import captures_from_folder

    return captures_from_folder(path)
