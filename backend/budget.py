"""Sizing the loop to a device: a time budget, and the memory thinned to what the fit can move.

Two pieces, used by ``backend.loop`` and ``backend.stages.fit``:

- :func:`thin_memory` keeps at most ``max_points`` points of the geometry memory by a voxel grid
  (the coarsest grid whose occupied voxels fit under the cap; the most confident point of each
  voxel stays), so that every point the fit starts a Gaussian from is one it can afford to move;
- :func:`plan_budget` turns "about N minutes" into a working size, a Gaussian cap and a number of
  fitting steps, from the measured cost of a few rasterizer steps on this device
  (:func:`measure_step_seconds`), checks the chosen step by measuring it where it is given the means,
  and says what it chose in one sentence for the log, the job's metrics notes and the progress message;
  a job that falls behind it (another program's load on the cores after the plan was measured) runs fewer
  steps in its last fit (:meth:`BudgetPlan.last_fit_steps`, from the guide's steps as timed by
  :class:`StepClock`), and says so.

The fit's cost model: a step costs ``per_pixel x W x H + per_gaussian x N`` seconds (the pairs a
rasterizer composites grow with the pixels times the surface's depth complexity, the projection with
N), the two rates fitted to two measured steps with different N (:func:`measure_step_costs`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
from torch import Tensor

from .types import GeometryMemory

# Working sizes tried from the largest down (4:3; the trajectory's aspect is applied afterwards), below
# the job's own size, which is tried first (``plan_budget``).
WORKING_SIZES = ((320, 240), (256, 192), (192, 144), (160, 120))
GAUSSIAN_CAPS = (120_000, 80_000, 60_000, 40_000, 30_000, 20_000, 15_000, 10_000)
MIN_ITERATIONS = 200  # fewer steps than this per fit leave the Gaussians where they started
# Steps per fit a plan secures before it spends time on a larger size or more Gaussians (the job's own count where it
# asks for fewer); steps beyond them get the time that size and Gaussians leave. `make demo` scored 21.4, 22.4 and
# 24.0 dB after 250, 300 and 400 steps in one 3-minute budget, at a smaller Gaussian cap for the more steps
# (docs/benchmarks.md, "make demo, the demo scene remade"); a 3000-step job (the setting's default) first planned
# with its own count got 10,000 Gaussians where a 300-step job got 80,000 on a faster CPU
PLAN_ITERATIONS = 400
FIT_SHARE = 0.6  # share of the budget for the two Gaussian fits (guide and final); the rest: SfM, stereo, frames
PROBE_GAUSSIANS = (2_000, 8_000)  # the two measured steps: Gaussians, at PROBE_SIZE
PROBE_SIZE = (128, 96)
PROBE_STEPS = 2  # timed steps per measurement (after one warm-up); the fastest counts
# A chosen step measured this many times slower than the probes predicted is planned again from the
# measurement. The probes' two steps (2k and 8k Gaussians) are extrapolated to caps up to 120k: a noisy
# pair once planned 60k Gaussians at 0.13 s a step that took about 0.22 s, and `make demo` ran 236 s
# of its 180 (docs/benchmarks.md, "Where `make demo`'s spread starts").
PLAN_CHECK_RATIO = 1.25
VOXEL_SEARCH_STEPS = 24  # bisection steps on the voxel size (log scale)
GRID_MAX_CELLS = 1 << 20  # finest voxel grid per axis tried (keys stay within int64)


# ----------------------------------------------------------------------------------------------
# Thinning the memory


@dataclass(frozen=True)
class Thinned:
    """The memory after :func:`thin_memory`.

    Attributes:
        memory: the points kept.
        dropped: how many points were left out.
        voxel: the voxel edge used, world units (0: nothing dropped).
        note: one sentence for the log and the metrics notes ("" when nothing was dropped).
    """

    memory: GeometryMemory
    dropped: int
    voxel: float
    note: str


def _voxel_keys(xyz: Tensor, voxel: float) -> Tensor:
    """One int64 key per point: its cell in a grid of edge ``voxel`` from the points' minimum. [N]"""
    cells = torch.floor((xyz - xyz.min(dim=0).values) / voxel).long()  # [N, 3]
    dims = cells.max(dim=0).values + 1
    return (cells[:, 0] * dims[1] + cells[:, 1]) * dims[2] + cells[:, 2]


