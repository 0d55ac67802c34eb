"""Datasets into Blender through File > Import > ReconLoop scene, and out again: the real scenes come
back from scene.json, COLMAP and transforms.json with their cameras within 0.01 px."""

from __future__ import annotations

import sys
from pathlib import Path

import bpy
import numpy as np
import pytest

from backend.formats import IMPORTERS, detect_format
from backend.scene import load_scene
from blender_addon import datasets
from tests.conftest import require_shared_data

MAX_ERROR_PX = 0.01
DATASETS = ("middlebury_temple", "middlebury_dino", "llff_fern", "lund_door")


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
    src = require_shared_data(name)  # RECONLOOP_SHARED_DATA, else ../shared/data; missing: skip, or fail under CI
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


def _write_scene(root: Path, cams: dict[str, tuple[int, int, float, float]]) -> Path:
    """A scene.json of one camera per (width, height, fx, fy), each with a black photo of its size."""
    import json

    from PIL import Image

    (root / "images").mkdir(parents=True)
    caps = []
    for name, (w, h, fx, fy) in cams.items():
        Image.new("RGB", (w, h)).save(root / "images" / f"{name}.png")
        w2c = np.eye(4)
        w2c[2, 3] = 3.0
        K = [[fx, 0, w / 2 + 10], [0, fy, h / 2 - 7], [0, 0, 1]]
        camera = {"w2c": w2c.tolist(), "K": K, "width": w, "height": h}
        caps.append({"name": name, "image": f"images/{name}.png", "camera": camera})
    (root / "scene.json").write_text(json.dumps({"version": 1, "captures": caps}))
    return root


@pytest.mark.parametrize(
    "second, shown",
    [((480, 640, 500.0, 500.0), "'b' (480x640, fx/fy 1)"), ((640, 480, 500.0, 520.0), "'b' (640x480, fx/fy 0.961538)")],
)
def test_cameras_of_another_size_or_pixel_aspect_are_refused(registered, tmp_path, second, shown):
    """A scene has one render size and pixel aspect: every camera after the first would get wrong
    intrinsics, so the import refuses them, naming them, and adds nothing."""
    from blender_addon.errors import ReconLoopError

    root = _write_scene(tmp_path / "s", {"a": (640, 480, 500.0, 500.0), "b": second, "c": (640, 480, 500.0, 500.0)})
    scene = bpy.context.scene
    render = (scene.render.resolution_x, scene.render.resolution_y)
    n_objects = len(bpy.data.objects)
    with pytest.raises(ReconLoopError, match="1 camera") as err:
        datasets.import_dataset(scene, str(root))
    assert shown in str(err.value) and "'a' (640x480, fx/fy 1)" in str(err.value) and "'c'" not in str(err.value)
    assert len(bpy.data.objects) == n_objects and (scene.render.resolution_x, scene.render.resolution_y) == render
    # One size and aspect: imported, read back as written.
    ok = _write_scene(tmp_path / "ok", {"a": (640, 480, 500.0, 520.0), "b": (640, 480, 510.0, 530.4)})
    coll = datasets.import_dataset(scene, str(ok))
    assert "reconloop_sizes" not in coll
    from blender_addon.scene_read import read_captures

    got = {c.name: c.camera for c in read_captures(coll, scene)}
    np.testing.assert_allclose(got["b"].K, [[510.0, 0, 330], [0, 530.4, 233], [0, 0, 1]], atol=1e-3)


def test_export_writes_the_photo_in_use_and_refuses_a_packed_one(registered, tmp_path):
    import json

    from blender_addon.errors import ReconLoopError

    root = _write_scene(tmp_path / "s", {"a": (64, 48, 50.0, 50.0)})
    scene = bpy.context.scene
    coll = datasets.import_dataset(scene, str(root))
    cam = bpy.data.objects["a"]
    # The user swaps the photo (a stale path kept on the object must not win).
    from PIL import Image

    Image.new("RGB", (64, 48), (255, 0, 0)).save(tmp_path / "other.png")
    cam["reconloop_image"] = str(root / "images" / "a.png")
    cam.data.background_images[0].image = bpy.data.images.load(str(tmp_path / "other.png"))
    out = datasets.export_dataset(scene, coll, str(tmp_path / "out"), "scene")
    image = json.loads(out.read_text())["captures"][0]["image"]
    assert (out.parent / image).resolve() == (tmp_path / "other.png").resolve()
    # A packed photo with no file on disk: said plainly, not written as "..".
    img = cam.data.background_images[0].image
    img.pack()
    img.filepath = ""
    with pytest.raises(ReconLoopError, match="camera 'a': photo is packed or not on disk; unpack it before exporting"):
        datasets.export_dataset(scene, coll, str(tmp_path / "out2"), "scene")


