"""Evaluation mode: protocols on the real scenes and one small end-to-end evaluation on the temple."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import backend.loop
from backend.evaluate import (
    PROTOCOLS,
    EvalConfig,
    LoopStart,
    eval_trajectory,
    evaluate_scene,
    masked_score,
    split_protocol,
)
from backend.formats import import_scene
from backend.loop import LoopConfig
from backend.metrics import psnr
from backend.scene import Settings


def test_llff_protocol_on_fern(fern_dir: Path, tmp_path: Path) -> None:
    scene = import_scene("llff", fern_dir, tmp_path)
    split = split_protocol(scene, "llff", train_views=3)
    names = [c.name for c in scene.captures]
    held = [names.index(c.name) for c in split.heldout]
    train = [names.index(c.name) for c in split.captures]
    assert held == [i for i in range(len(names)) if i % 8 == 0]
    assert len(train) == 3 and not set(train) & set(held)
    assert train[0] == 1 and train[-1] == len(names) - 1, "spread over the rest"


def test_ring_protocols_on_temple(temple_dir: Path, tmp_path: Path) -> None:
    scene = import_scene("middlebury", temple_dir, tmp_path)
    ring = split_protocol(scene, "ring", train_views=4)
    assert len(ring.captures) == 4 and len(ring.heldout) == 11  # 16 photos, 15 poses: SR0011 repeats SR0001
    names = {c.name for c in ring.captures} | {c.name for c in ring.heldout}
    assert len(names) == 15 and not {"templeSR0001", "templeSR0011"} <= names
    centers = np.stack([c.camera.center for c in ring.captures])
    gaps = sorted(np.linalg.norm(centers[:, None] - centers[None], axis=-1)[np.triu_indices(4, 1)])
    assert gaps[0] > 0.3, "spread around the ring, not bunched"
    arc = split_protocol(scene, "ring-arc", train_views=3, ring_step=2)
    assert len(arc.captures) == 3 and len(arc.heldout) == 2
    for held in arc.heldout:  # every held-out view is a new pose, not a copy of a training photo
        gaps = [np.linalg.norm(held.camera.center - c.camera.center) for c in arc.captures]
        assert min(gaps) > 0.05, (held.name, gaps)
    with pytest.raises(ValueError, match="protocol must be one of"):
        split_protocol(scene, "blender")


def test_dtu_protocol_is_pixelnerfs_split_of_49_views(temple_dir: Path, tmp_path: Path) -> None:
    """Train on views 25, 22, 28; score the 25 test views; the 15 others are neither."""
    temple = import_scene("middlebury", temple_dir, tmp_path)

    def view(i: int, like: int | None = None):  # the temple's 16 poses again and again, each round moved aside
        cap = temple.captures[(i if like is None else like) % len(temple.captures)]
        w2c = cap.camera.w2c.copy()
        w2c[0, 3] += 0.1 * ((i if like is None else like) // len(temple.captures))
        return replace(cap, name=f"{i:03d}", camera=replace(cap.camera, w2c=w2c))

    views = [view(i) for i in range(49)]
    split = split_protocol(replace(temple, captures=views), "dtu", train_views=3)
    assert [c.name for c in split.captures] == ["022", "025", "028"]
    held = [int(c.name) for c in split.heldout]
    assert len(held) == 25 and held[:4] == [1, 2, 9, 10] and not {3, 7, 16, 21, 36, 39} & set(held)
    # a test view at a training view's pose is not held out (it would score memorisation), in every protocol
    views[1] = view(1, like=25)
    split = split_protocol(replace(temple, captures=views), "dtu", train_views=3)
    assert [int(c.name) for c in split.heldout][:3] == [2, 9, 10] and len(split.heldout) == 24
    with pytest.raises(ValueError, match="dtu: the protocol's view ids index a DTU scan's 49 views; the scene has 16"):
        split_protocol(temple, "dtu")
    with pytest.raises(ValueError, match=r"dtu: train_views must be in \[1, 9\]; got 10"):
        split_protocol(replace(temple, captures=views), "dtu", train_views=10)


def test_heldout_trajectory_passes_through_heldout_cameras(temple_dir: Path, tmp_path: Path) -> None:
    scene = split_protocol(
        import_scene("middlebury", temple_dir, tmp_path), "ring-arc", train_views=3, ring_step=2, ring_start=11
    )
    traj, on_heldout = eval_trajectory(scene, "heldout", frames_per_leg=2)
    assert len(traj) == 2 * (len(scene.captures) + len(scene.heldout))
    assert sorted(on_heldout) == list(range(len(scene.heldout)))
    traj_i, on_i = eval_trajectory(scene, "interpolate", frames_per_leg=2)
    assert len(traj_i) == 2 * len(scene.captures) and not on_i


@pytest.mark.slow
@pytest.mark.xdist_group("loop")
def test_evaluate_scene_small(temple_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_second_memory(*args, **kwargs):
        raise AssertionError("the loop built the memory again; the evaluation's should be handed over")

    monkeypatch.setattr("backend.loop.build_memory", no_second_memory)
    ready_in_loop: list[int] = []  # the guide's members the loop was handed
    fit_guide = backend.loop.fit_guide

    def counted_fit_guide(*args, ready=(), **kwargs):
        ready_in_loop.append(len(ready))
        out = fit_guide(*args, ready=ready, **kwargs)
        assert all(a is b for a, b in zip(out[: len(ready)], ready, strict=True)), "a handed-over member fitted again"
        return out

    monkeypatch.setattr("backend.loop.fit_guide", counted_fit_guide)
    scene = split_protocol(
        import_scene("middlebury", temple_dir, tmp_path / "scene"), "ring-arc", train_views=3, ring_start=11
    )
    scene = replace(scene, settings=Settings(width=64, height=48, gaussian_iterations=30, segment_length=8))
    loop_cfg = LoopConfig.from_settings(scene.settings)
    # a CUDA job's guide has 3 members, each from its own share of M (rasterizer_guide)
    two_member_guide = replace(loop_cfg, guide=replace(loop_cfg.guide, members=2, member_points=0.5))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    kept: dict[str, torch.Tensor] = {}
    start = LoopStart()
    config = EvalConfig(loop=two_member_guide, frames_per_leg=2)
    try:
        report = evaluate_scene(
            scene, tmp_path / "eval", device="cpu", trajectory_mode="heldout", config=config, keep=kept, start=start
        )
        with pytest.raises(ValueError, match="start holds no memory"):
            evaluate_scene(scene, tmp_path / "e", device="cpu", config=config, baselines=False, start=LoopStart())
        # a row paired with this one: its loop starts from the same memory and guide (nothing fitted again)
        # and, on the CPU, where the fits are deterministic, lands where this one did
        paired = evaluate_scene(
            scene,
            tmp_path / "paired",
            device="cpu",
            trajectory_mode="heldout",
            config=config,
            baselines=False,
            start=start,
        )
    finally:
        torch.set_num_threads(threads)
    # each figure beats a model that knows nothing: each view's own mean colour (11.5 dB here); the fits by far
    # (15.5-16.4 dB measured on the dev machine), the memory's points (holes left black) by a little (12.5)
    truth = kept["truth"]
    flat = float(psnr(truth.mean(dim=(1, 2), keepdim=True).expand_as(truth), truth).mean())
    assert report["points"]["psnr"] > flat + 0.5 and report["points"]["ssim"] > 0.2, (flat, report["points"])
    for key in ("gaussians_captures", "guide", "gaussians_loop", "frames"):
        assert flat + 3.0 < report[key]["psnr"] < 60.0 and 0.4 < report[key]["ssim"] <= 1.0, (flat, key, report[key])
    assert report["frames_views"] == len(scene.heldout) == 2
    assert 0.0 < report["frames_confidence"] <= 1.0
    # the frames' error per unit of the fit's weight, beside their plain mean absolute error
    assert 0.0 < report["frames_l1"] < 0.5 and 0.0 < report["frames_weighted_l1"] < 0.5
    # the best tile-wise choice between the frames and the captures-only render beats both, view by view
    oracle = report["frames_guide_oracle"]["psnr"]
    assert oracle >= max(report["frames"]["psnr"], report["gaussians_captures"]["psnr"]) - 1e-6
    assert {k: tuple(v.shape) for k, v in kept.items()} == {  # the tensors behind those figures, when asked
        "truth": (2, 48, 64, 3),
        "frames": (2, 48, 64, 3),
        "guide": (2, 48, 64, 3),
        "confidence": (2, 48, 64),
        "guide_spread": (2, 48, 64),  # the guide here has several sets
    }
    assert kept["guide_spread"].max() > 0 and kept["guide_spread"].min() >= 0
    assert 0.0 < report["points_coverage"] < 1.0
    on_disk = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert on_disk["gaussians_loop"]["psnr"] == pytest.approx(report["gaussians_loop"]["psnr"])
    assert {"fit_captures", "fit_guide"} <= set(on_disk["timing"]["baselines"]["stages"])
    assert ready_in_loop == [2, 2]  # the guide's bagged members, fitted once and scored, handed over twice
    assert len(start.guide) == 2 and start.memory is not None and start.notes == report["memory_notes"]
    assert "gaussians_captures" not in paired
    for key in ("gaussians_loop", "frames"):
        assert paired[key]["psnr"] == report[key]["psnr"], key
    assert (tmp_path / "eval" / "loop" / "gaussians.ply").is_file()
    assert Image.open(tmp_path / "eval" / "eval.png").height >= 2 * 48


def test_evaluate_needs_heldout(temple_dir: Path, tmp_path: Path) -> None:
    scene = import_scene("middlebury", temple_dir, tmp_path)
    with pytest.raises(ValueError, match="no held-out views; give scene.heldout or use a protocol") as info:
        evaluate_scene(scene, tmp_path / "eval", device="cpu")
    assert f"--protocol {'|'.join(PROTOCOLS)}" in str(info.value)  # every protocol, from the table


def ring_scene(folder: Path, n: int, heldout: int = 0) -> Path:
    """A scene folder of ``n`` captures (and ``heldout`` held-out views) with cameras on a ring around
    the origin, 64x48 noise photos."""
    from backend.scene import Camera, Capture, Scene, look_at, save_scene
    from tests.protocol.helpers import png_bytes

    (folder / "images").mkdir(parents=True)
    K = np.array([[50.0, 0, 32], [0, 50, 24], [0, 0, 1]])
    views = []
    for i in range(n + heldout):
        a = 2 * np.pi * i / (n + heldout)
        image = folder / "images" / f"v{i}.png"
        image.write_bytes(png_bytes(seed=i))
        views.append(Capture(f"v{i}", image, Camera(look_at((3 * np.cos(a), 0.0, 3 * np.sin(a))), K, 64, 48)))
    save_scene(Scene(root=folder, captures=views[:n], heldout=views[n:]), folder)
    return folder


def test_a_protocol_that_holds_nothing_out_says_which_and_why(tmp_path: Path) -> None:
    """``--protocol ring`` on 3 captures trains on all 3: the message names the protocol and the counts
    (not "use a protocol", which was given); ring-arc with one view holds out nothing either."""
    from backend.scene import load_scene

    scene = load_scene(ring_scene(tmp_path / "s", 3))
    with pytest.raises(ValueError, match="--protocol ring with 3 training views leaves no held-out view of 3 captures"):
        split_protocol(scene, "ring", train_views=3)
    with pytest.raises(ValueError, match="--protocol ring-arc with 1 training views leaves no held-out view"):
        split_protocol(scene, "ring-arc", train_views=1)
    assert len(split_protocol(scene, "ring", train_views=2).heldout) == 1


def test_train_views_must_be_positive(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``--train-views 0`` is refused by the parser (not a ZeroDivisionError), and split_protocol names the
    field for callers that skip the parser."""
    from backend.cli import build_parser
    from backend.scene import load_scene

    parse = ["eval", "scene", "--out", "o", "--protocol", "ring"]
    assert build_parser().parse_args([*parse, "--train-views", "2"]).train_views == 2
    for bad in ("0", "-1", "two"):
        with pytest.raises(SystemExit):
            build_parser().parse_args([*parse, "--train-views", bad])
        assert f"--train-views: must be a whole number >= 1; got '{bad}'" in capsys.readouterr().err
    scene = load_scene(ring_scene(tmp_path / "s", 4))
    for protocol in PROTOCOLS:
        with pytest.raises(ValueError, match=f"{protocol}: train_views must be >= 1; got 0"):
            split_protocol(scene, protocol, train_views=0)