def thin_memory(memory: GeometryMemory, max_points: int) -> Thinned:
    """At most ``max_points`` points of ``memory``: one per cell of the coarsest-fitting voxel grid.

    The voxel edge is bisected (log scale) between the cloud's extent / 2^20 and its extent, so
    that the occupied cells are as many as possible but no more than ``max_points``; in each cell
    the most confident point stays (colour, confidence and source id as they were).

    Args:
        memory: the geometry memory (any device).
        max_points: the cap, >= 1.

    Returns:
        :class:`Thinned` (the memory itself when it is within the cap).

    Example::

        >>> m = GeometryMemory(torch.rand(1000, 3), torch.rand(1000, 3), torch.rand(1000),
        ...                    torch.zeros(1000, dtype=torch.int32))
        >>> len(thin_memory(m, 100).memory) <= 100
        True
    """
    if max_points < 1:
        raise ValueError(f"thin_memory: max_points must be >= 1; got {max_points}")
    n = len(memory)
    if n <= max_points:
        return Thinned(memory, 0, 0.0, "")
    xyz = memory.xyz.detach()
    extent = float((xyz.max(dim=0).values - xyz.min(dim=0).values).max())
    if extent <= 0:  # all points in one place
        keep = torch.argsort(memory.confidence, descending=True)[:max_points]
        return Thinned(memory.select(keep), n - max_points, 0.0, _thin_note(n, max_points, max_points, 0.0))
    lo, hi = math.log(extent / GRID_MAX_CELLS), math.log(extent)  # fine (too many cells) .. coarse
    for _ in range(VOXEL_SEARCH_STEPS):
        mid = 0.5 * (lo + hi)
        if torch.unique(_voxel_keys(xyz, math.exp(mid))).numel() > max_points:
            lo = mid
        else:
            hi = mid
    voxel = math.exp(hi)
    keys = _voxel_keys(xyz, voxel)
    # Most confident first, then a stable sort by cell: the first point of each cell is its best.
    by_conf = torch.argsort(memory.confidence, descending=True, stable=True)
    order = by_conf[torch.sort(keys[by_conf], stable=True).indices]
    sorted_keys = keys[order]
    is_first = torch.ones_like(sorted_keys, dtype=torch.bool)
    is_first[1:] = sorted_keys[1:] != sorted_keys[:-1]
    keep = order[is_first]
    if len(keep) > max_points:  # a cap below the 8 cells the coarsest voxel may straddle: the most confident
        keep = keep[torch.argsort(memory.confidence[keep], descending=True, stable=True)[:max_points]]
        voxel = 0.0  # not one point per voxel: the note names no voxel
    kept = memory.select(torch.sort(keep).values)  # the memory's own order
    return Thinned(kept, n - len(kept), voxel, _thin_note(n, len(kept), max_points, voxel))


def _thin_note(before: int, after: int, cap: int, voxel: float) -> str:
    grid = f", one per {voxel:.3g}-unit voxel" if voxel > 0 else ""
    return f"Gaussians start from {after} of the memory's {before} points (cap {cap}{grid}; {before - after} dropped)"


# ----------------------------------------------------------------------------------------------
# Measuring and planning


def probe_scene(n: int, width: int, height: int, n_cams: int = 1, *, device: torch.device | str = "cpu") -> dict:
    """N Gaussians on a wavy surface 2-4 units in front of C cameras, sized as ``init_gaussians``
    sizes a stereo memory (scale = point spacing): the reference scene of the step measurements and
    of ``scripts/bench_rasterizer.py``. Keys are the rasterizer's ``render`` arguments."""
    gen = torch.Generator().manual_seed(0)
    f = float(width)  # about 53 degrees horizontal field of view
    u = torch.rand(n, generator=gen) * 1.2 - 0.1  # a little beyond the image
    v = torch.rand(n, generator=gen) * 1.2 - 0.1
    depth = 3.0 + 0.6 * torch.sin(6.0 * u) * torch.cos(5.0 * v) + 0.02 * torch.randn(n, generator=gen)
    means = torch.stack([(u * width - width / 2) / f * depth, (v * height - height / 2) / f * depth, depth], dim=-1)
    spacing = math.sqrt((1.2 * width / f * 3.0) * (1.2 * height / f * 3.0) / n)
    scales = torch.full((n, 3), spacing) * (0.7 + 0.6 * torch.rand(n, 3, generator=gen))
    viewmats = torch.eye(4).repeat(n_cams, 1, 1)
    viewmats[:, 0, 3] = 0.1 * torch.arange(n_cams)
    K = torch.tensor([[f, 0.0, width / 2], [0.0, f, height / 2], [0.0, 0.0, 1.0]])
    scene = {
        "means": means,
        "quats": torch.randn(n, 4, generator=gen),
        "scales": scales,
        "opacities": 0.05 + 0.9 * torch.rand(n, generator=gen),
        "colors": torch.rand(n, 3, generator=gen),
        "viewmats": viewmats,
        "Ks": K.repeat(n_cams, 1, 1),
    }
    scene = {k: t.to(device) for k, t in scene.items()}
    return scene | {"width": width, "height": height}


