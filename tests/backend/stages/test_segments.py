"""Segments: every frame generated once, in order; carried frames come from the previous segment."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from backend.stages.segments import Segment, SegmentConfig, split_segments


def test_defaults_follow_anyrecon():
    cfg = SegmentConfig()
    assert (cfg.length, cfg.overlap) == (40, 2)
    segs = split_segments(120, cfg)
    assert [(s.start, s.stop) for s in segs] == [(0, 40), (40, 80), (80, 120)]
    assert [s.carried for s in segs] == [(), (38, 39), (78, 79)]
    assert segs[1].indices == list(range(40, 80)) and len(segs[1]) == 40


@given(n=st.integers(0, 300), length=st.integers(1, 50), overlap=st.integers(0, 50), min_tail=st.integers(0, 20))
def test_coverage_and_overlap(n, length, overlap, min_tail):
    """Any overlap, longer than the segments too (the job's settings allow 16 with a length of 2)."""
    segs = split_segments(n, SegmentConfig(length=length, overlap=overlap, min_tail=min_tail))
    covered = [i for s in segs for i in s.indices]
    assert covered == list(range(n))  # each frame once, in order
    for prev, seg in zip(segs, segs[1:]):
        assert seg.start == prev.stop
        assert len(seg.carried) == min(overlap, len(prev))
        assert (
            set(seg.carried) <= set(prev.indices) and list(seg.carried) == prev.indices[len(prev) - len(seg.carried) :]
        )
    if segs:
        assert segs[0].carried == ()
        assert all(len(s) <= length for s in segs[:-1] if min_tail == 0)
        if len(segs) > 1:
            assert len(segs[-1]) >= min(min_tail, length) or min_tail > length


def test_short_tail_is_merged():
    segs = split_segments(85, SegmentConfig(length=40, min_tail=10))
    assert [(s.start, s.stop) for s in segs] == [(0, 40), (40, 85)]
    assert split_segments(85, SegmentConfig(length=40))[-1] == Segment(80, 85, (78, 79))


def test_a_tail_exactly_min_tail_long_is_kept():
    segs = split_segments(85, SegmentConfig(length=40, min_tail=5))
    assert [(s.start, s.stop) for s in segs] == [(0, 40), (40, 80), (80, 85)]


def test_an_overlap_longer_than_the_segments_carries_the_whole_previous_one():
    segs = split_segments(5, SegmentConfig(length=2, overlap=16))
    assert [(s.start, s.stop, s.carried) for s in segs] == [(0, 2, ()), (2, 4, (0, 1)), (4, 5, (2, 3))]


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"length": 0}, "length"),
        ({"overlap": -1}, "overlap"),
        ({"min_tail": -1}, "min_tail"),
    ],
)
def test_bad_config(kwargs, field):
    with pytest.raises(ValueError, match=field):
        split_segments(10, SegmentConfig(**kwargs))
    with pytest.raises(ValueError, match="num_frames"):
        split_segments(-1)
