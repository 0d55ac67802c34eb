"""The time budget's plan, the memory's thinning, the device choice and the --budget option."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from backend import budget as budget_module
from backend.budget import (
    FIT_SHARE,
    GAUSSIAN_CAPS,
    MIN_ITERATIONS,
    OVERRUN_SLACK,
    PLAN_CHECK_RATIO,
    PLAN_ITERATIONS,
    StepClock,
    StepCosts,
    measure_step_costs,
    measure_step_seconds,
    plan_budget,
    probe_scene,
    thin_memory,
)
from backend.cli import budget_for, build_parser, with_budget
from backend.devices import default_budget_min, pick_device
from backend.scene import Capture, Scene, SceneError, Settings
from backend.stages.fit import FitConfig, FitViews, fit_gaussians
from backend.types import Cameras, GeometryMemory
from tests.conftest import require_module


def cloud(n: int, seed: int = 0) -> GeometryMemory:
    gen = torch.Generator().manual_seed(seed)
    return GeometryMemory(
        torch.rand(n, 3, generator=gen),
        torch.rand(n, 3, generator=gen),
        torch.rand(n, generator=gen),
        torch.arange(n, dtype=torch.int32) % 5,
    )


def test_thin_memory_keeps_the_most_confident_point_per_voxel_under_the_cap():
    memory = cloud(5000)
    thinned = thin_memory(memory, 600)
    kept = len(thinned.memory)
    assert 0.5 * 600 < kept <= 600 and thinned.dropped == 5000 - kept
    assert "5000" in thinned.note and str(kept) in thinned.note and "cap 600" in thinned.note
    # Every kept point is the most confident of its voxel, and no voxel holds two kept points.
    origin, v = memory.xyz.min(dim=0).values, thinned.voxel
    cells = lambda xyz: [tuple(c) for c in torch.floor((xyz - origin) / v).long().tolist()]  # noqa: E731
    kept_cells = cells(thinned.memory.xyz)
    assert len(set(kept_cells)) == kept
    best: dict = {}
    for cell, conf in zip(cells(memory.xyz), memory.confidence.tolist()):
        best[cell] = max(best.get(cell, 0.0), conf)
    assert all(best[c] == conf for c, conf in zip(kept_cells, thinned.memory.confidence.tolist()))
    # Points keep their colour and source (rows of the original memory, in its order).
    rows = {tuple(p): i for i, p in enumerate(memory.xyz.tolist())}
    idx = [rows[tuple(p)] for p in thinned.memory.xyz.tolist()]
    assert idx == sorted(idx)
    torch.testing.assert_close(thinned.memory.rgb, memory.rgb[idx])
    torch.testing.assert_close(thinned.memory.source, memory.source[idx])


def test_thin_memory_keeps_to_a_cap_below_the_coarsest_voxels_cells():
    """The coarsest voxel (the cloud's extent) may straddle 8 cells: a cap of 1 to 7 keeps that many, the most
    confident (a cap of 1 kept 2)."""
    memory = cloud(1000)
    for cap in range(1, 8):
        thinned = thin_memory(memory, cap)
        assert len(thinned.memory) <= cap and thinned.dropped == 1000 - len(thinned.memory)
    assert float(thin_memory(memory, 1).memory.confidence[0]) == float(memory.confidence.max())


def test_thin_memory_of_points_in_one_place_keeps_the_most_confident():
    n = 10
    memory = GeometryMemory(
        torch.full((n, 3), 0.25),
        torch.rand(n, 3),
        torch.arange(n, dtype=torch.float32),
        torch.zeros(n, dtype=torch.int32),
    )
    thinned = thin_memory(memory, 3)
    assert sorted(thinned.memory.confidence.tolist()) == [7.0, 8.0, 9.0] and thinned.dropped == 7


def test_thin_memory_within_the_cap_is_the_memory_itself():
    memory = cloud(100)
    thinned = thin_memory(memory, 100)
    assert thinned.memory is memory and thinned.dropped == 0 and thinned.note == ""
    with pytest.raises(ValueError, match="max_points must be >= 1; got 0"):
        thin_memory(memory, 0)


def test_fit_starts_from_at_most_max_gaussians():
    cams = Cameras(torch.eye(4)[None], torch.tensor([[[20.0, 0, 12], [0, 20, 8], [0, 0, 1]]]), 24, 16)
    memory = GeometryMemory(
        torch.randn(500, 3) * 0.2 + torch.tensor([0, 0, 2.0]),
        torch.rand(500, 3),
        torch.ones(500),
        torch.zeros(500, dtype=torch.int32),
    )
    views = FitViews(torch.rand(1, 16, 24, 3), cams, torch.ones(1, 16, 24))
    cfg = FitConfig(iterations=2, rasterizer="torch_cpu", strategy="none", sh_degree=0, max_gaussians=50)
    assert 0 < len(fit_gaussians(views, memory, cfg, device="cpu")) <= 50
    with pytest.raises(ValueError, match="max_gaussians must be >= 0"):
        FitConfig(max_gaussians=-1)


def test_plan_fits_the_budget_and_never_exceeds_the_job():
    costs = StepCosts(per_pixel=2e-6, per_gaussian=2e-6)
    plan = plan_budget(4.0, costs, max_iterations=3000, max_size=(320, 240))
    assert (plan.width, plan.height) == (320, 240)
    assert plan.max_gaussians in GAUSSIAN_CAPS and plan.iterations >= MIN_ITERATIONS
    fit_seconds = plan.fits * plan.iterations * costs.seconds(plan.max_gaussians, plan.width, plan.height)
    assert fit_seconds <= 4.0 * 60
    assert "4 min" in plan.sentence and "320x240" in plan.sentence and str(plan.iterations) in plan.sentence
    # The job's own size and steps are upper bounds.
    small = plan_budget(60.0, costs, max_iterations=300, max_size=(192, 144))
    assert (small.width, small.height) == (192, 144) and small.iterations == 300
    # A job larger than WORKING_SIZES keeps its own size when the budget affords it (it was cut to
    # 320x240 whatever the budget), and one between two of them too; a short budget still shrinks it.
    large = plan_budget(60.0, costs, max_iterations=300, max_size=(640, 480))
    assert (large.width, large.height) == (640, 480) and large.iterations == 300 and "640x480" in large.sentence
    between = plan_budget(60.0, costs, max_iterations=300, max_size=(200, 150))
    assert (between.width, between.height) == (200, 150)
    short = plan_budget(1.0, costs, max_iterations=300, max_size=(640, 480))
    assert short.width * short.height < 640 * 480
    # The job's own short step count wins over a larger cap: 300 steps at 20,000 Gaussians, not ~240 at
    # 30,000 (72 s per fit at 1e-5 s per Gaussian).
    steps_first = plan_budget(
        4.0, StepCosts(per_pixel=1e-9, per_gaussian=1e-5), max_iterations=300, max_size=(320, 240)
    )
    assert (steps_first.iterations, steps_first.max_gaussians) == (300, 20_000)
    # A job asking for more than PLAN_ITERATIONS (the default 3000) gets the size and cap a job asking for
    # PLAN_ITERATIONS gets, the time left over as more steps: on a slow CPU ...
    many = plan_budget(4.0, StepCosts(per_pixel=1e-9, per_gaussian=1e-5), max_iterations=3000, max_size=(320, 240))
    assert many.max_gaussians == 15_000 and many.iterations == 479  # 72 s a fit at 0.15 s a step
    for per_pixel, per_gaussian, minutes in (
        (2e-6, 2e-6, 4.0),
        (1e-6, 3e-6, 3.0),
        (4e-6, 1e-6, 5.0),
        (1e-9, 2e-6, 4.0),
    ):
        step_costs = StepCosts(per_pixel=per_pixel, per_gaussian=per_gaussian)
        asked = plan_budget(minutes, step_costs, max_iterations=3000, max_size=(320, 240))
        short = plan_budget(minutes, step_costs, max_iterations=PLAN_ITERATIONS, max_size=(320, 240))
        assert (asked.width, asked.height, asked.max_gaussians) == (short.width, short.height, short.max_gaussians)
        assert asked.iterations >= short.iterations == PLAN_ITERATIONS
    # ... and on a fast one 3000 steps do not cost the Gaussians (10,000 of them could take 3000 steps in 4
    # minutes; 80,000 take 449, as for a 300-step job), nor at 20 minutes (3000 steps at 10,000 before).
    fast = StepCosts(per_pixel=1e-9, per_gaussian=2e-6)
    assert plan_budget(4.0, fast, max_iterations=3000, max_size=(320, 240)).max_gaussians == 80_000
    assert plan_budget(4.0, fast, max_iterations=300, max_size=(320, 240)).max_gaussians == 80_000
    slow = StepCosts(per_pixel=1e-9, per_gaussian=1e-5)
    assert plan_budget(20.0, slow, max_iterations=3000, max_size=(320, 240)).max_gaussians == 80_000
    # ... and where no cap affords PLAN_ITERATIONS, the largest that affords MIN_ITERATIONS.
    fewer = plan_budget(2.0, StepCosts(per_pixel=1e-9, per_gaussian=1e-5), max_iterations=3000, max_size=(320, 240))
    assert fewer.max_gaussians == 15_000 and MIN_ITERATIONS <= fewer.iterations == 239 < PLAN_ITERATIONS
    # A slower device gets a smaller problem; one too slow for anything is told so.
    slow = plan_budget(4.0, StepCosts(per_pixel=2e-5, per_gaussian=2e-6), max_iterations=3000, max_size=(320, 240))
    assert slow.width * slow.height * slow.max_gaussians < plan.width * plan.height * plan.max_gaussians
    hopeless = plan_budget(0.5, StepCosts(per_pixel=1e-3, per_gaussian=1e-4), max_iterations=300, max_size=(320, 240))
    assert hopeless.iterations >= 1 and "too short" in hopeless.sentence
    # More fits (the refiner's leave-out guides, fractions of a fit) and seconds kept for its training
    # leave a smaller problem per fit (here a smaller size for the PLAN_ITERATIONS steps), and the sentence says why.
    refine = plan_budget(
        4.0, costs, max_iterations=3000, max_size=(320, 240), fits=2.6, reserved_s=10, reserved_for="training"
    )
    step = costs.seconds(refine.max_gaussians, refine.width, refine.height)
    assert refine.width * refine.height * refine.max_gaussians < plan.width * plan.height * plan.max_gaussians
    assert refine.iterations >= PLAN_ITERATIONS and refine.fits * refine.iterations * step <= 4.0 * 60 * FIT_SHARE - 10
    assert "2.6 fits" in refine.sentence and "10 s kept for training" in refine.sentence
    # Costs measured on steps of 3 frames (FitConfig.batch_size on gsplat) are what a step costs; the
    # sentence says a step's frames.
    batched = plan_budget(4.0, replace(costs, views=3), max_iterations=3000, max_size=(320, 240))
    assert "s a step of 3 frames as measured here" in batched.sentence and "frames" not in plan.sentence
    with pytest.raises(ValueError, match=r"fits must be > 0 and reserved_s >= 0; got 2, -1"):
        plan_budget(4.0, costs, max_iterations=300, max_size=(320, 240), reserved_s=-1)
    with pytest.raises(ValueError, match="budget_min must be > 0"):
        plan_budget(0, costs, max_iterations=300, max_size=(320, 240))


def test_plan_measures_its_chosen_step_and_plans_again_when_it_is_slower():
    """A probe pair that saw Gaussians as nearly free plans a cap the device cannot afford; the chosen
    step, measured, is planned again from the measurement, and the sentence says so."""
    probed = StepCosts(per_pixel=1e-6, per_gaussian=1e-7)
    true = StepCosts(per_pixel=1e-6, per_gaussian=2e-6)  # what a step really costs on this "device"
    measured: list[tuple[int, int, int]] = []

    def measure(n: int, w: int, h: int) -> float:
        measured.append((n, w, h))
        return true.seconds(n, w, h)

    kw = {"max_iterations": 400, "max_size": (160, 120)}
    blind = plan_budget(3.0, probed, **kw)
    checked = plan_budget(3.0, probed, **kw, measure=measure)
    # the chosen step, then the choice made again (which measures as the refit predicts, so it stands)
    assert measured == [(blind.max_gaussians, 160, 120), (40_000, 160, 120)]
    assert blind.max_gaussians == GAUSSIAN_CAPS[0]  # 120k: predicted 0.03 s a step, really 0.26 s
    assert checked.max_gaussians == 40_000 and checked.iterations == 400
    spent = checked.fits * checked.iterations * true.seconds(checked.max_gaussians, 160, 120)
    assert spent <= 3.0 * 60 * FIT_SHARE  # within the fits' share, as measured
    assert checked.costs.per_gaussian == pytest.approx(true.per_gaussian)
    assert "a step at 120000 Gaussians took 0.26 s, not the probes' 0.03 s: planned again" in checked.sentence
    # A step that measures as predicted, or faster, or within PLAN_CHECK_RATIO of it, keeps the plan.
    for factor in (0.5, 1.0, PLAN_CHECK_RATIO):
        kept = plan_budget(3.0, probed, **kw, measure=lambda n, w, h, f=factor: f * probed.seconds(n, w, h))
        assert kept == blind


def test_a_plan_made_again_stays_at_the_size_it_measured():
    """A machine twice as slow as its probes (another program on the cores): the plan made again keeps to the
    size it measured and the fits to their share (it moved to 640x480, never measured, and took 627 s of 360)."""
    probed = StepCosts(per_pixel=2.42e-6, per_gaussian=3.24e-6, views=3)  # a 2-core machine's probes

    def twice(n: int, w: int, h: int) -> float:
        return 2 * probed.seconds(n, w, h)

    first = plan_budget(10.0, probed, max_iterations=1000, max_size=(640, 480), fits=2)
    again = plan_budget(10.0, probed, max_iterations=1000, max_size=(640, 480), fits=2, measure=twice)
    assert "planned again" in again.sentence
    assert again.width * again.height <= first.width * first.height
    spent = again.fits * again.iterations * twice(again.max_gaussians, again.width, again.height)
    assert spent <= 10.0 * 60 * FIT_SHARE, spent
    # its new choice measured too: slower than the refit predicts (its fits took 1.26 times the share), so both rates
    # are solved through the two measurements, which gives the plan the device's true costs give
    assert again.sentence.endswith("not 0.45 s: planned from both"), again.sentence
    true_costs = replace(probed, per_pixel=2 * probed.per_pixel, per_gaussian=2 * probed.per_gaussian)
    true = plan_budget(10.0, true_costs, max_iterations=1000, max_size=(320, 240), fits=2)
    assert (again.width, again.height, again.max_gaussians, again.iterations) == (
        true.width,
        true.height,
        true.max_gaussians,
        true.iterations,
    )
    # Pixels six times the probes' rate and Gaussians at it: not a uniform slowdown (the rate of the first
    # measurement alone planned 1.9 times the share), and within the share by the two measurements' rates.
    pixels = replace(probed, per_pixel=6 * probed.per_pixel)
    kw = {"max_iterations": 300, "max_size": (320, 240), "fits": 2}
    plan = plan_budget(10.0, probed, **kw, measure=lambda n, w, h: pixels.seconds(n, w, h))
    assert plan.fits * plan.iterations * pixels.seconds(plan.max_gaussians, plan.width, plan.height) <= 360
    # ... and one where the third choice, new, measures slower than both rates predict: its steps are what that
    # measurement affords, the sentence's step is the measured one
    third = lambda n, w, h: probed.seconds(n, w, h) * 3 * (1 + (n / 30_000) ** 0.5) * (1 + w * h / 40_000) / 4  # noqa: E731
    made = plan_budget(20.0, probed, max_iterations=1000, max_size=(320, 240), fits=2, measure=third)
    assert (made.width, made.height, made.max_gaussians, made.iterations) == (320, 240, 15_000, 410)
    assert made.step_seconds == third(15_000, 320, 240) and "about 0.88 s a step" in made.sentence
    assert made.fits * made.iterations * made.step_seconds <= 20 * 60 * FIT_SHARE
    # a device whose steps grow faster than any line through the measurements: within the check's tolerance
    curved = lambda n, w, h: probed.seconds(n, w, h) * (1 + (w * h / 20_000) ** 2)  # noqa: E731
    bent = plan_budget(10.0, probed, **kw, measure=curved)
    assert bent.fits * bent.iterations * curved(bent.max_gaussians, bent.width, bent.height) <= 360 * PLAN_CHECK_RATIO


def test_measured_step_is_positive_and_grows_with_gaussians():
    small = measure_step_seconds("torch_cpu", "cpu", 200, (32, 24))
    assert 0 < small < 10
    # a step of 3 frames renders 3 cameras in its one call: the CPU rasterizer draws them one by one
    assert measure_step_seconds("torch_cpu", "cpu", 2000, (64, 48), views=3) > 1.5 * measure_step_seconds(
        "torch_cpu", "cpu", 2000, (64, 48)
    )
    with pytest.raises(ValueError, match="measure_step_costs: views must be >= 1; got 0"):
        measure_step_costs("torch_cpu", "cpu", views=0)
    scene = probe_scene(200, 32, 24, 2)
    assert scene["means"].shape == (200, 3) and scene["viewmats"].shape == (2, 4, 4)
    assert (scene["means"][:, 2] > 1.5).all()


def test_probe_keeps_torchs_threads_unless_one_thread_beats_them_warm(monkeypatch):
    """The process's first timing runs cold: torch's threads are timed again after the single thread, and
    one thread wins only against the faster of the two."""
    import backend.budget as budget

    def probe(timings):
        calls = []

        def fake(rasterizer, device, n, size, views=1):
            calls.append((n, torch.get_num_threads()))
            return timings[len(calls) - 1]

        monkeypatch.setattr(budget, "measure_step_seconds", fake)
        monkeypatch.setattr(budget, "_before_one_thread", None)
        return budget._measure_step_costs("torch_cpu", "cpu"), calls, torch.get_num_threads()

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        # cold first timing 0.095, one thread 0.089, warm again 0.056: torch's threads stay
        costs, calls, now = probe([0.095, 0.089, 0.056, 0.07])
        assert costs.threads == 0 and now == 2
        assert [c[1] for c in calls] == [2, 1, 2, 2]
        assert costs.per_gaussian > 0
        # one thread faster than both timings: it is kept, for the probe's last step and after
        costs, calls, now = probe([0.095, 0.05, 0.09, 0.07])
        assert costs.threads == 1 and now == 1 and calls[-1][1] == 1
    finally:
        torch.set_num_threads(threads)


@pytest.fixture
def probes(monkeypatch):
    """Step timings faked in order (one thread wins the first probe, loses the second), the probes' clock at
    ``clock[0]``, no costs cached; yields (calls: torch's thread count at each timing, clock). Threads restored."""
    import backend.budget as budget

    timings = iter([0.095, 0.05, 0.09, 0.07, 0.06, 0.09, 0.05, 0.07])
    calls, clock = [], [1000.0]
    monkeypatch.setattr(
        budget, "measure_step_seconds", lambda *a, **k: calls.append(torch.get_num_threads()) or next(timings)
    )
    monkeypatch.setattr(budget, "_probes", {})
    monkeypatch.setattr(budget, "_before_one_thread", None)
    monkeypatch.setattr(budget, "_clock", lambda: clock[0])
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield calls, clock
    torch.set_num_threads(threads)


def test_a_long_lived_process_measures_again_and_tries_its_threads_again(probes):
    """A service reuses its step costs for PROBE_MAX_AGE_S, then measures again; where one thread won under
    a moment's load, the next measurement starts from the thread count one thread beat."""
    from backend.budget import PROBE_MAX_AGE_S

    calls, clock = probes
    first = measure_step_costs("torch_cpu", "cpu")
    assert first.threads == 1 and torch.get_num_threads() == 1 and len(calls) == 4
    clock[0] += PROBE_MAX_AGE_S - 1
    assert measure_step_costs("torch_cpu", "cpu") is first and len(calls) == 4  # reused
    clock[0] += 2
    again = measure_step_costs("torch_cpu", "cpu")
    assert calls[4:] == [2, 1, 2, 2]  # from torch's count again, not from the one thread left behind
    assert again.threads == 0 and torch.get_num_threads() == 2


def test_a_thread_count_set_after_a_probe_is_kept(probes):
    """Where one thread won and the count was then set again (a Ray worker's share, a user), the next probe
    starts from that count, not from the one before the probe; a cached one-thread plan sets one thread again."""
    from backend.budget import PROBE_MAX_AGE_S

    calls, clock = probes
    assert measure_step_costs("torch_cpu", "cpu").threads == 1
    torch.set_num_threads(3)
    assert measure_step_costs("torch_cpu", "cpu").threads == 1 and torch.get_num_threads() == 1  # cached
    torch.set_num_threads(3)
    clock[0] += PROBE_MAX_AGE_S + 1
    assert measure_step_costs("torch_cpu", "cpu").threads == 0
    assert calls[4:] == [3, 1, 3, 3] and torch.get_num_threads() == 3


def test_devices_auto_and_checked_names(monkeypatch):
    assert pick_device("auto") == (
        "cuda:0" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    )
    assert pick_device("cpu") == "cpu"
    with pytest.raises(ValueError, match="--device must be auto, cuda, mps, cpu or cuda:N; got 'tpu'"):
        pick_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="torch sees no cuda device"):
            pick_device("cuda:1")
    with monkeypatch.context() as m:  # one GPU: cuda:5 named with the count, not CUDA's "invalid device ordinal"
        m.setattr(torch.cuda, "is_available", lambda: True)
        m.setattr(torch.cuda, "device_count", lambda: 1)
        with pytest.raises(ValueError, match=r"--device cuda:5: this machine has 1 CUDA device\(s\), cuda:0 up"):
            pick_device("cuda:5")
    assert default_budget_min("cpu") == 4.0 and default_budget_min("cuda:0") is None


def test_a_job_well_past_its_budget_is_told_so():
    """The plan is made once: a job whose steps ran slower (another program's load) hears by how much, past a
    quarter over the budget; within it, nothing."""
    plan = plan_budget(4.0, StepCosts(per_pixel=2e-6, per_gaussian=2e-6), max_iterations=3000, max_size=(320, 240))
    assert plan.overrun_note(4 * 60) is None and plan.overrun_note(4 * 60 * OVERRUN_SLACK) is None
    note = plan.overrun_note(8 * 60 + 30)
    assert note is not None and note.startswith("the job took 8.5 min of its 4-minute budget: its steps ran slower")
    assert f"predicted {plan.step_seconds:.3g} s a fitting step" in note


def test_a_job_behind_its_plan_gives_the_time_back_in_its_last_fit():
    """On plan, the last fit keeps its steps; behind it (the earlier stages or a measured step slower than
    predicted), as many as the time left affords, said in a sentence; never fewer than MIN_ITERATIONS nor
    more than planned."""
    plan = replace(
        plan_budget(4.0, StepCosts(1e-6, 1e-6), max_iterations=3000, max_size=(160, 120)),
        iterations=1000,
        step_seconds=0.05,
    )
    last_fit = 1000 * 0.05
    assert plan.last_fit_steps(4 * 60 - last_fit - 1) == (1000, None)
    assert plan.last_fit_steps(0.0, step_seconds=0.001) == (1000, None)  # faster than planned: no more steps
    steps, note = plan.last_fit_steps(4 * 60 - last_fit / 2)  # half the last fit's time left
    assert steps == 500 and note == (
        "the last fit runs 500 of its 1000 steps: 25 s of the 4-minute budget were left after 215 s, at 0.05 s a "
        "step (predicted 0.05 s; another program's load, or the stages before it ran long?)"
    )
    steps, note = plan.last_fit_steps(4 * 60 - last_fit / 2, step_seconds=0.05)  # steps as planned: the stages
    assert steps == 500 and note.endswith("(predicted 0.05 s; the stages before it ran long)")
    steps, note = plan.last_fit_steps(4 * 60 - last_fit, step_seconds=0.1)  # on time, but steps twice as slow
    assert steps == 500 and note.endswith("at 0.1 s a step (predicted 0.05 s; another program's load?)")
    # a measured step faster than predicted (sets in lockstep share one on gsplat) does not stretch the time left
    steps, note = plan.last_fit_steps(4 * 60 - last_fit / 2, step_seconds=0.01)
    assert steps == 500 and "at 0.05 s a step (predicted 0.05 s" in note
    steps, note = plan.last_fit_steps(5 * 60)  # past the budget already
    assert steps == MIN_ITERATIONS and note.startswith(f"the last fit runs {MIN_ITERATIONS} of its 1000 steps: 0 s")
    short = replace(plan, iterations=MIN_ITERATIONS // 2)
    assert short.last_fit_steps(5 * 60) == (MIN_ITERATIONS // 2, None)  # a plan under the floor keeps its steps


def test_step_clock_times_a_fit_from_its_first_callback(monkeypatch):
    """The steps before the first callback (compilation, caches) do not count; the callback still runs."""
    ticks = iter([100.0, 101.0, 103.0])
    monkeypatch.setattr(budget_module.time, "perf_counter", lambda: next(ticks))
    seen: list[tuple[int, float]] = []
    clock = StepClock()
    on_step = clock.wrap(lambda step, loss: seen.append((step, loss)))
    assert clock.seconds_per_step() is None
    on_step(50, 0.5)
    assert clock.seconds_per_step() is None  # one mark is no interval
    on_step(100, 0.4)
    on_step(150, 0.3)
    assert clock.seconds_per_step() == pytest.approx(3.0 / 100) and seen == [(50, 0.5), (100, 0.4), (150, 0.3)]


def test_budget_setting_and_option(tmp_path):
    assert Settings.from_json({"time_budget_min": 5}).time_budget_min == 5
    with pytest.raises(SceneError, match=r"settings\.time_budget_min: must be in \[0, 1440\]; got -1"):
        Settings.from_json({"time_budget_min": -1})
    args = build_parser().parse_args(["run", "scene", "--out", "o", "--budget", "2"])
    assert args.budget == 2
    assert budget_for(None, "cpu") == 4 and budget_for(None, "cuda:0") == 0 and budget_for(7, "cuda:0") == 7
    scene = Scene(tmp_path, [Capture("a", tmp_path / "a.png")])
    assert with_budget(scene, 3).settings.time_budget_min == 3
    own = Scene(tmp_path, [], settings=Settings(time_budget_min=9))
    assert with_budget(own, 3).settings.time_budget_min == 9
    assert with_budget(scene, 0) is scene


def test_loop_config_follows_the_budget_plan():
    from backend.loop import LoopConfig

    settings = Settings(width=64, height=48, gaussian_iterations=20, time_budget_min=60)
    cfg = LoopConfig.from_settings(settings, device="cpu")
    plan = cfg.budget
    assert plan is not None and plan.budget_min == 60
    assert (cfg.width, cfg.height) == (plan.width, plan.height) == (64, 48)  # never larger than the job's
    assert cfg.fit.iterations == plan.iterations <= 20 and cfg.fit.max_gaussians == plan.max_gaussians
    assert LoopConfig.from_settings(Settings(width=64, height=48), device="cpu").budget is None
    # the plan is sized by the fit's cost: a job without a fit gets none, and the setting's help says so
    assert LoopConfig.from_settings(replace(settings, gaussian_iterations=0), device="cpu").budget is None
    from protocol.settings import BY_NAME

    assert "with 0 Iterations (no fit) it has no effect" in BY_NAME["time_budget_min"].help
    assert cfg.fit.batch_size == plan.costs.views == 3  # 3 frames a step, measured so
    # the refiner's preparation counts: 3 captures give 3 leave-out guides of a fifth of the fit and
    # its training's seconds; without the count, the most it could be (max_fits 6)
    refine = replace(settings, generator="refine", refine_seconds=12)
    for captures, fits in ((3, 2.6), (None, 3.2)):
        plan = LoopConfig.from_settings(refine, device="cpu", num_captures=captures).budget
        assert plan.fits == pytest.approx(fits) and plan.reserved_s == 12
        assert "12 s kept for the refine generator's training" in plan.sentence
    assert cfg.budget.fits == 2 and cfg.budget.reserved_s == 0


def test_cached_plans_of_two_frame_counts_each_run_on_the_threads_they_were_measured_on(probes):
    """A process that plans for two frame counts (eval, a library caller): one thread won for one, torch's
    count for the other; each cached plan sets its own count, so one never leaves the other single-threaded."""
    calls, _ = probes
    one = measure_step_costs("torch_cpu", "cpu", views=1)
    assert one.threads == 1 and torch.get_num_threads() == 1
    three = measure_step_costs("torch_cpu", "cpu", views=3)
    assert calls[4:] == [2, 1, 2, 2]  # measured from torch's count, not from the one thread left by the first
    assert three.threads == 0 and torch.get_num_threads() == 2
    assert measure_step_costs("torch_cpu", "cpu", views=1) is one and torch.get_num_threads() == 1
    assert measure_step_costs("torch_cpu", "cpu", views=3) is three and torch.get_num_threads() == 2
    assert len(calls) == 8


def test_serve_leaves_a_ray_pools_device_and_budget_to_its_workers(monkeypatch):
    """A Ray front end on a node without a GPU must not turn "auto" into "cpu" for every worker, nor give
    every job the CPU's budget: each worker resolves the device, each job gets its device's default."""
    require_module("ray", "serve --workers needs it")
    import backend.devices
    import backend.service

    seen = {}

    class FakeService:
        def __init__(self, config, runner):
            seen["config"], seen["runner"] = config, runner

        def serve_forever(self):
            pass

        def worker_still_running(self):
            return False

    monkeypatch.setattr(backend.service, "Service", FakeService)
    monkeypatch.setattr(backend.devices, "is_available", lambda kind: kind == "cpu")  # a head node: no GPU
    jobs = []
    monkeypatch.setattr("backend.service.options.GeneratorLoopRunner", lambda cache: lambda s, o, **kw: jobs.append(s))
    from backend.cli import main as cli_main

    assert cli_main(["serve", "--workers", "2", "--data-dir", "unused"]) == 0
    assert seen["config"].device == "auto"  # resolved by each worker on its own node
    scene = Scene(Path("."), [Capture("a", Path("a.png"))])
    seen["runner"](scene, Path("o"), device="cuda:0", progress=None)
    seen["runner"](scene, Path("o"), device="cpu", progress=None)
    assert [j.settings.time_budget_min for j in jobs] == [0, 4]  # the worker's device, not the front end's
    assert cli_main(["serve", "--data-dir", "unused"]) == 0  # no pool: the front end's device, resolved here
    assert seen["config"].device == "cpu"


def test_a_ray_service_leaves_an_explicit_device_to_its_workers(monkeypatch, tmp_path):
    """`serve --ray --device cuda` on a head node without a GPU: the front end passes "cuda" to the pool
    (each actor checks it on its node) instead of refusing to start."""
    require_module("ray", "serve --workers needs it")
    import backend.devices
    import backend.service.ray_pool as ray_pool
    from backend.service import Service, ServiceConfig

    monkeypatch.setattr(backend.devices, "is_available", lambda kind: kind == "cpu")
    seen = []

    class Started(Exception):
        pass

    class FakePool:
        def __init__(self, context, config, runner, device):
            seen.append(device)

        def start(self):
            raise Started

        def close(self, *args, **kwargs):
            pass

    monkeypatch.setattr(ray_pool, "RayPool", FakePool)
    config = ServiceConfig(
        bind="tcp://127.0.0.1:*", data_dir=tmp_path, device="cuda", ray=ray_pool.RayConfig(workers=1)
    )
    with pytest.raises(Started):
        Service(config, runner=lambda *a, **k: None).serve_forever()
    assert seen == ["cuda"]