def probe_loss_weights(shape: tuple[int, ...], device: torch.device | str = "cpu") -> Tensor:
    """Fixed weights in [-1, 1] per pixel and channel for a probe step's loss, ``(img * weights).sum()``:
    its image gradient is dense, as a fit's is (``img.sum()``'s is one value broadcast, which the torch
    kernel's gathers read several times slower than a dense tensor). [C, H, W, D]"""
    gen = torch.Generator().manual_seed(0)
    return (torch.rand(shape, generator=gen) * 2.0 - 1.0).to(device)


def measure_step_seconds(
    rasterizer_name: str, device: torch.device | str, n: int, size: tuple[int, int], views: int = 1
) -> float:
    """Seconds of one fitting step's render + backward (the fastest of :data:`PROBE_STEPS` after a
    warm-up) with ``rasterizer_name`` on ``device``, on :func:`probe_scene` with ``n`` Gaussians at ``size``
    and ``views`` frames drawn in the step's one render call (``FitConfig.batch_size``)."""
    from .rasterizers import RASTERIZERS

    rasterizer = RASTERIZERS.make(rasterizer_name)
    scene = probe_scene(n, *size, views, device=device)
    names = ("means", "quats", "scales", "opacities", "colors")
    weights = probe_loss_weights((views, size[1], size[0], 3), device)
    best = math.inf
    for i in range(PROBE_STEPS + 1):
        leaves = [scene[k].clone().requires_grad_(True) for k in names]
        t0 = time.perf_counter()
        img, _, _ = rasterizer.render(*leaves, scene["viewmats"], scene["Ks"], scene["width"], scene["height"])
        (img * weights).sum().backward()
        float(img.detach().sum())  # waits for the device
        if i > 0:
            best = min(best, time.perf_counter() - t0)
    return best


@dataclass(frozen=True)
class StepCosts:
    """Seconds per fitting step of ``views`` frames: ``per_pixel x W x H + per_gaussian x N`` (both >= 0),
    with ``threads`` torch threads (the faster of torch's default and one thread, as measured)."""

    per_pixel: float
    per_gaussian: float
    threads: int = 0  # 0: leave torch's thread count alone
    views: int = 1  # frames a step draws (FitConfig.batch_size), all in the measured steps

    def seconds(self, n: int, width: int, height: int) -> float:
        return self.per_pixel * width * height + self.per_gaussian * n


def measure_step_costs(rasterizer_name: str, device: torch.device | str, views: int = 1) -> StepCosts:
    """:class:`StepCosts` fitted to two measured steps of ``views`` frames (:data:`PROBE_GAUSSIANS` at
    :data:`PROBE_SIZE`), measured once per rasterizer, device and frame count and reused for
    :data:`PROBE_MAX_AGE_S` (a service's later jobs reuse them, then measure again: the load of one moment,
    a render beside the service's first job, does not set every later job's plan). The frames are measured,
    not counted: on the CPU rasterizer a 3-frame step's render costs 2.8-3.1 single ones (160x120, 2k-20k
    Gaussians, 2 cores), where gsplat draws them in one launch.

    On the CPU, the first step is also timed with one torch thread, between two timings with torch's
    own count (the faster of those counts): where other processes load the cores, threads that wait on
    each other are slower than one, and the faster count is kept (set with ``torch.set_num_threads``;
    the plan's ``threads`` says which). A later measurement starts again from the count one thread beat.
    """
    if views < 1:
        raise ValueError(f"measure_step_costs: views must be >= 1; got {views}")
    key = (rasterizer_name, str(torch.device(device)), views)
    now = _clock()
    measured = _probes.get(key)
    if measured is None or now - measured[0] > PROBE_MAX_AGE_S:
        measured = _probes[key] = (now, _measure_step_costs(*key))
    costs = measured[1]
    _use_threads(costs.threads)  # as measured: a cached plan's choice, whatever another probe set since
    return costs