def test_eval_device_is_picked_as_run_and_serve_pick_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``reconloop eval --device``: ``auto`` (the default) is cuda, then mps, then cpu, as for run/serve
    (backend.devices.pick_device); a name it does not know is one line naming --device, exit 2."""
    import backend.devices
    import backend.evaluate
    from backend.cli import main

    scene = ring_scene(tmp_path / "s", 2, heldout=1)
    got: dict[str, object] = {}

    def record(scene, out, *, device, **kw):  # the evaluation itself is tested above
        got["device"] = device
        return {}

    monkeypatch.setattr(backend.evaluate, "evaluate_scene", record)
    monkeypatch.setattr(backend.devices, "is_available", lambda kind: kind in ("mps", "cpu"))  # a Mac
    for device in ([], ["--device", "auto"]):  # no budget: its plan would measure steps on this fake mps
        assert main(["eval", str(scene), "--out", str(tmp_path / "e"), "--budget", "0", *device]) == 0
        assert got.pop("device") == "mps"
    for bad in ("gpu", "cuda:x"):
        assert main(["eval", str(scene), "--out", str(tmp_path / "e"), "--device", bad]) == 2
        err = capsys.readouterr().err
        assert f"reconloop eval: --device must be auto, cuda, mps, cpu or cuda:N; got '{bad}'" in err, err
        assert "Traceback" not in err and not got


def test_eval_plans_a_time_budget_as_run_does(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``reconloop eval`` on a CPU sizes the job to the device's default budget as ``run`` does (a scene
    imported with the default 3000 steps is not three 3000-step fits on two cores): ``--size`` and
    ``--iterations`` are then the most its plan may choose; ``--budget 0`` runs them as given."""
    import backend.evaluate
    from backend.cli import main
    from backend.devices import DEFAULT_BUDGET_MIN

    scene = ring_scene(tmp_path / "s", 2, heldout=1)
    got: list[object] = []

    def record(scene, out, *, device, config, **kw):
        got.append(config.loop)
        return {}

    monkeypatch.setattr(backend.evaluate, "evaluate_scene", record)
    args = ["eval", str(scene), "--out", str(tmp_path / "e"), "--device", "cpu", "--size", "64x48"]
    assert main([*args, "--iterations", "3000"]) == 0
    planned = got.pop()
    assert planned.budget is not None and planned.budget.budget_min == DEFAULT_BUDGET_MIN["cpu"]
    assert planned.fit.iterations == planned.budget.iterations <= 3000 and planned.width * planned.height <= 64 * 48
    assert main([*args, "--iterations", "7", "--budget", "0"]) == 0
    given = got.pop()
    assert given.budget is None and given.fit.iterations == 7 and (given.width, given.height) == (64, 48)
    with pytest.raises(SystemExit):  # no fit is no evaluation (0 ran the whole loop, then failed on no Gaussians)
        main([*args, "--iterations", "0"])
    assert "--iterations" in capsys.readouterr().err and not got


SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


def script_module(name: str):
    """``scripts/<name>.py`` imported as a module."""
    import importlib
    import sys

    sys.path.insert(0, str(SCRIPTS))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.pop(0)


def bench_quality():
    return script_module("bench_loop_quality")


def test_masked_score_leaves_out_views_whose_mask_is_empty() -> None:
    """A view with no object pixel has nothing to score (not 100 dB); every view empty is an error."""
    g = torch.Generator().manual_seed(0)
    truth = torch.rand(2, 16, 16, 3, generator=g)
    pred = (truth + 0.1 * torch.randn(2, 16, 16, 3, generator=g)).clamp(0, 1)
    masks = torch.zeros(2, 16, 16, dtype=torch.bool)
    masks[0, 4:12, 4:12] = True
    both = masked_score(pred, truth, masks)
    assert both == masked_score(pred[:1], truth[:1], masks[:1]) and 15 < both["psnr"] < 30
    with pytest.raises(ValueError, match="every view's mask is empty"):
        masked_score(pred, truth, torch.zeros_like(masks))


def test_bench_quality_merges_runs_of_one_seed_each() -> None:
    """scripts/bench_loop_quality.py --merge: concurrent one-seed runs give one summary per scene."""
    bq = bench_quality()

    def part(seed: int, caps: float, loop: float, variant: float | None = None) -> dict:
        run = {"seed": seed, "gaussians_captures": {"psnr": caps}, "gaussians_loop": {"psnr": loop}}
        scene = {"size": [64, 48], "seeds": [seed], "runs": {"default": [run]}}
        if variant is not None:  # a loop variant scored against this process's default row
            scene["runs"]["no guide"] = [{"seed": seed, "gaussians_loop": {"psnr": variant}}]
        return {"device": "cpu", "torch": "x", "iterations": 10, "scenes": {"temple": scene}}

    merged = bq.merge_results([part(2, 20.0, 21.0), part(0, 21.0, 21.5), part(1, 19.0, 21.5)])
    scene = merged["scenes"]["temple"]
    assert scene["seeds"] == [0, 1, 2] and [r["seed"] for r in scene["runs"]["default"]] == [0, 1, 2]
    row = scene["summary"]["default"]
    assert row["gaussians_loop"] == pytest.approx(64.0 / 3) and row["gaussians_captures"] == pytest.approx(20.0)
    assert row["loop_minus_captures"] == pytest.approx(4.0 / 3)  # gains paired seed by seed
    table = bq.markdown(merged)  # the means, then the figures behind them seed by seed
    assert "| default | 21.00 / 19.00 / 20.00 | 21.50 / 21.50 / 21.00 |" in table.split("per seed (0 / 1 / 2):")[1]
    # processes of one seed, each with the default row and its own variant: the default rows' mean
    merged = bq.merge_results([part(0, 20.0, 21.0), part(0, 20.2, 21.2, variant=22.0)])
    scene = merged["scenes"]["temple"]
    [default] = scene["runs"]["default"]
    assert default["gaussians_loop"]["psnr"] == pytest.approx(21.1) and default["rows"] == 2
    assert scene["summary"]["default"]["loop_minus_captures"] == pytest.approx(1.0)
    assert scene["summary"]["no guide"]["gaussians_loop"] == pytest.approx(22.0)
    # a variant against the default row, seed by seed: the mean difference and the seeds above
    assert scene["summary"]["no guide"]["loop_minus_default"] == pytest.approx(0.9)
    assert scene["summary"]["no guide"]["seeds_above_default"] == 1
    assert "loop_minus_default" not in scene["summary"]["default"]
    assert "| no guide |" in bq.markdown(merged) and "| +0.90 | 1 |" in bq.markdown(merged)
    assert "per seed" not in bq.markdown(merged)  # one seed: the means are the figures
    with pytest.raises(ValueError, match="seed"):  # a variant's row twice for one seed is a mistake
        bq.merge_results([part(0, 20.0, 21.0, variant=22.0), part(0, 20.0, 21.0, variant=22.0)])
    with pytest.raises(ValueError, match="iterations"):
        bq.merge_results([part(0, 20.0, 21.0), {**part(1, 20.0, 21.0), "iterations": 20}])
    planned = part(1, 20.0, 21.0)
    planned["scenes"]["temple"]["plan"] = "budget 3 min: 160x120, 400 steps"
    assert bq.merge_results([planned])["scenes"]["temple"]["plan"] == "budget 3 min: 160x120, 400 steps"  # kept
    with pytest.raises(ValueError, match="planned as"):  # rows of a budget's plan and of fixed steps
        bq.merge_results([part(0, 20.0, 21.0), planned])


