"""What would better frames be worth to the loop? Its Gaussians with the weight-free generator's frames
against the same loop fed near-perfect frames: the render of Gaussians fitted on every photo of the scene
but the held-out ones (a stand-in for a generator that knew the scene, as a learned prior would come
closer to), both with the same captures, fit settings and seed.

The dense fit never sees a held-out photo; its render at a held-out camera is the best any generator
could be expected to paint there from the scene's other photos, and how much of it reaches the loop's
Gaussians says whether the fit would pass a better generator's gain on. It is analysis, not a job
setting: a user has three photos, not seventeen.

``--choices 1,9`` adds rows where an oracle that knows the dense render picks, per pixel (judged over a
box of that many pixels), the captures' reprojection or the guide's render, the two colours the
weight-free generator blends half and half: what a per-pixel selector could be worth.
``--no-dense`` leaves out the dense frames' own row.
``--mixes 0.25,0.5`` adds rows between the two: frames that are that share of the dense render and the
rest of the weight-free generator's (colour and confidence alike), how good frames must be before the
loop gains a given amount. ``--capture-share 0.3`` fits those rows (not the first, the weight-free
generator's, which stays the reference) with less of the fit's steps on the captures: whether better
frames deserve more of the fit.

    python scripts/frames_ceiling.py --scene fern --size 168x126 --iterations 400 --seed 0   # CPU, a floor
    bash scripts/gpu_runs.sh ceiling fern,temple 0,1,2 0.25,0.5 [--capture-share 0.3]   # H200, the bench's
        sizes, 3000 steps; carry .whlq .gsplat_so .device_data/llff_fern .device_data/middlebury_temple (the
        door: its images and _imported copy); docs/benchmarks.md run 35
    bash scripts/gpu_runs.sh ceiling temple 0,1,2 "" --choices 1,9 --no-dense   # the oracle's rows, run 37
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from bench_loop_quality import SCENES, bench_scene_names, load_bench_scene  # noqa: E402

from backend.evaluate import EvalConfig, LoopStart, evaluate_scene, split_protocol  # noqa: E402
from backend.evaluate_args import size_wxh  # noqa: E402
from backend.generators import Generator, GeneratorCache  # noqa: E402
from backend.generators.reproject import ReprojectConfig, ReprojectGenerator  # noqa: E402
from backend.loop import LoopConfig  # noqa: E402
from backend.scene import Scene  # noqa: E402
from backend.stages.cameras import load_views  # noqa: E402
from backend.stages.fit import FitConfig, FitViews, Gaussians, fit_gaussians, render_gaussians  # noqa: E402
from backend.stages.memory import build_memory  # noqa: E402
from backend.types import ConditionVideo, Frames  # noqa: E402

TRAIN_VIEWS = 3  # as the bench's scenes (load_bench_scene)


class DenseFrames:
    """A generator that renders fixed Gaussians at the segment's cameras, confidence 1 everywhere."""

    def __init__(self, gaussians: Gaussians, fit_cfg: FitConfig) -> None:
        self.gaussians, self.fit_cfg = gaussians, fit_cfg

    def generate(self, cond: ConditionVideo, *, num_steps: int = 1, seed: int = 0, progress=None) -> Frames:
        images = render_gaussians(self.gaussians, cond.targets, self.fit_cfg)  # [F, H, W, 3]
        return Frames(images, torch.ones(images.shape[:3], device=images.device))


class MixedFrames:
    """A generator whose frames are ``share`` of ``dense``'s and the rest of ``base``'s: colours and
    confidences mixed per pixel."""

    def __init__(self, base: Generator, dense: DenseFrames, share: float) -> None:
        self.base, self.dense, self.share = base, dense, share

    def generate(self, cond: ConditionVideo, *, num_steps: int = 1, seed: int = 0, progress=None) -> Frames:
        a = self.base.generate(cond, num_steps=num_steps, seed=seed, progress=progress)
        b = self.dense.generate(cond)
        s = self.share
        return Frames(
            (1.0 - s) * a.images + s * b.images.to(a.images), (1.0 - s) * a.confidence + s * b.confidence.to(a.images)
        )


class ChosenFrames:
    """Frames an oracle picks per pixel from the two things the weight-free generator blends: the captures
    reprojected (``reproject`` without the render's colour) and the guide's render (where it covers),
    whichever is nearer the dense render in mean absolute error over a ``window`` x ``window`` box. The
    confidence is the reprojection's, as the default generator's (its blends leave confidence
    alone), so the row differs from the weight-free one only in how the two colours are combined: the
    limit of a per-pixel selector (what a refiner that only chose could reach)."""

    def __init__(self, dense: DenseFrames, window: int) -> None:
        self.reproject = ReprojectGenerator(ReprojectConfig(render_blend=0.0, guide_blend=0.0, ensemble_blend=0.0))
        self.dense, self.window = dense, window

    def generate(self, cond: ConditionVideo, *, num_steps: int = 1, seed: int = 0, progress=None) -> Frames:
        a = self.reproject.generate(cond)
        truth = self.dense.generate(cond).images.to(a.images)
        guide = cond.renders.rgb.to(a.images)  # [F, H, W, 3]

        def error(x: torch.Tensor) -> torch.Tensor:  # [F, H, W]
            e = (x - truth).abs().mean(-1, keepdim=True).permute(0, 3, 1, 2)
            return torch.nn.functional.avg_pool2d(e, self.window, 1, self.window // 2, count_include_pad=False)[:, 0]

        pick = cond.renders.mask.to(a.images.device) & (error(guide) < error(a.images))
        return Frames(torch.where(pick[..., None], guide, a.images), a.confidence)


def windows(text: str) -> list[int]:
    """``--choices``: comma-separated odd box sizes in pixels."""
    try:
        sizes = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"comma-separated odd whole numbers; got {text!r}") from None
    if bad := [x for x in sizes if x < 1 or x % 2 == 0]:
        raise argparse.ArgumentTypeError(f"each box size odd and >= 1; got {bad}")
    return sizes


