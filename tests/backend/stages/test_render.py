"""Point splatting: pixel positions, depth, z-test, source map, footprints, batching."""

from __future__ import annotations

import pytest
import torch

from backend.stages.render import RenderConfig, render_memory
from backend.types import Cameras, GeometryMemory, backproject, project_points

from ._geometry_data import one_torch_thread  # noqa: F401  (autouse fixture)

W, H = 40, 30


def _cams(n: int = 1) -> Cameras:
    K = torch.tensor([[50.0, 0, 20], [0, 50.0, 15], [0, 0, 1]]).expand(n, 3, 3).clone()
    w2c = torch.eye(4).expand(n, 4, 4).clone()
    for i in range(n):  # cameras shifted along x
        w2c[i, 0, 3] = -0.1 * i
    return Cameras(w2c, K, W, H)


def _memory(xyz, rgb=None, source=None) -> GeometryMemory:
    xyz = torch.as_tensor(xyz, dtype=torch.float32)
    n = len(xyz)
    rgb = torch.rand(n, 3, generator=torch.Generator().manual_seed(0)) if rgb is None else torch.as_tensor(rgb)
    source = torch.arange(n, dtype=torch.int32) if source is None else torch.as_tensor(source, dtype=torch.int32)
    return GeometryMemory(xyz, rgb.float(), torch.ones(n), source)


def test_pixels_and_depth_match_projection():
    g = torch.Generator().manual_seed(1)
    # One point per pixel on a grid of distinct pixels, at random depths.
    u = torch.arange(2, 38, 3).float() + 0.5
    v = torch.arange(2, 28, 3).float() + 0.5
    uu, vv = torch.meshgrid(u, v, indexing="xy")
    z = 1.0 + 3.0 * torch.rand(uu.shape, generator=g)
    xyz = torch.stack([(uu - 20) / 50 * z, (vv - 15) / 50 * z, z], -1).reshape(-1, 3)
    mem = _memory(xyz)
    out = render_memory(mem, _cams(), RenderConfig(radius_px=0))
    uv, zz = project_points(mem.xyz, _cams())
    px = torch.floor(uv[0]).long()
    assert out.mask.sum() == len(mem)
    assert torch.equal(out.mask[0, px[:, 1], px[:, 0]], torch.ones(len(mem), dtype=torch.bool))
    torch.testing.assert_close(out.depth[0, px[:, 1], px[:, 0]], zz[0])
    torch.testing.assert_close(out.rgb[0, px[:, 1], px[:, 0]], mem.rgb)
    assert torch.equal(out.source[0, px[:, 1], px[:, 0]], mem.source)
    assert (out.source[0][~out.mask[0]] == -1).all() and (out.depth[0][~out.mask[0]] == 0).all()
    # Lifting the rendered depth gives the points back.
    world = backproject(out.depth, _cams())[out.mask]
    dist = torch.cdist(world, mem.xyz, compute_mode="donot_use_mm_for_euclid_dist")
    assert dist.min(1).values.max() < 1e-5


def test_z_test_picks_the_near_point_in_any_order():
    # Two points on the same ray through pixel (20, 15); far one listed first, then the reverse.
    ray = torch.tensor([0.5 / 50, 0.5 / 50, 1.0])
    for order in ([3.0, 1.5], [1.5, 3.0]):
        mem = _memory(torch.stack([ray * d for d in order]), rgb=[[1.0, 0, 0], [0, 1.0, 0]], source=[7, 9])
        out = render_memory(mem, _cams(), RenderConfig(radius_px=1))
        near = order.index(1.5)
        assert out.depth[0, 15, 20] == pytest.approx(1.5, rel=1e-6)
        assert out.source[0, 15, 20] == [7, 9][near]
        assert torch.equal(out.rgb[0, 15, 20], mem.rgb[near])
        assert out.mask[0, 14:17, 19:22].all() and out.mask.sum() == 9  # 3x3 footprint


def test_point_size_footprint_grows_when_near():
    ray = torch.tensor([0.5 / 50, 0.5 / 50, 1.0])
    cfg = RenderConfig(point_size=0.1, max_radius_px=4)  # f * size / (2 z) = 2.5 / z pixels
    near = render_memory(_memory((ray * 1.0)[None]), _cams(), cfg)  # radius 2 (2.5 rounds to 2) -> 5x5
    far = render_memory(_memory((ray * 5.0)[None]), _cams(), cfg)  # radius 0 -> 1 pixel
    assert near.mask.sum() == 25 and far.mask.sum() == 1


def test_batches_chunks_and_points_behind():
    g = torch.Generator().manual_seed(2)
    xyz = torch.rand(500, 3, generator=g) * torch.tensor([2.0, 2.0, 3.0]) - torch.tensor([1.0, 1.0, 0.5])
    mem = _memory(xyz)
    cams = _cams(3)
    full = render_memory(mem, cams)
    chunked = render_memory(mem, cams, RenderConfig(max_candidates=600))  # one camera at a time, or less
    for a, b in ((full.depth, chunked.depth), (full.source, chunked.source), (full.mask, chunked.mask)):
        assert torch.equal(a, b)
    for c in range(3):  # each camera of the batch equals rendering it alone
        alone = render_memory(mem, cams[c])
        assert torch.equal(alone.depth[0], full.depth[c]) and torch.equal(alone.source[0], full.source[c])
    behind = mem.source[mem.xyz[:, 2] <= 0]
    assert not torch.isin(full.source, behind).any()
    # Projections far off the image (beyond int32 pixel coordinates) stay off it.
    off = _memory([[1e6, 0.0, 1e-3], [-1e6, -1e6, 1e-3], [0.0, 3e5, 1e-4 + 1e-6]])
    assert not render_memory(off, cams, RenderConfig(radius_px=2)).mask.any()


def test_empty_memory_and_bad_config():
    out = render_memory(GeometryMemory.empty(), _cams(2))
    assert out.rgb.shape == (2, H, W, 3) and not out.mask.any() and (out.source == -1).all()
    mem = _memory([[0.0, 0.0, 2.0]])
    assert render_memory(mem, _cams(), RenderConfig(radius_px=0)).mask.sum() == 1
    with pytest.raises(ValueError, match="radius_px"):
        render_memory(mem, _cams(), RenderConfig(radius_px=-1))