def test_bench_quality_variants_reach_the_loop_config() -> None:
    """A variant's overrides land in the LoopConfig the bench runs, the rest of it the default's."""
    bq = bench_quality()
    base = LoopConfig()

    def config(variant: str) -> LoopConfig:
        loop_over, fit_over, _ = bq.VARIANTS[variant]
        return bq.loop_config(base, loop_over, fit_over)

    pm3 = config("patchmatch 3 degrees")
    assert pm3.estimator == "patchmatch" and pm3.memory.patchmatch.min_triangulation_angle_deg == 3.0
    assert base.memory.patchmatch.min_triangulation_angle_deg == 1.0  # the default itself untouched
    assert config("patchmatch geometry").memory == base.memory
    assert not config("no memory update").update.enabled and not config("no guide").guide.enabled
    assert config("capture share 0.7").fit.capture_share == 0.7 and config("capture share 0.7").memory == base.memory
    # which rows fit their own captures-only baseline: the frames' share of the fit does not change it
    assert [bq.has_baselines(v) for v in ("default", "dropout 0.3", "patchmatch 3 degrees")] == [True] * 3
    assert [bq.has_baselines(v) for v in ("capture share 0.7", "blend 0.9", "no guide")] == [False] * 3
    # the guide's members: rows that change them score their own captures-only fit beside the ensemble's render
    assert config("one guide").guide.members == 1 and config("guide ensemble 3 blend 0.5").guide.members == 3
    assert bq.has_baselines("run 38 default") and bq.has_baselines("one guide")
    bagged = config("guide ensemble 3 points 0.5")  # the guide's members bagged: scored beside the baselines
    assert bagged.guide.member_points == 0.5 and bagged.guide.members == 3
    assert config("guide all points").guide.member_points == 1.0 and config("one guide").guide.member_points == 1.0
    assert bq.has_baselines("guide ensemble 3 points 0.5") and bq.has_baselines("guide all points")
    wide = config("guide alpha 0.1 + blend 1.0").guide  # the guide's fields a row sets, the rest the default's
    assert wide == replace(base.guide, alpha=0.1) and config("no guide").guide == replace(base.guide, enabled=False)


