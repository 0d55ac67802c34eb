"""Evaluation mode: scores at held-out cameras for three ways to get there.

    (a) ``points``          the initial memory M splatted into the held-out cameras (holes stay black)
    (b) ``gaussians_captures``  Gaussians fitted on the captures alone, from M
    (c) ``gaussians_loop``  the full loop's Gaussians (captures + generated frames, confidence-weighted)
    (+) ``frames``          the loop's generated frames themselves, when the trajectory passes exactly
                            through held-out cameras

Each reports PSNR and SSIM (and LPIPS when its weights are present) against the held-out photos at
the working size, plus time and peak memory per stage. When the held-out views have masks (a
``mask`` per view in scene.json, an alpha channel, DTU's ``mask/``, Middlebury silhouettes), each
also gets ``<key>_masked``: PSNR over the object's pixels and SSIM averaged over them, both images
black outside the mask (the DTU sparse-view protocol scores the object only). (b) and (c) fit with the same settings, so
the difference is what the generated frames bring.

Held-out views come from ``scene.heldout`` or from a protocol of ``../shared/data/README.md``
(:func:`split_protocol`): ``llff`` holds out every 8th capture and trains on 3 of the rest,
``ring`` keeps 3 (or N) views spread around the ring and holds out the others; ``ring-arc`` keeps
3 views 2 ring positions apart and holds out the views between them; ``dtu`` is pixelNeRF's split of
a DTU scan's 49 views (train on 25, 22, 28; score 25 fixed views).

The loop's trajectory (``trajectory_mode``): ``scene`` uses the scene's own trajectory; ``heldout``
makes a closed path through the training and held-out cameras (so it passes through the held-out
poses; their photos are never used); ``interpolate`` a closed path through the training captures
only; ``auto`` is ``scene`` when the scene has a trajectory, else ``heldout``.

Command line: ``reconloop eval`` (``add_eval_arguments`` / ``run_eval``, wired into backend/cli.py).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from . import outputs
from .camera_paths import distinct_poses, order_around, path_through, repeats_a_pose
from .devices import pick_device
from .evaluate_args import DEFAULT_TRAIN_VIEWS, PROTOCOLS, TRAJECTORY_MODES, add_eval_arguments  # noqa: F401
from .generators import Generator
from .loop import LoopConfig, run_loop
from .masks import stack_masks
from .metrics import DATA_RANGE, MSE_FLOOR, best_of_blocks, image_metrics, load_lpips, ssim_map, weighted_l1
from .progress import ProgressFn, ProgressTracker, no_progress
from .scene import Scene, TrajectoryFrame
from .stages.cameras import load_image, load_views, resize_image, to_tensor, undistorted, working_size
from .stages.fit import FitViews, Gaussians, fit_gaussians, render_gaussians
from .stages.guide import fit_guide, render_guide
from .stages.memory import GeometryMemory, build_memory
from .stages.render import render_memory
from .types import Cameras

EVAL_FILE = "eval.json"
EVAL_PICTURE = "eval.png"
LOOP_DIR = "loop"
RING_ARC_STEP = 2  # ring-arc protocol: training views this many ring positions apart
LLFF_HOLDOUT_EVERY = 8  # LLFF protocol: every 8th image is a test view
# DTU sparse-view protocol (pixelNeRF, RegNeRF; a scan's 49 views in order): the first N of the training
# ids train, the test ids are scored, and the 15 views left (the object barely in frame) are neither
DTU_VIEWS = 49
DTU_TRAIN_IDS = (25, 22, 28, 40, 44, 48, 0, 8, 13)
DTU_TEST_IDS = (1, 2, 9, 10, 11, 12, 14, 15, 23, 24, 26, 27, 29, 30, 31, 32, 33, 34, 35, 41, 42, 43, 45, 46, 47)
FRAMES_PER_LEG = 3  # trajectory frames per leg of the path (keys included) in heldout/interpolate modes
PICTURE_ROWS = 4
# frames_guide_oracle: per tile of this side, the frame or the captures-only render, whichever is closer to
# the held-out photo: how much the frames hold that the guide lacks, for a chooser that knew where
ORACLE_BLOCK_PX = 16
# Share of an evaluation's progress bar per part (rough CPU proportions): the baselines, then the loop, whose own
# events (0..1) fill the loop's share. Without baselines the loop has the whole bar.
EVAL_PROGRESS_SHARES = {"load": 0.02, "memory": 0.08, "captures": 0.15, "guide": 0.1, "loop": 0.65}


@dataclass(frozen=True)
class EvalConfig:
    """Attributes:
    loop: the loop's config (working size, fit iterations, ...); default from the scene's settings.
    trajectory_mode: one of TRAJECTORY_MODES (module docstring).
    frames_per_leg: frames per leg of a made path (heldout, interpolate).
    """

    loop: LoopConfig | None = None
    trajectory_mode: str = "auto"
    frames_per_leg: int = FRAMES_PER_LEG

    def check(self) -> None:
        if self.trajectory_mode not in TRAJECTORY_MODES:
            raise ValueError(
                f"EvalConfig.trajectory_mode must be one of {', '.join(TRAJECTORY_MODES)}; got {self.trajectory_mode!r}"
            )
        if self.frames_per_leg < 1:
            raise ValueError(f"EvalConfig.frames_per_leg must be >= 1; got {self.frames_per_leg}")


@dataclass
class LoopStart:
    """What an evaluation with baselines made before its loop, for another evaluation of the same scene,
    working size, memory and guide settings to start its loop from (:func:`evaluate_scene`'s ``start``).
    Two rows of a comparison that differ in the generator or in how the fit weighs the frames then
    differ by that alone, not by a second guide fit as well (on CUDA gsplat's backward is not
    deterministic, so a second fit of the same seed is another guide), and the second row skips the
    guide's fit and the memory's build.

    Attributes:
        memory: the initial memory M, built from the captures.
        notes: the memory's notes (the job log's lines about the geometry).
        guide: the guide's Gaussian sets on the captures alone (empty when the guide is off).
    """

    memory: GeometryMemory | None = None
    notes: list[str] = field(default_factory=list)
    guide: list[Gaussians] = field(default_factory=list)


def split_protocol(
    scene: Scene,
    protocol: str,
    *,
    train_views: int = DEFAULT_TRAIN_VIEWS,
    ring_step: int = RING_ARC_STEP,
    ring_start: int = 0,
) -> Scene:
    """The scene with captures split into training views and held-out views by a standard protocol.

    Args:
        scene: a scene whose captures all have cameras (any held-out views it has are replaced).
        protocol: ``llff``: test on every 8th capture, train on ``train_views`` spread over the rest
            (file order). ``ring``: train on ``train_views`` spread around the whole ring, test on
            all others. ``ring-arc``: train on ``train_views`` views ``ring_step`` ring positions
            apart from ``ring_start``, test on the views between them (interpolation; plane-sweep
            stereo needs neighbours closer than the ~120 degrees of ``ring`` with 3 views). In the
            ring protocols a pose photographed twice is one ring position (``distinct_poses``): the
            later photo is dropped, so no held-out view is a copy of a training view. ``dtu``: the
            sparse-view split of pixelNeRF and RegNeRF on a DTU scan's 49 views (IDR's order): train on
            the first ``train_views`` of :data:`DTU_TRAIN_IDS` (25, 22, 28 for 3), test on
            :data:`DTU_TEST_IDS`; scored on the object alone where the scene has masks.
        train_views: how many captures to train on (>= 1).
    Raises:
        ValueError: naming the field: an unknown protocol, train_views out of the protocol's range, or a
            split that holds no view out.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {', '.join(PROTOCOLS)}; got {protocol!r}")
    if train_views < 1:
        raise ValueError(f"{protocol}: train_views must be >= 1; got {train_views}")
    caps = list(scene.captures)
    if any(c.camera is None for c in caps):
        raise ValueError("split_protocol: every capture needs a camera to be scored")
    n = len(caps)
    if protocol == "dtu":
        if n != DTU_VIEWS:
            raise ValueError(f"dtu: the protocol's view ids index a DTU scan's {DTU_VIEWS} views; the scene has {n}")
        if train_views > len(DTU_TRAIN_IDS):
            raise ValueError(f"dtu: train_views must be in [1, {len(DTU_TRAIN_IDS)}]; got {train_views}")
        train, test = list(DTU_TRAIN_IDS[:train_views]), list(DTU_TEST_IDS)
    elif protocol == "llff":
        rest = [i for i in range(n) if i % LLFF_HOLDOUT_EVERY]
        if train_views > len(rest):
            raise ValueError(f"train_views must be in [1, {len(rest)}] for {n} captures; got {train_views}")
        train = [rest[round(j * (len(rest) - 1) / max(train_views - 1, 1))] for j in range(train_views)]
        test = [i for i in range(n) if i % LLFF_HOLDOUT_EVERY == 0]
    else:
        distinct = distinct_poses([c.camera for c in caps])
        n = len(distinct)
        order = [distinct[i] for i in order_around([caps[i].camera for i in distinct])]
        step = n / train_views if protocol == "ring" else ring_step
        span = round(step * (train_views - 1))
        if train_views > n or span >= n:
            raise ValueError(f"{protocol}: {train_views} views {step:g} apart do not fit a ring of {n}")
        pos = [(ring_start + round(j * step)) % n for j in range(train_views)]
        train = [order[p] for p in pos]
        if protocol == "ring":
            test = [i for i in distinct if i not in train]
        else:
            test = [order[(ring_start + k) % n] for k in range(1, span) if (ring_start + k) % n not in pos]
    # every protocol: a view at a training view's pose is not held out (its score would be memorisation), the
    # import's rule (backend.formats.split_holdout)
    repeats = repeats_a_pose([caps[i].camera for i in train], [caps[i].camera for i in test])
    test = [i for i, r in zip(test, repeats, strict=True) if not r]
    if not test:
        raise ValueError(
            f"--protocol {protocol} with {train_views} training views leaves no held-out view of "
            f"{len(caps)} captures; pick another --train-views"
        )
    return replace(
        scene, captures=[caps[i] for i in sorted(train)], heldout=[caps[i] for i in sorted(test)], trajectory=[]
    )


