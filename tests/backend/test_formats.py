"""Scene importers and exporters on the real scenes in ../shared/data (read where they lie)."""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pytest

from backend.formats import (
    EXPORTERS,
    IMPORTERS,
    add_import_arguments,
    export_scene,
    import_scene,
    read_bounds,
    read_colmap_points,
    run_import,
)
from backend.formats.colmap import camera_from_colmap, colmap_camera_params
from backend.formats.dtu import decompose_projection
from backend.formats.undistort import UNDISTORTED_DIR, UNDISTORTED_HELDOUT_DIR, undistort_capture, undistort_image
from backend.masks import MASK_LEVEL, capture_mask, read_mask
from backend.scene import Camera, Capture, Distortion, Scene, SceneError, load_scene
from tests.conftest import require_shared_data

# Bounding boxes from the READMEs of the Middlebury sets (min corner, max corner).
TEMPLE_BOX = (np.array([-0.073568, 0.021728, -0.012445]), np.array([0.028855, 0.181892, 0.062736]))
DINO_BOX = (np.array([-0.061897, -0.018874, -0.057845]), np.array([0.010897, 0.068227, 0.015495]))
DOOR_MEDIAN_REPROJ_PX = 0.5  # the data's README: 0.22 px for its COLMAP ground truth
EPIPOLAR_MEDIAN_PX = 0.5  # median Sampson distance of SIFT matches under our cameras
POSE_ATOL = 1e-9
UNDISTORT_MEAN_LEVELS = 0.01  # mean |difference| in 8-bit levels between two routes to the same pixels
FERN_FULL_FOCAL = 3260.52633  # poses_bounds.npy: focal at 4032x3024


@pytest.fixture(scope="module")
def door_scene(tmp_path_factory) -> Scene:
    return import_scene("colmap", require_shared_data("lund_door"), tmp_path_factory.mktemp("door"))


@pytest.fixture(scope="module")
def door_points():
    return read_colmap_points(require_shared_data("lund_door"))


@pytest.fixture(scope="module")
def fern_scene(tmp_path_factory) -> Scene:
    return import_scene("llff", require_shared_data("llff_fern"), tmp_path_factory.mktemp("fern"))


def assert_cameras_equal(a: list, b: list, atol: float = POSE_ATOL) -> None:
    assert [c.name for c in a] == [c.name for c in b]
    for ca, cb in zip(a, b):
        assert ca.image == cb.image
        assert (ca.camera.width, ca.camera.height) == (cb.camera.width, cb.camera.height)
        np.testing.assert_allclose(ca.camera.w2c, cb.camera.w2c, atol=atol)
        np.testing.assert_allclose(ca.camera.K, cb.camera.K, atol=atol)
        da, db = ca.camera.distortion, cb.camera.distortion
        assert (da is None) == (db is None)
        if da is not None:
            np.testing.assert_allclose(da.to_opencv(), db.to_opencv(), atol=atol)


def project_distorted(cam: Camera, xyz: np.ndarray) -> np.ndarray:
    """Pixel coordinates (ours) of world points through a camera with distortion. [N, 2]"""
    rvec, _ = cv2.Rodrigues(cam.w2c[:3, :3])
    dist = cam.distortion.to_opencv() if cam.distortion else np.zeros(4)
    uv, _ = cv2.projectPoints(xyz, rvec, cam.w2c[:3, 3], cam.K, dist)
    return uv[:, 0]


def median_epipolar_px(cap_a, cap_b) -> float:
    """Median Sampson distance (px) of SIFT matches between two photos under their cameras."""
    gray_a, gray_b = (cv2.imread(str(c.image), cv2.IMREAD_GRAYSCALE) for c in (cap_a, cap_b))
    sift = cv2.SIFT_create(2000)
    kp_a, desc_a = sift.detectAndCompute(gray_a, None)
    kp_b, desc_b = sift.detectAndCompute(gray_b, None)
    pairs = cv2.BFMatcher().knnMatch(desc_a, desc_b, k=2)
    good = [p[0] for p in pairs if len(p) == 2 and p[0].distance < 0.7 * p[1].distance]
    assert len(good) > 50
    # OpenCV keypoints have pixel centres at integers; ours at i + 0.5.
    xa = np.array([kp_a[g.queryIdx].pt for g in good]) + 0.5
    xb = np.array([kp_b[g.trainIdx].pt for g in good]) + 0.5
    rel = cap_b.camera.w2c @ cap_a.camera.c2w
    R, t = rel[:3, :3], rel[:3, 3]
    t_cross = np.array([[0, -t[2], t[1]], [t[2], 0, -t[0]], [-t[1], t[0], 0]])
    F = np.linalg.inv(cap_b.camera.K).T @ t_cross @ R @ np.linalg.inv(cap_a.camera.K)
    ha, hb = np.c_[xa, np.ones(len(xa))], np.c_[xb, np.ones(len(xb))]
    Fa, Fb = ha @ F.T, hb @ F
    num = np.sum(hb * Fa, axis=1) ** 2
    return float(np.median(np.sqrt(num / (Fa[:, 0] ** 2 + Fa[:, 1] ** 2 + Fb[:, 0] ** 2 + Fb[:, 1] ** 2))))


# ----------------------------------------------------------------------------------------------
# Middlebury


