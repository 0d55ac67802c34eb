"""The refine generator on CPU at tiny sizes: leave-out pairs, training, the loop and the service."""

from __future__ import annotations

import hashlib
import math
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from backend.camera_paths import default_trajectory
from backend.evaluate import split_protocol
from backend.formats import import_scene
from backend.generators import GENERATORS
from backend.generators.refine import (
    LeaveOut,
    RefineConfig,
    RefineGenerator,
    TrainingPairs,
    UNet,
    Validation,
    choose_strength,
    degraded_inputs,
    gain_standard_error,
    leave_out_guides,
    leave_out_subsets,
    make_pairs,
    predict,
    split_validation,
    train_refiner,
    validate,
)
from backend.generators.reproject import ReprojectConfig, ReprojectGenerator
from backend.loop import LoopConfig, run_loop
from backend.scene import Scene, SceneError, Settings, TrajectoryFrame
from backend.types import ENSEMBLE_SOURCE, Cameras, Frames, Renders, Views

W, H = 64, 48
FIT_ITERATIONS = 20
TINY = RefineConfig(seconds=60.0, max_steps=6, widths=(8, 16), crop_px=32, batch_size=2, fit_share=0.25)


def tiny_refiner(seed: int = 0) -> UNet:
    torch.manual_seed(seed)
    return UNet(8, 2, TINY.widths)


@pytest.fixture(scope="module")
def temple3(tmp_path_factory: pytest.TempPathFactory) -> Scene:
    from tests.conftest import require_shared_data

    src = require_shared_data("middlebury_temple")
    scene = import_scene("middlebury", src, tmp_path_factory.mktemp("temple"))
    scene = split_protocol(scene, "ring-arc", train_views=3, ring_start=11)
    orbit = default_trajectory([c.camera for c in scene.captures], 6)
    settings = Settings(
        width=W,
        height=H,
        gaussian_iterations=FIT_ITERATIONS,
        segment_length=6,
        segment_overlap=2,
        generator="refine",
        refine_seconds=1,
    )
    return replace(
        scene, trajectory=[TrajectoryFrame(i + 1, c) for i, c in enumerate(orbit)], heldout=[], settings=settings
    )


@pytest.fixture(scope="module")
def captures_cfg(temple3: Scene, single_thread):
    from backend.stages.cameras import load_image, resize_image, to_tensor

    images = [resize_image(load_image(c.image), W, H) for c in temple3.captures]
    captures = Views(
        to_tensor(images, torch.device("cpu")),
        Cameras.from_scene([c.camera for c in temple3.captures], W, H),
        list(range(len(images))),
    )
    return captures, LoopConfig.from_settings(temple3.settings)


def test_refine_is_listed_and_settings_check_the_budget() -> None:
    assert "refine" in GENERATORS.names()
    assert Settings.from_json({"refine_seconds": 30}).refine_seconds == 30
    with pytest.raises(SceneError, match=r"settings.refine_seconds: must be in \[1, 3600\]; got 0"):
        Settings.from_json({"refine_seconds": 0})
    with pytest.raises(ValueError, match="RefineConfig.fit_share must be in"):
        RefineConfig(fit_share=0.0)


def test_the_loop_builds_it_from_the_job_settings() -> None:
    from backend.generators import GeneratorCache, GeneratorConfig

    config = GeneratorConfig.from_settings(Settings(generator="refine", refine_seconds=7, seed=3))
    gen = GeneratorCache().get(config, "cpu")
    assert isinstance(gen, RefineGenerator) and gen.config.seconds == 7.0
    # the network's reprojection mixes a one-fit guide's share of the colour of any guide; its fallback is reproject's
    assert (
        gen.weight_free.config == ReprojectConfig()
        and gen.reproject.config.ensemble_blend == ReprojectConfig().guide_blend
    )
    with pytest.raises(RuntimeError, match="call prepare"):
        gen.refine(None, None)


def test_leave_out_subsets() -> None:
    assert leave_out_subsets(2, 6) == [(0,), (1,)]
    assert leave_out_subsets(3, 6) == [(0,), (1,), (2,)]
    five = leave_out_subsets(5, 6)
    assert len(five) == 6 and any(len(s) == 2 for s in five) and any(len(s) == 1 for s in five)
    assert all(len(set(s)) == len(s) and max(s) < 5 for s in five)
    with pytest.raises(ValueError, match="needs at least 2 captures"):
        leave_out_subsets(1, 6)


