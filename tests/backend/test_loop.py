"""The loop end to end on the real temple (3 captures, an orbit through them) on CPU at a small size."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from plyfile import PlyData

import backend.loop as loop_module
from backend import budget as budget_module
from backend.budget import StepCosts, plan_budget
from backend.camera_paths import default_trajectory, order_around, path_through, scene_center
from backend.evaluate import split_protocol
from backend.formats import import_scene
from backend.loop import LoopConfig, run_loop
from backend.progress import Cancelled, ProgressEvent
from backend.scene import Scene, Settings, TrajectoryFrame, camera_from_json
from backend.stages.cameras import working_size
from backend.stages.fit import FitConfig, Gaussians
from backend.stages.guide import GuideConfig, guided_renders
from backend.types import ENSEMBLE_SOURCE, GUIDE_SOURCE, Cameras, Renders
from protocol.ply import gaussian_field_names

W, H = 96, 72
FRAMES = 12
FRAME_NUMBERS = [10 + 5 * i for i in range(FRAMES)]  # Blender's frames 10-65 at a step of 5: not the indices
ITERATIONS = 100
POINT_FIELDS = ("x", "y", "z", "red", "green", "blue", "confidence", "source")
STAGE_ORDER = ["cameras", "memory", "guide", "generate", "update", "fit", "outputs"]


@pytest.fixture(scope="module")
def temple3(tmp_path_factory: pytest.TempPathFactory) -> Scene:
    from tests.conftest import require_shared_data

    src = require_shared_data("middlebury_temple")
    scene = import_scene("middlebury", src, tmp_path_factory.mktemp("temple"))
    # three captures two ring steps (~45 degrees) apart: plane-sweep stereo needs neighbours that close
    scene = split_protocol(scene, "ring-arc", train_views=3, ring_start=11)
    orbit = default_trajectory([c.camera for c in scene.captures], FRAMES)
    settings = Settings(width=W, height=H, gaussian_iterations=ITERATIONS, segment_length=6, segment_overlap=2)
    return replace(
        scene,
        trajectory=[TrajectoryFrame(n, c) for n, c in zip(FRAME_NUMBERS, orbit, strict=True)],
        heldout=[],
        settings=settings,
    )


@pytest.fixture(scope="module")
def loop_run(temple3: Scene, single_thread, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("job")
    events: list[ProgressEvent] = []
    result = run_loop(temple3, out, device="cpu", progress=events.append)
    return out, result, events


@pytest.mark.slow
@pytest.mark.xdist_group("loop")
def test_outputs_are_valid(loop_run) -> None:
    out, result, _ = loop_run
    for name in ("points.ply", "points_final.ply"):
        el = PlyData.read(str(out / name))["vertex"]
        assert tuple(p.name for p in el.properties) == POINT_FIELDS
        assert el.count > 100
        assert np.all(np.isfinite(el["x"])) and el["red"].dtype == np.uint8
    initial, final = (
        PlyData.read(str(out / "points.ply"))["vertex"],
        PlyData.read(str(out / "points_final.ply"))["vertex"],
    )
    assert set(np.unique(initial["source"])) <= {0, 1, 2}
    assert (final["source"] == -1).any(), "the update adds points lifted from generated frames"

    g = PlyData.read(str(out / "gaussians.ply"))["vertex"]
    names = [p.name for p in g.properties]
    assert names == gaussian_field_names(3)
    assert g.count == result.metrics["gaussians"] > 0

    index = json.loads((out / "frames" / "cameras.json").read_text())["frames"]
    assert [e["frame"] for e in index] == FRAME_NUMBERS
    for e in index:
        assert Image.open(out / "frames" / e["image"]).size == (W, H)
        conf = np.asarray(Image.open(out / "frames" / e["confidence"]))
        assert conf.shape == (H, W) and conf.dtype == np.uint8
        cam = camera_from_json(e["camera"], "frame", allow_distortion=False)
        assert (cam.width, cam.height) == (W, H)

    cams = json.loads((out / "cameras.json").read_text())
    assert len(cams["captures"]) == 3 and not any(c["estimated"] for c in cams["captures"])
    assert len(cams["trajectory"]) == FRAMES
    for c in cams["captures"]:
        camera_from_json(c["camera"], "capture", allow_distortion=True)

    metrics = json.loads((out / "metrics.json").read_text())
    for stage in ("cameras", "memory", "guide", "retrieval", "render", "generate", "update", "fit"):
        assert metrics["timing"]["stages"][stage]["seconds"] > 0
        assert metrics["timing"]["stages"][stage]["peak_mib"] > 0
    assert metrics["frames"] == FRAMES and metrics["segments"] == 2
    overview = Image.open(out / "overview.png")
    assert overview.width >= 4 * W and overview.height >= 2 * H

    conf = result.frames.confidence
    assert conf.shape == (FRAMES, H, W) and float(conf.min()) >= 0 and float(conf.max()) == 1.0
    assert 0.0 < float((conf < 1).float().mean()) < 1.0, "some pixels rendered, some filled"


@pytest.mark.slow
@pytest.mark.xdist_group("loop")
def test_progress_events_in_order_with_every_artifact(loop_run) -> None:
    out, result, events = loop_run
    fractions = [e.fraction for e in events]
    assert fractions == sorted(fractions) and fractions[-1] == pytest.approx(1.0)
    stages = [e.stage for e in events if e.stage != "fit" or e.artifacts]
    firsts = [s for i, s in enumerate(stages) if i == 0 or stages[i - 1] != s]
    assert firsts == STAGE_ORDER
    announced = [a for e in events for a in e.artifacts]
    assert announced[0] == "points.ply"
    assert len(announced) == len(set(announced)) or announced.count("frames/cameras.json") == 2
    assert announced == result.artifacts
    on_disk = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()}
    assert on_disk == set(announced)
    assert any(e.stage == "fit" and "step" in e.message for e in events), "the fit reports its steps"
    segments = [e.message.split(",")[0] for e in events if e.stage == "generate" and e.message.startswith("segment")]
    assert segments == ["segment 1/2: frames 10-35", "segment 2/2: frames 40-65"]  # Blender's numbers


@pytest.mark.slow
@pytest.mark.xdist_group("loop")
def test_cancelled_propagates_and_stops(temple3: Scene, single_thread, tmp_path: Path) -> None:
    seen: list[str] = []

    def cancel_after_memory(event: ProgressEvent) -> None:
        seen.append(event.stage)
        if event.stage == "memory" and event.message.startswith("initial memory"):
            raise Cancelled("user pressed cancel")

    with pytest.raises(Cancelled, match="user pressed cancel"):
        run_loop(temple3, tmp_path, device="cpu", progress=cancel_after_memory)
    assert seen[0] == "cameras" and set(seen[1:]) == {"memory"}
    assert (tmp_path / "points.ply").is_file()
    assert not (tmp_path / "frames").exists() and not (tmp_path / "gaussians.ply").exists()


@pytest.mark.slow
@pytest.mark.xdist_group("loop")
def test_plane_sweep_says_where_it_is_and_a_cancel_stops_it(
    temple3: Scene, single_thread, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The memory stage's plane sweep reports as it goes (it gave no word for 14 s on a CPU) and a cancel is read
    there: the job stops before its points are written."""
    import backend.loop

    monkeypatch.setattr(backend.loop, "throttled", lambda report: report)  # every message, however quick
    heard: list[ProgressEvent] = []

    def cancel_in_the_sweep(event: ProgressEvent) -> None:
        heard.append(event)
        if event.message.startswith("plane sweep: depth of capture"):
            raise Cancelled("user pressed cancel")

    with pytest.raises(Cancelled, match="user pressed cancel"):
        run_loop(temple3, tmp_path, device="cpu", progress=cancel_in_the_sweep)
    assert heard[-1].stage == "memory" and heard[-1].message == "plane sweep: depth of capture 1 of 3"
    assert heard[1].message == "plane sweep: SIFT features of capture 1 of 3"
    assert not (tmp_path / "points.ply").exists()