PROBE_MAX_AGE_S = 600.0
_clock = time.monotonic  # what the probes' age is measured by (tests move it)
_probes: dict[tuple[str, str, int], tuple[float, StepCosts]] = {}  # key -> (_clock() when measured, costs)
_before_one_thread: int | None = None  # torch's thread count when a probe last chose one thread


def _use_threads(threads: int) -> None:
    """Torch's thread count for costs measured with ``threads``: 1 sets one thread (remembering the count it
    replaced); 0 gives back the remembered count while a probe's one thread is still in force. A count set
    by anyone else (a Ray worker's share, a user) is left alone."""
    global _before_one_thread
    now = torch.get_num_threads()
    if threads == 1:
        if now != 1:
            _before_one_thread = now
            torch.set_num_threads(1)
    elif now == 1 and _before_one_thread is not None:
        torch.set_num_threads(_before_one_thread)
        _before_one_thread = None
    elif now != 1:
        _before_one_thread = None  # one thread is no longer in force: nothing to give back


def _measure_step_costs(rasterizer_name: str, device: str, views: int = 1) -> StepCosts:
    (n1, n2), (w, h) = PROBE_GAUSSIANS, PROBE_SIZE
    _use_threads(0)  # from torch's own count: the load that made one thread faster may be gone
    t1 = measure_step_seconds(rasterizer_name, device, n1, PROBE_SIZE, views)
    threads = 0
    default_threads = torch.get_num_threads()
    if torch.device(device).type == "cpu" and default_threads > 1:
        torch.set_num_threads(1)
        t1_single = measure_step_seconds(rasterizer_name, device, n1, PROBE_SIZE, views)
        torch.set_num_threads(default_threads)
        # torch's threads measured again after the single thread: the process's first measurement runs
        # cold (on the idle 2-core dev machine 0.095 s against 0.056 s warm, while one thread took 0.089 s),
        # and one thread then won and slowed the whole job by half (docs/benchmarks.md, "make demo")
        t1 = min(t1, measure_step_seconds(rasterizer_name, device, n1, PROBE_SIZE, views))
        if t1_single < t1:
            t1, threads = t1_single, 1
            _use_threads(1)
    t2 = measure_step_seconds(rasterizer_name, device, n2, PROBE_SIZE, views)
    per_gaussian = max(t2 - t1, 0.0) / (n2 - n1)
    per_pixel = max(t1 - per_gaussian * n1, 0.1 * t1) / (w * h)
    return StepCosts(per_pixel, per_gaussian, threads, views)


OVERRUN_SLACK = 1.25  # a job past this share of its budget is told so (BudgetPlan.overrun_note)


