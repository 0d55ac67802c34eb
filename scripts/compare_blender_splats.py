"""A job's Gaussians rendered by Blender (Cycles, through the add-on's importer) against the service's own
render, from the scene's capture cameras: PSNR per camera (docs/benchmarks.md, "Gaussians in Blender").

    .venv/bin/python scripts/compare_blender_splats.py demo_out/scene demo_out/results --size 96x72
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from backend.evaluate_args import size_wxh  # noqa: E402
from backend.metrics import MSE_FLOOR  # noqa: E402
from backend.scene import load_scene  # noqa: E402
from protocol.ply import read_gaussians_ply  # noqa: E402
from tests.blender._splat_compare import cycles_render, service_render  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("scene", type=Path, help="scene folder (its captures' cameras are the views)")
    ap.add_argument("results", type=Path, help="a job's output folder (gaussians.ply below it; of several, the newest)")
    ap.add_argument("--size", type=size_wxh, default="96x72", metavar="WxH")
    ap.add_argument("--cameras", type=int, default=3, help="the first N captures")
    ap.add_argument("--engine", default="CYCLES", help="Blender's render engine (CYCLES, BLENDER_EEVEE)")
    args = ap.parse_args(argv)
    W, H = args.size
    found = sorted(args.results.rglob("gaussians.ply"), key=lambda p: p.stat().st_mtime)
    if not found:
        ap.error(f"results: no gaussians.ply in {args.results} or below it; give a job's output folder")
    ply = found[-1]  # the newest job's (demo_out/results keeps every job's), named in the output
    if len(found) > 1:
        print(f"{len(found)} gaussians.ply below {args.results}; the newest: {ply} (give its job's folder for another)")
    g = read_gaussians_ply(ply)
    scene = load_scene(args.scene)
    scores = []
    with tempfile.TemporaryDirectory() as tmp:
        for c in scene.captures[: args.cameras]:
            cam = c.camera.scaled(W, H)
            want = service_render(g, cam.w2c, cam.K, W, H)
            got = cycles_render(g, cam.w2c, cam.K, W, H, Path(tmp) / f"{c.name}.png", engine=args.engine)
            psnr = 10 * np.log10(1.0 / max(float(np.mean((want - got) ** 2)), MSE_FLOOR))
            scores.append(psnr)
            print(f"{c.name}: {psnr:.2f} dB ({args.engine} against the service, {W}x{H})", flush=True)
    print(f"{ply}: mean {np.mean(scores):.2f} dB over {len(scores)} cameras")
    return 0


if __name__ == "__main__":
    sys.exit(main())
