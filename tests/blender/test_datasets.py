"""Datasets into Blender through File > Import > ReconLoop scene, and out again: the real scenes come
back from scene.json, COLMAP and transforms.json with their cameras within 0.01 px."""

from __future__ import annotations

import sys
from pathlib import Path

import bpy
import numpy as np
import pytest

import blender_addon
from backend.formats import IMPORTERS, detect_format
from backend.scene import load_scene
from blender_addon import datasets

MAX_ERROR_PX = 0.01
DATASETS = ("middlebury_temple", "middlebury_dino", "llff_fern", "lund_door")


@pytest.fixture
def registered():
    blender_addon.register()
    yield
    blender_addon.unregister()


def _reprojection_px(a, b, points: np.ndarray) -> float:
    """Largest distance between where two cameras put the same world points, pixels."""
    ua, _ = a.project(points)
    ub, _ = b.project(points)
    return float(np.abs(ua - ub).max())


def _points_in_front(cam, n=50, seed=0) -> np.ndarray:
    """World points spread over the camera's image at depths 1-5 (in the scene's units). [n, 3]"""
    rng = np.random.default_rng(seed)
    uv = rng.uniform([0, 0], [cam.width, cam.height], (n, 2))
    z = rng.uniform(1.0, 5.0, n)
    rays = np.c_[uv, np.ones(n)] @ np.linalg.inv(cam.K).T * z[:, None]
    c2w = cam.c2w
    return rays @ c2w[:3, :3].T + c2w[:3, 3]


def _check_same(original, back, what: str) -> None:
    by_name = {c.name: c for c in back}
    assert sorted(by_name) == sorted(c.name for c in original), what
    for c in original:
        b = by_name[c.name].camera
        assert (b.width, b.height) == (c.camera.width, c.camera.height), (what, c.name)
        pts = _points_in_front(c.camera)
        err = _reprojection_px(c.camera, b, pts)
        assert err < MAX_ERROR_PX, f"{what} {c.name}: cameras differ by {err:.4f} px"
        if c.camera.distortion is not None and not c.camera.distortion.is_identity:
            assert b.distortion is not None, (what, c.name)
            ka, kb = (np.resize(np.r_[d.to_opencv(), np.zeros(8)], 8) for d in (c.camera.distortion, b.distortion))
            assert np.allclose(ka, kb), (what, c.name, ka, kb)  # COLMAP may name the same model otherwise


@pytest.mark.parametrize("name", DATASETS)
def test_import_export_round_trip(registered, name, tmp_path):
    src = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / name
    if not src.is_dir():
        pytest.fail(f"real scene {src} missing") if "CI" in __import__("os").environ else pytest.skip(f"{src} missing")
    original = IMPORTERS.get(detect_format(src))(src).captures
    assert bpy.ops.reconloop.import_dataset(directory=str(src), filepath=str(src)) == {"FINISHED"}
    scene = bpy.context.scene
    coll = scene.reconloop.captures
    assert coll is not None and coll.name.startswith(datasets.CAPTURES_COLLECTION)
    cams = [o for o in coll.objects if o.type == "CAMERA"]
    assert len(cams) == len(original) and all(o.data.background_images[0].image for o in cams)

    assert bpy.ops.reconloop.export_dataset(filepath=str(tmp_path / "scene"), format="scene") == {"FINISHED"}
    _check_same(original, load_scene(tmp_path / "scene").captures, "scene.json")
    datasets.export_dataset(scene, coll, str(tmp_path / "colmap"), "colmap")
    images = Path(original[0].image).parent  # export_colmap names images relative to their folder
    _check_same(original, IMPORTERS.get("colmap")(tmp_path / "colmap", images=str(images)).captures, "COLMAP")
    path = datasets.export_dataset(scene, coll, str(tmp_path / "nerf"), "nerf")
    _check_same(original, IMPORTERS.get("nerf")(path).captures, "transforms.json")


def test_bad_dataset_is_a_plain_error(registered, tmp_path):
    with pytest.raises(RuntimeError, match="cannot import"):
        bpy.ops.reconloop.import_dataset(directory=str(tmp_path), filepath=str(tmp_path))


def test_dataset_import_stays_torch_free():
    import subprocess

    code = (
        "import sys, blender_addon.cameras, backend.formats, backend.scene; "
        "assert not {'torch', 'cv2', 'PIL'} & set(sys.modules), sorted({'torch', 'cv2', 'PIL'} & set(sys.modules))"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[2])
