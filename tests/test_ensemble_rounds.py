"""scripts/ensemble_rounds.py: rounds of the loop whose guide is an ensemble of the last round's fits
(docs/benchmarks.md, run 45), on the real temple at a tiny size on the CPU."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.backend.test_evaluate import script_module


def test_a_rounds_set_of_the_loops_seed_is_the_loops_own_fit(shared_data: Path, tmp_path: Path) -> None:
    """Round 1 is the job as it is, and the round's set of the job's seed is fitted on the same captures
    and frames with the same settings, so it renders the held-out views as the loop's Gaussians do (the
    CPU rasterizer is deterministic); the round's other set, of another seed, does not. Every round
    scores its frames and its sets' mean and median."""
    rounds = script_module("ensemble_rounds")
    report = rounds.run_scene(
        shared_data, "temple", tmp_path, (64, 48), iterations=30, seed=0, members=2, rounds=2, device="cpu"
    )
    assert len(report["rounds"]) == 3
    guide, first, second = report["rounds"]
    assert len(guide["sets_psnr"]) == 2 and "loop" not in guide
    assert first["sets_psnr"][0] == pytest.approx(first["loop"]["psnr"], abs=1e-4)
    assert first["sets_psnr"][1] != pytest.approx(first["sets_psnr"][0], abs=1e-4)
    for row in (first, second):
        assert 5.0 < row["frames"]["psnr"] < 40.0 and 0.0 < row["frames_confidence"] <= 1.0
        assert {"mean", "median"} <= row.keys()
    assert "round 2: loop" in rounds.summary_line(report)
