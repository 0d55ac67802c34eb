"""The pure camera formulas (blender_addon.cameras) against Blender's own world_to_camera_view."""

from __future__ import annotations

import itertools

import bpy
import numpy as np
import pytest
from bpy_extras.object_utils import world_to_camera_view
from mathutils import Euler, Matrix, Vector

from blender_addon import cameras as cam_math
from blender_addon.scene_read import camera_params, sample_camera

MAX_ERROR_PX = 0.01
RESOLUTIONS = [(640, 480), (480, 640), (512, 512), (1921, 1079)]
SENSOR_FITS = ["AUTO", "HORIZONTAL", "VERTICAL"]
SHIFTS = [(0.0, 0.0), (0.13, -0.21)]
PIXEL_ASPECTS = [(1.0, 1.0), (2.0, 1.0), (1.0, 1.5)]
PERCENTAGES = [100, 50]
SCALES = [(1.0, 1.0, 1.0), (2.0, 0.5, 3.0)]


def _points_in_view(rng: np.random.Generator, n: int) -> np.ndarray:
    """Points in front of a camera at the origin looking down -Z, spread over the frame. [n, 3]"""
    z = -rng.uniform(2.0, 10.0, n)
    xy = rng.uniform(-0.6, 0.6, (n, 2)) * -z[:, None]
    return np.column_stack([xy, z])


def test_formulas_match_world_to_camera_view():
    scene = bpy.context.scene
    data = bpy.data.cameras.new("cam")
    obj = bpy.data.objects.new("cam", data)
    scene.collection.objects.link(obj)
    rng = np.random.default_rng(0)
    worst = 0.0
    count = 0
    for (rx, ry), fit, (sx, sy), (ax, ay), pct, scale in itertools.product(
        RESOLUTIONS, SENSOR_FITS, SHIFTS, PIXEL_ASPECTS, PERCENTAGES, SCALES
    ):
        if rx * pct % cam_math.PERCENT or ry * pct % cam_math.PERCENT:
            # A fractional render size: Blender renders floor(size) pixels (RE_InitState) while
            # view_frame() keeps the fraction, so the two disagree by design; compare at 100%.
            pct = cam_math.PERCENT
        scene.render.resolution_x, scene.render.resolution_y = rx, ry
        scene.render.resolution_percentage = pct
        scene.render.pixel_aspect_x, scene.render.pixel_aspect_y = ax, ay
        data.sensor_fit = fit
        data.lens = float(rng.uniform(18, 85))
        data.sensor_width, data.sensor_height = 36.0, 24.0
        data.shift_x, data.shift_y = sx, sy
        rot = Euler(rng.uniform(-np.pi, np.pi, 3).tolist()).to_matrix().to_4x4()
        loc = Matrix.Translation(Vector(rng.uniform(-5, 5, 3).tolist()))
        obj.matrix_world = loc @ rot @ Matrix.Diagonal((*scale, 1.0))
        bpy.context.view_layer.update()

        cv = cam_math.opencv_from_blender(camera_params(obj, scene))
        local = _points_in_view(rng, 8)
        c2w = np.array(loc @ rot)
        world = local @ c2w[:3, :3].T + c2w[:3, 3]
        uv, depth = cv.project(world)
        W, H = cam_math.render_size(camera_params(obj, scene))
        for p, (u, v), d in zip(world, uv, depth):
            ndc = world_to_camera_view(scene, obj, Vector(p.tolist()))
            ref_u, ref_v = ndc.x * W, (1.0 - ndc.y) * H
            worst = max(worst, abs(u - ref_u), abs(v - ref_v))
            assert d == pytest.approx(ndc.z, rel=1e-6)
            count += 1
    assert count == 8 * len(RESOLUTIONS) * 3 * 2 * 3 * 2 * 2
    assert worst < MAX_ERROR_PX, f"worst reprojection difference {worst:.4g} px"


def test_blender_from_opencv_round_trip():
    """An OpenCV camera (non-square pixels, off-centre principal point) written to Blender and read back."""
    scene = bpy.context.scene
    rng = np.random.default_rng(1)
    R = np.array(Euler((0.3, -1.1, 2.0)).to_matrix())
    w2c = np.eye(4)
    w2c[:3, :3] = R
    w2c[:3, 3] = [0.2, -0.1, 3.0]
    for width, height, K in [
        (640, 480, np.array([[1520.4, 0, 302.32], [0, 1525.9, 246.87], [0, 0, 1.0]])),
        (378, 504, np.array([[400.0, 0, 190.0], [0, 390.0, 260.0], [0, 0, 1.0]])),
    ]:
        params = cam_math.blender_from_opencv(w2c, K, width, height)
        data = bpy.data.cameras.new("cam")
        obj = bpy.data.objects.new("cam", data)
        scene.collection.objects.link(obj)
        from blender_addon.scene_read import apply_camera_params

        apply_camera_params(obj, scene, params)
        bpy.context.view_layer.update()
        back = sample_camera(obj, scene)
        assert (back.width, back.height) == (width, height)
        np.testing.assert_allclose(back.K, K, atol=1e-3)
        np.testing.assert_allclose(back.w2c, w2c, atol=1e-5)
        pts = rng.uniform(-0.5, 0.5, (20, 3))
        uv, _ = back.project(pts)
        for p, (u, v) in zip(pts, uv):
            ndc = world_to_camera_view(scene, obj, Vector(p.tolist()))
            assert abs(ndc.x * width - u) < MAX_ERROR_PX and abs((1 - ndc.y) * height - v) < MAX_ERROR_PX