def eval_trajectory(scene: Scene, mode: str, frames_per_leg: int) -> tuple[list[TrajectoryFrame], dict[int, int]]:
    """The loop's trajectory for evaluation, and which of its indices sit exactly on held-out view i."""
    if mode == "auto":
        mode = "scene" if scene.trajectory else "heldout"
    held_cams = [c.camera for c in scene.heldout]
    if mode == "scene":
        if not scene.trajectory:
            raise ValueError("trajectory_mode 'scene': the scene has no trajectory")
        traj = list(scene.trajectory)
    else:
        train_cams = [c.camera for c in scene.captures]
        keys = train_cams + (held_cams if mode == "heldout" else [])
        size = (keys[0].width, keys[0].height)
        keys = [k.scaled(*size) for k in keys]
        order = order_around(keys)
        path = path_through([keys[i] for i in order], frames_per_leg * len(keys), closed=True)
        traj = [TrajectoryFrame(frame=i + 1, camera=c) for i, c in enumerate(path)]
    on_heldout: dict[int, int] = {}
    for h, cam in enumerate(held_cams):
        for i, t in enumerate(traj):
            if np.allclose(t.camera.w2c, cam.w2c, atol=1e-6):
                on_heldout[h] = i
                break
    return traj, on_heldout


def score(pred: Tensor, truth: Tensor) -> dict[str, float]:
    """Mean PSNR and SSIM (and LPIPS when its weights are here) over views. pred, truth: [C, H, W, 3] in [0, 1]"""
    p, t = pred.clamp(0, 1).float().cpu(), truth.float().cpu()
    return image_metrics(p, t, lpips_fn=load_lpips()).mean()