def test_pairs_never_see_their_target(captures_cfg) -> None:
    captures, cfg = captures_cfg
    pairs = make_pairs(captures, cfg, TINY, ReprojectGenerator(), device="cpu")
    assert pairs.target_ids == [0, 1, 2]
    for target, kept in zip(pairs.target_ids, pairs.kept_ids):
        assert target not in kept and len(kept) == 2
    assert torch.equal(pairs.truth, captures.images[[0, 1, 2]])
    assert pairs.frames.shape == (3, H, W, 3) and pairs.coverage.dtype == torch.bool
    # the inputs at camera 1 do not change when the photo taken there does: capture 1 is never read,
    # not even by the memory (built from the kept captures: the job's would hold points matched with it)
    scrambled = Views(captures.images.clone(), captures.cams, captures.ids)
    scrambled.images[1] = torch.rand(H, W, 3, generator=torch.Generator().manual_seed(0))

    def inputs(views: Views, left_out: list[int]) -> tuple[Frames, Renders]:
        subset = LeaveOut.of(views, left_out, cfg)
        assert subset.kept == [i for i in range(3) if i not in left_out]
        (guide,) = leave_out_guides([subset], cfg, 5, device="cpu")
        return degraded_inputs(views, subset, guide, cfg, ReprojectGenerator())

    a, b = LeaveOut.of(captures, [1], cfg).memory, LeaveOut.of(scrambled, [1], cfg).memory
    assert torch.equal(a.xyz, b.xyz) and torch.equal(a.rgb, b.rgb) and not bool((a.source == 1).any())
    frames, renders = inputs(captures, [1])
    frames2, renders2 = inputs(scrambled, [1])
    assert torch.equal(frames.images, frames2.images) and torch.equal(renders.rgb, renders2.rgb)
    # ... while leaving out another capture does read it
    assert not torch.equal(inputs(scrambled, [0])[0].images, inputs(captures, [0])[0].images)
    # a subset's memory that falls back (the hull asked for, no masks) is said in the notes, naming the subset
    notes: list[str] = []
    LeaveOut.of(captures, [2], replace(cfg, estimator="hull"), notes)
    assert len(notes) == 1 and notes[0].startswith("refiner, without capture(s) [2]: geometry: ")
    with pytest.raises(ValueError, match=r"left_out must leave out some and keep some of 3 captures; got \[0, 1, 2\]"):
        LeaveOut.of(captures, [0, 1, 2], cfg)


def test_network_stays_between_its_sources_and_learns_which_to_take(single_thread) -> None:
    """Each refined pixel lies between the render and the reprojection; trained on a fixed pair
    where the reprojection is right on the left half and the render on the right, the loss falls
    and the network learns to take each from its side."""
    g = torch.Generator().manual_seed(0)
    truth = torch.nn.functional.avg_pool2d(torch.rand(1, 3, 24, 32, generator=g), 3, 1, 1).permute(0, 2, 3, 1)
    left = torch.arange(32) < 16
    wrong = (1.0 - truth).clamp(0, 1)
    frames = torch.where(left[None, None, :, None], truth, wrong)  # the reprojection: right on the left
    render = torch.where(left[None, None, :, None], wrong, truth)  # the render: right on the right
    pairs = TrainingPairs(
        [0], [(1,)], frames, torch.full((1, 24, 32), 0.5), render, torch.ones(1, 24, 32).bool(), truth
    )
    cfg = replace(TINY, max_steps=200, crop_px=24, batch_size=4, lr=3e-3)
    cfg = replace(cfg, gain_jitter=0.0, gamma_jitter=0.0, offset_jitter=0.0)
    net = tiny_refiner()
    with torch.no_grad():  # an untrained head that already weighs: the check below is not trivial
        net.head.weight.normal_(0.0, 5.0, generator=torch.Generator().manual_seed(4))
    refined, _ = predict(net, frames, pairs.confidence, render, pairs.coverage)
    lo, hi = torch.minimum(frames, render), torch.maximum(frames, render)
    assert bool(((refined >= lo - 1e-6) & (refined <= hi + 1e-6)).all())
    assert not torch.allclose(refined, render)
    losses = train_refiner(net, pairs, cfg)
    assert len(losses) == 20
    assert losses[-1] < 0.5 * losses[0], losses
    refined, _ = predict(net, frames, pairs.confidence, render, pairs.coverage)
    assert float((refined - truth).abs().mean()) < 0.5 * float((render - truth).abs().mean())
    assert sum(p.numel() for p in UNet(8, 2, RefineConfig().widths).parameters()) < 3_000_000