@dataclass(frozen=True)
class BudgetPlan:
    """What a time budget buys on this device.

    Attributes:
        budget_min: the budget, minutes.
        width, height: working size: the job's own, or one of :data:`WORKING_SIZES` (4:3) below it (the
            loop keeps the trajectory's aspect at this pixel count).
        max_gaussians: cap on the Gaussians (the memory is thinned to it; densification stays under it).
        iterations: steps per Gaussian fit.
        step_seconds: seconds per fitting step at this size and cap: predicted, or measured where a re-plan
            measured its choice.
        costs: the measured step costs the plan used.
        fits: Gaussian fits the loop runs, in lengths of one fit (2 with the guide, else 1, plus what
            the generator's preparation fits: the refiner's leave-out guides, a fifth each).
        reserved_s: seconds of the fits' share kept for other work on the device (the refiner's training).
        sentence: what was chosen and why, for people.
    """

    budget_min: float
    width: int
    height: int
    max_gaussians: int
    iterations: int
    step_seconds: float
    costs: StepCosts
    fits: float
    reserved_s: float
    sentence: str

    def as_json(self) -> dict[str, Any]:
        """The plan as metrics.json holds it: every field but the sentence, the costs as a map."""
        return {k: v for k, v in asdict(self).items() if k != "sentence"}

    def last_fit_steps(self, elapsed_s: float, step_seconds: float | None = None) -> tuple[int, str | None]:
        """Steps for the job's last fit, from what is left of the budget when it starts: the plan's
        ``iterations`` while they fit in the time left, else as many as do (at least
        :data:`MIN_ITERATIONS`), with a sentence saying why. The plan is made from steps measured before the
        job; a load that came later (another program on the cores) slows every step, and only the steps
        still to come can give the time back. Never more steps than planned.

        Args:
            elapsed_s: seconds the job has run so far.
            step_seconds: one step of one fit as measured during this job (:class:`StepClock` on an earlier
                fit, divided by the sets it fitted in lockstep), or None. The slower of it and the plan's
                prediction counts: sets in lockstep share a step on gsplat, so a guide's step over its sets
                is less than a lone fit's there (run 74: 2.8 ms a set against 4.2 ms the last fit's).
        """
        step = self.step_seconds if step_seconds is None else max(step_seconds, self.step_seconds)
        left = self.budget_min * 60.0 - elapsed_s
        affordable = int(left / step) if step > 0 and left > 0 else 0
        steps = min(self.iterations, max(MIN_ITERATIONS, affordable))
        if steps >= self.iterations:
            return self.iterations, None
        # steps measured slower than planned: a load on the device; as planned: the work before them took longer
        if step_seconds is None:
            why = "another program's load, or the stages before it ran long?"
        elif step > PLAN_CHECK_RATIO * self.step_seconds:
            why = "another program's load?"
        else:
            why = "the stages before it ran long"
        return steps, (
            f"the last fit runs {steps} of its {self.iterations} steps: {max(left, 0.0):.0f} s of the "
            f"{self.budget_min:g}-minute budget were left after {elapsed_s:.0f} s, at {step:.3g} s a step "
            f"(predicted {self.step_seconds:.3g} s; {why})"
        )

    def overrun_note(self, elapsed_s: float) -> str | None:
        """What to tell a user whose job took more than :data:`OVERRUN_SLACK` times the budget (the plan is made
        once, from steps measured before the job: another process's load later slows every step), or None."""
        if elapsed_s <= self.budget_min * 60 * OVERRUN_SLACK:
            return None
        return (
            f"the job took {elapsed_s / 60:.1f} min of its {self.budget_min:g}-minute budget: its steps ran slower "
            f"than the plan measured (predicted {self.step_seconds:.3g} s a fitting step; another program's load?)"
        )


class StepClock:
    """Seconds per step of a fit, from its progress callbacks: :meth:`wrap` a fit's ``progress(step, loss)``
    and read :meth:`seconds_per_step` afterwards. Timed from the first callback on, so the steps before it
    (a first step's compilation and caches) do not count."""

    def __init__(self) -> None:
        self.marks: list[tuple[int, float]] = []  # (step, time.perf_counter())

    def wrap(self, progress: Callable[[int, float], None]) -> Callable[[int, float], None]:
        def on_step(step: int, loss: float) -> None:
            self.marks.append((step, time.perf_counter()))
            progress(step, loss)

        return on_step

    def seconds_per_step(self) -> float | None:
        """Mean seconds of the steps between the first and the last callback, or None before two."""
        if len(self.marks) < 2 or self.marks[-1][0] <= self.marks[0][0]:
            return None
        (s0, t0), (s1, t1) = self.marks[0], self.marks[-1]
        return (t1 - t0) / (s1 - s0)


def _plan_sizes(max_size: tuple[int, int]) -> list[tuple[int, int]]:
    """The working sizes a plan tries, largest first: the job's own ``max_size``, then the
    :data:`WORKING_SIZES` with fewer pixels. The job's size comes first so that a budget that affords
    it keeps it (a 640x480 job is not cut to 320x240 while the budget has time for its own size).
    """
    pixels = max_size[0] * max_size[1]
    return [tuple(max_size)] + [s for s in WORKING_SIZES if s[0] * s[1] < pixels]


