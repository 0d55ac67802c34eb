"""Retrieval: greedy pixel-coverage set cover with a depth test, k, and the nearest-camera fallback."""

from __future__ import annotations

import pytest
import torch

from backend.stages.retrieval import RetrievalConfig, coverage_matrix, greedy_set_cover, retrieve_views
from backend.types import Cameras, GeometryMemory

from ._geometry_data import (
    TEMPLE_TRIPLE,
    one_torch_thread,  # noqa: F401  (autouse fixture)
    temple_captures,
    temple_memory,
)

W, H = 32, 24
K = torch.tensor([[30.0, 0, 16], [0, 30.0, 12], [0, 0, 1]])


def _cams(xs: list[float], z: float = 0.0) -> Cameras:
    """Cameras looking down +z from (x, 0, z)."""
    w2c = torch.eye(4).expand(len(xs), 4, 4).clone()
    w2c[:, 0, 3] = -torch.tensor(xs)
    w2c[:, 2, 3] = -z
    return Cameras(w2c, K.expand(len(xs), 3, 3).clone(), W, H)


def _wall(x0: float, x1: float, depth: float, source: int, step: float = 0.02) -> GeometryMemory:
    xs, ys = torch.meshgrid(torch.arange(x0, x1, step), torch.arange(-1.0, 1.0, step), indexing="ij")
    xyz = torch.stack([xs, ys, torch.full_like(xs, depth)], -1).reshape(-1, 3)
    n = len(xyz)
    return GeometryMemory(xyz, torch.full((n, 3), 0.5), torch.ones(n), torch.full((n,), source, dtype=torch.int32))


def test_set_cover_picks_the_capture_that_sees_the_target():
    # Walls at z = 4 around x = -3 (from capture 0) and x = +3 (from capture 1); captures look at them.
    memory = GeometryMemory.cat([_wall(-4.0, -2.0, 4.0, 0), _wall(2.0, 4.0, 4.0, 1)])
    captures = _cams([-3.0, 3.0, 0.0], z=0.0)  # capture 2 at x = 0 sees neither wall (too narrow)
    target = _cams([-2.8], z=0.5)
    assert retrieve_views(memory, target, captures) == [0]  # capture 1 adds nothing: stop at zero gain
    both = _cams([-3.0, 3.0], z=-6.0)  # far back: sees both walls
    assert sorted(retrieve_views(memory, both, captures)) == [0, 1]
    assert len(retrieve_views(memory, both, captures, RetrievalConfig(k=1))) == 1
    assert retrieve_views(memory, both, captures, RetrievalConfig(k=0)) == []


def test_depth_test_rejects_an_occluded_capture():
    # A near wall (source 1) hides the far wall (source 0) from capture 1; the target sees the far wall.
    memory = GeometryMemory.cat([_wall(-1.5, 1.5, 6.0, 0), _wall(-1.5, 1.5, 2.0, 1)])
    memory = memory.select(~((memory.source == 1) & (memory.xyz[:, 2] == 2.0) & (memory.xyz[:, 0] < -1.0)))
    captures = _cams([0.0, 0.0], z=0.0)
    captures.w2c[1, 2, 3] = 0.0
    # Capture 0 sits between the walls (z = 3) and sees only the far one; capture 1 (z = 0) sees the near wall.
    captures.w2c[0, 2, 3] = -3.0
    target = _cams([0.0], z=3.5)
    covers, fraction = coverage_matrix(memory, target, captures, [0, 1], RetrievalConfig())
    assert fraction > 0.5
    assert covers[0].float().mean() > 0.9 and covers[1].float().mean() < 0.05
    assert retrieve_views(memory, target, captures) == [0]


def test_the_capture_a_point_came_from_always_sees_it():
    # Capture 0's far wall (z = 6) sits just beyond the depth tolerance behind capture 1's wall (z = 5.5, 6 > 5.5 * 1.05)
    # in capture 0's own z-buffer; the target, between the walls, sees only the far wall.
    memory = GeometryMemory.cat([_wall(-1.0, 1.0, 6.0, 0), _wall(-1.0, 1.0, 5.5, 1)])
    captures = _cams([0.0, 5.0], z=0.0)  # capture 1 looks past the far wall's pixels
    covers, fraction = coverage_matrix(memory, _cams([0.0], z=5.6), captures, [0, 1], RetrievalConfig())
    assert fraction > 0.5 and covers[0].all()


def test_greedy_set_cover_order_and_stop():
    covers = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 0], [0, 0, 0, 0, 1], [1, 0, 0, 0, 0]], dtype=torch.bool)
    assert greedy_set_cover(covers, 10) == [1, 2]
    assert greedy_set_cover(covers, 1) == [1]


def test_fallback_nearest_cameras_when_memory_is_empty():
    captures = _cams([-3.0, 0.5, 3.0, 8.0])
    target = _cams([0.0, -0.2])
    assert retrieve_views(GeometryMemory.empty(), target, captures, RetrievalConfig(k=2)) == [1, 0]
    # Memory that the target does not see at all: same fallback.
    far_away = _wall(50.0, 52.0, 4.0, 3)
    assert retrieve_views(far_away, target, captures, RetrievalConfig(k=1)) == [1]
    with pytest.raises(ValueError, match="capture_ids"):
        retrieve_views(far_away, target, captures, capture_ids=[0, 1])


def test_temple_retrieval_finds_the_capture_at_the_target(temple_dir):
    views, memory = temple_memory(str(temple_dir))
    caps = temple_captures(temple_dir)
    # Targets at each of the three captures (other size): the capture itself is retrieved first.
    for i, cid in enumerate(TEMPLE_TRIPLE):
        target = Cameras.from_scene([caps[cid].camera], 160, 120)
        picked = retrieve_views(memory, target, views.cams, RetrievalConfig(k=3), capture_ids=views.ids)
        assert picked[0] == i and len(set(picked)) == len(picked) <= 3
