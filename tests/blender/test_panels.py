"""What the sidebar shows: the trajectory's frame range, past jobs, the missing-trajectory note."""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import bpy
import pytest

import blender_addon
from blender_addon import panels

from ._layout import RecordingLayout

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def registered():
    blender_addon.register()
    yield
    blender_addon.unregister()


def _draw(panel_cls) -> RecordingLayout:
    layout = RecordingLayout()
    panel_cls.draw(SimpleNamespace(layout=layout), bpy.context)
    return layout


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
