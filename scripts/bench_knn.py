"""Benchmark the fit's initial scales: the k-nearest-neighbour search over the memory's points.

Every fit (the guide's sets, the refiner's leave-out guides, the loop's fit) starts one Gaussian per
memory point with a scale from the mean distance to its nearest points
(:func:`backend.stages.fit.knn_mean_distance`, an exact k-d tree search on the host with OpenCV's FLANN).
This times it against an exhaustive search on ``--device`` (pairwise distances and ``topk`` in chunks,
what the fit did before) on the memories of the bench scenes at their bench sizes (the door's is 241k
points) and on uniform random points, side by side in one process, medians over ``--repeats``, and
scores both against an exact float64 search.

Usage::

    python scripts/bench_knn.py --scenes temple,fern,door --random 20000,65000 --device cpu
    python scripts/bench_knn.py --data .device_data --scenes temple,fern,door --device cuda   # GPU machine
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from bench_loop_quality import SCENES, bench_scene_names, load_bench_scene  # noqa: E402

from backend.loop import LoopConfig  # noqa: E402
from backend.stages.cameras import load_views  # noqa: E402
from backend.stages.fit import FitConfig, knn_mean_distance  # noqa: E402
from backend.stages.memory import build_memory  # noqa: E402

PAIRS_PER_CHUNK = 1 << 24  # the exhaustive search's query x reference distances at once


def exhaustive_knn(xyz: torch.Tensor, k: int, *, exact: bool = False) -> torch.Tensor:
    """Mean distance to the k nearest other points by pairwise distances and ``topk``. [N, 3] -> [N]

    ``exact``: in float64 and by coordinate differences (the reference); otherwise as the fit searched
    before the k-d tree, ``torch.cdist``'s default in float32, which takes distances from dot products
    (|a|^2 + |b|^2 - 2 a.b) and loses the small ones to cancellation where points sit far from the origin
    compared with their spacing."""
    n = xyz.shape[0]
    chunk = max(1, PAIRS_PER_CHUNK // n)
    mode = "donot_use_mm_for_euclid_dist" if exact else "use_mm_for_euclid_dist_if_necessary"
    pts = xyz.double() if exact else xyz
    out = []
    for start in range(0, n, chunk):
        d = torch.cdist(pts[start : start + chunk], pts, compute_mode=mode)
        out.append(torch.topk(d, k + 1, dim=1, largest=False).values[:, 1:].mean(dim=1))
    return torch.cat(out)


def scene_points(data: Path, name: str, work: Path) -> torch.Tensor:
    """The memory's points of a bench scene's 3 captures at its bench size. [N, 3]"""
    scene = load_bench_scene(data, name, work)
    w, h = SCENES[name][3]
    cfg = LoopConfig.from_settings(scene.settings, device="cpu")
    captures = load_views(scene.captures, w, h, "cpu")
    return build_memory(captures, cfg.memory, estimator=cfg.estimator).xyz


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: torch.device) -> tuple[float, torch.Tensor]:
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    p.add_argument("--scenes", default="temple,fern,door", help="bench scenes whose memories to search ('' none)")
    p.add_argument("--random", default="20000,65000", help="sizes of uniform random point sets ('' none)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument(
        "--max-exhaustive", type=int, default=70_000, help="on the CPU, skip the exhaustive search above this size"
    )
    args = p.parse_args(argv)
    names = bench_scene_names(p, args.data, args.scenes, allow_none=True)
    try:
        sizes = [int(n) for n in args.random.split(",") if n.strip()]
    except ValueError:
        p.error(f"--random: comma-separated point counts; got {args.random!r}")
    if any(n < 1 for n in sizes):
        p.error(f"--random: point counts must be at least 1; got {args.random!r}")
    device = torch.device(args.device)
    k = FitConfig().knn
    sets: list[tuple[str, torch.Tensor]] = []
    with tempfile.TemporaryDirectory(prefix="reconloop-knn-") as work:
        for name in names:
            sets.append((f"{name} memory", scene_points(args.data, name, Path(work) / name)))
    gen = torch.Generator().manual_seed(0)
    for n in sizes:
        sets.append((f"uniform {n}", torch.rand(n, 3, generator=gen)))
    print(f"device {device}, k {k}, torch {torch.__version__}, threads {torch.get_num_threads()}", flush=True)
    print("| points | N | k-d tree (s) | exhaustive (s) | speedup | max relative error: k-d tree / exhaustive |")
    print("| --- | ---: | ---: | ---: | ---: | --- |")
    for label, xyz in sets:
        xyz = xyz.to(device)
        run_exhaustive = device.type == "cuda" or len(xyz) <= args.max_exhaustive
        tree_s, exh_s = [], []
        tree = exh = None
        for r in range(args.repeats):  # order alternated between repeats
            order = ("tree", "exhaustive") if r % 2 == 0 else ("exhaustive", "tree")
            for way in order:
                if way == "tree":
                    s, tree = timed(lambda: knn_mean_distance(xyz, k), device)
                    tree_s.append(s)
                elif run_exhaustive:
                    s, exh = timed(lambda: exhaustive_knn(xyz, k), device)
                    exh_s.append(s)
        t = statistics.median(tree_s)
        if exh is None:
            print(f"| {label} | {len(xyz)} | {t:.3f} | (skipped) | | |", flush=True)
            continue
        e = statistics.median(exh_s)
        ref = exhaustive_knn(xyz, k, exact=True)

        def error(d: torch.Tensor) -> float:
            return float(((d.double() - ref).abs() / ref.clamp_min(1e-12)).max())

        speedup = f"{e / t:.1f}x" if e / t < 10 else f"{e / t:.0f}x"  # the GPU's small sets run below 1x
        print(
            f"| {label} | {len(xyz)} | {t:.3f} | {e:.3f} | {speedup} | {error(tree):.1e} / {error(exh):.1e} |",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