def synthetic_pairs(target_ids: list[int], size: tuple[int, int] = (12, 16), noise: float = 0.02) -> TrainingPairs:
    """Pairs whose reprojection is the truth plus a little noise (a good input, hard to improve)."""
    g = torch.Generator().manual_seed(1)
    P, (h, w) = len(target_ids), size
    truth = torch.rand(P, h, w, 3, generator=g)
    frames = (truth + noise * torch.randn(P, h, w, 3, generator=g)).clamp(0, 1)
    return TrainingPairs(
        target_ids=list(target_ids),
        kept_ids=[tuple(c for c in range(max(target_ids) + 1) if c != t) for t in target_ids],
        frames=frames,
        confidence=torch.full((P, h, w), 0.5),
        render_rgb=frames.clone(),
        coverage=torch.ones(P, h, w, dtype=torch.bool),
        truth=truth,
    )


class Oracle(torch.nn.Module):
    """A "network" that weighs each pixel towards the source closer to the given truth (or, with
    ``wrong``, towards the other one), with a predicted error of softplus(0)."""

    def __init__(self, truth: torch.Tensor, wrong: bool = False) -> None:
        super().__init__()
        self.truth, self.wrong = truth, wrong

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        frames, render = x[:, :3] + 0.5, x[:, 3:6] + 0.5  # network_inputs centres the colours
        base = torch.where(x[:, 7:8].bool(), render, frames)
        truth = self.truth.permute(0, 3, 1, 2)
        closer = (frames - truth).abs().sum(1, keepdim=True) < (base - truth).abs().sum(1, keepdim=True)
        logit = torch.where(closer != self.wrong, 30.0, -30.0)
        return torch.cat([logit, torch.zeros_like(logit)], dim=1)


def two_source_pairs() -> TrainingPairs:
    """Two pairs whose reprojection is right on columns 0-7 and the render (covering all) on
    columns 4-15 (each shows 1 - truth elsewhere): the base is the better source, the reprojection
    still the better one on columns 0-3."""
    g = torch.Generator().manual_seed(1)
    truth = 0.1 + 0.8 * torch.rand(2, 12, 16, 3, generator=g)
    col = torch.arange(16)[None, None, :, None]
    frames = torch.where(col < 8, truth, 1.0 - truth)
    render = torch.where(col >= 4, truth, 1.0 - truth)
    return TrainingPairs(
        [0, 1], [(1, 2), (0, 2)], frames, torch.full((2, 12, 16), 0.5), render, torch.ones(2, 12, 16).bool(), truth
    )


def noise_refiner() -> UNet:
    """A tiny U-Net whose head weighs every pixel at random (large random logits): a useless refiner."""
    net = tiny_refiner()
    with torch.no_grad():
        net.head.weight.normal_(0.0, 20.0, generator=torch.Generator().manual_seed(2))
        net.head.bias.normal_(0.0, 1.0, generator=torch.Generator().manual_seed(3))
    return net


def test_validation_capture_is_never_trained_on() -> None:
    # five captures: singles and pairs left out together, as leave_out_subsets(5, 6) makes them
    pairs = synthetic_pairs([0, 0, 2, 1, 1, 3, 2])
    seen = set()
    for seed in range(8):
        training, validation, held_out = split_validation(pairs, seed)
        (target,) = set(validation.target_ids)
        assert held_out and target not in training.target_ids
        assert len(training) + len(validation) == len(pairs)
        assert torch.equal(validation.truth, pairs.truth[[i for i, t in enumerate(pairs.target_ids) if t == target]])
        again = split_validation(pairs, seed)[1]
        assert again.target_ids == validation.target_ids  # the seed decides
        seen.add(target)
    assert seen == {0, 1, 2, 3}  # every capture gets its turn over the seeds
    # one capture's pairs only (max_fits 1): validated on the training pair, and said so
    training, validation, held_out = split_validation(synthetic_pairs([1]), 5)
    assert not held_out and training.target_ids == validation.target_ids == [1]


