"""scripts/make_demo_scene.py at a tiny size: a valid scene whose cameras see the beacon where it is."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from backend.scene import load_scene
from tests.conftest import require_module

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "make_demo_scene.py"

require_module("bpy", "the demo scene is made in Blender")


@pytest.fixture(scope="module")
def tiny_scene(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("demo")
    cmd = [
        sys.executable,
        str(SCRIPT),
        "--out",
        str(out),
        "--captures",
        "2",
        "--frames",
        "3",
        "--size",
        "64x48",
        "--samples",
        "1",
        "--threads",
        "1",
    ]
    subprocess.run(cmd, check=True, capture_output=True, timeout=120)
    return out


def _red_centroid(path: Path) -> np.ndarray:
    rgb = np.asarray(Image.open(path).convert("RGB")).astype(np.int32)
    red = (rgb[..., 0] > 180) & (rgb[..., 1] < 80) & (rgb[..., 2] < 80)
    assert red.sum() >= 4, f"beacon not visible in {path.name}"
    ys, xs = np.nonzero(red)
    return np.array([xs.mean() + 0.5, ys.mean() + 0.5])  # pixel i spans [i, i+1]


def test_scene_loads_with_captures_trajectory_heldout(tiny_scene: Path) -> None:
    scene = load_scene(tiny_scene)
    assert len(scene.captures) == 2 and all(c.camera is not None for c in scene.captures)
    assert [t.frame for t in scene.trajectory] == [1, 2, 3]
    assert len(scene.heldout) == 3
    assert (scene.settings.width, scene.settings.height) == (64, 48)
    assert (tiny_scene / "demo.blend").stat().st_size > 0
    for c in scene.captures + scene.heldout:
        assert Image.open(c.image).size == (64, 48)


def test_cameras_project_the_beacon_onto_its_pixels(tiny_scene: Path) -> None:
    sys.path.insert(0, str(REPO / "scripts"))
    from make_demo_scene import BEACON_CENTER

    scene = load_scene(tiny_scene)
    views = scene.captures + scene.heldout
    for view in views:
        uv, z = view.camera.project(np.array([BEACON_CENTER]))
        assert z[0] > 0
        err = np.linalg.norm(uv[0] - _red_centroid(view.image))
        assert err < 1.0, f"{view.name}: beacon centre projects {err:.2f} px from its pixels"
    # the trajectory's cameras are the held-out ones
    for t, h in zip(scene.trajectory, scene.heldout):
        np.testing.assert_allclose(t.camera.w2c, h.camera.w2c)


READ_BLEND = """
import json, sys
import bpy
sys.path.insert(0, {repo!r})
bpy.ops.wm.open_mainfile(filepath={blend!r})
import blender_addon
blender_addon.register()
from blender_addon.scene_read import read_captures, sample_trajectory
scene = bpy.context.scene
st = scene.reconloop
caps = read_captures(st.captures, scene)
traj = sample_trajectory(st.trajectory_camera, scene, *st.frame_range(scene))
print(json.dumps({{"captures": {{c.name: [c.camera.K.tolist(), c.camera.w2c.tolist()] for c in caps}},
                  "frames": [f for f, _ in traj]}}))
"""


def test_demo_blend_is_ready_to_reconstruct(tiny_scene: Path) -> None:
    """demo.blend opens with the sidebar pointing at a Captures collection of cameras with their photos
    and at the animated trajectory camera: what the Reconstruct button reads equals scene.json."""
    import json

    code = READ_BLEND.format(repo=str(REPO), blend=str(tiny_scene / "demo.blend"))
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tiny_scene)
    assert run.returncode == 0, run.stderr[-2000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])
    scene = load_scene(tiny_scene)
    assert got["frames"] == [t.frame for t in scene.trajectory]
    assert sorted(got["captures"]) == sorted(c.name for c in scene.captures)
    for c in scene.captures:
        K, w2c = got["captures"][c.name]
        np.testing.assert_allclose(K, c.camera.K, atol=1e-4)
        np.testing.assert_allclose(w2c, c.camera.w2c, atol=1e-5)
