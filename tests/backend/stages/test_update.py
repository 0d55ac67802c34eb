"""Memory update: generated frames lifted into M (stereo where filled), bounded by voxels, switchable."""

from __future__ import annotations

import functools
from dataclasses import replace

import pytest
import torch

from backend.estimators.mvs import MVSConfig
from backend.stages.render import render_memory
from backend.stages.update import UpdateConfig, lift_filled, update_memory
from backend.types import Renders, Views

from ._geometry_data import (
    LUMA,
    SILHOUETTE_LUMA,
    TEMPLE_BOX,
    TEST_SIDE,
    inside_box,
    load_views,
    one_torch_thread,  # noqa: F401  (autouse fixture)
    temple_captures,
    temple_memory,
)

MEMORY_IDS = (6, 7)  # memory from two captures...
FRAME_IDS = [8, 9]  # ...and two real photos further round the ring play the generated frames
FILLED_CONFIDENCE = 0.5  # what a generator gives pixels it invented
# The stereo range comes from the rendered depths (tight), so fewer planes than the initial MVS.
CFG = UpdateConfig(stereo=MVSConfig(max_side=TEST_SIDE, num_planes=32, num_neighbors=3), stereo_stride=1)


@functools.lru_cache(maxsize=1)
def _setup(folder: str):
    captures, memory = temple_memory(folder, MEMORY_IDS)
    caps = temple_captures(folder)
    frames = load_views([caps[i] for i in FRAME_IDS], [-1] * len(FRAME_IDS), TEST_SIDE)
    renders = render_memory(memory, frames.cams)
    confidence = torch.where(renders.mask, 1.0, FILLED_CONFIDENCE)
    updated = update_memory(memory, frames, renders, confidence, captures, CFG)
    filled = lift_filled(memory, frames, renders, confidence, captures, CFG)
    return captures, memory, frames, renders, confidence, updated, filled


def test_memory_grows_where_frames_add_content(temple_dir):
    captures, memory, frames, renders, confidence, updated, filled = _setup(str(temple_dir))
    # Temple pixels of the frames that the old memory left empty: the update covers part of them.
    temple = frames.images @ torch.tensor(LUMA, dtype=torch.float32) > SILHOUETTE_LUMA
    holes = temple & ~renders.mask
    after = render_memory(updated, frames.cams)
    assert (holes.sum((1, 2)) > 1000).all()
    covered = (after.mask & holes).sum((1, 2)) / holes.sum((1, 2))
    assert (covered > 0.1).all(), covered
    assert (updated.source == -1).sum() > 1000
    assert set(updated.source.unique().tolist()) <= {-1, *MEMORY_IDS}
    # The stereo points of filled temple pixels lie on the temple.
    bright = filled.rgb @ torch.tensor(LUMA, dtype=torch.float32) > SILHOUETTE_LUMA
    assert bright.sum() > 200
    assert inside_box(filled.xyz[bright].numpy(), TEMPLE_BOX, 0.05).mean() > 0.9
    assert filled.confidence.max() <= CFG.stereo_weight * FILLED_CONFIDENCE + 1e-6


def test_memory_stays_bounded(temple_dir):
    captures, memory, frames, renders, confidence, updated, _ = _setup(str(temple_dir))
    again = update_memory(updated, frames, render_memory(updated, frames.cams), confidence, captures, CFG)
    assert len(again) <= 1.05 * len(updated)  # the same frames add (almost) nothing the second time
    one = Views(frames.images[:1], frames.cams[0], [-1])  # one frame is enough to overflow the cap
    one_render = Renders(renders.rgb[:1], renders.depth[:1], renders.mask[:1], renders.source[:1])
    capped = update_memory(
        memory,
        one,
        one_render,
        confidence[:1],
        captures,
        UpdateConfig(stereo=CFG.stereo, stereo_stride=1, max_points=2000),
    )
    assert len(capped) == 2000


def test_disabled_update_returns_the_memory(temple_dir):
    captures, memory, frames, renders, confidence, _, _ = _setup(str(temple_dir))
    assert update_memory(memory, frames, renders, confidence, captures, UpdateConfig(enabled=False)) is memory
    with pytest.raises(ValueError, match="confidence must be"):
        update_memory(memory, frames, renders, confidence[:, :-1], captures, CFG)
    bad = Views(frames.images, frames.cams, [-1])
    with pytest.raises(ValueError, match="one camera and id per image"):
        update_memory(memory, bad, renders, confidence, captures, CFG)


def test_a_short_segment_still_adds_stereo_points(temple_dir):
    """A segment of fewer frames than the stereo stride: its first frame and its last hold each other to
    the consistency check (the first alone had nothing to agree with, and no point came)."""
    captures, memory, frames, renders, confidence, _, filled = _setup(str(temple_dir))
    short = lift_filled(memory, frames, renders, confidence, captures, replace(CFG, stereo_stride=4))
    assert len(filled) > 500 and len(short) == len(filled)  # 2 frames: the same pair as with stride 1


def test_measured_points_keep_their_capture(temple_dir):
    """Frames' points merged into a voxel that holds a capture's point leave it that capture's (the update
    relabelled 76 % of them generated: 3,336 of the memory's 13,789 stayed measured, now 8,512)."""
    _, memory, _, _, _, updated, _ = _setup(str(temple_dir))
    assert bool((memory.source >= 0).all())
    assert int((updated.source >= 0).sum()) > 0.5 * len(memory)


def test_frames_far_beyond_the_captures_keep_the_memory(temple_dir):
    """Frames 150 times as far as the scene: the merge voxel's pixel term (one pixel at the median depth) grew
    with the distance until the update merged the whole memory into 5 points of 13,789; at most twice the
    captures' own, it keeps about a quarter (the far frames' pixels are that coarse)."""
    captures, memory, frames, _, _, _, _ = _setup(str(temple_dir))
    w2c = frames.cams.w2c.clone()
    near = render_memory(memory, frames.cams)
    w2c[:, 2, 3] += 150 * float(near.depth[near.mask].median())  # each camera backed off along its axis
    far = Views(frames.images, replace(frames.cams, w2c=w2c), frames.ids)
    renders = render_memory(memory, far.cams)
    assert renders.mask.any()
    updated = update_memory(memory, far, renders, torch.where(renders.mask, 1.0, 0.0), captures, CFG)
    assert len(updated) > 0.15 * len(memory), (len(memory), len(updated))
