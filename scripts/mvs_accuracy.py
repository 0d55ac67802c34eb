"""MVS depth accuracy on the Lund door against its COLMAP ground-truth points (docs/benchmarks.md).

For each reference photo, the COLMAP points it observes are projected into the undistorted,
downsized photo; the plane-sweep depth at that pixel is compared with the point's depth.
Prints the median and 90th percentile relative depth error, coverage and time per setting.

    .venv/bin/python scripts/mvs_accuracy.py --sides 320 640 --views 3 4
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from backend.estimators.mvs import MVSConfig, estimate_depths  # noqa: E402
from backend.evaluate_args import existing_dir, positive_int  # noqa: E402
from backend.formats.colmap import read_colmap, read_colmap_points  # noqa: E402
from backend.formats.undistort import undistort_image  # noqa: E402
from backend.types import (  # noqa: E402
    Cameras,
    Views,
    project_points,  # noqa: E402
)

FIRST = 3  # DSC_0004: the door photos 4.. are a sweep of neighbouring views


def load(captures, ids: list[int], max_side: int, device: str) -> Views:
    imgs, cams = [], []
    for i in ids:
        cam = captures[i].camera
        rgb = cv2.cvtColor(cv2.imread(str(captures[i].image)), cv2.COLOR_BGR2RGB)
        if cam.distortion is not None:
            rgb = undistort_image(rgb, cam)
        s = max_side / max(cam.width, cam.height)
        rgb = cv2.resize(rgb, (round(cam.width * s), round(cam.height * s)), interpolation=cv2.INTER_AREA)
        imgs.append(torch.from_numpy(rgb).float() / 255)
        cams.append(cam)
    h, w = imgs[0].shape[:2]
    return Views(torch.stack(imgs).to(device), Cameras.from_scene(cams, w, h, device=device), ids)


def score_depths(depth: torch.Tensor, cams: Cameras, captures, points, ids: list[int]) -> dict[str, float]:
    """Relative depth error of depth maps [V, H, W] (0 = none) at the COLMAP points each photo observes."""
    errors, seen = [], 0
    for k, i in enumerate(ids):
        idx, _ = points.observations[captures[i].name]
        xyz = torch.tensor(points.xyz[idx], dtype=torch.float32, device=depth.device)
        uv, z = project_points(xyz, cams[k])
        px, z = torch.floor(uv[0]).long(), z[0]
        H, W = depth.shape[1:]
        ok = (px[:, 0] >= 0) & (px[:, 0] < W) & (px[:, 1] >= 0) & (px[:, 1] < H) & (z > 0)
        d = depth[k][px[ok, 1], px[ok, 0]]
        has = d > 0
        seen += int(ok.sum())
        errors.append(((d[has] - z[ok][has]).abs() / z[ok][has]).cpu().numpy())
    e = np.concatenate(errors)
    return {
        "median": float(np.median(e)) if len(e) else float("nan"),
        "p90": float(np.quantile(e, 0.9)) if len(e) else float("nan"),
        "under_1pct": float(np.mean(e < 0.01)) if len(e) else 0.0,
        "coverage": len(e) / max(seen, 1),
        "points": len(e),
    }


def evaluate(scene: Path, side: int, views: int, planes: int, device: str) -> dict[str, float]:
    captures = read_colmap(scene).captures
    points = read_colmap_points(scene)
    ids = list(range(FIRST, FIRST + views))
    v = load(captures, ids, side, device)
    t = time.perf_counter()
    maps = estimate_depths(v, MVSConfig(max_side=side, num_planes=planes))
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t
    return {**score_depths(maps.depth, maps.views.cams, captures, points, ids), "seconds": seconds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--scene", type=existing_dir, default=str(Path(__file__).resolve().parents[1].parent / "shared/data/lund_door")
    )
    ap.add_argument("--sides", type=positive_int, nargs="+", default=[320, 640])
    ap.add_argument("--views", type=positive_int, nargs="+", default=[3, 4])
    ap.add_argument("--planes", type=positive_int, default=MVSConfig.num_planes)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    print(
        "| max side | views | planes | median rel. depth error | 90th pct | < 1 % | GT points with depth | time (s) |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for side in args.sides:
        for views in args.views:
            r = evaluate(args.scene, side, views, args.planes, args.device)
            print(
                f"| {side} | {views} | {args.planes} | {r['median']:.4f} | {r['p90']:.4f} | {r['under_1pct']:.3f} | "
                f"{r['points']} ({r['coverage']:.0%}) | {r['seconds']:.2f} |"
            )


if __name__ == "__main__":
    main()