def test_bench_quality_plans_its_rows_as_a_budgeted_job(shared_data: Path, tmp_path: Path) -> None:
    """--budget: the rows run at what a job with that time budget plans (size and steps at most the bench's,
    a Gaussian cap), one plan shared by every row; without it, the bench's size and steps as given."""
    bq = bench_quality()
    scene = bq.load_bench_scene(shared_data, "temple", tmp_path / "scene")
    fixed = bq.bench_config(scene, (160, 120), 600, None, "cpu")
    assert (fixed.width, fixed.height, fixed.fit.iterations, fixed.fit.max_gaussians) == (160, 120, 600, 0)
    assert fixed.budget is None
    planned = bq.bench_config(scene, (160, 120), 400, 3.0, "cpu")
    assert planned.budget is not None and planned.budget.budget_min == 3.0
    assert planned.width <= 160 and planned.fit.iterations <= 400 and planned.fit.max_gaussians > 0
    assert (planned.fit.iterations, planned.fit.max_gaussians) == (
        planned.budget.iterations,
        planned.budget.max_gaussians,
    )


def test_frames_chooser_scores_signals_against_the_truths_choice() -> None:
    """scripts/frames_chooser.py: a signal that marks the tiles where the frames win exactly reaches the
    oracle's gain with AUC 1; one that marks the wrong tiles loses to the guide."""
    chooser = script_module("frames_chooser")
    g = torch.Generator().manual_seed(0)
    truth = torch.rand(1, 32, 64, 3, generator=g)
    noise = 0.2 * torch.randn(truth.shape, generator=g)
    guide, frames = truth.clone(), truth.clone()
    guide[:, :, 32:] += noise[:, :, 32:]  # the guide is wrong on the right half, the frames on the left
    frames[:, :, :32] += noise[:, :, :32]
    conf = torch.zeros(1, 32, 64)
    conf[:, :, 32:] = 1.0  # the frames' confidence marks where they are right
    share, rows = chooser.chooser_table(truth, guide, frames, conf, 16)
    by_name = {name: (a, gain) for name, a, gain in rows}
    assert share == 0.5 and by_name["confidence"][0] == 1.0
    assert by_name["confidence"][1] == pytest.approx(by_name["the truth (oracle)"][1]) and by_name["confidence"][1] > 10
    _, rows = chooser.chooser_table(truth, guide, frames, 1.0 - conf, 16)
    a, gain = {name: (a, gain) for name, a, gain in rows}["confidence"]
    assert a == 0.0 and gain < 0
    # the guide's sets' spread is a signal when given: high where the guide is wrong
    _, rows = chooser.chooser_table(truth, guide, frames, conf, 16, spread=conf.clone())
    assert {name: a for name, a, _ in rows}["the guide's sets' spread"] == 1.0