def masked_score(pred: Tensor, truth: Tensor, masks: Tensor) -> dict[str, float]:
    """Mean PSNR over each view's masked pixels and SSIM averaged over them, with both images black
    outside the mask. pred, truth: [C, H, W, 3] in [0, 1]; masks: bool [C, H, W]

    A view whose mask keeps no pixel (the object outside it, or gone at a small size) has nothing
    to score and is left out of the means; ValueError when every view's is empty."""
    keep = masks.flatten(1).any(1).cpu()  # [C]
    if not keep.any():
        raise ValueError("masked_score: every view's mask is empty; there is no object pixel to score")
    masks, pred, truth = masks.cpu()[keep], pred.cpu()[keep], truth.cpu()[keep]
    m = masks.float()
    p, t = pred.clamp(0, 1).float() * m[..., None], truth.float() * m[..., None]
    count = m.flatten(1).sum(1)  # [C]
    mse = ((p - t) ** 2).flatten(1).sum(1) / (3.0 * count)
    psnr = 10.0 * torch.log10(DATA_RANGE**2 / mse.clamp_min(MSE_FLOOR))
    ssim = (ssim_map(p, t) * m).flatten(1).sum(1) / count
    return {"psnr": float(psnr.mean()), "ssim": float(ssim.mean())}


