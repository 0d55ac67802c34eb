"""Benchmark: import 1,000,000 Gaussians and a 1,000,000-point cloud into Blender (bpy wheel).

Times, per run, (a) reading the .ply with protocol.ply, (b) building the object (mesh, attributes
through foreach_set, geometry-nodes modifier, material) and (c) one depsgraph evaluation of the new
object (the geometry nodes run: points or instanced ellipsoids). Prints medians of ``--runs`` runs
as a markdown table.

    .venv/bin/python scripts/bench_blender_import.py --count 1000000 --runs 3
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import bpy  # noqa: E402

from backend.evaluate_args import positive_int  # noqa: E402
from blender_addon import importers  # noqa: E402
from protocol.ply import (  # noqa: E402
    GaussianArrays,
    PointArrays,
    read_gaussians_ply,
    read_points_ply,
    write_gaussians_ply,
    write_points_ply,
)

SH_DEGREE = 3
SEED = 0


def make_gaussians(n: int, rng: np.random.Generator) -> GaussianArrays:
    k = (SH_DEGREE + 1) ** 2
    return GaussianArrays(
        means=rng.normal(size=(n, 3)).astype(np.float32),
        log_scales=rng.uniform(-6, -3, (n, 3)).astype(np.float32),
        quats=rng.normal(size=(n, 4)).astype(np.float32),
        opacity_logits=rng.normal(size=n).astype(np.float32),
        sh=rng.normal(scale=0.3, size=(n, k, 3)).astype(np.float32),
    )


def make_points(n: int, rng: np.random.Generator) -> PointArrays:
    return PointArrays(
        xyz=rng.normal(size=(n, 3)).astype(np.float32),
        rgb=rng.integers(0, 256, (n, 3), dtype=np.uint8),
        confidence=rng.uniform(0, 1, n).astype(np.float32),
        source=rng.integers(-1, 16, n).astype(np.int32),
    )


def time_one(path: Path, reader, importer, name: str) -> dict[str, float]:
    bpy.ops.wm.read_homefile(app_template="")
    scene = bpy.context.scene
    coll = bpy.data.collections.new("bench")
    scene.collection.children.link(coll)
    t0 = time.perf_counter()
    arrays = reader(path)
    t1 = time.perf_counter()
    obj = importer(arrays, name, coll)
    t2 = time.perf_counter()
    depsgraph = bpy.context.evaluated_depsgraph_get()
    obj.evaluated_get(depsgraph)
    t3 = time.perf_counter()
    return {"read": t1 - t0, "build": t2 - t1, "evaluate": t3 - t2, "total": t3 - t0}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--count", type=positive_int, default=1_000_000)
    ap.add_argument("--runs", type=positive_int, default=3)
    args = ap.parse_args(argv)
    rng = np.random.default_rng(SEED)
    with tempfile.TemporaryDirectory() as tmp:
        g_path, p_path = Path(tmp) / "gaussians.ply", Path(tmp) / "points.ply"
        write_gaussians_ply(g_path, make_gaussians(args.count, rng))
        write_points_ply(p_path, make_points(args.count, rng))
        rows = []
        for label, path, reader, importer in (
            (
                f"{args.count:,} Gaussians (SH degree {SH_DEGREE})",
                g_path,
                read_gaussians_ply,
                importers.import_gaussians,
            ),
            (f"{args.count:,}-point cloud", p_path, read_points_ply, importers.import_points),
        ):
            runs = [time_one(path, reader, importer, "bench") for _ in range(args.runs)]
            med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
            rows.append((label, med, [r["total"] for r in runs]))
    print(
        f"bpy {bpy.app.version_string}, Python {platform.python_version()}, {platform.machine()}, "
        f"medians of {args.runs} runs"
    )
    print("| import | read .ply (s) | build object (s) | evaluate geometry nodes (s) | total (s) | runs (s) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for label, med, totals in rows:
        print(
            f"| {label} | {med['read']:.2f} | {med['build']:.2f} | {med['evaluate']:.2f} | {med['total']:.2f} | "
            + ", ".join(f"{t:.2f}" for t in totals)
            + " |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