def test_frames_ceiling_fits_no_heldout_photo_and_renders_at_the_targets(temple_dir: Path, tmp_path: Path) -> None:
    """scripts/frames_ceiling.py: the dense fit's photos are every one but the held-out ones (the
    training captures among them), loaded at the working size; its generator renders the segment's
    cameras with confidence 1."""
    from backend.stages.cameras import load_views
    from backend.stages.fit import FitConfig, Gaussians
    from backend.types import ConditionVideo

    ceiling = script_module("frames_ceiling")
    load = bench_quality().load_bench_scene
    full = load(temple_dir.parent, "temple", tmp_path / "full", split=False)
    split = load(temple_dir.parent, "temple", tmp_path / "split")
    assert len(split.captures) == 3 and len(split.heldout) == 2  # the bench's ring-arc split
    dense = ceiling.dense_captures(full, split)
    names = {c.name for c in dense}
    assert len(dense) == len(full.captures) - len(split.heldout)
    assert not names & {c.name for c in split.heldout} and {c.name for c in split.captures} <= names
    views = load_views(dense[:2], 32, 24, "cpu")
    assert views.images.shape == (2, 24, 32, 3) and views.ids == [0, 1] and views.cams.width == 32

    g = Gaussians(
        torch.tensor([[0.0, 0.0, 0.0]]),
        torch.full((1, 3), -2.0),
        torch.tensor([[1.0, 0, 0, 0]]),
        torch.tensor([4.0]),
        torch.ones(1, 1, 3),
    )
    frames = ceiling.DenseFrames(g, FitConfig(rasterizer="torch_cpu")).generate(
        ConditionVideo(views.cams, None, views, views)  # only the targets are read
    )
    assert frames.images.shape == (2, 24, 32, 3) and bool((frames.confidence == 1).all())
    assert float(frames.images.amax()) > 0.5  # the Gaussian (colour 0.78) drawn over the black background


def test_frames_ceiling_mixes_its_two_generators_per_pixel() -> None:
    """frames_ceiling's ``--mixes`` rows: colour and confidence are the share of the dense frames and
    the rest of the base generator's; a share outside (0, 1), or a capture share outside [0, 1), is
    refused naming the flag."""
    import argparse

    from backend.types import Frames

    ceiling = script_module("frames_ceiling")

    class Fixed:
        def __init__(self, value: float, conf: float) -> None:
            self.value, self.conf = value, conf

        def generate(self, cond, *, num_steps: int = 1, seed: int = 0, progress=None) -> Frames:
            return Frames(torch.full((2, 4, 5, 3), self.value), torch.full((2, 4, 5), self.conf))

    frames = ceiling.MixedFrames(Fixed(0.2, 0.3), Fixed(1.0, 1.0), 0.25).generate(None, num_steps=1, seed=0)
    assert torch.allclose(frames.images, torch.full((2, 4, 5, 3), 0.4))
    assert torch.allclose(frames.confidence, torch.full((2, 4, 5), 0.475))
    assert ceiling.mixes("0.25, 0.5,0.75") == [0.25, 0.5, 0.75] and ceiling.mixes("") == []
    for bad in ("0.5,1", "0", "half"):
        with pytest.raises(argparse.ArgumentTypeError):
            ceiling.mixes(bad)
    for flag, value, says in (("--mixes", "0.5,2", "(0, 1)"), ("--capture-share", "1", "[0, 1)")):
        with pytest.raises(SystemExit), contextlib.redirect_stderr(io.StringIO()) as err:
            ceiling.main([flag, value])
        assert flag in err.getvalue() and says in err.getvalue()


def test_frames_ceiling_oracle_picks_the_colour_nearer_the_dense_render() -> None:
    """frames_ceiling's ``--choices`` rows: per pixel, the guide's render where it covers and is nearer the
    dense render than the reprojection, the reprojection elsewhere; the confidence is the reprojection's.
    An even or non-numeric box size is refused."""
    import argparse
    from types import SimpleNamespace

    from backend.types import Frames

    ceiling = script_module("frames_ceiling")

    class Fixed:
        def __init__(self, images: torch.Tensor) -> None:
            self.images = images

        def generate(self, cond, *, num_steps: int = 1, seed: int = 0, progress=None) -> Frames:
            return Frames(self.images, torch.full(self.images.shape[:3], 0.3))

    truth = torch.ones(1, 2, 4, 3)
    guide = torch.tensor([0.9, 0.9, 0.0, 0.9]).view(1, 1, 4, 1).expand(1, 2, 4, 3)
    mask = torch.tensor([[[True, False, True, True], [True, True, True, True]]])
    chooser = ceiling.ChosenFrames(Fixed(truth), 1)
    chooser.reproject = Fixed(torch.full((1, 2, 4, 3), 0.5))
    frames = chooser.generate(SimpleNamespace(renders=SimpleNamespace(rgb=guide, mask=mask)))
    expect = torch.tensor([[0.9, 0.5, 0.5, 0.9], [0.9, 0.9, 0.5, 0.9]])
    assert torch.allclose(frames.images[0, ..., 0], expect) and bool((frames.confidence == 0.3).all())
    assert ceiling.windows("1, 9") == [1, 9] and ceiling.windows("") == []
    for bad in ("4", "0", "nine"):
        with pytest.raises(argparse.ArgumentTypeError):
            ceiling.windows(bad)