def heldout_views(scene: Scene, width: int, height: int, device: torch.device | str) -> tuple[Tensor, Cameras]:
    """The scene's held-out photos undistorted and at ``width`` x ``height`` [C, H, W, 3], and their
    pinhole cameras at that size: what every held-out score is taken against."""
    photos, cams = [], []
    for c in scene.heldout:
        img, cam = undistorted(load_image(c.image, capture=c.name), c.camera)
        photos.append(resize_image(img, width, height))
        cams.append(cam)
    return to_tensor(photos, device), Cameras.from_scene(cams, width, height, device=device)


def evaluate_scene(
    scene: Scene,
    out_dir: Path,
    *,
    device: torch.device | str,
    trajectory_mode: str = "auto",
    config: EvalConfig | None = None,
    progress: ProgressFn = no_progress,
    generator: Generator | None = None,
    baselines: bool = True,
    keep: dict[str, Tensor] | None = None,
    start: LoopStart | None = None,
    source: str | Path | None = None,
    source_format: str | None = None,
) -> dict[str, Any]:
    """Score (a) point render, (b) captures-only Gaussians, (c) the full loop at the held-out cameras.

    Args:
        scene: captures to train on and ``heldout`` views (photo + camera) to score against.
        out_dir: writes ``eval.json``, ``eval.png`` (rows: truth | points | captures-only | loop, and
            the generated frames when the trajectory passes every held-out camera) and the loop's
            job folder ``loop/``.
        device: where everything runs.
        trajectory_mode: see the module docstring (overrides ``config.trajectory_mode``).
        config: loop config and path settings.
        progress: gets the evaluation's progress: the baselines' stages (``load``, ``memory``, ``captures``,
            ``guide``; their fits step by step), then the loop's events with their fractions scaled into the rest
            of the bar (may raise :class:`backend.progress.Cancelled`).
        generator: a ready generator for the loop (default: built from the loop config's name).
        baselines: also score (a) and (b); off scores the loop alone (comparing loop variants
            against baselines computed once).
        keep: filled, for analysis, with the tensors at the held-out views the trajectory passes:
            ``truth``, ``frames`` [V, H, W, 3], ``confidence`` [V, H, W], and ``guide`` (the captures-only
            render) when ``baselines``, with ``guide_spread`` [V, H, W] (its sets' colour spread,
            :func:`backend.stages.guide.render_guide`) when the guide has several sets.
        start: with ``baselines``, filled with the memory and guide made here (:class:`LoopStart`);
            without, the loop starts from a start so filled (same scene, size and memory and guide
            settings; checked no further) instead of building its memory and fitting its guide.
        source, source_format: the folder and format the scene was imported from, recorded in eval.json as its
            ``scene`` and ``format`` (default: ``scene.root``, no format): an import's ``scene.root`` is a
            temporary folder (``reconloop eval --format``) gone once the evaluation ends.
    Returns:
        the report written to eval.json.
    """
    cfg = replace(config or EvalConfig(), trajectory_mode=trajectory_mode)
    cfg.check()
    if not scene.heldout:
        raise ValueError(
            "evaluate: the scene has no held-out views; give scene.heldout or use a protocol "
            f"(--protocol {'|'.join(PROTOCOLS)})"
        )
    if any(c.camera is None for c in scene.captures):
        raise ValueError(
            "evaluate: every training capture needs a camera (estimated cameras cannot be scored against held-out poses)"
        )
    device = torch.device(device)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    loop_cfg = cfg.loop or LoopConfig.from_settings(scene.settings, device=device, num_captures=len(scene.captures))
    traj, on_heldout = eval_trajectory(scene, cfg.trajectory_mode, cfg.frames_per_leg)
    W, H = _size(loop_cfg, traj)
    meter = outputs.StageMeter(device)

    truth, held = heldout_views(scene, W, H, device)
    held_masks = stack_masks(scene.heldout, [c.camera for c in scene.heldout], W, H, "cpu", need_pixels=False)

    def add_scores(key: str, pred: Tensor, views: Sequence[int] | None = None) -> None:
        picked = list(range(len(held))) if views is None else list(views)
        report[key] = score(pred, truth[picked])
        if held_masks is not None:
            report[f"{key}_masked"] = masked_score(pred, truth[picked], held_masks[picked])

    report: dict[str, Any] = {
        "scene": str(source if source is not None else scene.root),
        **({"format": source_format} if source_format else {}),
        "train_views": [c.name for c in scene.captures],
        "heldout_views": [c.name for c in scene.heldout],
        "working_size": [W, H],
        "trajectory_mode": cfg.trajectory_mode,
        "trajectory_frames": len(traj),
        "fit_iterations": loop_cfg.fit.iterations,
        "generator": loop_cfg.generator.name,
        "update_memory": loop_cfg.update.enabled,
    }
    columns = [truth]
    # the loop's memory, its notes and its guide, when made here or handed over in ``start``
    memory: GeometryMemory | None = None
    notes: list[str] = []
    guide: list[Gaussians] = []
    shares = EVAL_PROGRESS_SHARES if baselines else {"loop": 1.0}
    track = ProgressTracker(progress, shares)
    # (a) the point memory alone, and (b) Gaussians on the captures alone
    if baselines:
        with meter.measure("load"):
            captures = load_views(scene.captures, W, H, device)
        track.finish("load", f"{len(scene.captures)} captures and {len(held)} held-out views at {W}x{H}")
        # said as it begins: the memory has no steps to show, and takes a while on a CPU
        track.within("memory")(0.0, f"building the point memory from {len(scene.captures)} captures")
        with meter.measure("memory"):
            memory = build_memory(captures, loop_cfg.memory, estimator=loop_cfg.estimator, notes=notes)
            report["memory_notes"] = notes
        with meter.measure("points_render"), torch.no_grad():
            points = render_memory(memory, held, loop_cfg.render).rgb
        add_scores("points", points)
        track.finish("memory", f"initial memory: {len(memory)} points; points PSNR {report['points']['psnr']:.2f}")
        with meter.measure("fit_captures"):
            on_step = track.steps("captures", "Gaussians on the captures", loop_cfg.fit.iterations)
            g_caps = fit_gaussians(FitViews.from_views(captures), memory, loop_cfg.fit, device=device, progress=on_step)
        caps_render = render_gaussians(g_caps, held, loop_cfg.fit)
        report["points_coverage"] = float((points.sum(-1) > 0).float().mean())
        add_scores("gaussians_captures", caps_render)
        track.finish(
            "captures",
            f"{len(g_caps)} Gaussians on the captures alone; PSNR {report['gaussians_captures']['psnr']:.2f}",
        )
        columns += [points, caps_render]
        # the captures-only fit is the guide's first member where the members start from all of M
        guide = [g_caps] if loop_cfg.guide.member_points >= 1.0 else []
        if loop_cfg.guide.enabled and (loop_cfg.guide.members > 1 or not guide):  # the rest, and their render
            with meter.measure("fit_guide"):
                on_step = track.steps("guide", "guide Gaussians on the captures", loop_cfg.fit.iterations)
                guide = fit_guide(
                    captures, memory, loop_cfg.fit, loop_cfg.guide, device=device, ready=guide, progress=on_step
                )
            guide_rgb, _, guide_spread = render_guide(guide, held, loop_cfg.fit, loop_cfg.guide)
            add_scores("guide", guide_rgb)
            track.finish("guide", f"guide: {len(guide)} sets; PSNR {report['guide']['psnr']:.2f}")
        else:
            track.skip("guide")
        if start is not None:
            start.memory, start.notes, start.guide = memory, notes, guide
    elif start is not None:
        if start.memory is None:
            raise ValueError("evaluate: start holds no memory; fill it by an evaluation with baselines first")
        memory, notes, guide = start.memory, start.notes, start.guide

    # (c) the full loop along the evaluation trajectory; its memory and guide are (a)'s and (b)'s when
    # those were made here (the same captures, size and settings)
    loop_scene = replace(scene, trajectory=traj)
    t0 = time.perf_counter()
    result = run_loop(
        loop_scene,
        out_dir / LOOP_DIR,
        device=device,
        progress=track.nested("loop"),  # the loop's bar (0..1) as the rest of the evaluation's
        config=replace(loop_cfg, width=W, height=H),
        generator=generator,
        guide=guide,
        memory=memory,
        memory_notes=notes,
    )
    loop_seconds = time.perf_counter() - t0
    loop_render = render_gaussians(result.gaussians, held, loop_cfg.fit)
    add_scores("gaussians_loop", loop_render)
    report["loop_notes"] = result.metrics["notes"]
    report["timing"] = {
        "baselines": meter.summary(),
        "loop_seconds": round(loop_seconds, 3),
        "loop": result.metrics["timing"],
    }
    columns.append(loop_render)
    if on_heldout:
        hs = sorted(on_heldout)
        picked = [on_heldout[h] for h in hs]  # the trajectory frames at those views
        add_scores("frames", result.frames.images[picked], hs)
        report["frames_views"] = len(hs)
        # the weight the fit gave those frames (mean confidence), beside what they scored, and their
        # mean absolute error per unit of that weight: below the plain mean where the confidence ranks
        # the frames' errors (the fit leans on their right pixels), above it where it does not
        images, conf = result.frames.images[picked].to(truth), result.frames.confidence[picked].to(truth)
        report["frames_confidence"] = float(conf.mean())
        report["frames_l1"] = float((images - truth[hs]).abs().mean())
        report["frames_weighted_l1"] = float(weighted_l1(images, truth[hs], conf)) if conf.sum() > 0 else None
        if keep is not None:
            keep.update(truth=truth[hs], frames=images, confidence=conf)
        if baselines:
            guide_at = caps_render[hs].to(truth).clamp(0, 1)  # tiles chosen on what score() sees
            oracle = best_of_blocks(images.clamp(0, 1), guide_at, truth[hs], ORACLE_BLOCK_PX)
            report["frames_guide_oracle"] = score(oracle, truth[hs])
            if keep is not None:
                keep["guide"] = guide_at
                if len(guide) > 1:
                    keep["guide_spread"] = guide_spread[hs].to(truth)
        if len(hs) == len(held):  # the generated frames at the held-out cameras, last column
            columns.append(result.frames.images[picked])  # hs is then every held-out view, in order
    rows = outputs.overview_rows(columns, outputs.spread(len(held), PICTURE_ROWS))
    outputs.write_overview_as(out_dir, EVAL_PICTURE, rows)
    outputs.write_json(out_dir / EVAL_FILE, report)
    return report


