"""Initial memory: plane-sweep MVS on real captures, voxel downsampling, .ply arrays, SfM cameras."""

from __future__ import annotations

import re

import cv2
import numpy as np
import pytest
import torch

from backend.estimators import ESTIMATORS, GeometryEstimator
from backend.estimators.mvs import MVSConfig, PlaneSweepMVS, estimate_depths, plane_sweep
from backend.estimators.sfm import SfMConfig, SfMError, estimate_cameras
from backend.stages.memory import MemoryConfig, build_memory, memory_to_ply_arrays, voxel_downsample
from backend.types import Cameras, GeometryMemory, Views, backproject, project_points

from ._geometry_data import (
    LUMA,
    SILHOUETTE_LUMA,
    TEMPLE_BOX,
    TEMPLE_TRIPLE,
    door_scene,
    inside_box,
    load_views,
    one_torch_thread,  # noqa: F401  (autouse fixture)
    temple_captures,
    temple_memory,
)

SILHOUETTE_SLACK_PX = 5  # silhouettes dilated by this window (full-size pixels) for depth and calibration error
# Lund door, three neighbouring photos (COLMAP ground truth), stereo at 320 pixels.
DOOR_IDS = [3, 4, 5]
DOOR_SIDE = 320
DOOR_MEDIAN_REL_BOUND = 0.005  # measured 0.0017 (docs/benchmarks.md, MVS accuracy)


def test_mvs_temple_points_lie_on_the_temple(temple_dir):
    views, memory = temple_memory(str(temple_dir))
    assert len(memory) > 5000
    xyz, rgb, conf, source = memory_to_ply_arrays(memory)
    assert set(np.unique(source)) <= set(TEMPLE_TRIPLE)
    assert len(np.unique(source)) == len(TEMPLE_TRIPLE)
    assert conf.min() >= 0 and conf.max() <= 1
    # The black cloth behind the temple is a real surface outside the box: all points mostly inside,
    # points of the (bright) temple silhouette almost all inside.
    assert inside_box(xyz, TEMPLE_BOX, 0.1).mean() >= 0.9
    bright = (rgb / 255.0) @ LUMA > SILHOUETTE_LUMA
    assert bright.mean() > 0.5
    assert inside_box(xyz[bright], TEMPLE_BOX, 0.05).mean() >= 0.97
    # Temple points land in the temple's silhouette in photos MVS did not use (either side of the triple).
    caps = temple_captures(temple_dir)
    for held_out in (TEMPLE_TRIPLE[0] - 1, TEMPLE_TRIPLE[-1] + 1):
        cam = caps[held_out].camera
        photo = cv2.cvtColor(cv2.imread(str(caps[held_out].image)), cv2.COLOR_BGR2RGB) / 255.0
        silhouette = cv2.dilate((photo @ LUMA > SILHOUETTE_LUMA).astype(np.uint8), np.ones((SILHOUETTE_SLACK_PX,) * 2))
        uv, z = cam.project(xyz[bright].astype(np.float64))
        px = np.floor(uv).astype(int)
        ok = (z > 0) & (px[:, 0] >= 0) & (px[:, 0] < cam.width) & (px[:, 1] >= 0) & (px[:, 1] < cam.height)
        assert ok.mean() > 0.99
        assert silhouette[px[ok, 1], px[ok, 0]].mean() >= 0.95


def _door_depth_errors(door_dir) -> np.ndarray:
    captures, points = door_scene(door_dir)
    views = load_views([captures[i] for i in DOOR_IDS], DOOR_IDS, DOOR_SIDE)
    maps = estimate_depths(views, MVSConfig(max_side=DOOR_SIDE, num_planes=64))
    errors = []
    for k, i in enumerate(DOOR_IDS):
        idx, _ = points.observations[captures[i].name]  # COLMAP points this photo sees
        uv, z = project_points(torch.tensor(points.xyz[idx], dtype=torch.float32), maps.views.cams[k])
        px, z = torch.floor(uv[0]).long(), z[0]
        H, W = maps.depth.shape[1:]
        ok = (px[:, 0] >= 0) & (px[:, 0] < W) & (px[:, 1] >= 0) & (px[:, 1] < H) & (z > 0)
        d = maps.depth[k][px[ok, 1], px[ok, 0]]
        has = d > 0
        assert has.float().mean() > 0.8  # MVS gives depth at most of the ground-truth points
        errors.append(((d[has] - z[ok][has]).abs() / z[ok][has]).numpy())
    return np.concatenate(errors)