def test_gate_keeps_the_base_for_a_useless_network_and_takes_a_perfect_one(single_thread) -> None:
    pairs = two_source_pairs()
    cfg = RefineConfig()
    strengths = cfg.strengths
    base_l1 = float((pairs.render_rgb - pairs.truth).abs().mean())
    # a network that takes each pixel from the wrong source: the base (here the render) passes through
    strength, declined, l1_input, l1, change, noise = validate(Oracle(pairs.truth, wrong=True), pairs, cfg)
    assert strength == 0.0 and not declined and l1[0] == pytest.approx(base_l1) and base_l1 < l1_input, l1
    assert l1 == sorted(l1) and l1[-1] > l1_input  # every step towards its frames costs
    assert change == pytest.approx(float((pairs.render_rgb - pairs.frames).abs().mean()))
    # one that takes each from the right source: all the way to the photos
    strength, declined, l1_input, l1, change, noise = validate(Oracle(pairs.truth), pairs, cfg)
    assert strength == 1.0 and l1[-1] < 1e-6 < l1_input and not declined
    assert change == pytest.approx(l1_input)
    # a refiner that overshoots by as much again: half way is right
    zero, half, one = torch.zeros(1, 4, 4, 3), torch.full((1, 4, 4, 3), 0.5), torch.ones(1, 4, 4, 3)
    assert choose_strength(zero, one, half, strengths) == (0.5, [0.5, 0.25, 0.0, 0.25, 0.5])
    # a network that changes nothing ties at every strength: declined
    assert choose_strength(half, half, one, strengths)[0] == 0.0
    with pytest.raises(ValueError, match=r"RefineConfig.strengths must be non-empty, each in \[0, 1\]; got \(1.5,\)"):
        RefineConfig(strengths=(1.5,))


