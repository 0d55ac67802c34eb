"""Can one set of Gaussians hold the guide ensemble's gain? The guide's K captures-only sets rendered
as their mean (what the loop's frames take their colour from) against the single set that is their
union, every opacity a made 1 - (1 - a)^(1/K) so that K copies of one Gaussian stacked in place let
as much light through at its centre as the one did (away from the centre the copies stack a little more
opaque: alpha falls off with the Gaussian, and 1 - (1 - a'G)^K > aG for G < 1).

Where the K sets agree, their union draws each surface K times at that opacity: about the members'
own image. Where they disagree, each member's stray Gaussian is drawn at a fraction of its opacity
among the others' surfaces, as the mean of renders shows it at a K-th of its weight. The loop's output
has to be one set (docs/benchmarks.md, run 44: the door's frames 0.67 dB better from the mean moved the
loop's Gaussians by 0.03), so if the union scores as the mean does, a union of sets is a way to give
the user the ensemble's gain. Analysis, not a job setting. Answered on the H200 (run 44): the union
keeps about half of the mean's gain on the temple and the fern and loses 0.5 dB on the door.

    python scripts/guide_union.py --scenes temple --size 192x144 --iterations 400   # CPU, a floor
    bash scripts/gpu_runs.sh union temple,fern,door 0   # H200, the bench's sizes, 3000 steps
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import fields, replace
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

import bench_loop_quality as bench  # noqa: E402

from backend.devices import pick_device  # noqa: E402
from backend.evaluate import score  # noqa: E402
from backend.loop import LoopConfig  # noqa: E402
from backend.stages.fit import Gaussians, render_gaussians  # noqa: E402
from backend.stages.guide import fit_guide, render_guide  # noqa: E402


def union(sets: list[Gaussians], *, thin_opacity: bool = True) -> Gaussians:
    """The K sets as one [sum N_k]; with ``thin_opacity`` each opacity a becomes 1 - (1 - a)^(1/K)."""
    cat = Gaussians(*(torch.cat([getattr(g, f.name) for g in sets]) for f in fields(Gaussians)))
    if not thin_opacity or len(sets) == 1:
        return cat
    a = torch.sigmoid(cat.opacity_logits)
    thinned = 1.0 - (1.0 - a).clamp_min(1e-7) ** (1.0 / len(sets))
    return replace(cat, opacity_logits=torch.logit(thinned.clamp(1e-6, 1.0 - 1e-6)))


def run_scene(
    data: Path, name: str, work: Path, size: tuple[int, int], iterations: int, seed: int, members: int, device: str
) -> dict:
    scene = bench.load_bench_scene(data, name, work / f"{name}_seed{seed}")
    W, H = size
    cfg = LoopConfig.from_settings(scene.settings, device=device, num_captures=len(scene.captures))
    fit = replace(cfg.fit, iterations=iterations, seed=seed)  # the device's rasterizer, from from_settings
    truth, held, captures, memory = bench.heldout_and_memory(scene, cfg, (W, H), device)
    t0 = time.perf_counter()
    sets = fit_guide(captures, memory, fit, replace(cfg.guide, members=members), device=device)
    report: dict = {"scene": name, "size": [W, H], "iterations": iterations, "seed": seed, "members": members}
    report["fit_seconds"] = round(time.perf_counter() - t0, 1)
    report["gaussians"] = [len(g) for g in sets]
    with torch.no_grad():
        member_scores = [score(render_gaussians(g, held, fit), truth) for g in sets]
        report["member_psnr"] = [s["psnr"] for s in member_scores]
        report["mean_of_renders"] = score(render_guide(sets, held, fit, cfg.guide)[0], truth)
        report["union"] = score(render_gaussians(union(sets), held, fit), truth)
        report["union_opacity_kept"] = score(render_gaussians(union(sets, thin_opacity=False), held, fit), truth)
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bench.add_scene_seed_args(p, Path("/tmp/guide_union"))
    p.add_argument("--members", type=int, default=3)
    args = p.parse_args(argv)
    runs = bench.scene_seeds(p, args)
    device = pick_device(args.device)
    reports = []
    for name, size, seed in runs:
        r = run_scene(args.data, name, args.work, size, args.iterations, seed, args.members, device)
        reports.append(r)
        members = " / ".join(f"{v:.2f}" for v in r["member_psnr"])
        print(
            f"{name} {size[0]}x{size[1]} {args.iterations} it seed {seed} ({r['fit_seconds']} s, "
            f"{r['gaussians']} Gaussians): members {members}, mean of renders {r['mean_of_renders']['psnr']:.2f}, "
            f"union {r['union']['psnr']:.2f}, union with opacity kept {r['union_opacity_kept']['psnr']:.2f}",
            flush=True,
        )
    bench.write_scene_reports(args.out, device, reports)
    return 0


if __name__ == "__main__":
    sys.exit(main())