def _dtu_with_masks(scene, root: Path) -> Path:
    """An IDR/DTU folder of ``scene``'s captures: cameras.npz (world_mat P = K [R t] with IDR's pixel
    centres, identity scale_mat), ``image/`` linking the photos, ``mask/`` linking their mask files."""
    (root / "image").mkdir(parents=True)
    (root / "mask").mkdir()
    mats = {}
    for i, cap in enumerate(scene.captures):
        world_mat = np.eye(4)
        K_idr = cap.camera.K - np.array([[0, 0, 0.5], [0, 0, 0.5], [0, 0, 0]])  # IDR: pixel centres at integers
        world_mat[:3] = K_idr @ cap.camera.w2c[:3]
        mats[f"world_mat_{i}"], mats[f"scale_mat_{i}"] = world_mat, np.eye(4)
        (root / "image" / cap.image.name).symlink_to(cap.image)
        (root / "mask" / cap.mask.name).symlink_to(cap.mask)
    np.savez(root / "cameras.npz", **mats)
    return root


@pytest.mark.parametrize("source", ["scene", "dtu"])
def test_capture_masks_reach_the_cameras_the_payload_and_the_export(registered, dino_dir, tmp_path, source):
    """A masked dataset (the dino's silhouettes, as `reconloop import middlebury --silhouettes` writes them,
    read from scene.json or from a DTU ``mask/`` folder): each camera keeps its mask file's absolute path,
    a job sends that file's bytes beside the photo (a hull job needs them), the export writes it back, and a
    mask file gone since is named with its capture."""
    from backend.formats import import_scene
    from blender_addon import scene_io
    from blender_addon.errors import ReconLoopError
    from blender_addon.scene_read import read_captures
    from protocol.schemas import validate
    from protocol.version import SUPPORTED_VERSIONS

    made = import_scene("middlebury", dino_dir, tmp_path / "scene", silhouettes=True)
    src = tmp_path / "scene" if source == "scene" else _dtu_with_masks(made, tmp_path / "dtu")
    expected = {c.name: c.mask for c in (load_scene(src) if source == "scene" else IMPORTERS.get("dtu")(src)).captures}
    assert len(expected) == 16 and all(m is not None and m.is_file() for m in expected.values())

    assert bpy.ops.reconloop.import_dataset(directory=str(src), filepath=str(src)) == {"FINISHED"}
    scene = bpy.context.scene
    coll = scene.reconloop.captures
    cams = [o for o in coll.objects if o.type == "CAMERA"]
    assert sorted(o.name for o in cams) == sorted(expected)
    for o in cams:
        assert o[datasets.PROP_MASK] == str(expected[o.name].resolve()), o.name
        assert Path(o[datasets.PROP_MASK]).is_absolute()

    caps = read_captures(coll, scene)
    assert {c.name: c.mask for c in caps} == {n: str(m.resolve()) for n, m in expected.items()}
    payload = scene_io.build_scene_payload(caps, [], {"geometry": "hull"})
    for msg in payload["captures"]:
        assert msg["mask"].tobytes() == expected[msg["name"]].read_bytes(), msg["name"]
        assert msg["image"].tobytes() != msg["mask"].tobytes()
    validate({"v": max(SUPPORTED_VERSIONS), "op": "submit", "id": 1, "scene": payload}, "request")

    assert bpy.ops.reconloop.export_dataset(filepath=str(tmp_path / "out"), format="scene") == {"FINISHED"}
    back = {c.name: c.mask for c in load_scene(tmp_path / "out").captures}
    assert back == {n: m.resolve() for n, m in expected.items()}

    # One camera without a mask sends none; a mask file gone since is named with its capture.
    del bpy.data.objects["dinoSR0002"][datasets.PROP_MASK]
    gone = expected["dinoSR0001"].resolve()
    gone.unlink()
    caps = read_captures(coll, scene)
    assert next(c for c in caps if c.name == "dinoSR0002").mask is None
    with pytest.raises(ReconLoopError, match=f"capture 'dinoSR0001': mask file not found: {gone}"):
        scene_io.build_scene_payload(caps, [], {})
    with pytest.raises(ReconLoopError, match=f"camera 'dinoSR0001': mask file not found: {gone}"):
        datasets.export_dataset(scene, coll, str(tmp_path / "out2"), "scene")
    ok = [c for c in caps if c.name != "dinoSR0001"]
    payload = scene_io.build_scene_payload(ok, [], {})
    assert [("mask" in m) for m in payload["captures"]][:2] == [False, True]  # dinoSR0002, dinoSR0003