@pytest.mark.parametrize("name, box", [("middlebury_temple", TEMPLE_BOX), ("middlebury_dino", DINO_BOX)])
def test_middlebury_box_centre_in_every_view(name, box, tmp_path):
    scene = import_scene("middlebury", require_shared_data(name), tmp_path)
    assert len(scene.captures) == 16
    centre = (box[0] + box[1]) / 2
    for cap in scene.captures:
        cam = cap.camera
        assert (cam.width, cam.height) == (640, 480)
        uv, z = cam.project(centre[None])
        assert z[0] > 0, cap.name
        assert 0 <= uv[0, 0] < cam.width and 0 <= uv[0, 1] < cam.height, (cap.name, uv)


@pytest.mark.parametrize("size, every", [((320, 240), False), ((640, 400), False), ((512, 384), True)])
def test_resized_middlebury_photos_are_refused_naming_one(temple_dir, tmp_path, size, every):
    """The par file has intrinsics and no image size: photos resized since (one to 320x240 or 640x400, or all to
    512x384) were imported with the full-size K, wrong cameras."""
    from PIL import Image

    src = tmp_path / "temple"
    shutil.copytree(temple_dir, src)
    photos = sorted(src.glob("*.png"))
    for photo in photos if every else photos[5:6]:
        with Image.open(photo) as im:
            im.resize(size).save(photo)
    name = r"templeSR\d+\.png" if every else photos[5].name
    with pytest.raises(SceneError, match=rf"{name} is {size[0]}x{size[1]}|far from the centre of {name}"):
        import_scene("middlebury", src, tmp_path / "out")


