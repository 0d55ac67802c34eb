"""Does the guide's ensemble gain compound over rounds of the loop? A second round whose guide is an
ensemble of the first round's loop fits, and the median of the sets' renders beside their mean.

The loop's gain over its captures-only fit is about the guide ensemble's gain over one set (runs 39-44,
docs/benchmarks.md): the frames carry the mean of K captures-only fits' renders, and the loop's one set
lands near that mean. If the loop's own fits, fitted K times with other seeds on round 1's frames, still
err each their own way, their mean renders better than one of them, and a second round whose guide is
those K sets starts from better colour than round 1 did. This script measures, per scene and seed, at
the held-out views:

- round 0: one captures-only set (member 0), the mean and the per-pixel median of the guide's K sets;
- round r >= 1: the loop's one set (``run_loop`` with round r-1's sets as its guide; round 1 is the job
  as it is), its frames, and K sets fitted in lockstep on the same captures and frames (seeds ``seed``,
  ``seed + 1``, ...), scored one by one, as their mean and as their median.

Analysis, not a job setting: a round costs a loop fit and K lockstep fits.

    python scripts/ensemble_rounds.py --scenes temple --size 192x144 --iterations 400 --device cpu  # a floor
    bash scripts/gpu_runs.sh rounds temple,fern,door 0,1,2   # H200, the bench's sizes, 3000 steps
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
from backend.evaluate import FRAMES_PER_LEG, eval_trajectory, score  # noqa: E402
from backend.loop import LoopConfig, run_loop  # noqa: E402
from backend.stages.cameras import working_size  # noqa: E402
from backend.stages.fit import FitViews, Gaussians, captures_and_frames, fit_gaussians_many, render_gaussians  # noqa: E402
from backend.stages.guide import fit_guide  # noqa: E402
from backend.types import Cameras  # noqa: E402


def ensemble_scores(sets: list[Gaussians], held: Cameras, fit, truth: torch.Tensor) -> dict:
    """Each set's PSNR at the held-out views, and the mean's and the per-pixel median's scores."""
    with torch.no_grad():
        renders = torch.stack([render_gaussians(g, held, fit) for g in sets])  # [K, V, H, W, 3]
        return {
            "sets_psnr": [score(r, truth)["psnr"] for r in renders],
            "mean": score(renders.mean(0), truth),
            "median": score(renders.median(0).values, truth),
        }


def run_scene(
    data: Path,
    name: str,
    work: Path,
    size: tuple[int, int],
    iterations: int,
    seed: int,
    members: int,
    rounds: int,
    device: str,
) -> dict:
    scene = bench.load_bench_scene(data, name, work / f"{name}_seed{seed}")
    traj, on_heldout = eval_trajectory(scene, "heldout", FRAMES_PER_LEG)
    W, H, _ = working_size(*size, [t.camera for t in traj])  # as evaluate_scene sizes its loop
    cfg = LoopConfig.from_settings(scene.settings, device=device, num_captures=len(scene.captures))
    cfg = replace(
        cfg,
        width=W,
        height=H,
        fit=replace(cfg.fit, iterations=iterations, seed=seed),
        seed=seed,
        guide=replace(cfg.guide, members=members),
    )
    loop_scene = replace(scene, trajectory=traj)
    truth, held, captures, memory = bench.heldout_and_memory(scene, cfg, (W, H), device)
    report: dict = {"scene": name, "size": [W, H], "iterations": iterations, "seed": seed, "members": members}
    t0 = time.perf_counter()
    sets = fit_guide(captures, memory, cfg.fit, cfg.guide, device=device)
    report["rounds"] = [{"seconds": round(time.perf_counter() - t0, 1), **ensemble_scores(sets, held, cfg.fit, truth)}]
    hs = sorted(on_heldout)
    for r in range(1, rounds + 1):
        t0 = time.perf_counter()
        result = run_loop(
            loop_scene, work / f"{name}_seed{seed}_round{r}", device=device, config=cfg, guide=sets, memory=memory
        )
        frames = FitViews(result.frames.images, result.trajectory, result.frames.confidence)
        views = captures_and_frames(captures, frames, cfg.fit.capture_share)
        sets = fit_gaussians_many(
            [views] * members, [memory] * members, cfg.fit, device=device, seeds=[seed + k for k in range(members)]
        )
        with torch.no_grad():
            row = {
                "seconds": round(time.perf_counter() - t0, 1),
                "loop": score(render_gaussians(result.gaussians, held, cfg.fit), truth),
                "frames": score(result.frames.images[[on_heldout[h] for h in hs]], truth[hs]),
                "frames_confidence": float(result.frames.confidence.mean()),
            }
        report["rounds"].append(row | ensemble_scores(sets, held, cfg.fit, truth))
    return report


def summary_line(r: dict) -> str:
    parts = []
    for i, row in enumerate(r["rounds"]):
        sets = " / ".join(f"{v:.2f}" for v in row["sets_psnr"])
        head = (
            "captures only"
            if i == 0
            else f"round {i}: loop {row['loop']['psnr']:.2f}, frames {row['frames']['psnr']:.2f};"
        )
        parts.append(f"{head} sets {sets}, mean {row['mean']['psnr']:.2f}, median {row['median']['psnr']:.2f}")
    return f"{r['scene']} {r['size'][0]}x{r['size'][1]} {r['iterations']} it seed {r['seed']}: " + " | ".join(parts)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bench.add_scene_seed_args(p, Path("/tmp/ensemble_rounds"))
    p.add_argument("--members", type=int, default=3, help="sets per ensemble (the guide's and each round's)")
    p.add_argument("--rounds", type=int, default=2, help="rounds of the loop")
    args = p.parse_args(argv)
    runs = bench.scene_seeds(p, args)
    if args.members < 1 or args.rounds < 1:
        p.error(f"--members and --rounds must be at least 1; got {args.members}, {args.rounds}")
    device = pick_device(args.device)
    reports = []
    for name, size, seed in runs:
        r = run_scene(args.data, name, args.work, size, args.iterations, seed, args.members, args.rounds, device)
        reports.append(r)
        print(summary_line(r), flush=True)
    bench.write_scene_reports(args.out, device, reports)
    return 0


if __name__ == "__main__":
    sys.exit(main())
