"""scripts/guide_diversity.py: the guide's members made different on purpose (bagging) and a render
averaged over moved cameras (docs/benchmarks.md, "Guide members that differ by more than their seeds")."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from backend.stages.fit import FitViews
from backend.types import Views
from tests.backend.stages.test_fit import make_scene
from tests.backend.test_evaluate import script_module


def test_variants_parse_and_bad_ones_name_the_reason() -> None:
    parse = script_module("guide_diversity").parse_variant
    assert parse("default") == ("default", 1.0)
    assert parse(" tiles 0.8") == ("tiles", 0.8)
    assert parse("capture-weight 0.5") == ("capture-weight", 0.5)
    with pytest.raises(ValueError, match="unknown variant 'bagging 0.5'"):
        parse("bagging 0.5")
    with pytest.raises(ValueError, match="needs a number after 'points'"):
        parse("points")
    with pytest.raises(ValueError, match=r"share must be in \(0, 1\]"):
        parse("tiles 1.5")


def test_each_member_loses_what_its_variant_takes_and_nothing_else() -> None:
    module = script_module("guide_diversity")
    cams, images, memory = make_scene(seed=3, n=200)
    captures = FitViews.from_views(Views(images, cams, ids=[0, 1, 2]))
    gen = torch.Generator().manual_seed(0)

    views, inits = module.member_inputs(captures, memory, "default", 1.0, 3, gen)
    assert all(v is captures for v in views) and all(m is memory for m in inits)

    views, _ = module.member_inputs(captures, memory, "capture-weight", 0.5, 3, gen)
    for k, v in enumerate(views):  # member k halves capture k, and only it
        expected = torch.ones(len(captures))
        expected[k] = 0.5
        torch.testing.assert_close(v.confidence.flatten(1).amax(1), expected)
    assert float(captures.confidence.min()) == 1.0  # the shared views are not written

    views, _ = module.member_inputs(captures, memory, "tiles", 0.5, 2, gen)
    tile = module.TILE_PX
    kept = views[0].confidence[:, ::tile, ::tile]
    assert 0.3 < float(kept.mean()) < 0.7  # about half the tiles
    block = views[0].confidence[0, :tile, :tile]
    assert bool((block == block[0, 0]).all())  # whole tiles, not pixels
    assert not torch.equal(views[0].confidence, views[1].confidence)  # each member its own draw

    _, inits = module.member_inputs(captures, memory, "points", 0.7, 2, gen)
    for m in inits:
        assert 100 < len(m) < 180
        assert torch.isin(m.xyz[:, 0], memory.xyz[:, 0]).all()  # a subset of the memory's points
    assert not torch.equal(inits[0].xyz, inits[1].xyz)  # each member its own subset
    _, inits = module.member_inputs(captures, memory, "shared-points", 0.7, 2, gen)
    assert 100 < len(inits[0]) < 180 and torch.equal(inits[0].xyz, inits[1].xyz)  # one subset for all


def test_jittered_cameras_move_every_centre_the_distance_and_keep_the_orientation() -> None:
    jittered = script_module("guide_diversity").jittered
    cams, _, _ = make_scene(seed=1, n=5)
    moved = jittered(cams, 0.25, torch.Generator().manual_seed(2))
    torch.testing.assert_close((moved.centers - cams.centers).norm(dim=1), torch.full((len(cams),), 0.25))
    torch.testing.assert_close(moved.w2c[:, :3, :3], cams.w2c[:, :3, :3])
    torch.testing.assert_close(moved.K, cams.K)


def test_the_script_scores_each_variant_on_the_real_temple(shared_data: Path, tmp_path: Path, capsys) -> None:
    """End to end at a tiny size: every variant's members and mean are scored, the default's members are
    the guide's (seeds only) and a bagged variant's differ from them; a bad variant is the parser's error."""
    module = script_module("guide_diversity")
    out = tmp_path / "diversity.json"
    args = ["--data", str(shared_data), "--scenes", "temple", "--size", "48x36", "--iterations", "12"]
    args += ["--device", "cpu", "--members", "2", "--variants", "default,points 0.5", "--jitter", "0.01"]
    assert module.main([*args, "--work", str(tmp_path / "work"), "--out", str(out)]) == 0
    (report,) = json.loads(out.read_text())["reports"]
    default, bagged = report["variants"]["default"], report["variants"]["points 0.5"]
    for row in (default, bagged):
        assert len(row["member_psnr"]) == 2 and 5.0 < row["mean"]["psnr"] < 40.0
        assert 5.0 < row["member 0 jittered 0.01"]["psnr"] < 40.0
    assert bagged["member_psnr"] != default["member_psnr"]
    assert "'points 0.5'" in capsys.readouterr().out
    for bad, reason in (
        (["--variants", "tiles 2"], "share must be in (0, 1]"),
        (["--jitter", "0.01,x"], "--jitter: '0.01,x' is not a comma-separated list of numbers"),
        (["--members", "0"], "--members and --jitter-renders must be at least 1; got 0"),
    ):
        with pytest.raises(SystemExit):
            module.main([*args, *bad])
        assert reason in capsys.readouterr().err
