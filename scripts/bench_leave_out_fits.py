"""Benchmark the refiner's leave-out guide fits: one after another against all at once in lockstep.

Issue 15 asks for the leave-one-out fits to run batched where the rasterizer allows.
:func:`backend.generators.refine.leave_out_guides` fits every subset's guide with
:func:`backend.stages.fit.fit_gaussians_many` (gsplat draws all the subsets' Gaussians in one call per
step, on a leading batch dimension); this script times that against the same fits made one after
another with :func:`backend.stages.fit.fit_gaussians`, side by side in one process (order alternated,
medians over ``--repeats``), and scores each guide at the capture it left out (PSNR against the
photo) so that the two ways can be seen to fit the same.

Usage (GPU machine; scenes under .device_data, never committed)::

    python scripts/bench_leave_out_fits.py --data .device_data --scenes temple,fern,door --out $OUT

On the 2-core dev machine, at a small size (the CPU rasterizer draws the batch one set after another,
so lockstep gains nothing there)::

    python scripts/bench_leave_out_fits.py --scenes temple --size 96x72 --iterations 30 --repeats 1 --device cpu
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from bench_loop_quality import SCENES, bench_scene_names, load_bench_scene  # noqa: E402

from backend.evaluate_args import size_wxh  # noqa: E402
from backend.generators.refine import LeaveOut, RefineConfig, leave_out_subsets  # noqa: E402
from backend.loop import LoopConfig  # noqa: E402
from backend.metrics import psnr  # noqa: E402
from backend.stages.cameras import load_views  # noqa: E402
from backend.stages.fit import (  # noqa: E402
    FitViews,
    Gaussians,
    fit_gaussians,
    fit_gaussians_many,
    render_gaussians,
)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def held_out_psnr(guides: list[Gaussians], subsets: list[LeaveOut], captures, cfg: LoopConfig) -> float:
    """Mean PSNR of each guide's render at the captures its subset left out, against their photos."""
    scores = []
    for g, s in zip(guides, subsets):
        left = list(s.left_out)
        scores += psnr(render_gaussians(g, captures.cams[left], cfg.fit), captures.images[left]).tolist()
    return statistics.fmean(scores)


def bench_scene(name: str, args: argparse.Namespace, device: torch.device, work: Path) -> dict:
    scene = load_bench_scene(args.data, name, work)
    W, H = args.size or SCENES[name][3]
    cfg = LoopConfig.from_settings(scene.settings, device=device)  # picks the device's rasterizer
    captures = load_views(scene.captures, W, H, device)
    refine = RefineConfig()
    subsets = [LeaveOut.of(captures, s, cfg) for s in leave_out_subsets(len(captures), refine.max_fits)]
    iterations = args.iterations or max(1, round(args.fit_iterations * refine.fit_share))
    fit_cfg = replace(cfg.fit, iterations=iterations)
    views = [FitViews.from_views(s.views) for s in subsets]
    memories = [s.memory for s in subsets]

    def one_after_another() -> list[Gaussians]:
        return [fit_gaussians(v, m, fit_cfg, device=device) for v, m in zip(views, memories)]

    def lockstep() -> list[Gaussians]:
        return fit_gaussians_many(views, memories, fit_cfg, device=device)

    ways = {"one after another": one_after_another, "lockstep": lockstep}
    seconds: dict[str, list[float]] = {k: [] for k in ways}
    scores: dict[str, list[float]] = {k: [] for k in ways}
    peak: dict[str, int] = {}
    for r in range(args.repeats):
        for way in list(ways) if r % 2 == 0 else list(ways)[::-1]:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            synchronize(device)
            t0 = time.perf_counter()
            guides = ways[way]()
            synchronize(device)
            seconds[way].append(time.perf_counter() - t0)
            if device.type == "cuda":
                peak[way] = max(peak.get(way, 0), torch.cuda.max_memory_allocated(device) // 2**20)
            scores[way].append(held_out_psnr(guides, subsets, captures, cfg))
            print(f"{name} repeat {r}: {way} {seconds[way][-1]:.2f} s, guides {scores[way][-1]:.2f} dB", flush=True)
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=activities) as prof:
            fit_gaussians_many(views, memories, replace(fit_cfg, iterations=args.profile), device=device)
            synchronize(device)
        sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25), flush=True)
        print(prof.key_averages().table(sort_by=sort, row_limit=15), flush=True)
    med = {k: statistics.median(v) for k, v in seconds.items()}
    return {
        "scene": name,
        "size": [W, H],
        "subsets": [list(s.left_out) for s in subsets],
        "gaussians_at_start": [len(m) for m in memories],
        "iterations": iterations,
        "strategy": fit_cfg.strategy,
        "seconds": seconds,
        "median_s": med,
        "speedup": med["one after another"] / med["lockstep"],
        "psnr_at_left_out": {k: statistics.fmean(v) for k, v in scores.items()},
        "peak_mib": peak,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    ap.add_argument("--scenes", default="temple,fern,door", help=f"comma-separated, of {', '.join(SCENES)}")
    ap.add_argument("--size", type=size_wxh, default=None, help="WxH (default: each scene's bench size)")
    ap.add_argument("--fit-iterations", type=int, default=3000, help="the job's fit steps (the bench's 3000)")
    ap.add_argument(
        "--iterations", type=int, default=0, help="steps per guide (0: the refiner's share of --fit-iterations)"
    )
    ap.add_argument("--profile", type=int, default=0, help="also profile this many lockstep steps (torch.profiler)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", type=Path, default=None, help="folder for leave_out_fits.json")
    args = ap.parse_args()
    names = bench_scene_names(ap, args.data, args.scenes)
    if args.repeats < 1 or args.iterations < 0 or args.fit_iterations < 1 or args.profile < 0:
        ap.error(
            "--repeats and --fit-iterations must be >= 1, --iterations and --profile >= 0; got "
            f"{args.repeats}, {args.fit_iterations}, {args.iterations}, {args.profile}"
        )
    device = torch.device(args.device)
    rows = []
    with tempfile.TemporaryDirectory(prefix="reconloop-leave-out-") as work:
        for name in names:
            rows.append(bench_scene(name, args, device, Path(work) / name))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"\n{name}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}")
    print(
        "| scene | subsets | steps | one after another (s) | lockstep (s) | speedup | guides at left-out (dB): alone / lockstep |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | --- |")
    for row in rows:
        m, p = row["median_s"], row["psnr_at_left_out"]
        print(
            f"| {row['scene']} | {len(row['subsets'])} | {row['iterations']} | {m['one after another']:.2f} | "
            f"{m['lockstep']:.2f} | {row['speedup']:.2f}x | {p['one after another']:.2f} / {p['lockstep']:.2f} |"
        )
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        report = {"device": name, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "rows": rows}
        (args.out / "leave_out_fits.json").write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