def test_mvs_door_depth_against_colmap_points(door_dir):
    errors = _door_depth_errors(door_dir)
    median = float(np.median(errors))
    print(
        f"door MVS median relative depth error {median:.5f} over {len(errors)} points; "
        f"90th percentile {np.quantile(errors, 0.9):.5f}"
    )
    assert len(errors) > 10000
    assert median < DOOR_MEDIAN_REL_BOUND
    assert np.mean(errors < 0.01) > 0.9


def test_voxel_downsample_merges_by_confidence():
    xyz = torch.tensor([[0.01, 0.01, 0.01], [0.03, 0.02, 0.04], [0.5, 0.5, 0.5], [1.01, 0.0, 0.0]])
    rgb = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0], [1.0, 1.0, 1.0]])
    mem = GeometryMemory(xyz, rgb, torch.tensor([0.25, 0.75, 0.5, 1.0]), torch.tensor([3, -1, 2, 5], dtype=torch.int32))
    out = voxel_downsample(mem, 0.1)
    assert len(out) == 3
    first = int(torch.argmin(out.xyz.norm(dim=1)))
    torch.testing.assert_close(out.xyz[first], 0.25 * xyz[0] + 0.75 * xyz[1])
    torch.testing.assert_close(out.rgb[first], torch.tensor([0.25, 0.75, 0.0]))
    # the voxel's confidence is its most confident point's (a generated one); its source the capture that
    # measured a point there (a frame's point landing on a measured one does not make it generated)
    assert out.confidence[first] == 0.75 and out.source[first] == 3
    generated = GeometryMemory(xyz[:2], rgb[:2], torch.tensor([0.25, 0.75]), torch.tensor([-1, -2], dtype=torch.int32))
    assert voxel_downsample(generated, 0.1).source.tolist() == [-2]  # no capture's: the most confident point's
    assert len(voxel_downsample(mem, 10.0)) == 1 and len(voxel_downsample(mem, 1e-3)) == 4
    with pytest.raises(ValueError, match="voxel_size"):
        voxel_downsample(mem, 0.0)


def test_ply_arrays_and_caps(temple_dir):
    views, memory = temple_memory(str(temple_dir))
    xyz, rgb, conf, source = memory_to_ply_arrays(memory)
    assert (xyz.dtype, rgb.dtype, conf.dtype, source.dtype) == (np.float32, np.uint8, np.float32, np.int32)
    assert xyz.shape == (len(memory), 3) and rgb.shape == (len(memory), 3)
    capped = build_memory(views, MemoryConfig(mvs=MVSConfig(max_side=160, num_planes=32), max_points=500))
    assert len(capped) == 500


def test_estimator_registry_and_input_checks():
    assert "mvs" in ESTIMATORS.names()
    est = ESTIMATORS.make("mvs", MVSConfig(max_side=64))
    assert isinstance(est, PlaneSweepMVS) and isinstance(est, GeometryEstimator) and "mvs" in ESTIMATORS
    with pytest.raises(ValueError, match=f"known: {', '.join(ESTIMATORS.names())}$"):
        ESTIMATORS.make("vggt")
    cams = Cameras(torch.eye(4)[None], torch.eye(3)[None], 8, 8)
    with pytest.raises(ValueError, match="at least 2 captures"):
        est.estimate(Views(torch.zeros(1, 8, 8, 3), cams, [0]))
    with pytest.raises(ValueError, match="one camera and id per image"):
        build_memory(Views(torch.zeros(2, 8, 8, 3), cams, [0, 1]))
    with pytest.raises(ValueError, match="num_planes"):
        MVSConfig(num_planes=2).check()


def _rotation_deg(a: np.ndarray, b: np.ndarray) -> float:
    R = a[:3, :3] @ b[:3, :3].T
    return float(np.degrees(np.arccos(np.clip((np.trace(R) - 1) / 2, -1, 1))))


