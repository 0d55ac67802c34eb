"""Can anything the loop sees tell where its frames beat the guide? One `reconloop eval`-style run (the
default loop), then, at the held-out views, per tile: does the frame or the captures-only render (the
guide) come closer to the photo, and how well does each candidate signal, computed without the photo,
rank those tiles (ROC AUC; 0.5 is chance) and what choosing by it would score.

Signals: the frames' confidence (what the fit weighs them by), the frame-guide difference, the guide's and the
frame's detail (mean absolute Laplacian), and with ``--members`` 2 or more the spread of the guide's sets' colours
(where the captures pin none of them down). ``frames_guide_oracle`` (the truth choosing) is the ceiling.

    python scripts/frames_chooser.py --scene temple --size 256x192 --iterations 600 --seed 0 [--members 3]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from bench_loop_quality import SCENES, bench_scene_names, load_bench_scene  # noqa: E402

from backend.evaluate import ORACLE_BLOCK_PX, EvalConfig, evaluate_scene  # noqa: E402
from backend.evaluate_args import size_wxh  # noqa: E402
from backend.loop import LoopConfig  # noqa: E402
from backend.metrics import tile_means  # noqa: E402


def tile_mean(x: Tensor, block: int) -> Tensor:
    """Mean per tile of a per-pixel map, as frames_guide_oracle tiles it. [F, H, W] -> [F * tiles]"""
    return tile_means(x, block).flatten()


def detail(x: Tensor) -> Tensor:
    """Mean absolute Laplacian of the grey image, per pixel. [F, H, W, 3] -> [F, H, W]"""
    kernel = torch.tensor([[0.0, 1, 0], [1, -4, 1], [0, 1, 0]], dtype=x.dtype)[None, None]
    return F.conv2d(F.pad(x.mean(-1)[:, None], (1, 1, 1, 1), mode="replicate"), kernel)[:, 0].abs()


def auc(score: Tensor, positive: Tensor) -> float:
    """ROC AUC of ``score`` for the boolean labels ``positive`` (Mann-Whitney, ties by order)."""
    ranks = torch.empty_like(score)
    ranks[score.argsort()] = torch.arange(len(score), dtype=score.dtype)
    pos, neg = int(positive.sum()), int((~positive).sum())
    if pos == 0 or neg == 0:
        return float("nan")
    return float((ranks[positive].sum() - pos * (pos - 1) / 2) / (pos * neg))


def chooser_table(
    truth: Tensor, guide: Tensor, frames: Tensor, conf: Tensor, block: int, spread: Tensor | None = None
) -> tuple[float, list]:
    """The share of tiles where the frame beats the guide, and per signal (name, AUC, gain in dB over the
    guide when the frames are taken in that signal's top tiles, as many as the frames win), the truth's
    choice (the oracle) last. Images [F, H, W, 3], conf and the guide's sets' spread [F, H, W]."""
    err_g, err_f = tile_mean(((guide - truth) ** 2).mean(-1), block), tile_mean(((frames - truth) ** 2).mean(-1), block)
    wins = err_f < err_g
    share = float(wins.float().mean())
    base = err_g.mean()
    signals = {
        "confidence": tile_mean(conf, block),
        "frame-guide difference": tile_mean((frames - guide).abs().mean(-1), block),
        "guide's detail": tile_mean(detail(guide), block),
        "frame's detail - guide's": tile_mean(detail(frames) - detail(guide), block),
    }
    if spread is not None:
        signals["the guide's sets' spread"] = tile_mean(spread, block)
    rows = []
    for name, s in signals.items():
        picked = s > torch.quantile(s, 1.0 - share) if share > 0 else torch.zeros_like(wins)
        mse = torch.where(picked, err_f, err_g).mean()
        rows.append((name, auc(s, wins), float(10 * torch.log10(base / mse))))
    rows.append(("the truth (oracle)", 1.0, float(10 * torch.log10(base / torch.minimum(err_f, err_g).mean()))))
    return share, rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    p.add_argument("--scene", default="temple", choices=sorted(SCENES))
    p.add_argument("--size", type=size_wxh, default="256x192", metavar="WxH", help="working size")
    p.add_argument("--iterations", type=int, default=600)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--members", type=int, default=None, help="the guide's sets (default: the device's)")
    args = p.parse_args(argv)
    bench_scene_names(p, args.data, args.scene, "--scene")
    W, H = args.size
    with tempfile.TemporaryDirectory(prefix="reconloop-chooser-") as work:
        scene = load_bench_scene(args.data, args.scene, Path(work) / "scene")
        base = LoopConfig.from_settings(scene.settings, device=args.device)
        cfg = replace(base, width=W, height=H, seed=args.seed)
        cfg = replace(cfg, fit=replace(cfg.fit, iterations=args.iterations, seed=args.seed))
        if args.members is not None:
            cfg = replace(cfg, guide=replace(cfg.guide, members=args.members))
        captured: dict[str, Tensor] = {}
        report = evaluate_scene(
            scene,
            Path(work) / "eval",
            device=args.device,
            trajectory_mode="heldout",
            config=EvalConfig(loop=cfg),
            keep=captured,
        )
    w, h = report["working_size"]
    truth, guide, frames, conf = (captured[k].cpu().float() for k in ("truth", "guide", "frames", "confidence"))
    print(
        f"{args.scene} {w}x{h}, {args.iterations} steps, seed {args.seed}: captures only "
        f"{report['gaussians_captures']['psnr']:.2f}, loop {report['gaussians_loop']['psnr']:.2f}, "
        f"frames {report['frames']['psnr']:.2f}, best {ORACLE_BLOCK_PX}-px tiles {report['frames_guide_oracle']['psnr']:.2f}"
    )
    print(
        f"\n| signal ({ORACLE_BLOCK_PX}-px tiles) | AUC for 'the frame wins' | frames where it is highest: dB over the guide |"
    )
    print("| --- | ---: | ---: |")
    spread = captured["guide_spread"].cpu().float() if "guide_spread" in captured else None
    share, rows = chooser_table(truth, guide, frames.clamp(0, 1), conf, ORACLE_BLOCK_PX, spread)
    for name, a, gain in rows:
        print(f"| {name} | {a:.3f} | {gain:+.2f} |")
    print(f"\nthe frames win {share:.0%} of the tiles; the gains pool the tiles' squared error (all views together)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