def test_gate_declines_a_gain_inside_the_validations_noise(single_thread) -> None:
    # 64 tiles of 16 px; the chosen frames beat the reprojection by 0.1 on half the tiles and lose 0.1 - d
    # on the others: a mean gain of d / 2 whose tiles disagree
    truth = torch.zeros(1, 128, 128, 3)
    frames = torch.full_like(truth, 0.3)
    checker = ((torch.arange(128)[:, None] // 16 + torch.arange(128)[None, :] // 16) % 2 == 0)[None, ..., None]
    for d, passes in ((0.002, False), (0.2, True)):
        chosen = torch.where(checker, 0.2, 0.4 - d).expand_as(truth)
        gain = float((frames - truth).abs().mean() - (chosen - truth).abs().mean())
        se = gain_standard_error(frames, chosen, truth)
        assert gain == pytest.approx(d / 2, rel=1e-3) and se == pytest.approx((0.2 - d) / 2 / math.sqrt(63), abs=1e-7)
        assert (gain > 2.0 * se) == passes
    # the same gain on every tile has no spread
    assert gain_standard_error(frames, torch.full_like(truth, 0.299), truth) == pytest.approx(0.0, abs=1e-7)
    # validate declines what gate_z says is noise, and says how much it needed
    pairs = two_source_pairs()
    strength, declined, l1_input, l1, change, noise = validate(Oracle(pairs.truth), pairs, RefineConfig())
    assert strength == 1.0 and not declined and 0.0 <= noise < l1_input - l1[-1]
    strict = RefineConfig(gate_z=1e9)
    strength, declined, l1_input, l1, change, noise = validate(Oracle(pairs.truth), pairs, strict)
    assert declined and change == 0.0 and noise > l1_input
    v = Validation([0], True, 1, l1_input, strict.strengths, tuple(l1), strength, change, noise, declined)
    assert v.l1_chosen == l1_input and "the validation's noise" in v.note and v.note.startswith("refiner declined")
    with pytest.raises(ValueError, match=r"RefineConfig.gate_z must be >= 0; got -1"):
        RefineConfig(gate_z=-1)


def zero_refiner() -> UNet:
    """A tiny U-Net that changes nothing (the reprojection's weight sigmoid(-30), predicted error softplus(0))."""
    net = tiny_refiner()
    with torch.no_grad():
        net.head.weight.zero_()
        net.head.bias.copy_(torch.tensor([-30.0, 0.0]))
    return net


def test_refined_frames_start_from_the_render_where_it_covers(single_thread) -> None:
    pairs = synthetic_pairs([0, 1])
    pairs.render_rgb = pairs.truth.clone()  # a render better than the reprojection ...
    pairs.coverage[..., pairs.coverage.shape[-1] // 2 :] = False  # ... over the left half only
    cover = pairs.coverage[..., None]
    cfg = TINY
    # the gate scores blends of the base (render | reprojection), not of the reprojection
    strength, declined, l1_input, l1, change, noise = validate(zero_refiner(), pairs, cfg)
    base_l1 = float((torch.where(cover, pairs.truth, pairs.frames) - pairs.truth).abs().mean())
    assert 0.0 < base_l1 < l1_input
    assert l1 == pytest.approx([base_l1] * len(cfg.strengths))
    assert strength == 0.0 and not declined  # a network that changes nothing: the base passes through
    assert change == pytest.approx(l1_input - base_l1)
    # a render worse than the reprojection: the gate declines and the reprojection passes through
    worse = replace(pairs, render_rgb=(1.0 - pairs.truth))
    strength, declined, l1_input, l1, change, noise = validate(zero_refiner(), worse, cfg)
    assert declined and l1_input < min(l1) and change == 0.0
    frames = Frames(pairs.frames, pairs.confidence)
    renders = Renders(
        pairs.render_rgb, torch.ones_like(pairs.confidence), pairs.coverage, torch.zeros_like(pairs.confidence).int()
    )
    gen = RefineGenerator(cfg)
    gen.net, gen.strength = zero_refiner(), 0.0
    out = gen.refine(frames, renders)
    assert torch.equal(out.images, torch.where(cover, pairs.truth, pairs.frames))
    expected = math.exp(-math.log(2) / cfg.confidence_error)  # softplus(0) = log 2 predicted
    torch.testing.assert_close(out.confidence, torch.full_like(out.confidence, expected))
    # a noisy network: strength 1 is its frame, 0.25 a quarter of the way there, the confidence the network's
    gen.net = noise_refiner()
    base = torch.where(cover, pairs.render_rgb, pairs.frames)
    gen.strength = 1.0
    full = gen.refine(frames, renders)
    assert (full.images - base).abs().mean() > 1e-3
    gen.strength = 0.25
    quarter = gen.refine(frames, renders)
    torch.testing.assert_close(quarter.images, base + 0.25 * (full.images - base))
    torch.testing.assert_close(quarter.confidence, full.confidence)


def test_trust_region_lowers_the_strength_where_frames_move_further_than_validated() -> None:
    frames = torch.zeros(2, 4, 4, 3)
    refined = torch.full_like(frames, 0.4)  # strength a moves the frames 0.4 a
    gen = RefineGenerator(TINY)
    gen.strength = 1.0
    assert gen.trusted_strength(frames, frames, refined) == 1.0  # no validation: the gate's strength stands
    gen.validation = Validation([0], True, 2, 0.2, TINY.strengths, (0.2,) * 5, strength=1.0, change=0.1)
    # limit 1.5 x 0.1: 0.25 moves 0.1, 0.5 would move 0.2
    assert gen.trusted_strength(frames, frames, refined) == 0.25
    gen.strength = 0.25
    assert gen.trusted_strength(frames, frames, refined) == 0.25
    # a base that alone moves the frames beyond the limit: the reprojection passes through
    assert gen.trusted_strength(frames, frames + 0.2, refined) is None
    off = RefineGenerator(replace(TINY, max_change_ratio=0.0))
    off.strength, off.validation = 1.0, gen.validation
    assert off.trusted_strength(frames, frames, refined) == 1.0
    # refine() records each segment's strength and passes the reprojection through at None
    gen.net, gen.strength = zero_refiner(), 1.0
    conf = torch.full(frames.shape[:3], 0.3)
    renders = Renders(frames + 0.2, torch.ones_like(conf), torch.ones_like(conf, dtype=torch.bool), conf.int())
    out = gen.refine(Frames(frames, conf), renders)
    assert gen.segment_strengths == [None] and torch.equal(out.images, frames) and torch.equal(out.confidence, conf)
    # ... and generate() gives the weight-free generator's own frames there (an ensemble guide's share of its colour,
    # not the network's input), as where the refiner declined; with no ensemble pixel the two are the same, and the
    # network's input passes through without a second reprojection
    own = Frames(frames + 0.1, conf)
    gen.reproject = SimpleNamespace(generate=lambda cond: Frames(frames, conf))
    gen.weight_free = SimpleNamespace(generate=lambda cond: own)
    assert torch.equal(gen.generate(SimpleNamespace(renders=renders)).images, frames)
    ensemble = replace(renders, source=torch.full_like(renders.source, ENSEMBLE_SOURCE))
    assert gen.generate(SimpleNamespace(renders=ensemble)) is own and gen.segment_strengths == [None] * 3
    gen.declined = True
    assert gen.generate(SimpleNamespace(renders=renders)) is own and gen.segment_strengths == [None] * 4
    gen.declined = False
    # the job's note names the lowered segments, and is silent where every segment kept the gate's strength
    gen.segment_strengths = [1.0, 0.25, None]
    assert gen.segments_note.startswith("refiner: the trust region lowered strength 1 in 2 of 3 segments")
    assert "(0.25, the reprojection passed through)" in gen.segments_note
    gen.segment_strengths = [1.0, 1.0]
    assert gen.segments_note is None
    with pytest.raises(ValueError, match="RefineConfig.max_change_ratio must be >= 0; got -1"):
        RefineConfig(max_change_ratio=-1)


@pytest.mark.slow
def test_refine_runs_in_the_loop(temple3: Scene, single_thread, tmp_path: Path, monkeypatch) -> None:
    import backend.generators.refine as refine_module

    trained_on: list[list[int]] = []  # the captures whose photos the network was trained against
    train = refine_module.train_refiner

    def recording_train(net, pairs, *args, **kwargs):
        trained_on.append(list(pairs.target_ids))
        return train(net, pairs, *args, **kwargs)

    monkeypatch.setattr(refine_module, "train_refiner", recording_train)
    events = []
    gen = RefineGenerator(TINY)
    result = run_loop(temple3, tmp_path / "job", device="cpu", progress=events.append, generator=gen)
    assert result.metrics["generator"] == "refine"
    assert "prepare" in result.metrics["timing"]["stages"]
    assert sum(e.stage == "prepare" for e in events) >= 3  # one per leave-out fit at least
    assert result.frames.images.shape == (6, H, W, 3)
    assert torch.isfinite(result.frames.images).all()
    conf = result.frames.confidence
    assert float(conf.min()) >= 0.0 and float(conf.max()) <= 1.0 and float(conf.mean()) > 0.0
    assert len(gen.losses) >= 1
    # the gate: capture seed % 3 validated, held out of the 2 training pairs, its line in the notes
    v = gen.validation
    assert v.target_ids == [temple3.settings.seed % 3] and v.held_out and v.train_pairs == 2
    assert len(trained_on) == 1 and len(trained_on[0]) == 2 and not set(v.target_ids) & set(trained_on[0])
    assert v.strength == gen.strength and v.strength in TINY.strengths and len(v.l1) == len(TINY.strengths)
    assert v.declined == gen.declined and v.l1_chosen == min(v.l1_input, *v.l1)  # never above the reprojection
    assert len(gen.segment_strengths) >= 1 and (not gen.declined or set(gen.segment_strengths) == {None})
    assert (gen.segments_note in result.metrics["notes"]) == (gen.segments_note is not None)
    assert v.note in result.metrics["notes"] and v.note.startswith(("refiner: validation L1", "refiner declined"))
    assert any(e.stage == "prepare" and e.message == v.note for e in events)
    gen.save(tmp_path / "refiner.pt")
    saved = torch.load(tmp_path / "refiner.pt")
    assert saved["config"]["widths"] == TINY.widths and "head.weight" in saved["state_dict"]


@pytest.mark.slow
def test_refine_job_through_the_service(temple3: Scene, tmp_path: Path) -> None:
    from backend.service import Service, ServiceConfig
    from backend.service.store import scene_message
    from backend.service.worker import default_runner
    from protocol.client import Client

    svc = Service(
        ServiceConfig(bind="tcp://127.0.0.1:*", data_dir=tmp_path / "jobs", device="cpu"), runner=default_runner
    )
    thread = svc.start_thread()
    try:
        with Client(svc.endpoint, timeout_ms=5000) as c:
            assert "refine" in c.hello()["generators"]
            job = c.submit(scene_message(temple3))
            c.watch(job, since=0)
            events = list(c.events(job, idle_ms=120_000))
            assert events[-1]["state"] == "done", events[-1]
            assert any(e.get("stage") == "prepare" for e in events)
            artifacts = {a["name"]: a for a in c.status(job)["artifacts"]}
            assert {"gaussians.ply", "frames/frame_0001.png", "metrics.json"} <= set(artifacts)
            metrics = c.fetch_bytes(job, "metrics.json")
            assert hashlib.sha256(metrics).hexdigest() == artifacts["metrics.json"]["sha256"]
            assert b'"generator": "refine"' in metrics
    finally:
        svc.stop()
        thread.join(20)


@pytest.mark.slow
def test_bench_refine_variant_runs_at_a_tiny_size(single_thread, tmp_path: Path) -> None:
    import json
    import sys

    from tests.conftest import require_shared_data

    data = require_shared_data("middlebury_temple").parent
    sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "scripts"))
    try:
        import bench_loop_quality
    finally:
        sys.path.pop(0)
    args = ["--data", str(data), "--scenes", "temple", "--size", "48x36", "--iterations", "5"]
    args += ["--variants", "default,refine small", "--refine-steps", "2", "--refine-seconds", "600"]
    assert (
        bench_loop_quality.main(
            [*args, "--device", "cpu", "--pictures", str(tmp_path), "--out", str(tmp_path / "q.json")]
        )
        == 0
    )
    summary = json.loads((tmp_path / "q.json").read_text())["scenes"]["temple"]["summary"]
    assert {"frames", "refine_input_frames", "gaussians_loop", "refine_declined"} <= set(summary["refine small"])
    assert 0.0 < summary["default"]["frames_confidence"] <= 1.0  # the fit's weight on the frames scored
    for row in (summary["default"], summary["refine small"]):  # and the frames' error per unit of it
        assert 0.0 < row["frames_l1"] < 0.5 and 0.0 < row["frames_weighted_l1"] < 0.5
    table = bench_loop_quality.markdown(json.loads((tmp_path / "q.json").read_text()))
    assert "| frames_confidence | frames_l1 | frames_weighted_l1 |" in table
    assert f"{summary['default']['frames_weighted_l1']:.4f}" in table
    (run,) = json.loads((tmp_path / "q.json").read_text())["scenes"]["temple"]["runs"]["refine small"]
    gate = run["refine_validation"]
    assert run["refine_strength"] in (0.0, 0.25, 0.5, 0.75, 1.0) and gate["held_out"] and gate["train_pairs"] == 2
    assert set(gate["l1"]) == {"0", "0.25", "0.5", "0.75", "1"}
    best = min(gate["l1"].values())
    gain = gate["l1_input"] - best  # declined: below the validation's noise, or a loss
    assert gate["declined"] == run["refine_declined"] == (gain < gate["noise"])
    # the summary's strength is the mean where the network was applied; a declined run counts as declined
    assert summary["refine small"]["refine_declined"] == float(run["refine_declined"])
    assert ("refine_strength" in summary["refine small"]) == (not run["refine_declined"])
    if run["refine_declined"]:  # the reprojection passed through: the frames scored what it scored
        assert run["frames"]["psnr"] == pytest.approx(run["refine_input_frames"]["psnr"])
    assert (tmp_path / "temple_refine_small_seed0_refine.png").is_file()


@pytest.mark.slow
def test_cli_run_saves_the_refiner_weights_when_asked(temple3: Scene, single_thread, tmp_path: Path) -> None:
    from backend.cli import main
    from backend.scene import save_scene

    folder = tmp_path / "scene"
    save_scene(temple3, folder)
    weights = tmp_path / "refiner.pt"
    assert (
        main(["run", str(folder), "--out", str(tmp_path / "out"), "--device", "cpu", "--refiner-out", str(weights)])
        == 0
    )
    saved = torch.load(weights)
    assert saved["config"]["seconds"] == 1.0 and "head.weight" in saved["state_dict"]
    assert (tmp_path / "out" / "gaussians.ply").is_file()
    save_scene(replace(temple3, settings=replace(temple3.settings, generator="reproject")), tmp_path / "plain")
    with pytest.raises(SystemExit, match="trains no weights"):
        main(
            [
                "run",
                str(tmp_path / "plain"),
                "--out",
                str(tmp_path / "o2"),
                "--device",
                "cpu",
                "--refiner-out",
                str(weights),
            ]
        )