def _size(cfg: LoopConfig, traj: Sequence[TrajectoryFrame]) -> tuple[int, int]:
    w, h, _ = working_size(cfg.width, cfg.height, [t.camera for t in traj])
    return w, h


# ----------------------------------------------------------------------------------------------
# Command line: `reconloop eval` (the parser lives in backend/cli.py)


def scene_for_eval(
    src: Path, fmt: str | None, protocol: str | None, train_views: int, work: Path, **import_options: Any
) -> Scene:
    """Load (or import into ``work``, with the importer's ``import_options``) a scene and apply a
    protocol when asked."""
    from .scene import load_scene

    if fmt:
        from .formats import import_scene

        scene = import_scene(fmt, src, work, **import_options)
    else:
        scene = load_scene(src)
    if protocol:
        scene = split_protocol(scene, protocol, train_views=train_views)
    return scene


def run_eval(args: argparse.Namespace) -> int:
    """Run ``reconloop eval`` from parsed arguments; prints the scores, returns 0.

    ``args.device`` is resolved as ``run`` and ``serve`` resolve theirs (``devices.pick_device``: ``auto``
    is cuda, then mps, then cpu; a bad name is a ValueError naming ``--device``)."""
    from .cli import ProgressBar, budget_for, with_budget

    device = pick_device(args.device)
    with tempfile.TemporaryDirectory(prefix="reconloop-eval-") as work:
        options = {"silhouettes": True} if getattr(args, "silhouettes", False) else {}
        scene = scene_for_eval(args.scene, args.format, args.protocol, args.train_views, Path(work), **options)
        # --size and --iterations are the job's settings, and a time budget (the device's default, as for `run`)
        # plans within them: a scene imported with the default 3000 steps is not three 3000-step fits on a CPU
        settings = scene.settings
        if args.size:
            settings = replace(settings, width=args.size[0], height=args.size[1])
        if args.iterations is not None:
            settings = replace(settings, gaussian_iterations=args.iterations)
        scene = with_budget(replace(scene, settings=settings), budget_for(getattr(args, "budget", None), device))
        loop_cfg = LoopConfig.from_settings(scene.settings, device=device, num_captures=len(scene.captures))
        if args.no_update:
            loop_cfg = replace(loop_cfg, update=replace(loop_cfg.update, enabled=False))
        for name in (EVAL_FILE, EVAL_PICTURE):  # an earlier run's scores must not pass for this one's if it stops
            (Path(args.out) / name).unlink(missing_ok=True)
        with ProgressBar("eval") as bar:  # the baselines, then the loop: minutes on a CPU
            report = evaluate_scene(
                scene,
                args.out,
                device=device,
                trajectory_mode=args.trajectory_mode,
                config=EvalConfig(loop=loop_cfg),
                progress=bar,
                source=Path(args.scene).absolute() if args.format else None,
                source_format=args.format,
            )
    keys = ("points", "gaussians_captures", "guide", "gaussians_loop", "frames", "frames_guide_oracle")
    for key in [k for base in keys for k in (base, f"{base}_masked")]:
        if key in report:
            print(f"{key:20s} " + "  ".join(f"{k} {v:.4f}" for k, v in report[key].items()))
    print(f"wrote {Path(args.out) / EVAL_FILE}")
    return 0
