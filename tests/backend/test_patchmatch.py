"""The ``patchmatch`` estimator's CPU parts: its COLMAP workspace, COLMAP's dense array layout, and
depth maps read back into the memory (PatchMatch itself needs CUDA: scripts/gpu_check_patchmatch.py)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pycolmap
import pytest
import torch

from backend.estimators import ESTIMATORS, GeometryError, patchmatch
from backend.estimators.mvs import MVSConfig, estimate_depths, fuse_depths
from backend.estimators.patchmatch import (
    PatchMatchConfig,
    PatchMatchMVS,
    check_coverage,
    has_cuda_patchmatch,
    read_colmap_array,
    read_depth_maps,
    write_colmap_array,
    write_workspace,
)
from backend.evaluate import split_protocol
from backend.formats import import_scene
from backend.loop import LoopConfig
from backend.scene import SceneError, Settings
from backend.stages.cameras import load_image, resize_image, to_tensor
from backend.stages.memory import MemoryConfig, build_memory
from backend.types import Cameras, Views, backproject
from protocol.settings import BY_NAME

W, H = 80, 60


def test_colmap_array_layout(tmp_path):
    """x fastest, then y, then channel, after a "width&height&channels&" header (COLMAP's mat.h)."""
    a = np.arange(2 * 3 * 2, dtype=np.float32).reshape(2, 3, 2)  # [H, W, D]
    path = write_colmap_array(a, tmp_path / "a.bin")
    raw = path.read_bytes()
    assert raw.startswith(b"3&2&2&")
    values = np.frombuffer(raw[len(b"3&2&2&") :], np.float32)
    np.testing.assert_array_equal(values[:3], a[0, :, 0])  # first row of channel 0
    np.testing.assert_array_equal(read_colmap_array(path), a)
    d = np.random.default_rng(0).random((5, 7), dtype=np.float32)
    np.testing.assert_array_equal(read_colmap_array(write_colmap_array(d, tmp_path / "d.bin")), d)


def test_workspace_is_a_colmap_model_of_our_cameras(temple_dir, tmp_path):
    scene = split_protocol(import_scene("middlebury", temple_dir, tmp_path / "s"), "ring-arc")
    cams = Cameras.from_scene([c.camera for c in scene.captures], W, H)
    views = Views(to_tensor([resize_image(load_image(c.image), W, H) for c in scene.captures], "cpu"), cams, [4, 5, 6])
    names = write_workspace(views, tmp_path / "ws", [[1, 2], [0, 2], [0, 1]])
    rec = pycolmap.Reconstruction(str(tmp_path / "ws" / "sparse"))
    assert rec.num_reg_images() == 3
    for i, name in enumerate(names):
        image = rec.find_image_with_name(name)
        w2c = np.asarray(image.cam_from_world().matrix())
        np.testing.assert_allclose(w2c, cams.w2c[i, :3].double().numpy(), atol=1e-5)
        cam = rec.cameras[image.camera_id]
        assert (cam.width, cam.height) == (W, H) and cam.model_name == "PINHOLE"
        np.testing.assert_allclose(cam.params, cams.K[i, [0, 1, 0, 1], [0, 1, 2, 2]].double().numpy(), rtol=1e-6)
        assert (tmp_path / "ws" / "images" / name).is_file()
    cfg_lines = (tmp_path / "ws" / "stereo" / "patch-match.cfg").read_text().splitlines()
    assert cfg_lines[0] == names[0] and cfg_lines[1] == f"{names[1]}, {names[2]}"
    assert (tmp_path / "ws" / "stereo" / "fusion.cfg").read_text().split() == names
    assert all((tmp_path / "ws" / "stereo" / d).is_dir() for d in ("depth_maps", "normal_maps", "consistency_graphs"))


def test_depth_maps_read_back_into_memory(temple_dir, tmp_path):
    """Depth maps of one plane, written in COLMAP's layout at half size, come back at the working size
    and fuse into points on that plane, each with its capture id."""
    scene = split_protocol(import_scene("middlebury", temple_dir, tmp_path / "s"), "ring-arc")
    cams = Cameras.from_scene([c.camera for c in scene.captures], W, H)
    views = Views(torch.rand(3, H, W, 3), cams, [7, 8, 9])
    names = write_workspace(views, tmp_path / "ws", [[1], [0, 2], [1]])
    plane_y = 0.1  # a world plane y = 0.1 through the temple, depth per pixel by ray intersection
    rays = backproject(torch.ones(3, H, W), cams) - cams.centers[:, None, None]  # world rays at z = 1
    t = (plane_y - cams.centers[:, None, None, 1]) / rays[..., 1]
    depth = torch.where(t > 0, t, torch.zeros_like(t))
    maps = tmp_path / "ws" / "stereo" / "depth_maps"
    for name, d in zip(names, depth):
        write_colmap_array(d.numpy(), maps / f"{name}.geometric.bin")
    back = read_depth_maps(tmp_path / "ws", names, H, W, torch.device("cpu"))
    torch.testing.assert_close(back, depth)
    memory = fuse_depths(back, (back > 0).float(), views, [[1], [0, 2], [1]], MVSConfig(min_consistent=0))
    assert len(memory) > 1000 and set(memory.source.tolist()) <= {7, 8, 9}
    assert float((memory.xyz[:, 1] - plane_y).abs().max()) < 1e-3
    # a map at half size (PatchMatch's max_image_size) comes back at the working size; a missing one is 0
    write_colmap_array(depth[0, ::2, ::2].numpy(), maps / f"{names[0]}.geometric.bin")
    (maps / f"{names[2]}.geometric.bin").unlink()
    back = read_depth_maps(tmp_path / "ws", names, H, W, torch.device("cpu"))
    torch.testing.assert_close(back[0, ::2, ::2], depth[0, ::2, ::2])
    assert float(back[2].abs().max()) == 0.0


def test_patchmatch_is_picked_by_the_geometry_setting():
    assert "patchmatch" in ESTIMATORS.names() and "hull" in ESTIMATORS.names()
    settings = Settings.from_json({"geometry": "patchmatch"})
    assert LoopConfig.from_settings(settings, device="cpu").estimator == "patchmatch"
    assert LoopConfig.from_settings(Settings(), device="cuda").estimator == "mvs"  # plane sweep by default
    offered = ", ".join(BY_NAME["geometry"].choices)
    with pytest.raises(SceneError, match=f"settings.geometry: must be one of {offered}; got 'colmap'"):
        Settings.from_json({"geometry": "colmap"})
    if not has_cuda_patchmatch():
        with pytest.raises(GeometryError, match="pycolmap has no CUDA"):
            PatchMatchMVS().estimate(
                Views(
                    torch.rand(2, H, W, 3),
                    Cameras(torch.eye(4).repeat(2, 1, 1), torch.eye(3).repeat(2, 1, 1), W, H),
                    [0, 1],
                )
            )


def test_patchmatch_covering_much_less_than_plane_sweep_gives_way_to_it(temple_dir, tmp_path, monkeypatch):
    """The coverage guard: depth maps standing in for PatchMatch's (plane sweep's own, then with most
    pixels emptied, as COLMAP's triangulation filter did on the fern) keep the estimator's points in
    the first case and send the memory to plane sweep, with both shares in the notes, in the second."""
    scene = split_protocol(import_scene("middlebury", temple_dir, tmp_path / "s"), "ring-arc")
    cams = Cameras.from_scene([c.camera for c in scene.captures], W * 2, H * 2)
    views = Views(
        to_tensor([resize_image(load_image(c.image), W * 2, H * 2) for c in scene.captures], "cpu"), cams, [0, 1, 2]
    )
    cfg = MemoryConfig(mvs=MVSConfig(max_side=W * 2, num_planes=32))
    cfg = replace(cfg, patchmatch=PatchMatchConfig(max_side=W * 2))
    sweep = estimate_depths(views, patchmatch.fusion_config(cfg.patchmatch))
    assert float((sweep.depth > 0).float().mean()) > 0.1
    sparse = sweep.depth.clone()
    sparse[:, : sparse.shape[1] * 3 // 4] = 0  # three quarters of every map emptied
    for maps, falls_back in ((sweep, False), (replace(sweep, depth=sparse), True)):
        monkeypatch.setattr(patchmatch, "patchmatch_depths", lambda v, c, progress, m=maps: m)
        notes: list[str] = []
        memory = build_memory(views, cfg, estimator="patchmatch", notes=notes)
        assert len(memory) > 100
        if falls_back:
            assert len(notes) == 1 and "patchmatch: depth on" in notes[0] and "used plane sweep" in notes[0], notes
        else:
            assert notes == []
    with pytest.raises(GeometryError, match=r"depth on 10% of the pixels, plane sweep on 50%"):
        check_coverage(torch.tensor([1.0] + [0.0] * 9), torch.tensor([1.0] * 5 + [0.0] * 5), 0.8)
    check_coverage(torch.tensor([1.0] * 4 + [0.0] * 6), torch.tensor([1.0] * 5 + [0.0] * 5), 0.8)  # 40 >= 0.8 x 50
    with pytest.raises(ValueError, match="min_coverage_share must be >= 0"):
        PatchMatchConfig(min_coverage_share=-1).check()


def test_a_cancel_during_patchmatch_stops_the_job_instead_of_falling_back(temple_dir, tmp_path, monkeypatch):
    """A client's cancel raised in PatchMatch's progress is not COLMAP failing: it leaves the memory stage as
    Cancelled, with no fallback to plane sweep and no note (it read as 'patchmatch: COLMAP failed: Cancelled')."""
    from backend.progress import Cancelled

    scene = split_protocol(import_scene("middlebury", temple_dir, tmp_path / "s"), "ring-arc")
    cams = Cameras.from_scene([c.camera for c in scene.captures], W, H)
    views = Views(to_tensor([resize_image(load_image(c.image), W, H) for c in scene.captures], "cpu"), cams, [0, 1, 2])

    def cancelled(work, depth_range, cfg, progress):
        progress(0.0, "PatchMatch stereo (2 s)")

    def cancel(fraction, message):
        if message.startswith("PatchMatch stereo"):
            raise Cancelled("cancelled by a client")

    monkeypatch.setattr(patchmatch, "has_cuda_patchmatch", lambda: True)
    monkeypatch.setattr(patchmatch, "run_patchmatch", cancelled)
    notes: list[str] = []
    cfg = replace(MemoryConfig(mvs=MVSConfig(max_side=W, num_planes=16)), patchmatch=PatchMatchConfig(max_side=W))
    with pytest.raises(Cancelled, match="cancelled by a client"):
        build_memory(views, cfg, estimator="patchmatch", notes=notes, progress=cancel)
    assert notes == []
