"""Loop quality at held-out views: captures-only Gaussians against the full loop, with variants.

On the temple and the fern with 3 captures, the full loop's Gaussians should score a higher PSNR at
held-out cameras than Gaussians fitted on the captures alone. This script runs
``backend.evaluate.evaluate_scene`` once per scene with its baselines (point render, captures-only
Gaussians, the default loop), then the loop alone for each variant (a generator or loop setting
changed), so that every row of a scene is measured in one process against one baseline. With
``--seeds 0,1,2`` every row is run once per fit seed and a summary gives the means and the loop's
gain over the captures-only fit of the same seed: one fit differs from another by 0.1-0.3 dB.

Usage (GPU machine, scenes copied there and never committed; or on CPU at small sizes)::

    python scripts/bench_loop_quality.py --data .device_data --iterations 3000 --seeds 0,1,2 --out $OUT/quality.json
    .venv/bin/python scripts/bench_loop_quality.py --size 160x120 --iterations 150 --device cpu
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from backend.evaluate import EVAL_PICTURE, EvalConfig, evaluate_scene, scene_for_eval  # noqa: E402
from backend.generators.reproject import ReprojectConfig, ReprojectGenerator  # noqa: E402
from backend.loop import LoopConfig  # noqa: E402

# scene folder, format, protocol, default working size (the sizes of the GPU rows in docs/benchmarks.md)
SCENES = {
    "temple": ("middlebury_temple", "middlebury", "ring-arc", (512, 384)),
    "fern": ("llff_fern", "llff", "llff", (504, 378)),
}
# name -> (config patches, ReprojectConfig overrides); "default" is scored with the baselines. A patch is a
# dotted path into LoopConfig ("guide.enabled", "fit.capture_share") and its value: the script patches
# configs, product code keeps no switch for a variant.
VARIANTS: dict[str, tuple[dict, dict]] = {
    "default": ({}, {}),
    "no guide": ({"guide.enabled": False}, {"render_blend": 0.0}),  # AnyRecon's loop: the point render alone
    "guide without blend": ({}, {"render_blend": 0.0}),
    "agreement 0.02": ({}, {"agreement_std": 0.02}),
    "no memory update": ({"update.enabled": False}, {}),
    "capture share 0.7": ({"fit.capture_share": 0.7}, {}),
}


def patched(cfg: Any, path: str, value: Any) -> Any:
    """``cfg`` with the field at dotted ``path`` replaced (frozen dataclasses all the way down)."""
    head, _, rest = path.partition(".")
    return replace(cfg, **{head: patched(getattr(cfg, head), rest, value) if rest else value})


def loop_config(base: LoopConfig, patches: dict) -> LoopConfig:
    for path, value in patches.items():
        base = patched(base, path, value)
    return base


def summarize(runs: dict[str, list[dict]]) -> dict[str, dict[str, float]]:
    """Mean PSNR per variant over seeds: the loop's Gaussians and frames, the baselines (default
    row), and the loop's gain over the captures-only Gaussians of the same seed."""
    base = {r["seed"]: r for r in runs["default"]}
    out: dict[str, dict[str, float]] = {}
    for v, reports in runs.items():
        row: dict[str, float] = {}
        for key in ("points", "gaussians_captures", "gaussians_loop", "frames"):
            vals = [r[key]["psnr"] for r in reports if key in r]
            if vals:
                row[key] = statistics.fmean(vals)
        row["loop_minus_captures"] = statistics.fmean(
            r["gaussians_loop"]["psnr"] - base[r["seed"]]["gaussians_captures"]["psnr"] for r in reports
        )
        out[v] = row
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data", help="folder holding the scenes")
    p.add_argument("--scenes", default="temple,fern", help="comma-separated: " + ", ".join(SCENES))
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated: " + ", ".join(VARIANTS))
    p.add_argument("--size", default=None, metavar="WxH", help="working size for every scene (default: per scene)")
    p.add_argument("--iterations", type=int, default=3000)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--seeds",
        default="0",
        help="comma-separated fit seeds; every row is run once per seed and the "
        "summary gives the mean over seeds (one fit differs from another by a few tenths of a dB)",
    )
    p.add_argument("--pictures", type=Path, default=None, help="keep each run's eval picture in this folder")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    for v in variants:
        if v not in VARIANTS:
            p.error(f"--variants: unknown variant {v!r}; choose from {', '.join(VARIANTS)}")
    if variants[0] != "default":
        variants.insert(0, "default")
    seeds = [int(v) for v in args.seeds.split(",") if v.strip()]
    results: dict = {
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "torch": torch.__version__,
        "iterations": args.iterations,
        "scenes": {},
    }
    for name in (s.strip() for s in args.scenes.split(",")):
        folder, fmt, protocol, size = SCENES[name]
        if args.size:
            size = tuple(int(v) for v in args.size.lower().split("x"))
        with tempfile.TemporaryDirectory(prefix="reconloop-quality-") as work:
            scene = scene_for_eval(args.data / folder, fmt, protocol, 3, Path(work) / "scene")
            base = LoopConfig.from_settings(scene.settings, device=args.device)
            base = replace(base, width=size[0], height=size[1], fit=replace(base.fit, iterations=args.iterations))
            runs: dict[str, list[dict]] = {v: [] for v in variants}
            for seed in seeds:
                seeded = replace(base, seed=seed, fit=replace(base.fit, seed=seed))
                for v in variants:
                    loop_over, gen_over = VARIANTS[v]
                    t0 = time.perf_counter()
                    folder_name = f"{v.replace(' ', '_').replace('/', '_')}_seed{seed}"
                    report = evaluate_scene(
                        scene,
                        Path(work) / folder_name,
                        device=args.device,
                        trajectory_mode="heldout",
                        config=EvalConfig(loop=loop_config(seeded, loop_over)),
                        generator=ReprojectGenerator(ReprojectConfig(**gen_over)),
                        baselines=v == "default",
                    )
                    report["seconds"] = round(time.perf_counter() - t0, 1)
                    report["seed"] = seed
                    runs[v].append(report)
                    if args.pictures:
                        args.pictures.mkdir(parents=True, exist_ok=True)
                        shutil.copy(
                            Path(work) / folder_name / EVAL_PICTURE, args.pictures / f"{name}_{folder_name}.png"
                        )
                    keys = [k for k in ("points", "gaussians_captures", "gaussians_loop", "frames") if k in report]
                    print(
                        f"{name} {size[0]}x{size[1]} {args.iterations} it, seed {seed}, {v}: "
                        + ", ".join(f"{k} {report[k]['psnr']:.2f}/{report[k]['ssim']:.3f}" for k in keys)
                        + f" ({report['seconds']} s)",
                        flush=True,
                    )
            summary = summarize(runs)
            for v, row in summary.items():
                print(
                    f"{name}, mean of {len(seeds)} seeds, {v}: "
                    + ", ".join(f"{k} {val:.2f}" for k, val in row.items()),
                    flush=True,
                )
            results["scenes"][name] = {"size": list(size), "seeds": seeds, "runs": runs, "summary": summary}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