def mixes(text: str) -> list[float]:
    """``--mixes``: comma-separated shares of the dense frames, each in (0, 1)."""
    try:
        shares = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"comma-separated numbers in (0, 1); got {text!r}") from None
    if bad := [x for x in shares if not 0.0 < x < 1.0]:
        raise argparse.ArgumentTypeError(f"each share in (0, 1); got {bad}")
    return shares


def capture_share(text: str) -> float:
    """``--capture-share``: a number in [0, 1), as ``FitConfig.capture_share``."""
    try:
        share = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a number in [0, 1); got {text!r}") from None
    if not 0.0 <= share < 1.0:
        raise argparse.ArgumentTypeError(f"a number in [0, 1); got {share}")
    return share


def dense_captures(full: Scene, split: Scene) -> list:
    """Every photo of the scene but the held-out ones (the training captures among them)."""
    held = {c.name for c in split.heldout}
    return [c for c in full.captures if c.name not in held]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    p.add_argument("--scene", default="fern", choices=sorted(SCENES))
    p.add_argument(
        "--size",
        type=size_wxh,
        default=None,
        metavar="WxH",
        help="working size (default: the quality bench's for the scene)",
    )
    p.add_argument("--iterations", type=int, default=400, help="the loop's and the captures-only fit's steps")
    p.add_argument(
        "--dense-iterations", type=int, default=None, help="the dense fit's steps (default: twice --iterations)"
    )
    p.add_argument(
        "--mixes",
        type=mixes,
        default=[],
        metavar="S,S",
        help="rows between the two generators: frames with this share of the dense render (e.g. 0.25,0.5,0.75)",
    )
    p.add_argument(
        "--choices",
        type=windows,
        default=[],
        metavar="N,N",
        help="rows where an oracle picks the reprojection or the guide's render per pixel, judged by the dense "
        "render over an N x N box (e.g. 1,9)",
    )
    p.add_argument("--no-dense", action="store_true", help="leave out the dense frames' own row")
    p.add_argument(
        "--capture-share",
        type=capture_share,
        default=None,
        help="the fit's share of steps on the captures in the rows after the first (default: the fit's own)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    bench_scene_names(p, args.data, args.scene, "--scene")
    W, H = args.size or SCENES[args.scene][3]
    with tempfile.TemporaryDirectory(prefix="reconloop-ceiling-") as work:
        full = load_bench_scene(args.data, args.scene, Path(work) / "scene", split=False)
        scene = split_protocol(full, SCENES[args.scene][2], train_views=TRAIN_VIEWS)
        base = LoopConfig.from_settings(scene.settings, device=args.device)
        cfg = replace(base, width=W, height=H, seed=args.seed)
        cfg = replace(cfg, fit=replace(cfg.fit, iterations=args.iterations, seed=args.seed))

        dense = load_views(dense_captures(full, scene), W, H, args.device)
        dense_fit = replace(cfg.fit, iterations=args.dense_iterations or 2 * args.iterations)
        memory = build_memory(dense, cfg.memory, estimator=cfg.estimator)
        g = fit_gaussians(FitViews.from_views(dense), memory, dense_fit, device=args.device)

        dense_gen = DenseFrames(g, cfg.fit)
        rows: list[tuple[str, Generator | None, bool]] = [
            (f"mix {s:g}", MixedFrames(GeneratorCache().get(cfg.generator, args.device), dense_gen, s), False)
            for s in args.mixes
        ]
        rows += [(f"oracle choice {n} px", ChosenFrames(dense_gen, n), False) for n in args.choices]
        if not args.no_dense:
            rows.append(("dense frames", dense_gen, False))
        share = cfg.fit.capture_share if args.capture_share is None else args.capture_share
        better = replace(cfg, fit=replace(cfg.fit, capture_share=share))  # the rows after the first
        if args.capture_share is not None:
            rows = [(f"{name}, capture share {share:g}", gen, b) for name, gen, b in rows]
        rows.insert(0, (cfg.generator.name, None, True))
        print(
            f"{args.scene} {W}x{H}, {args.iterations} steps (dense fit: {len(dense)} photos, "
            f"{dense_fit.iterations} steps), seed {args.seed}; PSNR at the {len(scene.heldout)} held-out views",
            flush=True,
        )
        caps = None
        start = LoopStart()  # the first row's memory and guide: every row's loop starts from them
        for name, generator, baselines in rows:
            r = evaluate_scene(
                scene,
                Path(work) / name.replace(" ", "_").replace(",", ""),
                device=args.device,
                config=EvalConfig(loop=cfg if baselines else better),
                generator=generator,
                baselines=baselines,
                start=start,
            )
            if caps is None:  # the first row scores the captures-only fit
                caps = r["gaussians_captures"]["psnr"]
                print(
                    f"captures only: {caps:.2f}\n\n| generator | frames | the loop's Gaussians | loop - captures only |"
                )
                print("| --- | --- | --- | ---: |")
            loop = r["gaussians_loop"]["psnr"]
            print(f"| {name} | {r['frames']['psnr']:.2f} | {loop:.2f} | {loop - caps:+.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