def test_sfm_recovers_temple_cameras_with_known_K(temple_dir, tmp_path):
    caps = temple_captures(temple_dir)
    ids = [5, 6, 7, 8]
    cams = estimate_cameras(
        [caps[i].image for i in ids],
        known_K=caps[ids[0]].camera.K,
        work_dir=tmp_path / "sfm",
        cfg=SfMConfig(num_threads=1),
    )
    assert all(c is not None for c in cams)
    np.testing.assert_allclose(cams[0].K, caps[ids[0]].camera.K)  # held fixed
    gt = [caps[i].camera for i in ids]
    centers = np.array([c.center for c in cams])
    gt_centers = np.array([c.center for c in gt])
    d, d_gt = (
        np.linalg.norm(centers[:, None] - centers[None], axis=-1),
        np.linalg.norm(gt_centers[:, None] - gt_centers[None], axis=-1),
    )
    scale = d[0, 1] / d_gt[0, 1]
    for a in range(len(ids)):
        for b in range(a + 1, len(ids)):
            # relative rotations agree (the world frame is COLMAP's own) ...
            assert abs(_rotation_deg(cams[a].w2c, cams[b].w2c) - _rotation_deg(gt[a].w2c, gt[b].w2c)) < 1.0
            # ... and so do distances between centres, up to one scale.
            assert d[a, b] == pytest.approx(scale * d_gt[a, b], rel=0.03)


def test_sfm_fails_clearly_when_photos_do_not_overlap(temple_dir, fern_dir, tmp_path):
    photos = [temple_captures(temple_dir)[0].image, sorted((fern_dir / "images_8").iterdir())[0]]
    with pytest.raises(SfMError, match="could be placed"):
        estimate_cameras(photos, work_dir=tmp_path / "sfm", cfg=SfMConfig(num_threads=1, max_image_size=640))


def _plane_views(depth: float, xs: list[float], size: int = 64) -> tuple[torch.Tensor, Cameras]:
    """Grey images of a textured fronto-parallel plane z = depth seen by cameras at (x, 0, 0)."""
    g = torch.Generator().manual_seed(0)
    texture = torch.nn.functional.avg_pool2d(torch.rand(1, 1, 256, 256, generator=g), 3, 1, 1)  # world xy in [-2, 2]
    K = torch.tensor([[size * 1.0, 0, size / 2], [0, size * 1.0, size / 2], [0, 0, 1]])
    w2c = torch.eye(4).repeat(len(xs), 1, 1)
    w2c[:, 0, 3] = -torch.tensor(xs)
    cams = Cameras(w2c, K.expand(len(xs), 3, 3).clone(), size, size)
    world = backproject(torch.full((len(xs), size, size), depth), cams)  # [C, H, W, 3]
    grid = world[..., :2] / 2.0  # world xy -> [-1, 1]
    imgs = torch.nn.functional.grid_sample(texture.expand(len(xs), -1, -1, -1), grid, align_corners=False)[:, 0]
    return imgs, cams


def test_plane_sweep_recovers_a_textured_plane():
    imgs, cams = _plane_views(2.0, [0.0, 0.2, -0.2])
    res = plane_sweep(imgs[0], cams[0], imgs[1:], cams[1:], 1.0, 4.0, MVSConfig(num_planes=64))
    valid = res.depth > 0
    assert valid.float().mean() > 0.7  # both sources see ~80 % of the reference (6 px disparity each way)
    rel = (res.depth[valid] - 2.0).abs() / 2.0
    assert float(rel.median()) < 0.005 and float((rel < 0.02).float().mean()) > 0.95
    assert float(res.confidence[valid].min()) > 0 and float(res.confidence.max()) <= 1


def test_patchmatch_falls_back_to_plane_sweep(temple_dir):
    """Where COLMAP's PatchMatch cannot run (no CUDA pycolmap here), the memory is plane sweep's, and
    the job's notes say why."""
    from backend.estimators.patchmatch import has_cuda_patchmatch

    if has_cuda_patchmatch():
        pytest.skip("pycolmap has CUDA here: PatchMatch runs")
    views, _ = temple_memory(str(temple_dir))
    cfg = MemoryConfig(mvs=MVSConfig(max_side=160, num_planes=32))
    notes: list[str] = []
    memory = build_memory(views, cfg, estimator="patchmatch", notes=notes)
    sweep = build_memory(views, cfg, estimator="mvs")
    assert len(memory) == len(sweep) > cfg.min_points
    assert len(notes) == 1 and "pycolmap has no CUDA" in notes[0] and "used plane sweep" in notes[0]