def test_an_import_that_does_not_load_keeps_the_folders_scene_json(tmp_path):
    """A COLMAP model whose photo was resized since: the import is refused naming it, and the folder keeps the
    scene.json it had (it used to be replaced by the refused one), or none when it had none."""
    from PIL import Image

    src = tmp_path / "door"
    shutil.copytree(require_shared_data("lund_door"), src)
    photo = sorted((src / "images").iterdir())[2]
    with Image.open(photo) as im:
        im.resize((im.width // 2, im.height // 2)).save(photo)
    dst = tmp_path / "scene"
    with pytest.raises(SceneError, match=rf"does not match the image {photo.name}"):
        import_scene("colmap", src, dst)
    assert not (dst / "scene.json").exists()
    dst.mkdir(exist_ok=True)
    (dst / "scene.json").write_text("the user's earlier scene")
    with pytest.raises(SceneError, match=rf"does not match the image {photo.name}"):
        import_scene("colmap", src, dst)
    assert (dst / "scene.json").read_text() == "the user's earlier scene"


def test_temple_box_corners_in_every_view_and_epipolar(temple_dir, tmp_path):
    scene = import_scene("middlebury", temple_dir, tmp_path)
    corners = np.array(list(itertools.product(*zip(*TEMPLE_BOX))))
    for cap in scene.captures:
        uv, z = cap.camera.project(corners)
        assert np.all(z > 0) and np.all((uv >= 0) & (uv < [640, 480])), cap.name
    assert median_epipolar_px(scene.captures[0], scene.captures[1]) < EPIPOLAR_MEDIAN_PX
    # The same measure with the next view's camera swapped in: far off, so the check can fail.
    wrong = replace(scene.captures[1], camera=scene.captures[3].camera)
    assert median_epipolar_px(scene.captures[0], wrong) > 2 * EPIPOLAR_MEDIAN_PX


# ----------------------------------------------------------------------------------------------
# COLMAP (lund_door)


def test_door_reprojection_through_imported_cameras(door_scene, door_points):
    assert len(door_scene.captures) == 12
    cam = door_scene.captures[0].camera
    assert (cam.width, cam.height) == (1296, 1936)
    assert cam.distortion.model == "SIMPLE_RADIAL"
    assert len(door_points.xyz) == 11384 and door_points.rgb.dtype == np.uint8
    errors = []
    for cap in door_scene.captures:
        idx, uv = door_points.observations[cap.name]
        errors.append(np.linalg.norm(project_distorted(cap.camera, door_points.xyz[idx]) - uv, axis=1))
    errors = np.concatenate(errors)
    assert len(errors) == 73327
    median = float(np.median(errors))
    print(f"door: median reprojection error {median:.4f} px over {len(errors)} observations")
    assert median < DOOR_MEDIAN_REPROJ_PX


def test_door_binary_model_equals_text(door_dir, door_scene, tmp_path):
    import pycolmap

    model = tmp_path / "sparse" / "0"
    model.mkdir(parents=True)
    pycolmap.Reconstruction(str(door_dir / "colmap_ground_truth")).write_binary(str(model))
    assert (model / "cameras.bin").is_file() and not (model / "cameras.txt").exists()
    scene = import_scene("colmap", tmp_path, tmp_path / "scene", images=str(door_dir / "images"))
    assert_cameras_equal(scene.captures, door_scene.captures, atol=1e-12)
    points = read_colmap_points(tmp_path)
    np.testing.assert_array_equal(points.xyz, read_colmap_points(door_dir).xyz)


def test_door_undistort(door_dir, door_scene, door_points, tmp_path):
    scene = import_scene("colmap", door_dir, tmp_path, undistort=True, train_ids=[0, 1], cameras="colmap_ground_truth")
    assert len(scene.captures) == 2 and len(scene.heldout) == 10
    for i, (cap, orig) in enumerate(zip(scene.captures + scene.heldout, door_scene.captures)):
        assert cap.camera.distortion is None
        folder = UNDISTORTED_DIR if i < 2 else UNDISTORTED_HELDOUT_DIR  # held-out views in a folder of their own
        assert cap.image == (tmp_path / folder / f"{orig.name}.JPG").resolve()
        np.testing.assert_array_equal(cap.camera.K, orig.camera.K)
        np.testing.assert_array_equal(cap.camera.w2c, orig.camera.w2c)
    # A 3D point through the pinhole = its distorted projection mapped through undistortPoints.
    orig, cam = door_scene.captures[0].camera, scene.captures[0].camera
    idx, _ = door_points.observations["DSC_0001"]
    xyz = door_points.xyz[idx]
    pinhole, _ = cam.project(xyz)
    distorted = project_distorted(orig, xyz)
    mapped = cv2.undistortPoints(distorted[:, None], orig.K, orig.distortion.to_opencv(), P=orig.K)[:, 0]
    np.testing.assert_allclose(pinhole, mapped, atol=1e-3)
    assert np.abs(distorted - pinhole).max() > 5  # the lens moves points by several pixels
    # The image: output pixel centre (u+0.5, v+0.5) samples the photo where its ray lands, found here by
    # projectPoints (ours -> OpenCV's integer pixel centres: -0.5) instead of the undistortion map.
    photo = cv2.imread(str(door_scene.captures[0].image), cv2.IMREAD_GRAYSCALE)
    undistorted = undistort_image(photo, orig)
    rng = np.random.default_rng(0)
    pix = np.stack([rng.integers(100, orig.width - 100, 4000), rng.integers(100, orig.height - 100, 4000)], 1)
    rays = np.c_[(pix + 0.5 - orig.K[:2, 2]) / np.diag(orig.K)[:2], np.ones(len(pix))]
    src, _ = cv2.projectPoints(rays, np.zeros(3), np.zeros(3), orig.K, orig.distortion.to_opencv())
    src = (src[:, 0] - 0.5).astype(np.float32)[None]
    expected = cv2.remap(photo, src[..., 0], src[..., 1], cv2.INTER_LINEAR)[0]
    got = undistorted[pix[:, 1], pix[:, 0]]
    # 0.0 here; OpenCV's own convention (cv2.undistort with K as is: half a pixel off) gives 0.026.
    assert np.abs(expected.astype(float) - got).mean() < UNDISTORT_MEAN_LEVELS
    written = cv2.imread(str(scene.captures[0].image), cv2.IMREAD_GRAYSCALE)
    assert written.shape == photo.shape
    assert np.abs(written.astype(float) - undistorted).mean() < 2  # JPEG re-encoding at quality 95


def test_colmap_camera_models_round_trip():
    cases = {
        "SIMPLE_PINHOLE": [500.0, 320.0, 240.0],
        "PINHOLE": [500.0, 510.0, 320.0, 240.0],
        "SIMPLE_RADIAL": [500.0, 320.0, 240.0, 0.01],
        "RADIAL": [500.0, 320.0, 240.0, 0.01, -0.002],
        "OPENCV": [500.0, 510.0, 320.0, 240.0, 0.01, -0.002, 0.001, 0.0005],
        "FULL_OPENCV": [500.0, 510.0, 320.0, 240.0, 0.01, -0.002, 0.001, 0.0005, 0.1, 0.02, 0.003, 0.0004],
    }
    for model, params in cases.items():
        cam = camera_from_colmap(model, 640, 480, np.array(params), model)
        assert cam.K[0, 0] == params[0] and cam.K[1, 2] == 240.0
        assert colmap_camera_params(cam, model) == (model, params)
    cam = camera_from_colmap("SIMPLE_RADIAL", 640, 480, np.array(cases["SIMPLE_RADIAL"]), "x")
    stretched = replace(cam, K=cam.K * [[1.0], [1.1], [1.0]])
    model, params = colmap_camera_params(stretched, "x")
    assert model == "OPENCV" and params[4:] == [0.01, 0.0, 0.0, 0.0]
    with pytest.raises(SceneError, match="FISHEYE is not supported; supported: SIMPLE_PINHOLE"):
        camera_from_colmap("OPENCV_FISHEYE", 640, 480, np.zeros(8), "cameras[1]")
    with pytest.raises(SceneError, match=r"cameras\[2\]: PINHOLE takes 4 parameters"):
        camera_from_colmap("PINHOLE", 640, 480, np.zeros(3), "cameras[2]")


# ----------------------------------------------------------------------------------------------
# LLFF (fern)


def test_fern_cameras(fern_dir, fern_scene, tmp_path):
    raw = np.load(fern_dir / "poses_bounds.npy")
    assert len(fern_scene.captures) == len(raw) == 20
    for cap in fern_scene.captures:
        cam = cap.camera
        assert (cam.width, cam.height) == (504, 378)
        assert cap.image.parent.name == "images_8"
        np.testing.assert_allclose(
            cam.K, [[FERN_FULL_FOCAL / 8, 0, 252], [0, FERN_FULL_FOCAL / 8, 189], [0, 0, 1]], rtol=1e-6
        )
        np.testing.assert_allclose(cam.w2c[:3, :3] @ cam.w2c[:3, :3].T, np.eye(3), atol=1e-9)
        assert np.linalg.det(cam.w2c[:3, :3]) > 0
    bounds = read_bounds(fern_scene.root)
    assert bounds["image000"] == (raw[0, 15], raw[0, 16])
    # Forward-facing: a point at mid-depth on the central view's optical axis is in front of every
    # camera and inside every image.
    mid = fern_scene.captures[len(raw) // 2]
    near, far = bounds[mid.name]
    point = mid.camera.center + mid.camera.c2w[:3, 2] * (near + far) / 2
    for cap in fern_scene.captures:
        uv, z = cap.camera.project(point[None])
        assert z[0] > near / 2 and 0 <= uv[0, 0] < 504 and 0 <= uv[0, 1] < 378, cap.name
    # Matches between neighbours agree with the epipolar geometry of the imported cameras.
    assert median_epipolar_px(fern_scene.captures[0], fern_scene.captures[1]) < EPIPOLAR_MEDIAN_PX
    # images_4: K doubles.
    scene4 = import_scene("llff", fern_dir, tmp_path, images="images_4")
    np.testing.assert_allclose(scene4.captures[3].camera.K[:2], fern_scene.captures[3].camera.K[:2] * 2)


def test_fern_holdout_protocol(fern_dir, tmp_path):
    scene = import_scene("llff", fern_dir, tmp_path, holdout_every=8)
    assert [c.name for c in scene.heldout] == ["image000", "image008", "image016"]
    assert len(scene.captures) == 17
    scene = import_scene("llff", fern_dir, tmp_path, train_ids=[1, 10, 19])
    assert [c.name for c in scene.captures] == ["image001", "image010", "image019"]
    assert len(scene.heldout) == 17
    with pytest.raises(ValueError, match=r"train_ids: must be distinct indices in \[0, 19\]"):
        import_scene("llff", fern_dir, tmp_path, train_ids=[3, 20])


def test_a_held_out_view_at_a_kept_pose_is_not_held_out(temple_dir, tmp_path, caplog):
    """The temple photographs one pose twice (templeSR0001, templeSR0011: 41.5 dB apart): holding out one
    while the other trains would score memorisation, so it is left out of the held-out views, by name."""
    scene = import_scene("middlebury", temple_dir, tmp_path, holdout_every=8)
    assert [c.name for c in scene.heldout] == ["templeSR0009"] and "templeSR0001" not in [
        c.name for c in scene.captures
    ]
    assert "not held out, at the pose of a kept capture: templeSR0001" in caplog.text
    scene = import_scene("middlebury", temple_dir, tmp_path, train_ids=[1, 2, 3])  # no repeat among these
    assert "templeSR0001" in [c.name for c in scene.heldout] and "templeSR0011" in [c.name for c in scene.heldout]
    # the pose rule at the kept cameras' own scale: a view far from them does not widen it (it merged two kept
    # cameras 1.2 % apart and dropped the far view as a repeat)
    from backend.camera_paths import repeats_a_pose
    from backend.scene import look_at

    cams = [c.camera for c in scene.captures]
    far = replace(cams[0], w2c=look_at(50 * cams[0].center + 1.0))
    assert repeats_a_pose(cams, [far, cams[1]]) == [False, True]


# ----------------------------------------------------------------------------------------------
# Round trips through the exporters


@pytest.mark.parametrize("scene_name", ["door", "fern", "temple"])
def test_export_reimport_round_trip(scene_name, door_scene, fern_scene, temple_dir, tmp_path):
    scene = {"door": door_scene, "fern": fern_scene}.get(scene_name) or import_scene(
        "middlebury", temple_dir, tmp_path / "temple"
    )
    model = export_scene("colmap", scene, tmp_path / "sparse")
    image_root = scene.captures[0].image.parent
    back = import_scene("colmap", model, tmp_path / "c", images=str(image_root))
    assert_cameras_equal(back.captures, scene.captures + scene.heldout)
    json_path = export_scene("nerf", scene, tmp_path / "nerf")
    back = import_scene("nerf", json_path, tmp_path / "n")
    assert_cameras_equal(back.captures, scene.captures)
    assert_cameras_equal(back.heldout, scene.heldout)


def test_colmap_export_with_points_round_trip(door_dir, door_scene, door_points, tmp_path):
    model = export_scene("colmap", door_scene, tmp_path / "model", points=door_points)
    back = read_colmap_points(model)
    np.testing.assert_array_equal(back.ids, door_points.ids)
    np.testing.assert_array_equal(back.xyz, door_points.xyz)
    np.testing.assert_array_equal(back.rgb, door_points.rgb)
    for name, (idx, uv) in door_points.observations.items():
        np.testing.assert_array_equal(back.observations[name][0], idx)
        np.testing.assert_array_equal(back.observations[name][1], uv)


def test_nerf_synthetic_layout(fern_scene, tmp_path):
    """NeRF's own layout: camera_angle_x, file paths without suffix, train and test files."""
    cams = [c.camera for c in fern_scene.captures]
    angle_x = 2 * np.arctan(0.5 * cams[0].width / cams[0].K[0, 0])

    def frames(caps):
        out = []
        for cap in caps:
            rel = Path(os.path.relpath(cap.image.with_suffix(""), tmp_path))
            c2w_gl = cap.camera.c2w @ np.diag([1.0, -1.0, -1.0, 1.0])
            out.append({"file_path": rel.as_posix(), "transform_matrix": c2w_gl[:3].tolist()})
        return out

    for split, caps in (("train", fern_scene.captures[:15]), ("test", fern_scene.captures[15:])):
        data = {"camera_angle_x": angle_x, "frames": frames(caps)}
        (tmp_path / f"transforms_{split}.json").write_text(json.dumps(data))
    scene = import_scene("nerf", tmp_path, tmp_path / "scene")
    assert_cameras_equal(scene.captures, fern_scene.captures[:15], atol=1e-6)
    assert_cameras_equal(scene.heldout, fern_scene.captures[15:], atol=1e-6)


def test_nerf_distortion_and_per_frame_intrinsics(door_scene, temple_dir, tmp_path):
    temple = import_scene("middlebury", temple_dir, tmp_path / "temple")
    mixed = Scene(root=tmp_path, captures=door_scene.captures[:2] + temple.captures[:2])
    path = export_scene("nerf", mixed, tmp_path / "mixed.json")
    data = json.loads(path.read_text())
    assert "fl_x" not in data and data["frames"][0]["k1"] == door_scene.captures[0].camera.distortion.params[0]
    back = import_scene("nerf", path, tmp_path / "back")
    assert back.captures[0].camera.distortion.model == "OPENCV"
    assert back.captures[2].camera.distortion is None
    assert_cameras_equal(back.captures[2:], temple.captures[:2])
    np.testing.assert_allclose(back.captures[0].camera.distortion.to_opencv(), [-0.0336422, 0, 0, 0])


def _nerf_split(root: Path, split: str, photo: Path, **top) -> None:
    """transforms_<split>.json with one frame, ``<split>/r_0`` (NeRF's names repeat across splits)."""
    (root / split).mkdir(parents=True)
    (root / split / "r_0.png").symlink_to(photo)
    frame = {"file_path": f"./{split}/r_0", "transform_matrix": np.eye(4).tolist()}
    (root / f"transforms_{split}.json").write_text(json.dumps({**top, "frames": [frame]}))


def test_undistorted_heldout_view_never_overwrites_a_capture_of_its_name(temple_dir, tmp_path):
    """NeRF's train/r_0 and test/r_0: both undistorted, each into its own file."""
    photos = sorted(temple_dir.glob("*.png"))
    for split, photo in (("train", photos[0]), ("test", photos[4])):
        _nerf_split(tmp_path / "src", split, photo, camera_angle_x=0.69, k1=0.05)
    scene = import_scene("nerf", tmp_path / "src", tmp_path / "scene", undistort=True)
    (cap,), (held,) = scene.captures, scene.heldout
    assert cap.name == held.name == "r_0" and cap.image != held.image
    expected = {cap.image: photos[0], held.image: photos[4]}
    for written, photo in expected.items():
        undistorted = undistort_image(
            cv2.imread(str(photo)), replace(cap.camera, distortion=Distortion("OPENCV", (0.05, 0, 0, 0)))
        )
        np.testing.assert_array_equal(cv2.imread(str(written)), undistorted)


def test_undistorted_capture_gets_its_mask_undistorted_too(tmp_path):
    """The mask file is remapped with the photo (the camera comes back without distortion, so nothing
    later would undistort the mask): same map, thresholded at MASK_LEVEL, written where no photo goes."""
    width, height = 80, 60
    K = np.array([[70.0, 0, 40.0], [0, 70.0, 30.0], [0, 0, 1]])
    cam = Camera(w2c=np.eye(4), K=K, width=width, height=height, distortion=Distortion("OPENCV", (-0.35, 0, 0, 0)))
    photo = tmp_path / "src" / "r_0.png"
    photo.parent.mkdir()
    cv2.imwrite(str(photo), np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8))
    mask = np.zeros((height, width), np.uint8)
    mask[4:30, 50:78] = 255  # off-centre, reaching the corner where the distortion moves pixels most
    mask_file = tmp_path / "src" / "r_0_mask.png"
    cv2.imwrite(str(mask_file), mask)
    dst = tmp_path / "scene"
    expected = undistort_image(mask, cam) > MASK_LEVEL
    written = {}
    # a held-out view "r_0" and a capture whose name could reach the held-out folder's files if it sat in the
    # captures' folder ("heldout/r_0", the old layout's undistorted/heldout/r_0.png), and one of the same name
    views = ((UNDISTORTED_DIR, "heldout/r_0"), (UNDISTORTED_HELDOUT_DIR, "r_0"), (UNDISTORTED_DIR, "r_0"))
    for folder, name in views:
        out = undistort_capture(Capture(name, photo, cam, mask=mask_file), dst, folder)
        assert out.camera.distortion is None and out.mask is not None and out.mask.is_file()
        assert out.mask.is_absolute() and out.mask != mask_file.resolve()
        got = read_mask(out.mask)
        assert (got != (mask > MASK_LEVEL)).sum() > 50  # really remapped, not a copy of the distorted mask
        np.testing.assert_array_equal(got, expected)
        np.testing.assert_array_equal(capture_mask(out, out.camera), expected)  # what the stages will see
        written[folder, name] = (out.image, out.mask)
    photos = {image for image, _ in written.values()}
    masks = {m for _, m in written.values()}
    assert len(photos) == len(masks) == 3 and not photos & masks
    np.testing.assert_array_equal(read_mask(mask_file), mask > MASK_LEVEL)  # the source mask is left as it was

    bare = undistort_capture(Capture("r_1", photo, cam), dst)
    assert bare.mask is None and bare.image.is_file()
    identity = replace(cam, distortion=Distortion("OPENCV", (0, 0, 0, 0)))
    kept = undistort_capture(Capture("r_2", photo, identity, mask=mask_file), dst)
    assert kept.mask == mask_file and kept.image == photo and kept.camera.distortion is None


def test_written_files_get_the_mode_a_new_file_would(temple_dir, tmp_path):
    """Atomic writes go through mkstemp (mode 0600); the file in place has open()'s mode under the umask."""
    scene = import_scene("middlebury", temple_dir, tmp_path / "scene")
    path = export_scene("nerf", scene, tmp_path / "out.json")
    umask = os.umask(0o022)
    os.umask(umask)
    for written in (path, tmp_path / "scene" / "scene.json"):
        assert written.stat().st_mode & 0o777 == 0o666 & ~umask


def test_nerf_frame_focal_wins_over_the_top_level_given_either_way(temple_dir, tmp_path):
    photo = sorted(temple_dir.glob("*.png"))[0]
    width = cv2.imread(str(photo)).shape[1]
    _nerf_split(tmp_path / "src", "train", photo, fl_x=1000.0)
    data = json.loads((tmp_path / "src" / "transforms_train.json").read_text())
    data["frames"][0]["camera_angle_x"] = 0.69
    (tmp_path / "src" / "transforms_train.json").write_text(json.dumps(data))
    K = import_scene("nerf", tmp_path / "src", tmp_path / "scene").captures[0].camera.K
    np.testing.assert_allclose(K[0, 0], 0.5 * width / np.tan(0.345))
    np.testing.assert_allclose(K[1, 1], K[0, 0])  # fy follows the frame's fx when nothing gives it


@pytest.mark.parametrize(
    "top, matrix, match",
    [
        ({"camera_angle_x": 0}, np.eye(4), r"camera_angle_x: must be between 0 and pi radians; got 0"),
        ({"camera_angle_x": 4.0}, np.eye(4), r"camera_angle_x: must be between 0 and pi radians; got 4.0"),
        ({"camera_angle_x": 0.69}, np.diag([1.0, 1.0, 0.0, 1.0]), r"transforms_train.json.*rotation"),
    ],
)
def test_nerf_bad_camera_names_the_field(temple_dir, tmp_path, top, matrix, match):
    _nerf_split(tmp_path / "src", "train", sorted(temple_dir.glob("*.png"))[0], **top)
    data = json.loads((tmp_path / "src" / "transforms_train.json").read_text())
    data["frames"][0]["transform_matrix"] = matrix.tolist()
    (tmp_path / "src" / "transforms_train.json").write_text(json.dumps(data))
    with pytest.raises(SceneError, match=match):
        import_scene("nerf", tmp_path / "src", tmp_path / "scene")


@pytest.mark.parametrize(
    "frame, top, match",
    [
        ({"transform_matrix": None}, {}, r"frames\[0\]\.transform_matrix: missing$"),
        (
            {"transform_matrix": [[float("nan")] * 4] * 4},
            {},
            r"transform_matrix: must be finite; it holds NaN or infinity$",
        ),
        ({}, {"test_filenames": 5}, r"^transforms_train.json.test_filenames: must be a list of file paths"),
        ({}, {"val_filenames": [5]}, r"^transforms_train.json.val_filenames: must be a list of file paths"),
    ],
)
def test_nerf_malformed_file_names_the_field(temple_dir, tmp_path, frame, top, match):
    _nerf_split(tmp_path / "src", "train", sorted(temple_dir.glob("*.png"))[0], camera_angle_x=0.69, **top)
    data = json.loads((tmp_path / "src" / "transforms_train.json").read_text())
    data["frames"][0].update(frame)
    (tmp_path / "src" / "transforms_train.json").write_text(json.dumps(data))
    with pytest.raises(SceneError, match=match):
        import_scene("nerf", tmp_path / "src", tmp_path / "scene")


def test_malformed_numpy_camera_files_are_refused_naming_the_file(fern_dir, temple_dir, tmp_path):
    """Empty, cut short, of strings, with no rows, or a NaN in a translation: one line naming the file."""
    images = str(fern_dir / "images_8")
    llff = tmp_path / "poses_bounds.npy"
    raw = np.load(fern_dir / "poses_bounds.npy")
    cases = [
        (b"", r"poses_bounds.npy is not a numpy array file"),
        (raw.astype(str), r"poses_bounds.npy: must hold real numbers; got dtype <U"),
        (raw[:0], r"poses_bounds.npy: holds no poses"),
    ]
    nan_translation = raw.copy()
    nan_translation[2, 3] = np.nan
    cases.append((nan_translation, r"poses_bounds.npy\[2\]: the pose must be finite; it holds NaN or infinity"))
    for content, match in cases:
        if isinstance(content, bytes):
            llff.write_bytes(content)
        else:
            np.save(llff, content)
        with pytest.raises(SceneError, match=match):
            import_scene("llff", tmp_path, tmp_path / "scene", images=images)
    dtu = tmp_path / "dtu"
    (dtu / "image").mkdir(parents=True)
    (dtu / "image" / "000.png").symlink_to(sorted(temple_dir.glob("*.png"))[0])
    for content, match in [
        (b"", r"cameras: .*cameras.npz is not a numpy .npz file"),
        (b"world_mat_0 = 1 2 3", r"cameras: .*cameras.npz is not a numpy .npz file"),
    ]:
        (dtu / "cameras.npz").write_bytes(content)
        with pytest.raises(SceneError, match=match):
            import_scene("dtu", dtu, tmp_path / "scene")
    np.savez(dtu / "cameras.npz", world_mat_0=np.full((4, 4), "a"))
    with pytest.raises(SceneError, match=r"cameras.npz\[world_mat_0\]: must be a matrix of numbers; got dtype <U1"):
        import_scene("dtu", dtu, tmp_path / "scene")


def test_a_par_file_that_is_not_text_is_refused_naming_it(tmp_path):
    (tmp_path / "temple_par.txt").write_bytes(b"\xff\xfe1\n")
    with pytest.raises(SceneError, match=r"^temple_par.txt: not a text file \(invalid start byte at byte 0\)"):
        import_scene("middlebury", tmp_path, tmp_path / "scene")


def test_an_import_of_another_format_drops_the_earlier_bounds(fern_dir, temple_dir, tmp_path):
    import_scene("llff", fern_dir, tmp_path / "scene", images=str(fern_dir / "images_8"))
    assert (tmp_path / "scene" / "bounds.json").is_file()
    import_scene("middlebury", temple_dir, tmp_path / "scene")
    assert not (tmp_path / "scene" / "bounds.json").exists()


@pytest.mark.parametrize(
    "column, value, match",
    [
        (slice(0, 3), 0.0, r"poses_bounds.npy\[2\].*rotation"),  # the rotation's first column zeroed
        (15, np.nan, r"poses_bounds.npy\[2\]: bounds must be finite with 0 < near < far; got near nan"),
        (16, 0.0, r"poses_bounds.npy\[2\]: bounds must be finite with 0 < near < far"),
    ],
)
def test_llff_bad_pose_or_bounds_names_the_row(fern_dir, tmp_path, column, value, match):
    raw = np.load(fern_dir / "poses_bounds.npy")
    raw[2, [0, 5, 10] if column == slice(0, 3) else column] = value
    np.save(tmp_path / "poses_bounds.npy", raw)
    with pytest.raises(SceneError, match=match):
        import_scene("llff", tmp_path, tmp_path / "scene", images=str(fern_dir / "images_8"))
    (tmp_path / "poses_bounds.npy").write_bytes(b"not numpy")
    with pytest.raises(SceneError, match=r"cameras: .*poses_bounds.npy is not a numpy array file"):
        import_scene("llff", tmp_path, tmp_path / "scene", images=str(fern_dir / "images_8"))


def test_llff_poses_of_photos_of_another_shape_are_refused_naming_the_row(fern_dir, tmp_path):
    """hwf of another shape than the images (a row's height and width swapped, or a square's): K was scaled by the
    two ratios apart, fx 543 against fy 306 for the fern, where the photos were rotated or cropped."""
    raw = np.load(fern_dir / "poses_bounds.npy")
    h, w = raw[2, 4], raw[2, 9]
    for hw in ((w, h), (w, w)):
        bad = raw.copy()
        bad[2, 4], bad[2, 9] = hw
        np.save(tmp_path / "poses_bounds.npy", bad)
        with pytest.raises(
            SceneError, match=r"poses_bounds.npy\[2\]: hwf says .* another shape than the images' 504x378"
        ):
            import_scene("llff", tmp_path, tmp_path / "scene", images=str(fern_dir / "images_8"))


# ----------------------------------------------------------------------------------------------
# DTU / IDR


def test_dtu_decomposition(temple_dir, tmp_path):
    """cameras.npz built from the temple: P scaled by a negative number, a scale_mat to the unit sphere,
    K with IDR's pixel centres at integers (the importer moves them to ours, half a pixel on)."""
    temple = import_scene("middlebury", temple_dir, tmp_path / "temple")
    centre = (TEMPLE_BOX[0] + TEMPLE_BOX[1]) / 2
    radius = float(np.linalg.norm(TEMPLE_BOX[1] - TEMPLE_BOX[0])) / 2
    scale_mat = np.diag([radius, radius, radius, 1.0])
    scale_mat[:3, 3] = centre
    mats = {}
    for i, cap in enumerate(temple.captures):
        world_mat = np.eye(4)
        K_idr = cap.camera.K - np.array([[0, 0, 0.5], [0, 0, 0.5], [0, 0, 0]])  # IDR: pixel centres at integers
        world_mat[:3] = -3.7 * (K_idr @ cap.camera.w2c[:3])
        mats[f"world_mat_{i}"], mats[f"scale_mat_{i}"] = world_mat, scale_mat
    np.savez(tmp_path / "cameras.npz", **mats)
    world = import_scene("dtu", tmp_path, tmp_path / "world", images=str(temple_dir), use_scale_mat=False)
    assert_cameras_equal(world.captures, temple.captures, atol=1e-7)
    unit = import_scene("dtu", tmp_path, tmp_path / "unit", images=str(temple_dir))
    rng = np.random.default_rng(0)
    x_unit = rng.uniform(-0.5, 0.5, (10, 3))
    x_world = x_unit * radius + centre
    for a, b in zip(unit.captures, temple.captures):
        assert np.linalg.det(a.camera.w2c[:3, :3]) > 0 and a.camera.K[0, 0] > 0 and a.camera.K[1, 1] > 0
        np.testing.assert_allclose(a.camera.project(x_unit)[0], b.camera.project(x_world)[0], atol=1e-6)
    K0 = np.array([[800.0, 0.5, 320.0], [0.0, 700.0, 240.0], [0.0, 0.0, 1.0]])
    for scale in (2.0, -0.01):
        for R0 in (np.eye(3), np.diag([-1.0, -1.0, 1.0]), cv2.Rodrigues(np.array([2.0, -1.0, 0.5]))[0]):
            t0 = np.array([0.1, -0.2, 3.0])
            K, R, t = decompose_projection(scale * K0 @ np.c_[R0, t0])
            np.testing.assert_allclose(K, K0, atol=1e-9)
            np.testing.assert_allclose(R, R0, atol=1e-12)
            np.testing.assert_allclose(t, t0, atol=1e-12)


# ----------------------------------------------------------------------------------------------
# Entry points


def test_registry_and_errors(temple_dir, tmp_path):
    assert IMPORTERS.names() == ["colmap", "dtu", "llff", "middlebury", "nerf"]
    assert EXPORTERS.names() == ["colmap", "nerf"]
    with pytest.raises(
        ValueError, match="unknown scene import format 'blender'; known: colmap, dtu, llff, middlebury, nerf"
    ):
        import_scene("blender", temple_dir, tmp_path)
    with pytest.raises(ValueError, match="unknown scene export format 'ply'; known: colmap, nerf"):
        export_scene("ply", import_scene("middlebury", temple_dir, tmp_path), tmp_path / "x")
    with pytest.raises(ValueError, match="import nerf: unknown option 'images'; nerf takes cameras"):
        import_scene("nerf", temple_dir, tmp_path, images="x")
    with pytest.raises(SceneError, match="cameras: no COLMAP model"):
        import_scene("colmap", temple_dir, tmp_path)
    with pytest.raises(SceneError, match="images: none of images_8, images_4, images found"):
        import_scene("llff", temple_dir, tmp_path, cameras=str(require_shared_data("llff_fern") / "poses_bounds.npy"))


def test_cli_arguments(temple_dir, tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="reconloop")
    add_import_arguments(parser.add_subparsers(dest="command").add_parser("import"))
    args = parser.parse_args(["import", "middlebury", str(temple_dir), str(tmp_path), "--train-ids", "0,5,10"])
    assert run_import(args) == 0
    assert "imported 3 captures (13 held out)" in capsys.readouterr().out
    scene = load_scene(tmp_path)
    assert [c.name for c in scene.captures] == ["templeSR0001", "templeSR0006", "templeSR0011"]
    with pytest.raises(SystemExit):
        parser.parse_args(["import", "middlebury", "a", "b", "--train-ids", "0,5", "--holdout-every", "8"])


@pytest.mark.parametrize(
    "file, line, text, match",
    [
        (
            "images.txt",
            5,
            "1 0.98 0.001 0.17",
            r"^images.txt line 5: must be IMAGE_ID QW QX QY QZ TX TY TZ CAMERA_ID NAME; got 4",
        ),
        (
            "images.txt",
            5,
            "1 0.98 0.001 0.17 -0.03 -7.6 0.43 2.75 7 DSC_0001.JPG",
            r"^images.txt line 5: CAMERA_ID 7 is not in",
        ),
        (
            "images.txt",
            5,
            "1 0.98 0.001 x -0.03 -7.6 0.43 2.75 1 DSC_0001.JPG",
            r"^images.txt line 5: QW QX QY QZ TX TY TZ must",
        ),
        (
            "cameras.txt",
            4,
            "1 SIMPLE_RADIAL 1296 1936 2435.38 648",
            r"^cameras.txt line 4: SIMPLE_RADIAL takes 4 parameters; got 2",
        ),
        (
            "cameras.txt",
            4,
            "1 OPENCV_FISHEYE 1296 1936 1 2 3 4 5 6 7 8",
            r"^cameras.txt line 4: camera model OPENCV_FISH",
        ),
        (
            "cameras.txt",
            4,
            "1 SIMPLE_RADIAL 1296 1936 2435.38 648 968 nan",
            r"^cameras.txt line 4: PARAMS must be finite",
        ),
        (
            "cameras.txt",
            4,
            "1 SIMPLE_RADIAL 1296.5 1936 2435.38 648 968 0",
            r"^cameras.txt line 4: CAMERA_ID, WIDTH and HEIGHT",
        ),
    ],
)
def test_colmap_text_model_lines_are_checked_naming_file_line_and_field(door_dir, tmp_path, file, line, text, match):
    """pycolmap's own errors name a line of its C++ source ("Rig with ID 7 does not exist" for a missing camera)."""
    model = tmp_path / "model"
    model.mkdir()
    for name in ("cameras.txt", "images.txt", "points3D.txt"):
        (model / name).write_text((door_dir / "colmap_ground_truth" / name).read_text())
    lines = (model / file).read_text().splitlines()
    lines[line - 1] = text
    (model / file).write_text("\n".join(lines) + "\n")
    with pytest.raises(SceneError, match=match):
        import_scene("colmap", model, tmp_path / "scene", images=str(door_dir / "images"))


def test_colmap_text_model_with_blank_and_indented_comment_lines_reads_as_colmap_does(door_dir, tmp_path):
    """COLMAP skips blank and comment lines before an image's line (the line after it is its points): the check
    before pycolmap does too, so such a model is not refused."""
    model = tmp_path / "model"
    model.mkdir()
    for name in ("cameras.txt", "points3D.txt"):
        (model / name).write_text((door_dir / "colmap_ground_truth" / name).read_text())
    lines = (door_dir / "colmap_ground_truth" / "images.txt").read_text().splitlines()
    lines[6:6] = ["", "   # an indented comment between two images"]  # after the first image's two lines
    (model / "images.txt").write_text("\n".join(lines) + "\n")
    assert len(import_scene("colmap", model, tmp_path / "scene", images=str(door_dir / "images")).captures) == 12