def test_gpu_job_specs_name_known_scenes_and_variants() -> None:
    """scripts/jobs/*.txt (``gpu_runs.sh jobs``): every line's scene and variants are the bench's, so a
    renamed variant fails here and not after a device machine's start-up."""
    bq = bench_quality()
    known = {*bq.VARIANTS, *bq.REFINE_VARIANTS}
    assert not [v for v in known if "," in v]  # --variants and the specs split names on commas
    lines = [
        (spec.name, line)
        for spec in sorted((SCRIPTS / "jobs").glob("*.txt"))
        for line in spec.read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    assert lines
    for name, line in lines:
        scene, variants, seed, *_ = line.split("|")
        assert scene in bq.SCENES, f"{name}: {line}"
        assert set(variants.split(",")) <= known, f"{name}: {line}"
        assert seed.isdigit(), f"{name}: {line}"


def test_bench_quality_refuses_a_folder_for_out(tmp_path) -> None:
    """--out names the JSON file the partial reports go to after each scene: a folder is refused before
    any fit, not after the first scene's minutes."""
    with pytest.raises(SystemExit), contextlib.redirect_stderr(io.StringIO()) as err:
        bench_quality().main(["--out", str(tmp_path)])
    assert "--out" in err.getvalue() and "is a folder" in err.getvalue()
    with pytest.raises(SystemExit), contextlib.redirect_stderr(io.StringIO()) as err:
        bench_quality().main(["--budget", "0"])
    assert "--budget: a time budget in minutes above 0; got 0.0" in err.getvalue()


def test_bench_scripts_check_their_scenes_before_any_work(tmp_path, shared_data: Path) -> None:
    """An unknown scene, a missing --data folder or a scene missing from it is one line naming the option, for
    every script that takes bench scenes (they shared a traceback naming an internal ``src`` field)."""
    quality, knn = bench_quality(), script_module("bench_knn")
    cases = [
        (quality.main, ["--scenes", "templ"], "--scenes: unknown scene(s) ['templ']; known: dino-ring"),
        (quality.main, ["--data", str(tmp_path / "none")], f"--data: no folder {tmp_path / 'none'}"),
        (quality.main, ["--data", str(tmp_path), "--scenes", "fern"], "has no folder for scene(s) fern (llff_fern)"),
        (knn.main, ["--scenes", "", "--random", "abc"], "--random: comma-separated point counts; got 'abc'"),
        (knn.main, ["--scenes", "bogus", "--random", ""], "--scenes: unknown scene(s) ['bogus']"),
    ]
    for main, argv, message in cases:
        with pytest.raises(SystemExit), contextlib.redirect_stderr(io.StringIO()) as err:
            main(argv)
        assert message in err.getvalue(), (argv, err.getvalue())
    parser = argparse.ArgumentParser()
    assert quality.bench_scene_names(parser, shared_data, "temple, fern") == ["temple", "fern"]


def test_every_bench_variant_builds_its_configs() -> None:
    """Each row of scripts/bench_loop_quality.py makes its loop, fit, reproject or refiner config, so a
    removed or renamed setting fails here and not in a GPU call; a misspelt override is named."""
    from backend.generators.refine import RefineConfig
    from backend.generators.reproject import ReprojectConfig
    from backend.loop import LoopConfig

    bq = bench_quality()
    base = LoopConfig()
    for name, (loop_over, fit_over, gen_over) in bq.VARIANTS.items():
        cfg = bq.loop_config(base, loop_over, fit_over)
        assert all(getattr(cfg.fit, k) == v for k, v in fit_over.items()), name
        ReprojectConfig(**gen_over)
    for name, over in bq.REFINE_VARIANTS.items():
        RefineConfig(**over)
    with pytest.raises(ValueError, match=r"unknown loop override\(s\) \['guide_member'\]"):
        bq.loop_config(base, {"guide_member": 5}, {})


def test_bench_loop_fit_set_types_values_and_names_a_bad_field(tmp_path: Path) -> None:
    """scripts/bench_loop.py --fit-set / --guide-set FIELD=VALUE: a candidate FitConfig or GuideConfig default
    timed before it lands."""
    bench_loop = script_module("bench_loop")
    got = bench_loop.config_overrides(
        ["strategy=mcmc", "dropout_rate=0.1", "mcmc_cap=30000", "has_random_background=no"]
    )
    assert got == {"strategy": "mcmc", "dropout_rate": 0.1, "mcmc_cap": 30000, "has_random_background": False}
    with pytest.raises(SystemExit, match="--fit-set droput: not a bool, int, float or str field of FitConfig"):
        bench_loop.config_overrides(["droput=0.1"])
    with pytest.raises(SystemExit, match="--fit-set mcmc_cap=lots: invalid literal"):
        bench_loop.config_overrides(["mcmc_cap=lots"])
    with pytest.raises(ValueError, match="--fit-set must be NAME=VALUE"):
        bench_loop.config_overrides(["strategy"])
    guide = bench_loop.GuideConfig
    assert bench_loop.config_overrides(["member_points=1", "members=5"], guide, "--guide-set") == {
        "member_points": 1.0,
        "members": 5,
    }
    with pytest.raises(SystemExit, match="--guide-set member: not a bool, int, float or str field of GuideConfig"):
        bench_loop.config_overrides(["member=5"], guide, "--guide-set")
    # a value of the right type that the config refuses stops the run with the config's reason, before any work
    # (the scene folder is empty: reading it first would fail with another message)
    (tmp_path / "empty").mkdir()
    args = ["--data", str(tmp_path / "empty"), "--out", str(tmp_path), "--device", "cpu", "--frames", "4"]
    with pytest.raises(SystemExit, match=r"--guide-set: GuideConfig.member_points .* in \(0, 1\]; got 2.0"):
        bench_loop.main([*args, "--guide-set", "member_points=2"])


def test_a_broken_heldout_photo_names_its_capture(temple_dir: Path, tmp_path: Path) -> None:
    from backend.evaluate import heldout_views
    from backend.scene import SceneError

    scene = split_protocol(import_scene("middlebury", temple_dir, tmp_path / "s"), "ring-arc", train_views=3)
    broken = tmp_path / "broken.png"
    broken.write_bytes(scene.heldout[0].image.read_bytes()[:200])  # a header, then nothing
    first = replace(scene.heldout[0], image=broken)
    with pytest.raises(SceneError, match=rf"capture '{first.name}': cannot read the image"):
        heldout_views(replace(scene, heldout=[first]), 32, 24, "cpu")


def test_eval_shows_its_progress_and_records_the_folder_it_imported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``reconloop eval`` shows `run`'s bar from its first step (it was silent for minutes, then printed the
    scores): the baselines' stages, their fits step by step, then the loop's, one bar from 0 to 100%. With
    ``--format``, eval.json names the folder the scene came from and its format, not the temporary folder it
    was imported into (deleted on exit)."""
    import shutil

    import backend.cli
    import backend.formats
    from backend.cli import main
    from backend.scene import load_scene

    src = ring_scene(tmp_path / "src", 3, heldout=1)
    imported: list[Path] = []

    def fake_import(fmt, source, dst, **kw):  # the importers are tested in test_formats.py
        shutil.copytree(source, dst, dirs_exist_ok=True)
        imported.append(dst)
        return load_scene(dst)

    monkeypatch.setattr(backend.formats, "import_scene", fake_import)
    shown: list[tuple[str, float]] = []
    update = backend.cli.ProgressBar.update

    def recorded(self, stage, fraction, message=""):
        shown.append((stage, fraction))
        update(self, stage, fraction, message)

    monkeypatch.setattr(backend.cli.ProgressBar, "update", recorded)
    out = tmp_path / "e"
    argv = ["eval", str(src), "--format", "llff", "--out", str(out), "--device", "cpu", "--size", "32x24"]
    assert main([*argv, "--iterations", "2"]) == 0
    captured = capsys.readouterr()
    assert "gaussians_loop" in captured.out
    stages = [stage for stage, _ in shown]
    assert stages[0] == "load" and {"memory", "captures", "generate", "fit"} <= set(stages), stages
    assert stages.index("captures") < stages.index("generate")  # the baselines, then the loop
    fractions = [f for _, f in shown]
    assert fractions == sorted(fractions) and fractions[-1] == pytest.approx(1.0), shown
    assert "Gaussians on the captures: step 2/2" in captured.err and "100%|" in captured.err
    report = json.loads((out / "eval.json").read_text())
    assert report["scene"] == str(src.absolute()) and report["format"] == "llff"
    assert imported and not imported[0].exists()  # the import's folder, gone: not what eval.json names


def test_eval_interrupted_leaves_no_earlier_report_passing_for_its_own(tmp_path, monkeypatch, capsys):
    """An earlier run's eval.json and eval.png go once the scene is read; Ctrl-C then says what the folder holds
    (exit 130); an --out that is a file is refused before any work."""
    import backend.evaluate
    from backend.cli import EXIT_INTERRUPTED, main

    scene = ring_scene(tmp_path / "s", 2, heldout=1)
    out = tmp_path / "e"
    out.mkdir()
    for name in ("eval.json", "eval.png"):
        (out / name).write_text("an earlier run's")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(backend.evaluate, "evaluate_scene", interrupted)
    assert main(["eval", str(scene), "--out", str(out), "--budget", "0", "--device", "cpu"]) == EXIT_INTERRUPTED
    assert not (out / "eval.json").exists() and not (out / "eval.png").exists()
    assert f"interrupted: {out} holds an unfinished evaluation (no eval.json); run again" in capsys.readouterr().err
    (tmp_path / "file").write_text("")
    assert main(["eval", str(scene), "--out", str(tmp_path / "file"), "--device", "cpu"]) == 2
    assert f"--out {tmp_path / 'file'}: exists and is not a folder" in capsys.readouterr().err


def test_import_interrupted_says_what_the_folder_holds(temple_dir, tmp_path, monkeypatch, capsys):
    import backend.formats
    from backend.cli import EXIT_INTERRUPTED, main

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(backend.formats, "import_scene", interrupted)
    dst = tmp_path / "scene"
    assert main(["import", "middlebury", str(temple_dir), str(dst)]) == EXIT_INTERRUPTED
    assert f"interrupted: {dst}: it holds a partial import (no scene.json); run again" in capsys.readouterr().err
    dst.mkdir()
    (dst / "scene.json").write_text("{}")
    assert main(["import", "middlebury", str(temple_dir), str(dst)]) == EXIT_INTERRUPTED
    assert "its scene.json is an earlier import's, and files written since may not match it" in capsys.readouterr().err
