"""COLMAP PatchMatch (estimator ``patchmatch``) on the Lund door against its COLMAP points, beside
plane sweep: median and 90th-percentile relative depth error, share under 1 %, coverage (the share
of observed COLMAP points that get a depth) and time, as scripts/mvs_accuracy.py measures plane sweep.

Needs pycolmap with CUDA (``pycolmap-cuda12``); without it the PatchMatch rows say why and the plane
sweep rows still run (``--tiny`` for a quick CPU check). Writes JSON with ``--out``.

    python scripts/gpu_check_patchmatch.py --sides 640 1024 --views 3 5 --out $OUT/patchmatch.json
    .venv/bin/python scripts/gpu_check_patchmatch.py --tiny

``--llff DIR`` instead measures coverage alone on an LLFF scene's 3 training views (the quality
benchmark's protocol and size; there are no reference points): the share of pixels each method gives
a depth, and for PatchMatch per ``--angles`` (COLMAP's minimum triangulation angle, degrees).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from mvs_accuracy import FIRST, load, score_depths  # noqa: E402

from backend.estimators.mvs import MVSConfig, estimate_depths, fuse_depths  # noqa: E402
from backend.estimators.patchmatch import (  # noqa: E402
    PatchMatchConfig,
    fusion_config,
    has_cuda_patchmatch,
    patchmatch_depths,
)
from backend.formats.colmap import read_colmap, read_colmap_points  # noqa: E402


def patchmatch_run(views, side: int) -> tuple:
    """PatchMatch's geometric depth maps of ``views`` at ``side``, their cameras, seconds, points fused."""
    cfg = PatchMatchConfig(max_side=side)
    t = time.perf_counter()
    maps = patchmatch_depths(views, cfg)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t
    fused = fuse_depths(maps.depth, maps.confidence, maps.views, maps.neighbors, fusion_config(cfg))
    return maps.depth, maps.views.cams, seconds, len(fused)


def llff_coverage(scene_dir: Path, angles: list[float], device: str) -> list[dict]:
    """Depth coverage of plane sweep and of PatchMatch per minimum triangulation angle on an LLFF
    scene's 3 training views (bench_loop_quality's fern: llff protocol, 504x378)."""
    import tempfile

    from backend.evaluate import scene_for_eval
    from backend.stages.cameras import prepare_captures

    W, H = 504, 378
    with tempfile.TemporaryDirectory() as work:
        scene = scene_for_eval(scene_dir, "llff", "llff", 3, Path(work) / "scene")
        views = prepare_captures(scene, width=W, height=H, default_frames=len(scene.captures), device=device).captures
        rows = []
        t = time.perf_counter()
        maps = estimate_depths(views, MVSConfig(max_side=W))
        rows.append(
            {
                "method": "plane sweep",
                "coverage": float((maps.depth > 0).float().mean()),
                "seconds": time.perf_counter() - t,
            }
        )
        for a in angles:
            t = time.perf_counter()
            try:
                pm = patchmatch_depths(views, PatchMatchConfig(max_side=W, min_triangulation_angle_deg=a))
                rows.append(
                    {
                        "method": f"patchmatch, min angle {a:g}",
                        "coverage": float((pm.depth > 0).float().mean()),
                        "seconds": time.perf_counter() - t,
                    }
                )
            except Exception as err:
                rows.append({"method": f"patchmatch, min angle {a:g}", "error": f"{type(err).__name__}: {err}"})
            print(rows[-1], flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scene", type=Path, default=Path(__file__).resolve().parents[1].parent / "shared/data/lund_door")
    ap.add_argument("--sides", type=int, nargs="+", default=[640, 1024])
    ap.add_argument("--views", type=int, nargs="+", default=[3, 5])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tiny", action="store_true", help="one small CPU-sized setting (160 px, 3 views, 32 planes)")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--llff", type=Path, default=None, help="coverage on this LLFF scene instead (docstring)")
    ap.add_argument("--angles", type=float, nargs="+", default=[3.0, 1.0, 0.5])
    args = ap.parse_args(argv)
    if args.llff:
        rows = llff_coverage(args.llff, args.angles, args.device)
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps({"device": args.device, "rows": rows}, indent=1))
        return 0
    if args.tiny:
        args.sides, args.views = [160], [3]
    captures = read_colmap(args.scene).captures
    points = read_colmap_points(args.scene)
    rows = []
    print(f"pycolmap with CUDA: {has_cuda_patchmatch()}")
    print(
        "| method | max side | views | median rel. depth error | 90th pct | < 1 % | coverage | points fused | time (s) |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for side in args.sides:
        for n in args.views:
            ids = list(range(FIRST, FIRST + n))
            views = load(captures, ids, side, args.device)
            t = time.perf_counter()
            maps = estimate_depths(
                views, MVSConfig(max_side=side, num_planes=32 if args.tiny else MVSConfig.num_planes)
            )
            sweep = {"method": "plane sweep", "side": side, "views": n, "seconds": time.perf_counter() - t}
            sweep.update(score_depths(maps.depth, maps.views.cams, captures, points, ids))
            rows.append(sweep)
            pm = {"method": "patchmatch", "side": side, "views": n}
            try:
                depth, cams, seconds, fused = patchmatch_run(views, side)
                pm.update(score_depths(depth, cams, captures, points, ids), seconds=seconds, fused=fused)
            except Exception as err:  # report why (no CUDA build, COLMAP error) and keep measuring
                pm["error"] = f"{type(err).__name__}: {err}"
            rows.append(pm)
    for r in rows:
        if "error" in r:
            print(f"| {r['method']} | {r['side']} | {r['views']} | {r['error']} | | | | | |")
        else:
            print(
                f"| {r['method']} | {r['side']} | {r['views']} | {r['median']:.4f} | {r['p90']:.4f} | "
                f"{r['under_1pct']:.3f} | {r['coverage']:.0%} ({r['points']}) | {r.get('fused', '')} | {r['seconds']:.2f} |"
            )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(
            json.dumps({"device": args.device, "has_cuda_patchmatch": has_cuda_patchmatch(), "rows": rows}, indent=1)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