def plan_budget(
    budget_min: float,
    costs: StepCosts,
    *,
    max_iterations: int,
    max_size: tuple[int, int],
    fits: float = 2,
    reserved_s: float = 0.0,
    reserved_for: str = "",
    measure: Callable[[int, int, int], float] | None = None,
) -> BudgetPlan:
    """Choose working size, Gaussian cap and fitting steps so that the fits take about
    :data:`FIT_SHARE` of ``budget_min`` (less ``reserved_s``).

    The largest size (up to ``max_size``) and cap that still allow ``max_iterations`` steps per fit, or
    :data:`PLAN_ITERATIONS` where the job asks for more, win, size before cap: a short fit the job asked for
    is not cut for more Gaussians (200 steps instead of 300 cost the demo's Gaussians more than a smaller
    cap does), and a long one does not cost them (3000 steps at a tenth of the Gaussians). When no choice
    allows that many, the largest that allows :data:`MIN_ITERATIONS` wins. Steps then fill the fits'
    share, up to ``max_iterations``. A step costs
    ``costs.seconds(cap, W, H)``. When even the
    smallest choice cannot reach the minimum, it is taken with what steps the budget allows (at
    least 1 per fit) and the sentence says so.

    Args:
        budget_min: minutes for the whole job, > 0.
        costs: :func:`measure_step_costs` on this device.
        max_iterations: the job's own step count (the budget never adds steps).
        max_size: the job's working size (the budget never enlarges it).
        fits: Gaussian fits the loop runs, in lengths of one fit (fractions for shorter fits).
        reserved_s: seconds of the fits' share kept for other device work (``reserved_for`` says
            what, in the sentence).
        measure: ``measure(n, W, H)``, the seconds of one real step with n Gaussians at W x H
            (:func:`measure_step_seconds` on this device). Given, the chosen step is measured;
            slower than :data:`PLAN_CHECK_RATIO` times the prediction, the costs' ``per_gaussian`` is
            refitted through the measurement and the plan made again, at most at the size measured; a new
            choice is measured too, and where it is slower than that predicts as well, both rates are solved
            through the two measurements (:func:`_costs_through`) and the plan made a third time, its choice
            measured where it was not and its steps what that measurement affords. The sentence says so.

    Example::

        >>> plan = plan_budget(4.0, StepCosts(1e-5, 1e-5), max_iterations=300, max_size=(320, 240))
        >>> plan.iterations <= 300 and plan.width <= 320
        True
    """
    if budget_min <= 0:
        raise ValueError(f"plan_budget: budget_min must be > 0; got {budget_min}")
    if costs.per_pixel <= 0 or costs.per_gaussian < 0:
        raise ValueError(f"plan_budget: costs must be positive; got {costs}")
    if fits <= 0 or reserved_s < 0:
        raise ValueError(f"plan_budget: fits must be > 0 and reserved_s >= 0; got {fits}, {reserved_s}")
    fit_seconds = max(budget_min * 60.0 * FIT_SHARE - reserved_s, 0.0)
    sizes = _plan_sizes(max_size)
    choice = None
    for min_steps in (min(max_iterations, PLAN_ITERATIONS), MIN_ITERATIONS):  # the job's short count first
        for w, h in sizes:
            for cap in GAUSSIAN_CAPS:
                step = costs.seconds(cap, w, h)
                if fit_seconds / (fits * step) >= min(min_steps, max_iterations):
                    choice = (w, h, cap, step)
                    break
            if choice is not None:
                break
        if choice is not None:
            break
    is_short = choice is None
    if choice is None:
        w, h = sizes[-1]
        cap = GAUSSIAN_CAPS[-1]
        choice = (w, h, cap, costs.seconds(cap, w, h))
    w, h, cap, step = choice
    iterations = max(1, min(max_iterations, int(fit_seconds / (fits * step))))
    sentence = _plan_sentence(budget_min, w, h, cap, iterations, step, costs, fits, reserved_s, reserved_for, is_short)
    plan = BudgetPlan(budget_min, w, h, cap, iterations, step, costs, fits, reserved_s, sentence)
    if measure is None:
        return plan
    measured = measure(cap, w, h)
    if measured <= PLAN_CHECK_RATIO * step:
        return plan
    # The excess refitted on the Gaussians (the probes pin the pixels' rate down), and no size above the one measured:
    # the plan made again could move to an unmeasured size 6 times larger, whose pixels the excess did not reach
    # (its fits took 1.7 times their share)
    again_kw = {
        "max_iterations": max_iterations,
        "max_size": (w, h),
        "fits": fits,
        "reserved_s": reserved_s,
        "reserved_for": reserved_for,
    }
    per_gaussian = max((measured - costs.per_pixel * w * h) / cap, costs.per_gaussian)
    again = plan_budget(budget_min, replace(costs, per_gaussian=per_gaussian), **again_kw)
    note = f"; a step at {cap} Gaussians took {measured:.2f} s, not the probes' {step:.2f} s: planned again"
    first, second = (cap, w, h), (again.max_gaussians, again.width, again.height)
    if second == first:
        return replace(again, sentence=again.sentence + note)
    # The refit is right where the probes' pair extrapolated badly to a larger cap, and wrong where every step is
    # slower (another program on the cores): at a smaller cap of the size measured it predicts too little (a plan
    # took 1.26 times its share). So the new choice is measured too; slower than predicted, both rates are solved
    # through the two measurements and the plan made a third time; its choice, where not measured yet, is measured
    # and its steps are what that measurement affords.
    measured_again = measure(*second)
    if measured_again <= PLAN_CHECK_RATIO * again.step_seconds:
        return replace(again, sentence=again.sentence + note)
    note += f", and at {second[0]} Gaussians {measured_again:.2f} s, not {again.step_seconds:.2f} s: planned from both"
    third = plan_budget(budget_min, _costs_through(costs, (first, measured), (second, measured_again)), **again_kw)
    cap, w, h = choice = (third.max_gaussians, third.width, third.height)
    seconds = {first: measured, second: measured_again}.get(choice)
    if seconds is None:
        seconds = measure(*choice)
    if seconds <= third.step_seconds:
        return replace(third, sentence=third.sentence + note)
    steps = max(1, min(max_iterations, int(fit_seconds / (fits * seconds))))
    short = steps < min(MIN_ITERATIONS, max_iterations)
    sentence = _plan_sentence(budget_min, w, h, cap, steps, seconds, third.costs, fits, reserved_s, reserved_for, short)
    return replace(third, iterations=steps, step_seconds=seconds, sentence=sentence + note)


