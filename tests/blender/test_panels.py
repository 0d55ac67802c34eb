"""What the sidebar shows: the trajectory's frame range, past jobs, the missing-trajectory note."""

from __future__ import annotations

import re
from pathlib import Path

import bpy
import numpy as np
import pytest

from blender_addon import panels

from ._layout import RecordingLayout, draw

REPO = Path(__file__).resolve().parents[2]


def _draw(panel_cls) -> RecordingLayout:
    return draw(panel_cls, bpy.context)


def test_trajectory_range_shows_the_scene_range(registered):
    scene = bpy.context.scene
    scene.frame_start, scene.frame_end = 1, 8
    st = scene.reconloop
    st.use_scene_range = True
    layout = _draw(panels.RECONLOOP_PT_trajectory)
    shown = {e[2]: (e[1], e[3]) for e in layout.log if e[0] == "prop" and e[2].startswith("frame_")}
    assert shown["frame_start"] == (scene, False) and shown["frame_end"] == (scene, False)
    assert ("label", "No camera: the service invents a path") in layout.log
    st.use_scene_range = False
    st.trajectory_camera = bpy.data.objects["Camera"]
    layout = _draw(panels.RECONLOOP_PT_trajectory)
    shown = {e[2]: (e[1], e[3]) for e in layout.log if e[0] == "prop" and e[2].startswith("frame_")}
    assert shown["frame_end"] == (st, True)
    assert ("label", "40 frames") in layout.log
    st.capture_source = "FOLDER"  # a photo folder's cameras come from SfM: the camera is flagged, not counted
    labels = [e[1] for e in _draw(panels.RECONLOOP_PT_trajectory).log if e[0] == "label"]
    assert "A photo folder's cameras come from SfM: clear this camera" in labels and "40 frames" not in labels


def test_import_job_only_for_finished_jobs(registered):
    rt = bpy.context.window_manager.reconloop
    for job, state in (("a" * 32, "running"), ("b" * 32, "done")):
        item = rt.jobs.add()
        item.job, item.state = job, state
    rt.jobs_index = 0
    assert ("operator", "reconloop.import_job") not in _draw(panels.RECONLOOP_PT_jobs).log
    with pytest.raises(RuntimeError, match="is running: its results can be imported when it is done"):
        bpy.ops.reconloop.import_job(job="a" * 32)
    rt.jobs_index = 1
    assert ("operator", "reconloop.import_job") in _draw(panels.RECONLOOP_PT_jobs).log


def test_readme_names_the_blender_version():
    manifest = (REPO / "blender_addon" / "blender_manifest.toml").read_text()
    version = re.search(r'blender_version_min = "(\d+\.\d+)', manifest).group(1)
    assert f"Blender {version} or newer" in (REPO / "README.md").read_text()


def test_photo_folder_results_say_which_photos_got_no_camera_and_animate_the_path(registered, temple_dir, tmp_path):
    """A photo-folder job's cameras.json (as backend.outputs writes it) with 2 of 3 photos placed and an
    invented path: the sidebar lists the third photo; an animated camera follows the path."""
    from backend.formats.middlebury import read_middlebury
    from backend.outputs import CaptureCamera, write_cameras
    from blender_addon import operators
    from blender_addon.scene_read import sample_camera

    caps = read_middlebury(temple_dir).captures
    placed = [CaptureCamera(c.name, c.name + ".png", c.camera, True) for c in caps[:2]]
    path = [(f, caps[i].camera.scaled(320, 240)) for f, i in ((1, 3), (5, 4), (9, 5))]
    write_cameras(tmp_path, placed, path)
    photos = {c.name: str(c.image) for c in caps[:3]}
    # The photos' size and pixel aspect (the estimated cameras set them too); the path's 320x240 does not.
    from blender_addon.cameras import blender_from_opencv

    r = bpy.context.scene.render
    aspect = blender_from_opencv(caps[0].camera.w2c, caps[0].camera.K, 640, 480)
    r.resolution_x, r.resolution_y, r.pixel_aspect_x, r.pixel_aspect_y = (
        640,
        480,
        aspect.pixel_aspect_x,
        aspect.pixel_aspect_y,
    )
    importer = operators.ResultImporter(bpy.context.scene.name, "folder", "", (1, 40), photos)
    importer.job = "job1"
    importer.on_file("cameras", "cameras.json", str(tmp_path / "cameras.json"))

    note = bpy.context.window_manager.reconloop.unregistered
    assert note.startswith("1 of 3 photos could not be placed") and caps[2].name in note
    st = bpy.context.scene.reconloop
    st.capture_source = "FOLDER"
    log = _draw(panels.RECONLOOP_PT_captures).log
    assert any(e[0] == "label" and caps[2].name in e[1] for e in log)

    cam = bpy.data.objects[importer.trajectory_camera]
    assert importer.frame_range == (1, 9)
    scene = bpy.context.scene
    assert (r.resolution_x, r.resolution_y) == (640, 480)
    for frame, want in path:  # the path's views at the render's size (the same shape)
        scene.frame_set(frame)
        got = sample_camera(cam, scene)
        np.testing.assert_allclose(got.w2c, want.w2c, atol=1e-5)
        np.testing.assert_allclose(got.K, want.scaled(640, 480).K, atol=1e-3)


def test_gaussian_import_sets_the_scene_to_render_them_as_fitted(registered, tmp_path):
    from protocol.ply import SH_C0, GaussianArrays, write_gaussians_ply

    n = 10
    g = GaussianArrays(
        means=np.zeros((n, 3), np.float32),
        log_scales=np.full((n, 3), -2.0, np.float32),
        quats=np.tile(np.float32([1, 0, 0, 0]), (n, 1)),
        opacity_logits=np.zeros(n, np.float32),
        sh=np.full((n, 1, 3), 0.3 / SH_C0, np.float32),
    )
    write_gaussians_ply(tmp_path / "g.ply", g)
    scene = bpy.context.scene
    assert bpy.ops.reconloop.import_gaussians(filepath=str(tmp_path / "g.ply")) == {"FINISHED"}
    assert scene.view_settings.view_transform == "Raw" and scene.cycles.min_transparent_bounces >= 256
    assert bpy.ops.reconloop.import_gaussians(filepath=str(tmp_path / "g.ply"), as_fitted=False) == {"FINISHED"}
    assert scene.view_settings.view_transform == "Standard"