def test_hull_without_masks_falls_back_to_plane_sweep(temple_dir):
    """The ``geometry`` setting can ask for the visual hull on captures without masks: the memory is
    then plane sweep's, and the job's notes say why."""
    views, _ = temple_memory(str(temple_dir))
    assert views.masks is None
    cfg = MemoryConfig(mvs=MVSConfig(max_side=160, num_planes=32))
    notes: list[str] = []
    memory = build_memory(views, cfg, estimator="hull", notes=notes)
    assert len(memory) == len(build_memory(views, cfg, estimator="mvs")) > cfg.min_points
    assert len(notes) == 1 and "captures have no masks" in notes[0] and "used plane sweep" in notes[0]


def test_the_geometry_setting_offers_every_estimator():
    """A contributor's new estimator is named in the ``geometry`` row too (backend.estimators' docstring), so
    scene.json, the wire and the sidebar accept it."""
    from protocol.settings import BY_NAME

    assert sorted(BY_NAME["geometry"].choices) == ESTIMATORS.names()


def test_an_estimator_without_a_config_is_built_with_its_own_and_falls_back_to_plane_sweep(temple_dir):
    """An estimator that MemoryConfig does not know is built with no argument (its constructor's default),
    and when it fails the memory is plane sweep's, as after PatchMatch, with the reason in the notes."""
    from backend.estimators import GeometryError

    class Refusing:
        def __init__(self, cfg: str = "its own default") -> None:
            self.cfg = cfg

        def estimate(self, views: Views, progress=None) -> GeometryMemory:
            raise GeometryError(f"refused with {self.cfg}")

    ESTIMATORS.register("refusing_for_test")(Refusing)
    try:
        views, _ = temple_memory(str(temple_dir))
        cfg = MemoryConfig(mvs=MVSConfig(max_side=160, num_planes=32))
        notes: list[str] = []
        memory = build_memory(views, cfg, estimator="refusing_for_test", notes=notes)
    finally:
        ESTIMATORS._items.pop("refusing_for_test")
    assert len(memory) == len(build_memory(views, cfg, estimator="mvs")) > cfg.min_points
    assert len(notes) == 1 and re.fullmatch(
        r"geometry: refused with its own default; used plane sweep \(\d+ points\)", notes[0]
    )


def test_captures_from_one_position_get_a_stated_depth_not_a_rounding_noise_one():
    """A tripod panorama (one centre, turned 0/120/240 degrees): its baselines are rounding noise (~1e-16), which
    put every fallback point on the centre and the job's renders black; now a stated depth, said to be a guess."""
    from backend.stages.memory import bounded_depth_points

    turns = []
    for deg in (0.0, 120.0, 240.0):
        a = np.radians(deg)
        R = torch.tensor([[np.cos(a), 0, -np.sin(a)], [0, 1, 0], [np.sin(a), 0, np.cos(a)]], dtype=torch.float32)
        w2c = torch.eye(4)
        w2c[:3, :3] = R
        w2c[:3, 3] = -R @ torch.tensor([0.3, 0.1, 0.7])  # one centre, off the origin: rounding noise between them
        turns.append(w2c)
    K = torch.tensor([[20.0, 0, 12], [0, 20, 8], [0, 0, 1]]).repeat(3, 1, 1)
    cams = Cameras(torch.stack(turns), K, 24, 16)
    views = Views(torch.rand(3, 16, 24, 3), cams, [0, 1, 2])
    memory, what = bounded_depth_points(views, MemoryConfig())
    assert "the captures share one position" in what and "a guess" in what
    distance = (memory.xyz - cams.centers[0]).norm(dim=-1)
    assert float(distance.min()) > 0.99, float(distance.min())  # at the guessed depth along each ray, not on the centre