def _plan_sentence(
    budget_min: float,
    w: int,
    h: int,
    cap: int,
    iterations: int,
    step: float,
    costs: StepCosts,
    fits: float,
    reserved_s: float,
    reserved_for: str,
    is_short: bool,
) -> str:
    """What a plan chose and why, for people (:attr:`BudgetPlan.sentence`)."""
    reserved = f"; {reserved_s:g} s kept for {reserved_for or 'other work'}" if reserved_s else ""
    sentence = (
        f"time budget {budget_min:g} min: working size {w}x{h}, at most {cap} Gaussians, "
        f"{iterations} steps per fit ({fits:g} fit{'s' if fits != 1 else ''}, about {step:.2f} s a step"
        f"{f' of {costs.views} frames' if costs.views > 1 else ''} as "
        f"measured here{', on one thread' if costs.threads == 1 else ''}{reserved})"
    )
    if is_short:
        sentence += f"; the budget is too short for {MIN_ITERATIONS} steps per fit at this size"
    return sentence


def _costs_through(
    probed: StepCosts, a: tuple[tuple[int, int, int], float], b: tuple[tuple[int, int, int], float]
) -> StepCosts:
    """Step costs through two measured steps ``((n, w, h), seconds)``: both rates solved where the two pin them
    down (different Gaussians or pixels) and neither comes out below the probes', else every probed rate slowed
    by the larger of the two measurements' ratios to the probes' prediction."""
    ((n1, w1, h1), t1), ((n2, w2, h2), t2) = a, b
    p1, p2 = w1 * h1, w2 * h2
    det = p1 * n2 - p2 * n1
    if det != 0:
        per_pixel, per_gaussian = (t1 * n2 - t2 * n1) / det, (p1 * t2 - p2 * t1) / det
        if per_pixel >= probed.per_pixel and per_gaussian >= probed.per_gaussian:
            return replace(probed, per_pixel=per_pixel, per_gaussian=per_gaussian)
    ratio = max(t1 / probed.seconds(n1, w1, h1), t2 / probed.seconds(n2, w2, h2))
    return replace(probed, per_pixel=probed.per_pixel * ratio, per_gaussian=probed.per_gaussian * ratio)