@pytest.mark.slow
@pytest.mark.xdist_group("loop")
def test_a_trajectory_looking_away_is_named_in_a_note(temple3: Scene, single_thread, tmp_path: Path) -> None:
    """Every trajectory camera turned about its own vertical axis to look away: the job still ends, and a note
    names the frames that saw nothing (they were black, with no word)."""
    turn = np.diag([-1.0, 1.0, -1.0, 1.0])  # 180 degrees about the camera's y axis, its centre kept
    away = [TrajectoryFrame(t.frame, replace(t.camera, w2c=turn @ t.camera.w2c)) for t in temple3.trajectory]
    settings = replace(temple3.settings, gaussian_iterations=0, update_memory=False, guide=False)
    result = run_loop(replace(temple3, trajectory=away, settings=settings), tmp_path, device="cpu")
    (note,) = [n for n in result.metrics["notes"] if "see almost nothing the captures saw" in n]
    assert note.startswith(f"the trajectory's frames {FRAME_NUMBERS[0]}-"), note
    assert f"-{FRAME_NUMBERS[-1]} see almost nothing" in note and "under 1% of their pixels" in note
    # one frame looking away among frames that see the scene: named alone (the segment's mean hid it)
    one = [
        TrajectoryFrame(t.frame, replace(t.camera, w2c=turn @ t.camera.w2c)) if i == 1 else t
        for i, t in enumerate(temple3.trajectory)
    ]
    result = run_loop(replace(temple3, trajectory=one, settings=settings), tmp_path / "one", device="cpu")
    (note,) = [n for n in result.metrics["notes"] if "see almost nothing the captures saw" in n]
    assert note.startswith(f"the trajectory's frames {FRAME_NUMBERS[1]} see almost nothing"), note


