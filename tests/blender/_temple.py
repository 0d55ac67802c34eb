"""Build a Blender scene from the real Middlebury temple: capture cameras with their photos as
background images, and an animated trajectory camera between two of them (lens animated too)."""

from __future__ import annotations

from pathlib import Path

import bpy
import numpy as np

from backend.formats.middlebury import read_middlebury
from blender_addon import cameras as cam_math
from blender_addon.scene_read import apply_camera_params

CAPTURE_IDS = (0, 4, 8, 12)  # four views spread around the ring
TRAJECTORY_FROM, TRAJECTORY_TO = 1, 2  # neighbouring ring views the trajectory moves between
COLLECTION = "Temple captures"


def temple_captures(temple_dir: Path, ids=CAPTURE_IDS):
    scene = read_middlebury(temple_dir)
    return [scene.captures[i] for i in ids], scene.captures


def build_temple_scene(temple_dir: Path, *, frames: tuple[int, int] = (1, 3), ids=CAPTURE_IDS) -> dict:
    """Fill the current (fresh) scene and point the add-on's settings at it (needs the add-on).

    Returns {"captures": [...], "collection", "trajectory"}.
    """
    made = build_temple_scene_plain(temple_dir, frames=frames, ids=ids)
    scene = bpy.context.scene
    st = scene.reconloop
    st.capture_source = "COLLECTION"
    st.captures = made["collection"]
    st.trajectory_camera = made["trajectory"]
    st.use_scene_range = True
    return made


def build_temple_scene_plain(temple_dir: Path, *, frames: tuple[int, int] = (1, 3), ids=CAPTURE_IDS) -> dict:
    """Capture cameras with photos and an animated trajectory camera; no add-on needed."""
    scene = bpy.context.scene
    caps, all_caps = temple_captures(temple_dir, ids)
    coll = bpy.data.collections.new(COLLECTION)
    scene.collection.children.link(coll)
    for i, cap in enumerate(caps):
        cam = cap.camera
        params = cam_math.blender_from_opencv(cam.w2c, cam.K, cam.width, cam.height)
        obj = bpy.data.objects.new(cap.name, bpy.data.cameras.new(cap.name))
        coll.objects.link(obj)
        apply_camera_params(obj, scene, params, set_render=(i == 0))
        bg = obj.data.background_images.new()
        bg.image = bpy.data.images.load(str(cap.image))
        bg.frame_method = "STRETCH"  # fx != fy: the render's pixel aspect is not 1, the photo's pixels are
        obj.data.show_background_images = True
    # The trajectory: a camera keyed at two ring views, lens keyed as well.
    a, b = all_caps[TRAJECTORY_FROM].camera, all_caps[TRAJECTORY_TO].camera
    traj = bpy.data.objects.new("Trajectory", bpy.data.cameras.new("Trajectory"))
    scene.collection.objects.link(traj)
    for frame, cam in zip(frames, (a, b)):
        params = cam_math.blender_from_opencv(cam.w2c, cam.K, cam.width, cam.height)
        apply_camera_params(traj, scene, params, set_render=False)
        traj.keyframe_insert("location", frame=frame)
        traj.keyframe_insert("rotation_euler", frame=frame)
        traj.data.keyframe_insert("lens", frame=frame)
    scene.frame_start, scene.frame_end = frames
    scene.camera = traj
    return {"captures": caps, "collection": coll, "trajectory": traj}


def silhouette(image_path: Path, *, threshold: float = 0.08, grow_px: int = 0) -> np.ndarray:
    """Mask of the temple (bright) against the black background of a photo, grown by ``grow_px``
    pixels in every direction (a square neighbourhood). bool [H, W]"""
    from PIL import Image

    rgb = np.asarray(Image.open(image_path).convert("RGB"), dtype=np.float32) / 255.0
    mask = rgb.max(axis=2) > threshold
    for axis in (0, 1):  # separable max filter
        grown = mask.copy()
        for d in range(1, grow_px + 1):
            grown |= np.roll(mask, d, axis=axis) | np.roll(mask, -d, axis=axis)
        mask = grown
    return mask
