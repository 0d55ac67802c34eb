"""Would the guide's members gain more as an ensemble if they differed by more than their seeds? Each
member's views or start made different on purpose (bagging), and a set's render averaged over
cameras moved at random (a render-time ensemble), scored at the held-out views beside the guide as the
job fits it (members that differ by their seeds alone: frame order, Gaussian dropout, MCMC's noise).

The guide's mean of K renders scores above any one of its sets (runs 39-45, docs/benchmarks.md): where
3 captures leave the Gaussians free, each set errs its own way. Bagging makes the sets err more
independently at the price of each set seeing less:

- ``tiles P``: member k sees a random share P of each capture's 16-px tiles (confidence 0 elsewhere);
- ``points P``: member k starts from a random share P of the memory's points;
- ``shared-points P``: every member starts from one random share P of them (a sparser start, no bagging);
- ``capture-weight W``: member k weighs capture k (mod the captures) by W.

``--jitter F,...``: member 0's render averaged over ``--jitter-renders`` cameras, each centre moved by F x
the scene scale (``backend.stages.fit.scene_scale``) in a random direction: a render-time stand-in
for the members' disagreement on depth. Analysis, not a job setting.

    python scripts/guide_diversity.py --scenes temple,fern --size 160x120 --iterations 600 --device cpu \\
        --variants "default,tiles 0.8,points 0.7,capture-weight 0.5" --jitter 0.005,0.02
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

import bench_loop_quality as bench  # noqa: E402

from backend.devices import pick_device  # noqa: E402
from backend.evaluate import score  # noqa: E402
from backend.loop import LoopConfig  # noqa: E402
from backend.stages.fit import FitViews, fit_gaussians_many, render_gaussians, scene_scale  # noqa: E402
from backend.stages.guide import render_guide  # noqa: E402
from backend.types import Cameras, GeometryMemory  # noqa: E402

TILE_PX = 16
KINDS = ("default", "tiles", "points", "shared-points", "capture-weight")


def parse_variant(text: str) -> tuple[str, float]:
    """``"tiles 0.8"`` -> ("tiles", 0.8); ``"default"`` -> ("default", 1.0). A bad name or share is a
    ValueError naming it."""
    kind, _, value = text.strip().partition(" ")
    if kind not in KINDS:
        raise ValueError(f"--variants: unknown variant {text!r}; choose from {', '.join(KINDS)} (with a share)")
    if kind == "default":
        return kind, 1.0
    try:
        share = float(value)
    except ValueError:
        raise ValueError(f"--variants: {text!r} needs a number after {kind!r}") from None
    if not 0.0 < share <= 1.0:
        raise ValueError(f"--variants: {text!r}: the share must be in (0, 1]")
    return kind, share


def member_inputs(
    captures: FitViews, memory: GeometryMemory, kind: str, share: float, members: int, gen: torch.Generator
) -> tuple[list[FitViews], list[GeometryMemory]]:
    """The views and start of each of ``members`` sets for a variant of :func:`parse_variant`."""
    views, inits = [], []
    shared = torch.rand(len(memory), generator=gen) < share if kind == "shared-points" else None
    for k in range(members):
        v, m = captures, memory
        if kind == "tiles":
            f, h, w = captures.confidence.shape
            keep = torch.rand(f, -(-h // TILE_PX), -(-w // TILE_PX), generator=gen) < share
            keep = keep.repeat_interleave(TILE_PX, 1).repeat_interleave(TILE_PX, 2)[:, :h, :w]
            v = replace(captures, confidence=captures.confidence * keep.to(captures.confidence))
        elif kind in ("points", "shared-points"):
            keep = torch.rand(len(memory), generator=gen) < share if shared is None else shared
            m = memory.select(keep)
        elif kind == "capture-weight":
            confidence = captures.confidence.clone()
            confidence[k % len(captures)] *= share
            v = replace(captures, confidence=confidence)
        views.append(v)
        inits.append(m)
    return views, inits


def jittered(cams: Cameras, distance: float, gen: torch.Generator) -> Cameras:
    """``cams`` with every centre moved ``distance`` in a random direction, orientation kept."""
    step = torch.randn(len(cams), 3, generator=gen).to(cams.w2c)
    step = distance * step / step.norm(dim=1, keepdim=True)
    w2c = cams.w2c.clone()
    w2c[:, :3, 3] -= (w2c[:, :3, :3] @ step.unsqueeze(-1)).squeeze(-1)  # t = -R c, c moved by step
    return Cameras(w2c, cams.K, cams.width, cams.height)


def run_scene(
    name: str,
    size: tuple[int, int],
    seed: int,
    args,
    variants: list[tuple[str, str, float]],
    jitter: list[float],
    device: str,
) -> dict:
    scene = bench.load_bench_scene(args.data, name, args.work / f"{name}_seed{seed}")
    W, H = size
    cfg = LoopConfig.from_settings(scene.settings, device=device, num_captures=len(scene.captures))
    fit = replace(cfg.fit, iterations=args.iterations, seed=seed)
    truth, held, captures, memory = bench.heldout_and_memory(scene, cfg, (W, H), device)
    scale = scene_scale(captures.cams, memory.xyz)
    report: dict = {"scene": name, "size": [W, H], "iterations": args.iterations, "seed": seed, "variants": {}}
    for text, kind, share in variants:
        gen = torch.Generator().manual_seed(1000 + seed)
        views, inits = member_inputs(FitViews.from_views(captures), memory, kind, share, args.members, gen)
        t0 = time.perf_counter()
        sets = fit_gaussians_many(views, inits, fit, device=device, seeds=[seed + k for k in range(args.members)])
        row: dict = {"fit_seconds": round(time.perf_counter() - t0, 1)}
        with torch.no_grad():
            row["member_psnr"] = [score(render_gaussians(g, held, fit), truth)["psnr"] for g in sets]
            row["mean"] = score(render_guide(sets, held, fit, cfg.guide)[0], truth)
            moves = torch.Generator().manual_seed(1000 + seed)  # the same moved cameras for every variant
            for f in jitter:
                cams = [jittered(held, f * scale, moves) for _ in range(args.jitter_renders)]
                renders = torch.stack([render_gaussians(sets[0], c, fit) for c in cams])
                row[f"member 0 jittered {f:g}"] = score(renders.mean(0), truth)
        report["variants"][text] = row
        members = " / ".join(f"{p:.2f}" for p in row["member_psnr"])
        jit = ", ".join(f"{k} {v['psnr']:.2f}" for k, v in row.items() if k.startswith("member 0 jittered"))
        print(
            f"{name} {W}x{H} {args.iterations} it seed {seed} {text!r} ({row['fit_seconds']} s): members {members}, "
            f"mean of renders {row['mean']['psnr']:.2f}" + (f"; {jit}" if jit else ""),
            flush=True,
        )
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bench.add_scene_seed_args(p, Path("/tmp/guide_diversity"))
    p.add_argument("--members", type=int, default=3)
    p.add_argument("--variants", default="default", help="comma-separated: " + ", ".join(KINDS) + " (with a share)")
    p.add_argument("--jitter", default="", help="comma-separated shares of the scene scale (member 0's render)")
    p.add_argument("--jitter-renders", type=int, default=8)
    args = p.parse_args(argv)
    if args.members < 1 or args.jitter_renders < 1:
        p.error(f"--members and --jitter-renders must be at least 1; got {args.members} and {args.jitter_renders}")
    try:
        variants = [(t.strip(), *parse_variant(t)) for t in args.variants.split(",")]
    except ValueError as e:
        p.error(str(e))
    try:
        jitter = [float(x) for x in args.jitter.split(",") if x.strip()]
    except ValueError:
        p.error(f"--jitter: {args.jitter!r} is not a comma-separated list of numbers")
    device = pick_device(args.device)
    runs = bench.scene_seeds(p, args)
    reports = [run_scene(name, size, seed, args, variants, jitter, device) for name, size, seed in runs]
    bench.write_scene_reports(args.out, device, reports)
    return 0


if __name__ == "__main__":
    sys.exit(main())