@pytest.mark.slow
@pytest.mark.xdist_group("loop")
def test_no_trajectory_no_fit_no_update(temple3: Scene, single_thread, tmp_path: Path) -> None:
    settings = replace(temple3.settings, gaussian_iterations=0, update_memory=False, segment_length=8)
    scene = replace(temple3, trajectory=[], settings=settings)
    cfg = LoopConfig.from_settings(settings, default_frames=8)
    result = run_loop(scene, tmp_path, device="cpu", config=cfg)
    assert result.gaussians is None and not (tmp_path / "gaussians.ply").exists()
    assert len(result.memory_final) == len(result.memory_initial)
    assert result.frame_numbers == list(range(1, 9))
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert any("no trajectory" in n for n in metrics["notes"])
    assert not any("see almost nothing" in n for n in metrics["notes"])  # the made path looks at the scene
    # the made path starts on a capture
    first = json.loads((tmp_path / "cameras.json").read_text())["trajectory"][0]["camera"]
    centers = [c.camera.center for c in scene.captures]
    c0 = camera_from_json(first, "t", allow_distortion=False).center
    assert min(np.linalg.norm(c0 - c) for c in centers) < 1e-6


@pytest.mark.slow
@pytest.mark.xdist_group("loop")
def test_a_guide_of_two_fits_runs_in_the_loop(
    temple3: Scene, single_thread, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A self-ensemble guide (GuideConfig.members 2; a CUDA job's is 3): its sets fitted together, with
    steps reported once for all of them, and the job goes on to its frames and Gaussians. The memory update
    gets the memory's own render, not the guide's (which covers nearly every pixel and left its stereo none).
    A job behind its time budget when the last fit starts runs fewer of its steps, and says so."""
    settings = replace(temple3.settings, gaussian_iterations=30)
    cfg = LoopConfig.from_settings(settings)
    plan = plan_budget(1.0, StepCosts(1e-6, 1e-6, views=3), max_iterations=30, max_size=(W, H))  # as a budget made
    assert plan.iterations == 30
    plan = replace(plan, budget_min=0.001, step_seconds=1e-4)  # 0.06 s: spent before the last fit; steps faster
    monkeypatch.setattr(budget_module, "MIN_ITERATIONS", 10)  # a test fit's 30 steps are under the real floor
    # the guide's steps timed every 10: the last fit's step from them, not from the plan's prediction
    cfg = replace(cfg, guide=replace(cfg.guide, members=2), budget=plan, fit=replace(cfg.fit, progress_every=10))
    render, update = loop_module.render_memory, loop_module.update_memory
    memory_renders, update_renders = [], []

    def spy_render(*args, **kwargs):
        memory_renders.append(render(*args, **kwargs))
        return memory_renders[-1]

    def spy_update(memory, frames, renders, *args, **kwargs):
        update_renders.append(renders)
        return update(memory, frames, renders, *args, **kwargs)

    monkeypatch.setattr(loop_module, "render_memory", spy_render)
    monkeypatch.setattr(loop_module, "update_memory", spy_update)
    events: list[ProgressEvent] = []
    result = run_loop(replace(temple3, settings=settings), tmp_path, device="cpu", config=cfg, progress=events.append)
    guide = [e.message for e in events if e.stage == "guide"]
    assert any("step 30/30" in m for m in guide) and "in 2 sets on the captures alone" in guide[-1]
    assert result.gaussians is not None and result.frames.images.shape[0] == FRAMES
    assert update_renders and all(any(r is m for m in memory_renders) for r in update_renders)
    # the plan in metrics.json as fields, beside the note that says it in words
    written = json.loads((tmp_path / "metrics.json").read_text())["budget"]
    assert written["max_gaussians"] == plan.max_gaussians and written["costs"]["views"] == 3
    assert "sentence" not in written and result.metrics["notes"][0] == plan.sentence
    fit = [e.message for e in events if e.stage == "fit"]
    assert (
        any("step 10/10" in m for m in fit) and "after 10 steps" in fit[-1] and result.metrics["fit_iterations"] == 10
    )
    late = [n for n in result.metrics["notes"] if n.startswith("the last fit runs 10 of its 30 steps: 0 s of the")]
    assert len(late) == 1 and "0.001-minute budget were left after" in late[0], result.metrics["notes"]
    measured = re.search(r" s, at (\S+) s a step \(predicted (\S+) s;", late[0])
    assert measured and float(measured[1]) > float(measured[2]) == pytest.approx(plan.step_seconds, rel=1e-2)


@pytest.mark.slow
@pytest.mark.xdist_group("loop")
def test_a_second_run_into_the_folder_replaces_the_first(
    temple3: Scene, single_thread, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A rerun into the same folder with fewer frames and no fit leaves none of the first run's frames,
    index entries or gaussians.ply (a user's own file stays); writing gaussians.ply is timed as outputs;
    an overlap longer than the segments carries the whole previous segment."""
    from backend import outputs

    slow_write = 0.3  # seconds: writing gaussians.ply, made slow to see where it is timed
    write_gaussians = outputs.write_gaussians

    def slow_write_gaussians(path, gaussians):
        import time

        time.sleep(slow_write)
        return write_gaussians(path, gaussians)

    monkeypatch.setattr(outputs, "write_gaussians", slow_write_gaussians)
    small = replace(temple3.settings, width=64, height=48, gaussian_iterations=3, update_memory=False)
    first = run_loop(replace(temple3, settings=small), tmp_path, device="cpu")
    assert first.metrics["timing"]["stages"]["outputs"]["seconds"] >= slow_write
    assert (tmp_path / "gaussians.ply").is_file() and (
        tmp_path / "frames" / f"frame_{FRAME_NUMBERS[-1]:04d}.png"
    ).is_file()
    (tmp_path / "notes.txt").write_text("the user's own file")
    (tmp_path / "frames" / "mine.png").write_bytes(b"not the loop's")

    again = replace(small, gaussian_iterations=0, segment_length=2, segment_overlap=16)
    run_loop(replace(temple3, trajectory=temple3.trajectory[:4], settings=again), tmp_path, device="cpu")
    index = json.loads((tmp_path / "frames" / "cameras.json").read_text())["frames"]
    assert [e["frame"] for e in index] == FRAME_NUMBERS[:4]
    frames = sorted(p.name for p in (tmp_path / "frames").glob("*_*.png"))
    assert frames == [f"{kind}_{i:04d}.png" for kind in ("confidence", "frame") for i in FRAME_NUMBERS[:4]]
    assert not (tmp_path / "gaussians.ply").exists()
    assert (tmp_path / "notes.txt").is_file() and (tmp_path / "frames" / "mine.png").is_file()
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["frames"] == 4 and metrics["segments"] == 2 and metrics["gaussians"] == 0


def test_a_generator_that_needs_more_captures_says_so_before_any_work(
    temple3: Scene, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``refine`` leaves a capture out to learn from: with one capture the job stops at once, naming the generator
    and the count (it failed after the memory and the guide, in the refiner's preparation)."""

    def no_memory(*args, **kwargs):
        raise AssertionError("the memory was built for a job that cannot run")

    monkeypatch.setattr(loop_module, "build_memory", no_memory)
    scene = replace(temple3, captures=temple3.captures[:1], settings=replace(temple3.settings, generator="refine"))
    with pytest.raises(ValueError, match=r"^generator 'refine' needs at least 2 captures with cameras; this job has 1"):
        run_loop(scene, tmp_path, device="cpu")


def test_path_through_hits_keys_and_orders_the_ring(temple_dir: Path, tmp_path: Path) -> None:
    scene = import_scene("middlebury", temple_dir, tmp_path)
    cams = [c.camera for c in scene.captures]
    order = order_around(cams)
    steps = [np.linalg.norm(cams[a].center - cams[b].center) for a, b in zip(order, order[1:] + order[:1])]
    ring_step = np.median(steps)
    assert max(steps) < 2.0 * ring_step, "neighbours in ring order are close"
    keys = [cams[i] for i in order[:4]]
    path = path_through(keys, 12, closed=True)
    for k, cam in enumerate(keys):
        np.testing.assert_allclose(path[3 * k].w2c, cam.w2c, atol=1e-9)
    # an orbit, not a chord: every path centre stays about as far from the scene as the keys
    radii = [np.linalg.norm(c.center - scene_center_of(keys)) for c in path]
    assert max(radii) / min(radii) < 1.1


@pytest.mark.parametrize("protocol, ring_start", [("ring", 0), ("ring-arc", 11)])
def test_a_path_round_the_captures_keeps_the_scene_in_view(temple_dir: Path, tmp_path: Path, protocol, ring_start):
    """The Middlebury ring's cameras are rolled apart (their up vectors 90 degrees and more apart): slerping the
    keys' rotations alone swung the view off the temple between them (14 of 24 frames of the 3-view ring's path,
    6 of 12 of the test scene's). Every frame now faces the centre the keys' axes meet at, the keys hit exactly."""
    from tests.backend.stages._geometry_data import TEMPLE_BOX

    scene = split_protocol(
        import_scene("middlebury", temple_dir, tmp_path), protocol, train_views=3, ring_start=ring_start
    )
    keys = [c.camera for c in scene.captures]
    centre = (TEMPLE_BOX[0] + TEMPLE_BOX[1]) / 2
    path = default_trajectory(keys, 24)
    for cam in path:
        (uv,), (depth,) = cam.project(centre[None])
        assert depth > 0 and 0 <= uv[0] <= cam.width and 0 <= uv[1] <= cam.height, (uv, depth)
    # and it turns evenly: 8 frames a leg of some 120 degrees round the ring, the keys' rolls spread over the leg
    # (a roll taken from the slerped rotation swung up to 46 degrees a frame in 120 frames)
    turns = [
        np.degrees(np.arccos(np.clip((np.trace(a.w2c[:3, :3] @ b.w2c[:3, :3].T) - 1) / 2, -1, 1)))
        for a, b in zip(path, path[1:])
    ]
    assert max(turns) < 30.0, max(turns)
    order = order_around(keys)
    for k, i in enumerate(order):
        np.testing.assert_allclose(default_trajectory(keys, 24)[8 * k].w2c, keys[i].w2c, atol=1e-9)


def test_path_through_slerps_rotations_the_short_way() -> None:
    """Keys rotated +-100 degrees about z (canonical quaternions with a negative dot): the midpoint is
    the rotation by 180 degrees, 80 degrees from each key, not the identity 100 degrees the long way."""
    from backend.scene import Camera

    def key(deg: float) -> Camera:
        a = np.radians(deg)
        w2c = np.eye(4)
        w2c[:3, :3] = np.array([[np.cos(a), -np.sin(a), 0.0], [np.sin(a), np.cos(a), 0.0], [0.0, 0.0, 1.0]]).T
        return Camera(w2c=w2c, K=np.array([[50.0, 0, 32], [0, 50.0, 24], [0, 0, 1]]), width=64, height=48)

    keys = [key(100.0), key(-100.0)]
    mid = path_through(keys, 3, closed=False)[1]

    def angle(a: np.ndarray, b: np.ndarray) -> float:
        return float(np.degrees(np.arccos(np.clip((np.trace(a.T @ b) - 1) / 2, -1, 1))))

    for k in keys:
        assert angle(mid.w2c[:3, :3], k.w2c[:3, :3]) == pytest.approx(80.0, abs=1e-6)
    np.testing.assert_allclose(mid.w2c[:3, :3], np.diag([-1.0, -1.0, 1.0]), atol=1e-9)


def scene_center_of(cams):
    return scene_center(cams)


def test_working_size_keeps_the_trajectory_aspect(temple_dir: Path, tmp_path: Path) -> None:
    scene = import_scene("middlebury", temple_dir, tmp_path)
    portrait = [c.camera.scaled(480, 640) for c in scene.captures[:2]]
    w, h, note = working_size(320, 240, portrait)
    assert abs(w / h - 480 / 640) < 0.01 and abs(w * h - 320 * 240) < 320 * 4
    assert "aspect" in note
    assert working_size(320, 240, [c.camera for c in scene.captures])[:2] == (320, 240)
    # a strip of a trajectory at the smallest size: its short side stays at the settings' 16 pixels (it was 3,
    # and the fit's SSIM failed on a 2-pixel-high image, naming neither)
    strip = [scene.captures[0].camera.scaled(1000, 40)]
    assert working_size(16, 16, strip)[:2] == (400, 16) and "short side raised to 16" in working_size(16, 16, strip)[2]


def test_configs_reject_bad_settings() -> None:
    with pytest.raises(ValueError, match="FitConfig.capture_share"):
        FitConfig(capture_share=1.0)
    with pytest.raises(ValueError, match="GuideConfig.alpha"):
        GuideConfig(alpha=0.0)


def test_guided_renders_take_the_guide_where_it_is_opaque() -> None:
    """One opaque Gaussian in front of a camera: its pixels take its depth and source GUIDE_SOURCE (ENSEMBLE_SOURCE
    from a guide of two), the rest keep the memory's."""
    K = torch.tensor([[[40.0, 0, 16], [0, 40.0, 12], [0, 0, 1]]])
    cams = Cameras(torch.eye(4)[None], K, 32, 24)
    guide = Gaussians(
        torch.tensor([[0.0, 0.0, 2.0]]),
        torch.log(torch.full((1, 3), 0.2)),
        torch.tensor([[1.0, 0, 0, 0]]),
        torch.tensor([8.0]),
        torch.zeros(1, 1, 3),
    )
    memory = Renders(
        torch.full((1, 24, 32, 3), 0.7),
        torch.full((1, 24, 32), 5.0),
        torch.ones(1, 24, 32, dtype=torch.bool),
        torch.zeros(1, 24, 32, dtype=torch.int32),
    )
    cfg = LoopConfig.from_settings(Settings(), device="cpu")
    out = guided_renders(memory, [guide], cams, cfg.fit, cfg.guide)
    opaque = out.source == GUIDE_SOURCE
    assert opaque[0, 12, 16] and not opaque[0, 0, 0] and 0 < float(opaque.float().mean()) < 0.5
    assert torch.all((out.depth[opaque] > 1.5) & (out.depth[opaque] < 2.5)) and torch.all(out.depth[~opaque] == 5.0)
    grey = out.rgb[opaque]  # SH 0: grey 0.5, times alpha (>= guide_alpha) over the black background
    assert torch.all((grey > 0.5 * cfg.guide.alpha - 1e-3) & (grey < 0.5 + 1e-3))
    torch.testing.assert_close(out.rgb[0, 12, 16], torch.full((3,), 0.5), atol=1e-2, rtol=0)
    assert torch.all(out.rgb[~opaque] == 0.7) and torch.all(out.mask)
    pair = guided_renders(memory, [guide, guide], cams, cfg.fit, cfg.guide)
    assert torch.equal(pair.source == ENSEMBLE_SOURCE, opaque) and torch.equal(pair.rgb, out.rgb)


def test_guide_is_a_job_setting() -> None:
    assert LoopConfig.from_settings(Settings()).guide.enabled is True
    # a self-ensemble of 3 fits where gsplat fits them in lockstep (run 39), each from its own 0.4 of the
    # memory (runs 52 and 59); one fit from all of it on the CPU rasterizer
    cuda = LoopConfig.from_settings(Settings(), device="cuda").guide
    cpu = LoopConfig.from_settings(Settings(), device="cpu").guide
    assert (cuda.members, cuda.member_points) == (3, 0.4) and (cpu.members, cpu.member_points) == (1, 1.0)
    assert LoopConfig.from_settings(Settings.from_json({"guide": False})).guide.enabled is False
    with pytest.raises(Exception, match=r"settings\.guide: must be true or false"):
        Settings.from_json({"guide": 1})


def test_the_fit_draws_3_frames_a_step_on_every_rasterizer() -> None:
    """FitConfig.batch_size 3 on gsplat (run 46) and on the CPU (its numba compositing), the budget's step
    cost counting them (test_budget)."""
    for device in ("cuda", "cpu"):
        assert LoopConfig.from_settings(Settings(), device=device).fit.batch_size == 3


def test_write_frames_threads_round_trip(tmp_path):
    """Frames written by the thread pool read back bit for bit (PNG is lossless at any zlib level), the
    names come in frame order with cameras.json last, and a failed write raises to the caller."""
    from backend.outputs import FRAMES_DIR, to_u8, write_frames
    from backend.scene import Camera

    g = torch.Generator().manual_seed(0)
    images, conf = torch.rand(5, 12, 16, 3, generator=g), torch.rand(5, 12, 16, generator=g)
    cam = Camera(w2c=np.eye(4), K=np.array([[10.0, 0, 8], [0, 10.0, 6], [0, 0, 1]]), width=16, height=12)
    names = write_frames(tmp_path, [3, 4, 5, 6, 7], images, conf, [cam] * 5)
    assert names[:2] == [f"{FRAMES_DIR}/frame_0003.png", f"{FRAMES_DIR}/confidence_0003.png"]
    assert names[-1] == f"{FRAMES_DIR}/cameras.json" and len(names) == 11
    for i, frame in enumerate(range(3, 8)):
        back = np.asarray(Image.open(tmp_path / FRAMES_DIR / f"frame_{frame:04d}.png"))
        np.testing.assert_array_equal(back, to_u8(images[i]))
        back = np.asarray(Image.open(tmp_path / FRAMES_DIR / f"confidence_{frame:04d}.png"))
        np.testing.assert_array_equal(back, to_u8(conf[i]))
    # cameras.json lists the frames of the index it is given, never what the folder held before
    index: dict = {}
    write_frames(tmp_path, [1], images[:1], conf[:1], [cam], index=index)
    write_frames(tmp_path, [2], images[1:2], conf[1:2], [cam], index=index)
    listed = json.loads((tmp_path / FRAMES_DIR / "cameras.json").read_text())["frames"]
    assert [e["frame"] for e in listed] == [1, 2] and sorted(index) == [1, 2]
    (tmp_path / "blocked").write_text("a file where the frames folder would go")
    with pytest.raises(OSError):
        write_frames(tmp_path / "blocked", [1], images[:1], conf[:1], [cam])


def test_clear_outputs_removes_only_the_loops_files(tmp_path):
    """What an earlier run wrote goes (frames by name, numbers past 9999 and below 0 too: a rerun left frame_-002.png
    beside a new path); a user's files stay."""
    from backend.outputs import FRAMES_DIR, JOB_FILES, clear_outputs

    frames = tmp_path / FRAMES_DIR
    frames.mkdir()
    loop_files = [*JOB_FILES, f"{FRAMES_DIR}/cameras.json", f"{FRAMES_DIR}/frame_0001.png"]
    loop_files += [f"{FRAMES_DIR}/confidence_0001.png", f"{FRAMES_DIR}/frame_12345.png"]
    loop_files += [f"{FRAMES_DIR}/frame_-002.png", f"{FRAMES_DIR}/confidence_-002.png"]
    own = ["notes.txt", "scene.json", f"{FRAMES_DIR}/frame_1.png", f"{FRAMES_DIR}/frame_0001.jpg"]
    for name in loop_files + own:
        (tmp_path / name).write_bytes(b"x")
    assert sorted(clear_outputs(tmp_path)) == sorted(loop_files)
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file()) == sorted(own)
    for name in own[2:]:
        (tmp_path / name).unlink()
    assert clear_outputs(tmp_path) == [] and not frames.exists(), "an emptied frames folder goes too"
