"""Benchmark the Gaussian fit's steps: one set alone against K sets in lockstep, and the host's waits.

A fit of a few thousand Gaussians on a GPU is bound by the host: each step launches a few hundred small
kernels (the rasterizer, the loss, six Adam optimizers and MCMC's noise per set), and the GPU keeps up
only while the host runs ahead of it. Anything in a step that copies from the host to the device or
reads a device value back makes the host wait until the GPU has drained its queue. This script fits the
bench job's guide (``scripts/bench_loop.py``'s scene: 3 temple captures at 896x512, the job's fit
settings and steps) as 1 set and as K sets in lockstep (``fit_gaussians_many``, the guide's
``members``), medians over ``--repeats`` with the order alternated, and counts the synchronisations of a
few steps with ``torch.cuda.set_sync_debug_mode`` (each one a warning).

Usage (GPU machine; the temple folder copied there, never committed)::

    python scripts/bench_fit_steps.py --data .device_data/middlebury_temple --sets 1,3 --out $OUT
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import warnings
from collections import Counter
from dataclasses import replace
from pathlib import Path
from unittest import mock

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from bench_loop import add_ssim_conv, bench_scene, ssim_on_convolutions, warm_up  # noqa: E402

from backend.evaluate_args import existing_dir, size_wxh  # noqa: E402
from backend.loop import LoopConfig  # noqa: E402
from backend.scene import Settings  # noqa: E402
from backend.stages.cameras import prepare_captures  # noqa: E402
from backend.stages.fit import FitConfig, FitViews, fit_gaussians_many  # noqa: E402
from backend.stages.memory import build_memory  # noqa: E402
from backend.types import GeometryMemory, Views  # noqa: E402

JOB_ITERATIONS = Settings().gaussian_iterations  # the setting's default, scripts/bench_loop.py's fit


def fit_sets(views: Views, memory: GeometryMemory, cfg: FitConfig, sets: int, device: torch.device) -> float:
    """Seconds for ``sets`` Gaussian sets fitted on ``views`` in lockstep (seeds 0, 1, ...)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    fit_gaussians_many(
        [FitViews.from_views(views)] * sets, [memory] * sets, cfg, device=device, seeds=list(range(sets))
    )
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def syncs_per_step(
    views: Views, memory: GeometryMemory, cfg: FitConfig, sets: int, device: torch.device
) -> tuple[float, dict[str, float]]:
    """Synchronisations of the host with the GPU per step of ``sets`` sets, over ``cfg.iterations``
    steps (at least 2): a fit of 1 step is subtracted, which holds the set-up's (copying the views in,
    reading the results out) and one step's. Also where the longer fit's came from: the Python line
    that called the synchronising operation, with its count per step (set-up included)."""
    setup = replace(cfg, iterations=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fit_gaussians_many([FitViews.from_views(views)] * sets, [memory] * sets, setup, device=device)
            base = len(caught)
            fit_gaussians_many([FitViews.from_views(views)] * sets, [memory] * sets, cfg, device=device)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    steps = cfg.iterations - 1
    where = Counter(f"{w.filename}:{w.lineno}" for w in caught[base:])
    return (len(caught) - 2 * base) / steps, {k: n / steps for k, n in where.most_common(12)}


class _WindowClosed(Exception):
    """Raised in the fit's rasterizer call after the profiled window: the fit stops there."""


def profile_sets(
    views: Views, memory: GeometryMemory, cfg: FitConfig, sets: int, device: torch.device, out: Path, steps: int
) -> dict[str, float]:
    """Where ``steps`` steps of ``sets`` sets in lockstep spend the host's time: the Python functions
    (cProfile, their own time and their callees'), then the operators and the GPU's busy time
    (torch.profiler), written to ``out/profile_sets{sets}.txt``.

    The steps are a window of a whole fit of ``cfg.iterations`` steps, from its middle third's start (the
    Gaussians grown, densified every ``refine_every``, the SH degree raised as in a job): a fit as short
    as the window would densify every few steps, its schedules being shares of the run. The window's
    steps are counted by the rasterizer calls (one a step), so nothing in the fit reads the GPU back for
    it; the window opens at step ``first``'s rasterizer call, after that step's batch and dropout are drawn, so
    it holds N whole steps shifted by that much, and the fit stops at the window's end. Returns the GPU's busy and the wall-clock milliseconds per
    step, and the kernel launches per step, of the window (the times inflated by the profilers)."""
    import cProfile
    import io
    import pstats

    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    from backend.stages import fit as fit_module

    first = cfg.iterations // 3
    if not 0 < steps <= cfg.iterations - first:
        raise ValueError(f"--profile-steps: 1 to {cfg.iterations - first} steps of a {cfg.iterations}-step fit")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    python, torch_prof = cProfile.Profile(), profile(activities=activities)
    draw = fit_module._SetsRender.draw
    step, wall, closed = 0, [0.0, 0.0], []

    def close() -> None:  # the window's wall clock stops before the profiler collects its trace
        if closed:
            return
        closed.append(True)
        python.disable()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        wall[1] = time.perf_counter()
        torch_prof.stop()

    def counted(*args, **kwargs):  # one rasterizer call a step: the window opens and closes on them
        nonlocal step
        if step == first:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            wall[0] = time.perf_counter()
            torch_prof.start()
            python.enable()
        elif step == first + steps:
            close()
            raise _WindowClosed  # the rest of the fit would profile nothing: device time saved
        step += 1
        return draw(*args, **kwargs)

    with mock.patch.object(fit_module._SetsRender, "draw", counted):
        try:
            fit_sets(views, memory, cfg, sets, device)
        except _WindowClosed:
            pass
        finally:
            if step > first:  # the window opened: closed at its end, or at the fit's end (or its error)
                close()
    text = io.StringIO()
    text.write(f"{sets} set(s): steps {first} to {first + steps} of {cfg.iterations}\n")
    for key in ("tottime", "cumulative"):
        pstats.Stats(python, stream=text).sort_stats(key).print_stats(45)
    averages = torch_prof.key_averages()
    text.write(averages.table(sort_by="self_cpu_time_total", row_limit=45))
    busy = 0.0
    if device.type == "cuda":
        text.write(averages.table(sort_by="self_device_time_total", row_limit=25))
        # the kernels' own events (an operator's row repeats its kernels' time), us -> ms
        busy = sum(e.self_device_time_total for e in averages if e.device_type == DeviceType.CUDA) / 1e3
    launches = sum(e.count for e in averages if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC"))
    per_step = {
        "gpu_busy_ms": busy / steps,
        "wall_ms": 1e3 * (wall[1] - wall[0]) / steps,
        "kernel_launches": launches / steps,
    }
    text.write(f"\nper step: {json.dumps(per_step)}\n")
    out.mkdir(parents=True, exist_ok=True)
    (out / f"profile_sets{sets}.txt").write_text(text.getvalue())
    return per_step


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--data", type=existing_dir, default=str(REPO.parent / "shared" / "data" / "middlebury_temple")
    )  # a str: checked too
    ap.add_argument(
        "--size",
        type=size_wxh,
        default="896x512",
        metavar="WxH",
        help="working size (default: scripts/bench_loop.py's job)",
    )
    ap.add_argument("--sets", default="1,3", help="comma-separated set counts to time (1: the job's fit)")
    ap.add_argument("--iterations", type=int, default=0, help="steps per fit (0: the job's, 3000)")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument(
        "--sync-steps", type=int, default=50, help="steps whose synchronisations are counted (CUDA; 0: none)"
    )
    ap.add_argument(
        "--profile-steps",
        type=int,
        default=0,
        help="also profile this many steps per set count, a window of a whole fit from its middle third "
        "(cProfile and torch.profiler; needs --out)",
    )
    add_ssim_conv(ap)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--label", default="", help="a name for this code in the report (e.g. the commit)")
    ap.add_argument("--out", type=Path, default=None, help="folder for fit_steps.json")
    args = ap.parse_args()
    try:
        sets = [int(s) for s in args.sets.split(",") if s]
    except ValueError:
        ap.error(f"--sets: comma-separated integers; got {args.sets!r}")
    if (
        not sets
        or min(sets) < 1
        or args.repeats < 1
        or args.iterations < 0
        or args.sync_steps == 1
        or args.sync_steps < 0
        or args.profile_steps < 0
        or (args.profile_steps and args.out is None)
    ):
        ap.error(
            "--sets >= 1 each, --repeats >= 1, --iterations >= 0, --sync-steps 0 or >= 2, --profile-steps with --out"
        )
    steps = args.iterations or JOB_ITERATIONS
    if args.profile_steps > steps - steps // 3:
        ap.error(f"--profile-steps: at most {steps - steps // 3}, a window from step {steps // 3} of {steps}")
    device = torch.device(args.device)
    if args.ssim_conv:
        ssim_on_convolutions()
    width, height = args.size
    settings = Settings(width=width, height=height, gaussian_iterations=JOB_ITERATIONS)
    cfg = LoopConfig.from_settings(settings, device=device)
    fit_cfg = replace(cfg.fit, iterations=args.iterations) if args.iterations else cfg.fit
    with tempfile.TemporaryDirectory(prefix="reconloop-fit-steps-") as work:
        scene = bench_scene(args.data, Path(work), frames=3, settings=settings)
        views = prepare_captures(scene, width=cfg.width, height=cfg.height, default_frames=3, device=device).captures
    memory = build_memory(views, cfg.memory, estimator=cfg.estimator)
    warm = warm_up(device)
    seconds: dict[int, list[float]] = {k: [] for k in sets}
    for r in range(args.repeats):
        for k in sets if r % 2 == 0 else sets[::-1]:
            seconds[k].append(fit_sets(views, memory, fit_cfg, k, device))
            print(f"repeat {r}: {k} set(s), {fit_cfg.iterations} steps: {seconds[k][-1]:.2f} s", flush=True)
    syncs = {}
    if device.type == "cuda" and args.sync_steps:
        for k in sets:
            syncs[k], where = syncs_per_step(views, memory, replace(fit_cfg, iterations=args.sync_steps), k, device)
            print(f"{k} set(s), host waits per step by the line that asked:", flush=True)
            for line, n in where.items():
                print(f"  {n:6.2f}  {line}", flush=True)
    profiled = {}
    if args.profile_steps:
        for k in sets:
            profiled[k] = profile_sets(views, memory, fit_cfg, k, device, args.out, args.profile_steps)
            print(f"profiled {k} set(s), {args.profile_steps} steps: {profiled[k]}", flush=True)
    med = {k: statistics.median(v) for k, v in seconds.items()}
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"\n{name}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')} {args.label}".rstrip())
    print(f"{cfg.width}x{cfg.height}, {len(views)} captures, {len(memory)} points, {fit_cfg.iterations} steps")
    print("| sets | seconds (median) | ms per step | x one set | host waits per step |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    one = med.get(1)
    for k in sets:
        ratio = f"{med[k] / one:.2f}" if one else ""
        wait = f"{syncs[k]:.1f}" if k in syncs else ""
        print(f"| {k} | {med[k]:.2f} | {1e3 * med[k] / fit_cfg.iterations:.2f} | {ratio} | {wait} |")
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        report = {
            "device": name,
            "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d"),
            "label": args.label,
            "size": [cfg.width, cfg.height],
            "iterations": fit_cfg.iterations,
            "warm_up_s": warm,
            "seconds": {str(k): v for k, v in seconds.items()},
            "median_s": {str(k): v for k, v in med.items()},
            "syncs_per_step": {str(k): v for k, v in syncs.items()},
            "profiled_per_step": {str(k): v for k, v in profiled.items()},
        }
        suffix = f"_{args.label}" if args.label else ""
        (args.out / f"fit_steps{suffix}.json").write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
